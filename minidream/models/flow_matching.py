"""Rectified flow, the forward process of SD3 (Esser et al. 2024, §2-3), and its schedule as the model's
scheduler_config.json states it (`FlowConfig`, diffusers' FlowMatchEulerDiscreteScheduler).

The noisy latent is the straight line between data and noise, z_σ = (1 - σ) x_0 + σ ε for σ in [0, 1] (eq. 3
with a_t = 1 - t, b_t = t); the network predicts its velocity dz/dσ = ε - x_0 (eq. 6's target), and sampling
integrates that ODE from σ = 1 (pure noise) to 0. The timestep the network sees is t = 1000 σ.

SD3 spends more steps at high noise at its resolution by a shift of every σ (§5.3.2, "resolution-dependent
shifting", eq. 23): σ' = s σ / (1 + (s - 1) σ), s = 3 for SD3 and SD3.5. Flux.1 [dev] makes the shift depend on the
image's size when it samples (`use_dynamic_shifting`): σ' = e^μ / (e^μ + 1/σ - 1), the same map with s = e^μ, μ
linear in the image's token count from base_shift at 256 tokens to max_shift at 4096; it trains unshifted.
"""
import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class FlowConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    class_name: str = "FlowMatchEulerDiscreteScheduler"
    given: tuple | None = None  # which fields the file set (None: all, as in a preset)
    extra: tuple = ()  # the file's other keys, (key, value) pairs: options of its class
    # how its pipeline spaces the sampling σ before the shift: the training levels' timesteps evenly (SD3), or
    # σ = linspace(1, 1/n, n) (Flux's pipeline passes these); set by the loader, never in the file
    pipeline_sigmas: bool = False

    prediction_type = "flow"  # the network predicts the velocity ε - x_0

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        names = {"num_train_timesteps", "shift"}
        own = {k: v for k, v in d.items() if k in names}
        if "flow_shift" in d and "shift" not in d:  # the multistep solvers' name for it (with use_flow_sigmas)
            own["shift"] = d["flow_shift"]
        extra = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                             if k not in names and not k.startswith("_")))
        return cls(**own, class_name=d.get("_class_name", cls.class_name), given=tuple(sorted(own)), extra=extra)

    def for_class(self, defaults: dict) -> "FlowConfig":
        return self  # one flow class family, one set of defaults (ours are diffusers')

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name in ("num_train_timesteps", "shift")}
        return {"_class_name": self.class_name, **own, **dict(self.extra)}

    def describe(self) -> str:
        shift = "shift by image size (mu)" if self.dynamic else f"shift {self.shift:g}"
        return f"rectified flow, {self.num_train_timesteps} steps, {shift}"

    def check(self):
        n = self.num_train_timesteps
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 1):
            raise ValueError(f"num_train_timesteps={n!r} must be an integer > 1")
        s = self.shift
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0):
            raise ValueError(f"shift={s!r} must be a positive number")
        extra = dict(self.extra)  # options that change the σ levels themselves, for training and every sampler
        for key, plain in (("invert_sigmas", False), ("shift_terminal", None), ("time_shift_type", "exponential")):
            if extra.get(key, plain) not in (plain, 0):
                raise ValueError(f"{key}={extra[key]!r} is not supported (a constant shift: {key}={plain})")
        for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
            v = extra.get(key, 1)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"{key}={v!r} must be a number")
        if self.dynamic and extra.get("max_image_seq_len", 4096) == extra.get("base_image_seq_len", 256):
            raise ValueError("max_image_seq_len must differ from base_image_seq_len (the shift is linear between)")
        return self

    @property
    def dynamic(self) -> bool:
        """The shift depends on the image's size (Flux.1 [dev]); `shift` is then unused."""
        return bool(dict(self.extra).get("use_dynamic_shifting", False))

    def mu(self, tokens: int) -> float:
        """μ for an image of `tokens` tokens: linear from base_shift at base_image_seq_len tokens to max_shift at
        max_image_seq_len (diffusers' calculate_shift, with FluxPipeline's defaults)."""
        o = dict(self.extra)
        x0, x1 = o.get("base_image_seq_len", 256), o.get("max_image_seq_len", 4096)
        y0, y1 = o.get("base_shift", 0.5), o.get("max_shift", 1.15)
        m = (y1 - y0) / (x1 - x0)
        return tokens * m + (y0 - m * x0)


