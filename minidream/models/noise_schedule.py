"""The noise schedule a model was trained with, as its scheduler_config.json states it: `SchedulerConfig` (checked
on load), the presets the official checkpoints ship, and ᾱ_t (`alphas_cumprod`), from which the forward process
(`DDPMProcess`) and every sampler (minidream/sampling) are computed.

DDPM (Ho et al. 2020): β_t rises from beta_start to beta_end over num_train_timesteps steps, ᾱ_t = Π(1 - β_s).
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
    # Lin et al. 2024 (arXiv 2305.08891) §3.1: the betas rescaled so that the last timestep is pure noise, ᾱ_T = 0
    rescale_betas_zero_snr: bool = False
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
        # only the keys the source file had: a missing key means "the class default" to whoever reads it next (a
        # preset's rescale only when set: every class's default is off, and PNDM's has no such key)
        own = {k: getattr(self, k) for k in names if k in self.given} if self.given is not None else \
            {k: getattr(self, k) for k in names if k != "rescale_betas_zero_snr" or self.rescale_betas_zero_snr}
        return {"_class_name": self.class_name, **own, **dict(self.extra)}

    def describe(self) -> str:
        zero = ", zero terminal SNR" if self.rescale_betas_zero_snr else ""
        return f"{self.beta_schedule} betas{zero}, {self.num_train_timesteps} steps, spacing {self.timestep_spacing}"

    def check(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        n = self.num_train_timesteps
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 1):
            raise ValueError(f"num_train_timesteps={n!r} must be an integer > 1")
        if not (number(self.beta_start) and number(self.beta_end) and 0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r} must satisfy "
                             f"0 < start <= end < 1")
        offset = self.steps_offset
        if not (isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset < n):
            raise ValueError(f"steps_offset={self.steps_offset!r} must be an integer in [0, num_train_timesteps)")
        for name in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if not (number(self.clip_sample_range) and self.clip_sample_range > 0):
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r} must be a positive number")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (scaled_linear, linear)")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported (leading, trailing, "
                             f"linspace)")
        trained = dict(self.extra).get("trained_betas")  # betas listed one by one, for training and every sampler
        if trained is not None:
            raise ValueError(f"trained_betas={trained!r} is not supported (a schedule from beta_start, beta_end, "
                             f"beta_schedule)")
        return self


# the schedulers the official checkpoints ship (SD 1.5: PNDM with skip_prk_steps; SD 2.1 768 px: DDIM; SDXL: Euler)
PRESETS = {
    "sd15": SchedulerConfig(class_name="PNDMScheduler", extra=(("skip_prk_steps", True),)),
    "sd21": SchedulerConfig(prediction_type="v_prediction"),
    "sd21-base": SchedulerConfig(class_name="PNDMScheduler", extra=(("skip_prk_steps", True),)),
    "sdxl": SchedulerConfig(class_name="EulerDiscreteScheduler", extra=(
        ("interpolation_type", "linear"), ("sample_max_value", 1.0), ("skip_prk_steps", True),
        ("use_karras_sigmas", False))),
    "tiny": SchedulerConfig(),
    "tiny-xl": SchedulerConfig(class_name="EulerDiscreteScheduler"),
}


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    if config.beta_schedule == "scaled_linear":  # LDM's schedule: linear in √β
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                               dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float32)
    if config.rescale_betas_zero_snr:
        betas = zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift √ᾱ_t so that its last value is 0 (the last timestep sees pure noise, as
    sampling starts from it) and scale it so that its first is kept, then read the betas back off ᾱ_t."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    bar = root ** 2
    alphas = torch.cat([bar[:1], bar[1:] / bar[:-1]])
    return 1 - alphas


def _at(a: torch.Tensor, t, like: torch.Tensor):
    """ᾱ at timesteps t, shaped (B, 1, 1, 1) to multiply a (B, C, H, W) batch."""
    out = a.to(like.device)[torch.as_tensor(t, device=like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


# the timestep draws a DDPM model trains with (--timestep-sampling; "sigma" is the family's own: uniform)
DDPM_SAMPLINGS = ("sigma", "uniform", "sigmoid", "logit_normal")


@dataclass(frozen=True)
class TimestepDraw:
    """Which timesteps training draws, in [low, high) (kohya's --min-timestep/--max-timestep; high None: T):
    - uniform (and "sigma"): t ~ U{low, …, high-1}, Ho et al. 2020, Algorithm 1;
    - logit_normal: u = sigmoid(m + s·z), z ~ N(0, 1) (Esser et al. 2024 eq. 19: more weight mid-way), t = low +
      ⌊u·(high-low)⌋; sigmoid: the same with m = 0 and s = sigmoid_scale."""
    sampling: str = "sigma"
    low: int = 0
    high: int | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0

    def draw(self, n: int, steps: int, generator: torch.Generator, device) -> torch.Tensor:
        high = self.high or steps
        if self.sampling in ("sigma", "uniform"):
            return torch.randint(self.low, high, (n,), generator=generator, device=device)
        z = torch.randn(n, generator=generator, device=device)
        u = torch.sigmoid(self.logit_mean + self.logit_std * z if self.sampling == "logit_normal"
                          else self.sigmoid_scale * z)
        return (self.low + (u * (high - self.low)).long()).clamp(self.low, high - 1)


class DDPMProcess:
    """The forward process of DDPM (Ho et al. 2020, eq. 4), x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, and what training reads off
    it: the regression target (ε, or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 for v-prediction, Salimans & Ho 2022 §4, which SD 2.x
    768 px uses), the signal-to-noise ratio and the loss weights made of it, and the timestep draw."""

    def __init__(self, config: SchedulerConfig, draw: TimestepDraw = TimestepDraw()):
        self.config, self.draw = config.check(), draw
        self.alphas_cumprod = alphas_cumprod(config)

    def draw_timesteps(self, n: int, generator: torch.Generator, device, latent_hw=None) -> torch.Tensor:
        """t for n examples, by the run's draw (uniform over all T unless told otherwise)."""
        return self.draw.draw(n, self.config.num_train_timesteps, generator, device)

    def add_noise(self, x0, noise, t):
        a = _at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def velocity(self, x0, noise, t):
        a = _at(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def target(self, x0, noise, t):
        return noise if self.config.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def snr(self, t):
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t)."""
        a = self.alphas_cumprod.to(torch.as_tensor(t).device)[t]
        return a / (1 - a)

    def noise_ratio(self, t):
        """σ_t = √((1-ᾱ_t)/ᾱ_t), the noise-to-signal ratio of x_t (EDM's σ; infinite at a zero-SNR last step)."""
        return self.snr(t).rsqrt()

    def output(self, pred, z, t):
        """What the prediction is compared with the target as: itself (ε or v)."""
        return pred

    def debiased_weights(self, t):
        """Debiased estimation (Yu et al. 2024, arXiv 2310.08442, as kohya weighs it): 1/√SNR for ε, 1/(SNR+1) for
        v; the SNR clamped to [1e-3, 1000], so that neither end's weight is infinite (kohya clamps the top alone)."""
        snr = self.snr(t).clamp(1e-3, 1000)
        return snr.rsqrt() if self.config.prediction_type == "epsilon" else 1 / (snr + 1)

    def loss_weights(self, t, snr_gamma: float | None = None) -> torch.Tensor | None:
        """Each example's loss weight: min-SNR-γ when asked, else none."""
        return self.min_snr_weights(t, snr_gamma) if snr_gamma else None

    def min_snr_weights(self, t, gamma: float):
        """Min-SNR-γ (Hang et al. 2023, eq. 7-8): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v.
        A zero-terminal-SNR schedule's last timestep has SNR 0, where the ε weight is its limit, 1."""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.config.prediction_type == "epsilon":
            return torch.where(snr > 0, clipped / snr.clamp_min(1e-20), torch.ones_like(snr))
        return clipped / (snr + 1)
