"""The noise schedule and the samplers, as small classes over ᾱ_t (`alphas_cumprod`).

Forward process (DDPM, Ho et al. 2020, eq. 4): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.
The UNet predicts ε ("epsilon") or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 ("v_prediction", Salimans & Ho 2022, §4),
which SD 2.x (768 px) uses. Samplers: DDIM (Song et al. 2021, eq. 12) and DDPM ancestral sampling.
Timesteps, update rules and random draws follow diffusers' DDIMScheduler / DDPMScheduler so the same
seed gives the same image.
"""
import math
from dataclasses import dataclass, fields

import torch

from minidream import choices


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"  # or "trailing", "linspace"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        n = self.num_train_timesteps
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 1):
            raise ValueError(f"num_train_timesteps={n!r} must be an integer > 1")
        if not (number(self.beta_start) and number(self.beta_end) and 0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r} must satisfy 0 < start <= end < 1")
        if not (isinstance(self.steps_offset, int) and not isinstance(self.steps_offset, bool) and 0 <= self.steps_offset < n):
            raise ValueError(f"steps_offset={self.steps_offset!r} must be an integer in [0, num_train_timesteps)")
        for name in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if not (number(self.clip_sample_range) and self.clip_sample_range > 0):
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r} must be a positive number")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (scaled_linear, linear)")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported (leading, trailing, linspace)")
        return self


PRESETS = {
    "sd15": SchedulerConfig(),
    "sd21": SchedulerConfig(prediction_type="v_prediction"),
    "sd21-base": SchedulerConfig(),
    "tiny": SchedulerConfig(),
}


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    if cfg.beta_schedule == "scaled_linear":  # LDM's schedule: linear in √β
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def _bcast(a: torch.Tensor, t, like: torch.Tensor):
    """ᾱ at timesteps t, shaped (B, 1, 1, 1) to multiply a (B, C, H, W) batch."""
    out = a.to(like.device)[torch.as_tensor(t, device=like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Training side: q(x_t | x_0) and the regression target."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg.check()
        self.alphas_cumprod = alphas_cumprod(cfg)

    def add_noise(self, x0, noise, t):
        a = _bcast(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def velocity(self, x0, noise, t):
        a = _bcast(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def target(self, x0, noise, t):
        return noise if self.cfg.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def snr(self, t):
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), for min-SNR loss weighting (Hang et al. 2023)."""
        a = self.alphas_cumprod.to(torch.as_tensor(t).device)[t]
        return a / (1 - a)


class _Sampler(NoiseSchedule):
    def __init__(self, cfg: SchedulerConfig, eta: float = 0.0):
        """eta scales the fresh noise of stochastic samplers that have a knob for it (DDIM's η)."""
        super().__init__(cfg)
        if eta < 0:
            raise ValueError(f"--eta must be >= 0 (got {eta})")
        self.eta = eta

    def set_timesteps(self, steps: int, device=None):
        if steps < 1:
            raise ValueError(f"--steps must be at least 1 (got {steps})")
        N, c = self.cfg.num_train_timesteps, self.cfg
        if steps > N:
            raise ValueError(f"--steps {steps} exceeds the {N} training timesteps")
        self.num_inference_steps = steps
        if c.timestep_spacing == "leading":
            ts = (torch.arange(steps, dtype=torch.float64) * (N // steps)).round().flip(0) + c.steps_offset
        elif c.timestep_spacing == "trailing":
            ts = torch.arange(N, 0, -N / steps, dtype=torch.float64).round() - 1
        else:
            ts = torch.linspace(0, N - 1, steps, dtype=torch.float64).round().flip(0)
        if ts.max() >= N:  # leading spacing plus steps_offset can step past the last training timestep
            raise ValueError(f"--steps {steps} with this scheduler config reaches timestep {int(ts.max())} >= {N}; use fewer steps")
        self.timesteps = ts.long().to(device)
        return self.timesteps

    def _x0_eps(self, out, t, x, a_t):
        """The model output read as (predicted x_0, predicted ε)."""
        if self.cfg.prediction_type == "epsilon":
            x0 = (x - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
            eps = out
        else:
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
            eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
        if self.cfg.clip_sample:
            r = self.cfg.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def _noise(self, like, generator):
        # Drawn on the generator's device and moved, as diffusers' randn_tensor does, so a CPU
        # generator gives the same numbers whatever device the model runs on.
        dev = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


class DDIM(_Sampler):
    def __init__(self, cfg: SchedulerConfig, eta: float = 0.0):
        super().__init__(cfg, eta)
        # ᾱ "before" the first step: 1 (a clean image) or ᾱ_0, as the checkpoint's config says.
        self.final_alpha = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, out, t: int, x, generator=None):
        t = int(t)
        prev = t - self.cfg.num_train_timesteps // self.num_inference_steps
        # 0-d float32 tensors, so the arithmetic rounds as the reference's does
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        x0, eps = self._x0_eps(out, t, x, a_t)
        # σ_t of DDIM eq. 16: eta=0 is deterministic DDIM, eta=1 matches DDPM's variance.
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * self._noise(out, generator)
        return x_prev


class DDPM(_Sampler):
    def step(self, out, t: int, x, generator=None):
        t = int(t)
        # the next timestep of the schedule (strides are uneven with linspace/trailing spacing)
        ts = self.timesteps.tolist()
        i = ts.index(t)
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        alpha = a_t / a_prev  # one (possibly strided) step's α and β
        beta = 1 - alpha
        x0, _ = self._x0_eps(out, t, x, a_t)
        # Mean of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7.
        x_prev = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # β̃_t, the "fixed_small" variance
            x_prev = x_prev + var ** 0.5 * self._noise(out, generator)
        return x_prev


SAMPLERS = {"ddim": DDIM, "ddpm": DDPM}
assert tuple(SAMPLERS) == choices.SAMPLERS, "choices.SAMPLERS lists the samplers implemented here"


def make_sampler(name: str, cfg: SchedulerConfig, eta: float = 0.0):
    if name not in SAMPLERS:
        raise ValueError(f"--scheduler {name!r} is not one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](cfg, eta)
