"""The noise schedule and the samplers that work on ᾱ_t (`alphas_cumprod`) directly: DDIM, DDPM, PNDM.
The σ-space samplers (Euler, Heun, DPM-Solver++, UniPC) and the table of all samplers are in samplers.py.

Forward process (DDPM, Ho et al. 2020, eq. 4): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.
The UNet predicts ε ("epsilon") or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 ("v_prediction", Salimans & Ho 2022, §4),
which SD 2.x (768 px) uses. Timesteps, update rules and random draws follow diffusers' schedulers so the
same seed gives the same image.
"""
import math
from dataclasses import dataclass, fields, replace

import torch


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
    # The scheduler class the checkpoint ships: `minidream sample`'s default sampler (samplers.default_sampler).
    class_name: str = "DDIMScheduler"
    # Which of the fields above scheduler_config.json set (None: all, as in a preset). A field the file leaves
    # out takes the default of the sampler's diffusers class, as `<Class>.from_config(config)` does (for_class).
    given: tuple | None = None
    # The file's other keys, as (key, value) pairs: options of its class (use_karras_sigmas, algorithm_type, ...).
    extra: tuple = ()

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        names = {f.name for f in fields(cls)} - {"class_name", "given", "extra"}
        own = {k: v for k, v in d.items() if k in names}
        extra = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                             if k not in names and not k.startswith("_")))
        return cls(**own, class_name=d.get("_class_name", "DDIMScheduler"), given=tuple(sorted(own)), extra=extra)

    def for_class(self, defaults: dict) -> "SchedulerConfig":
        """This config as a diffusers class with these constructor defaults would read it."""
        if self.given is None:
            return self
        return replace(self, **{k: v for k, v in defaults.items() if k not in self.given}).check()

    def to_dict(self) -> dict:
        """scheduler_config.json: the class, the fields and the file's other options."""
        names = [f.name for f in fields(self) if f.name not in ("class_name", "given", "extra")]
        # only the keys the source file had: a missing key means "the class default" to whoever reads it next
        own = {k: getattr(self, k) for k in names if self.given is None or k in self.given}
        return {"_class_name": self.class_name, **own, **dict(self.extra)}

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
        extra = dict(self.extra)  # options that change ᾱ_t itself, for training and every sampler
        if extra.get("trained_betas") is not None or extra.get("rescale_betas_zero_snr", False) is not False:
            k = "trained_betas" if extra.get("trained_betas") is not None else "rescale_betas_zero_snr"
            raise ValueError(f"{k}={extra[k]!r} is not supported (a schedule from beta_start, beta_end, beta_schedule)")
        return self


PRESETS = {  # the schedulers the official checkpoints ship (SD 1.5: PNDM with skip_prk_steps; SD 2.1 768 px: DDIM; SDXL: Euler)
    "sd15": SchedulerConfig(class_name="PNDMScheduler", extra=(("skip_prk_steps", True),)),
    "sd21": SchedulerConfig(prediction_type="v_prediction"),
    "sd21-base": SchedulerConfig(class_name="PNDMScheduler", extra=(("skip_prk_steps", True),)),
    "sdxl": SchedulerConfig(class_name="EulerDiscreteScheduler", extra=(
        ("interpolation_type", "linear"), ("sample_max_value", 1.0), ("skip_prk_steps", True), ("use_karras_sigmas", False))),
    "tiny": SchedulerConfig(),
    "tiny-xl": SchedulerConfig(class_name="EulerDiscreteScheduler"),
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


def spacing(cfg: SchedulerConfig, steps: int, solver: bool = False) -> torch.Tensor:
    """The inference timesteps, descending, float64, as diffusers spaces them (the three spacings are compared in
    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). The multistep solvers
    (DPM-Solver, UniPC) space steps + 1 points and drop the last, t = 0 (`solver`)."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {steps})")
    N = cfg.num_train_timesteps
    if steps > N:
        raise ValueError(f"--steps {steps} exceeds the {N} training timesteps")
    n = steps + 1 if solver else steps
    if cfg.timestep_spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (N // n)).round().flip(0)[: steps] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = torch.arange(N, 0, -N / steps, dtype=torch.float64).round() - 1
    else:
        ts = torch.linspace(0, N - 1, n, dtype=torch.float64).flip(0)
        ts = ts.round()[: steps] if solver else ts
    if ts.max() >= N:  # leading spacing plus steps_offset can step past the last training timestep
        raise ValueError(f"--steps {steps} with this scheduler config reaches timestep {int(ts.max())} >= {N}; use fewer steps")
    return ts


class _Sampler(NoiseSchedule):
    init_sigma = 1.0  # standard deviation of the starting noise (σ-space samplers start from x_T = σ_max ε)

    def __init__(self, cfg: SchedulerConfig, eta: float = 0.0):
        """eta scales the fresh noise of stochastic samplers that have a knob for it (DDIM's η)."""
        super().__init__(cfg)
        if eta < 0:
            raise ValueError(f"--eta must be >= 0 (got {eta})")
        self.eta = eta

    def scale_input(self, x):
        """The UNet's input at the current step (σ-space samplers divide by √(σ²+1))."""
        return x

    def set_timesteps(self, steps: int, device=None):
        self.num_inference_steps = steps
        self.timesteps = spacing(self.cfg, steps).round().long().to(device)
        self.i = 0  # index of the next step, for samplers that keep state between steps
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


class PNDM(_Sampler):
    """PNDM's pseudo linear multistep method (Liu et al. 2022, "PLMS"), as SD 1.5 ships it (skip_prk_steps):
    the first step is redone as a second-order (Heun-like) step, then Adams-Bashforth over up to four ε."""

    def set_timesteps(self, steps: int, device=None):
        ts = super().set_timesteps(steps, device).tolist()
        # the UNet runs twice at t_1: once to redo the first step, once for the second
        self.timesteps = torch.tensor(ts[:1] + ts[1:2] + ts[1:], device=device)
        self.eps, self.first_x = [], None
        return self.timesteps

    def step(self, out, t: int, x, generator=None):
        t, stride = int(t), self.cfg.num_train_timesteps // self.num_inference_steps
        prev = t - stride  # diffusers steps a fixed stride, whatever the spacing
        if self.i != 1:
            self.eps = self.eps[-3:] + [out]
        else:  # redo step 0 from its start with the mean of both ε (t is step 1's time)
            prev, t = t, t + stride
        if self.i == 0:
            e, self.first_x = out, x
        elif self.i == 1:
            e, x = (out + self.eps[-1]) / 2, self.first_x
        else:  # Adams-Bashforth coefficients of order 2, 3, 4
            E = self.eps[::-1]
            e = ((3 * E[0] - E[1]) / 2 if len(E) == 2 else (23 * E[0] - 16 * E[1] + 5 * E[2]) / 12 if len(E) == 3
                 else (55 * E[0] - 59 * E[1] + 37 * E[2] - 9 * E[3]) / 24)
        self.i += 1
        return self._transfer(x, t, prev, e)

    def _transfer(self, x, t, prev, e):
        """PNDM's transfer part φ: x_t -> x_prev along the DDIM path for the combined output e."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else (torch.tensor(1.0) if self.cfg.set_alpha_to_one else self.alphas_cumprod[0])
        if self.cfg.prediction_type == "v_prediction":
            e = a_t ** 0.5 * e + (1 - a_t) ** 0.5 * x
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e / denom