_FLUX_SHIFT = (("base_image_seq_len", 256), ("base_shift", 0.5), ("max_image_seq_len", 4096), ("max_shift", 1.15))
PRESETS = {"sd3": FlowConfig(),
           "flux-dev": FlowConfig(shift=3.0, extra=(*_FLUX_SHIFT, ("use_dynamic_shifting", True)),
                                  pipeline_sigmas=True),
           "flux-schnell": FlowConfig(shift=1.0, extra=(*_FLUX_SHIFT, ("use_dynamic_shifting", False)),
                                      pipeline_sigmas=True)}


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s σ / (1 + (s - 1) σ) (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shifted(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^μ / (e^μ + 1/σ - 1): eq. 23's shift with s = e^μ (Flux's resolution-dependent shift)."""
    e = math.exp(mu)
    return e / (e + (1 / sigmas - 1))


def training_sigmas(config: FlowConfig) -> torch.Tensor:
    """The N shifted noise levels training draws from, descending: σ_i = shift(i / N) for i = N … 1 (diffusers'
    scheduler.sigmas, which train_dreambooth_lora_sd3.py indexes); unshifted where the shift is dynamic (Flux
    [dev], as train_dreambooth_lora_flux.py indexes them)."""
    N = config.num_train_timesteps
    sigmas = torch.linspace(1, N, N, dtype=torch.float32).flip(0) / N
    return sigmas if config.dynamic else shifted(sigmas, config.shift)


@dataclass(frozen=True)
class Density:
    """How training draws σ and weighs each draw's loss (§3.1, as diffusers' SD3 scripts name the choices):
    - logit_normal: σ = sigmoid(u), u ~ N(mean, std) (eq. 19; the paper's best, "rf/lognorm(0.00, 1.00)");
    - mode: u ~ U(0,1) mapped by 1 - u - s·(cos²(πu/2) - 1 + u) (eq. 20, heavier in the middle for s > 0);
    - cosmap: σ uniform, each loss weighted 2 / (π(1 - 2σ + 2σ²)) (eq. 21's density as a weight);
    - sigma_sqrt: σ uniform, each loss weighted σ⁻²;
    - none: σ uniform, unweighted.
    The draw u in [0, 1) picks one of the N shifted training levels, as diffusers indexes its scheduler.

    kohya's `timestep_sampling` draws σ itself instead, continuous (`sampling`; "sigma": by the scheme; the loss is
    weighted by the scheme either way, as there):
    - uniform: σ ~ U(0, 1); sigmoid: σ = sigmoid(s·z), z ~ N(0, 1), s = sigmoid_scale (as x-flux);
    - shift: that σ shifted by eq. 23 with s = discrete_flow_shift;
    - flux_shift: that σ shifted by the image's size, as Flux samples (μ from its packed token count)."""
    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition: bool = True  # regress x̂_0 = z_σ - σ·v on x_0 (EDM-style; diffusers' --precondition_outputs)
    sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0

    def continuous(self, n: int, generator: torch.Generator, device, latent_hw: tuple[int, int]) -> torch.Tensor:
        """kohya's σ draws (`sampling` other than "sigma")."""
        if self.sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        sigma = torch.sigmoid(self.sigmoid_scale * torch.randn(n, generator=generator, device=device))
        if self.sampling == "shift":
            return shifted(sigma, self.discrete_flow_shift)
        if self.sampling == "flux_shift":  # Flux's μ for (h/2)(w/2) tokens: 0.5 at 256, 1.15 at 4096
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            return time_shifted(sigma, 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256))
        return sigma

    def draw(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        if self.scheme == "logit_normal":
            u = torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator, device=device)
            return torch.sigmoid(u)
        u = torch.rand(n, generator=generator, device=device)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def weights(self, sigma: torch.Tensor) -> torch.Tensor | None:
        if self.scheme == "sigma_sqrt":
            return sigma.float() ** -2.0
        if self.scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)).float()
        return None


DENSITIES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")  # kohya's --timestep_sampling


class FlowProcess:
    """The forward process training reads: z_σ, the regression target, σ drawn per example by the density, each
    example's loss weight, and (preconditioned) the x̂_0 the prediction is read as."""

    def __init__(self, config: FlowConfig, density: Density = Density()):
        self.config, self.density = config.check(), density
        self.sigmas = training_sigmas(config)

    def sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        s = (torch.as_tensor(t, device=like.device) / self.config.num_train_timesteps).to(like.dtype)
        return s.reshape(-1, *([1] * (like.ndim - 1)))

    def draw_timesteps(self, n: int, generator: torch.Generator, device,
                       latent_hw: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """t = 1000 σ for σ at the drawn level (or drawn itself, kohya's way): the timestep the network sees."""
        if self.density.sampling != "sigma":
            return self.density.continuous(n, generator, device, latent_hw) * self.config.num_train_timesteps
        u = self.density.draw(n, generator, device)
        i = (u * self.config.num_train_timesteps).long().clamp(0, self.config.num_train_timesteps - 1)
        return self.sigmas.to(device)[i] * self.config.num_train_timesteps

    def add_noise(self, x0, noise, t):
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def output(self, pred, z, t):
        """What the prediction is compared with the target as: the velocity, or preconditioned x̂_0 = z - σ v."""
        return z - self.sigma(t, z) * pred if self.density.precondition else pred

    def target(self, x0, noise, t):
        return x0 if self.density.precondition else noise - x0

    def noise_ratio(self, t):
        """σ/(1-σ), the noise-to-signal ratio of z_σ (the analogue of DDPM's √((1-ᾱ)/ᾱ); infinite at σ = 1)."""
        s = torch.as_tensor(t).float() / self.config.num_train_timesteps
        return s / (1 - s)

    def loss_weights(self, t, snr_gamma: float | None = None) -> torch.Tensor | None:
        return self.density.weights(torch.as_tensor(t) / self.config.num_train_timesteps)
