"""What a training step regresses and how it weighs the error: the options of the objective (`Objective`, which
`TrainConfig` is made of), and the pieces of the step they choose, each one row here:

- the noise: Gaussian, with an offset (Guttenberg 2023) or multi-resolution ("pyramid") noise, and input
  perturbation (Ning et al. 2023): the latent is noised by ε + γ·ξ while the target keeps ε;
- the timesteps: the process's draw (noise_schedule.TimestepDraw; flow_matching.Density for the flow models);
- the loss of each latent cell (`LOSSES`): L2, L1, pseudo-Huber or smooth L1, with Huber's c per example by
  `HUBER_SCHEDULES`;
- each example's weight: min-SNR-γ, debiased estimation (DDPM) or the flow density's.

step.py's `training_step` calls them in this order; the model's forward process (noise_schedule.DDPMProcess,
flow_matching.FlowProcess) supplies ᾱ_t or σ.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minidream.models.flow_matching import DENSITIES, SAMPLINGS
from minidream.models.noise_schedule import DDPM_SAMPLINGS
from minidream.options import (Needs, at_least, finite, in_range, non_negative, option, optional, optional_at_least,
                               positive_number)
from minidream.sampling.pipeline import MAX_GUIDANCE
from minidream.sampling.samplers import zero_snr_schedule

PANEL = "Objective: noise, timesteps, loss"
TIMESTEP_SAMPLINGS = tuple(dict.fromkeys(SAMPLINGS + DDPM_SAMPLINGS))  # the flow families' and DDPM's


# ---------------------------------------------------------------------------------------------
# The loss of each latent cell, of d = prediction - target (kohya's conditional_loss): c is Huber's threshold

def _l2(d, c):
    return d.square()


def _l1(d, c):
    return d.abs()


def _huber(d, c):
    """Pseudo-Huber (Charbonnier): 2c(√(d² + c²) - c), ≈ d² near 0 and 2c|d| far from it (Khrapov et al. 2024)."""
    return 2 * c * ((d.square() + c * c).sqrt() - c)


def _smooth_l1(d, c):
    """The pseudo-Huber loss divided by c: ≈ d²/c near 0, 2|d| far from it."""
    return 2 * ((d.square() + c * c).sqrt() - c)


LOSSES = {"l2": _l2, "l1": _l1, "huber": _huber, "smooth-l1": _smooth_l1}
HUBER = ("huber", "smooth-l1")  # the losses that read c


# Huber's c of each example from the run's --huber-c (c0) and its timestep (kohya's --huber_schedule): constant; from
# 1 at t = 0 down to c0 at t = T, exponentially; or by the noise ratio σ_t: (1 - c0)/(1 + σ_t)² + c0
HUBER_SCHEDULES = {
    "constant": lambda process, t, c0: torch.full(t.shape, c0),
    "exponential": lambda process, t, c0: torch.exp(math.log(c0) * t.float() / process.config.num_train_timesteps),
    "snr": lambda process, t, c0: (1 - c0) / (1 + process.noise_ratio(t).float()) ** 2 + c0,
}


@dataclass(frozen=True)
class Objective:
    """The options of the training objective (the first of TrainConfig's fields; `minidream train --help` shows them
    in a panel of their own)."""
    snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (e.g. 5); DDPM models (SD 1.x/2.x/XL).",
                                     check=positive_number, panel=PANEL)
    weighting_scheme: str | None = option(None, "Rectified-flow models (SD3, Flux): how training draws the noise "
                                          "level and weighs its loss (Esser et al. 2024 §3.1; diffusers' names); "
                                          "default: as diffusers' script for the family (SD3 logit_normal, Flux "
                                          "none).", choices=DENSITIES, panel=PANEL)
    logit_mean: float = option(0.0, "Mean of the logit-normal's normal (--weighting-scheme or --timestep-sampling "
                               "logit_normal).", check=finite, panel=PANEL)
    logit_std: float = option(1.0, "Standard deviation of the logit-normal's normal.", check=positive_number,
                              panel=PANEL)
    mode_scale: float = option(1.29, "Scale of --weighting-scheme mode.", check=finite, panel=PANEL)
    precondition_outputs: bool | None = option(None, "Rectified-flow models: regress x0 = z - sigma v on the image "
                                               "latents rather than v on noise - x0; default: as diffusers' script "
                                               "for the family (SD3 yes, Flux no).",
                                               flag="--precondition-outputs/--no-precondition-outputs", panel=PANEL)
    timestep_sampling: str = option("sigma", "How training draws the noise level. sigma: the family's own (DDPM: t "
                                    "uniform; flow: by --weighting-scheme, diffusers'). uniform; sigmoid (sigmoid of "
                                    "N(0, 1) x --sigmoid-scale); DDPM: logit_normal (by --logit-mean/--logit-std); "
                                    "flow (kohya's --timestep_sampling, sigma drawn itself): shift (sigmoid's, "
                                    "shifted by --discrete-flow-shift), flux_shift (shifted by the image's size).",
                                    choices=TIMESTEP_SAMPLINGS, panel=PANEL)
    sigmoid_scale: float = option(1.0, "Scale of --timestep-sampling sigmoid/shift/flux_shift's normal draw.",
                                  check=in_range(1e-3, 100), panel=PANEL, needs=(Needs(
                                      lambda c: c.timestep_sampling in ("sigmoid", "shift", "flux_shift"),
                                      "{flag} scales --timestep-sampling sigmoid, shift or flux_shift's draw"),))
    discrete_flow_shift: float = option(3.0, "The shift of --timestep-sampling shift (kohya's; 3.1582 is common for "
                                        "Flux).", check=in_range(1e-3, 100), panel=PANEL, needs=(Needs(
                                            lambda c: c.timestep_sampling == "shift",
                                            "{flag} is the shift of --timestep-sampling shift"),))
    guidance_scale: float | None = option(None, "Flux.1 [dev]: the guidance scale its guidance embedding is fed "
                                          "while training (diffusers' and kohya's --guidance_scale); default 3.5.",
                                          check=optional(in_range(0, MAX_GUIDANCE)), panel=PANEL)
    loss_type: str = option("l2", "Loss of each latent cell: l2, l1, huber (pseudo-Huber), smooth-l1 (kohya's "
                            "--loss_type).", choices=LOSSES, panel=PANEL)
    huber_c: float = option(0.1, "Huber's threshold c (--loss-type huber/smooth-l1).", check=in_range(1e-4, 1),
                            panel=PANEL, needs=(Needs(lambda c: c.loss_type in HUBER, "{flag} is the threshold of "
                                                      "--loss-type huber or smooth-l1"),))
    huber_schedule: str = option("snr", "How c follows the timestep: constant, exponential (1 at t = 0 to c at T), "
                                 "snr (by the noise ratio, kohya's default).", choices=HUBER_SCHEDULES, panel=PANEL,
                                 needs=(Needs(lambda c: c.loss_type in HUBER, "{flag} schedules the threshold of "
                                              "--loss-type huber or smooth-l1"),))
    debiased_estimation: bool = option(False, "DDPM models: weigh each example's loss by 1/sqrt(SNR) (1/(SNR+1) for "
                                       "v-prediction), as kohya's --debiased_estimation_loss.", panel=PANEL)
    min_timestep: int = option(0, "DDPM models: the smallest timestep training draws.", check=non_negative,
                               panel=PANEL)
    max_timestep: int | None = option(None, "DDPM models: draws stay below this timestep; default: the schedule's "
                                      "length (1000).", check=optional_at_least(1), panel=PANEL)
    zero_terminal_snr: bool = option(False, "DDPM models: train on the schedule rescaled to zero SNR at its last "
                                     "timestep (Lin et al. 2024; kohya's --zero_terminal_snr); the exports sample by "
                                     "it (trailing timesteps). Best with v-prediction.", panel=PANEL)
    noise_offset: float = option(0.0, "Noise offset (e.g. 0.05); DDPM models.", check=non_negative, panel=PANEL)
    multires_noise_iterations: int = option(0, "DDPM models: multi-resolution (pyramid) noise of this many levels "
                                            "(kohya's; 6-10 is usual); 0: off.", check=at_least(0, 16), panel=PANEL,
                                            needs=(Needs(lambda c: not c.noise_offset, "{flag} and --noise-offset are "
                                                         "two ways to vary low frequencies: give one"),))
    multires_noise_discount: float = option(0.3, "Weight of each coarser level of --multires-noise-iterations "
                                            "(discount^i).", check=in_range(0, 1), panel=PANEL,
                                            needs=(Needs(lambda c: c.multires_noise_iterations > 0, "{flag} weighs "
                                                         "--multires-noise-iterations' levels"),))
    input_perturbation: float = option(0.0, "Noise the latent by eps + gamma*xi while the target keeps eps (Ning et "
                                       "al. 2023; diffusers' --input_perturbation, e.g. 0.1).",
                                       check=in_range(0, 1), panel=PANEL)


# the settings of one forward process, refused on a model trained by the other (their defaults: not given)
FLOW_ONLY = ("weighting_scheme", "mode_scale", "precondition_outputs", "discrete_flow_shift")
# min-SNR, debiased estimation and the timestep range need DDPM's ᾱ_t; offset and pyramid noise mend DDPM's
# never-pure noise, as zero terminal SNR does
DDPM_ONLY = ("snr_gamma", "debiased_estimation", "min_timestep", "max_timestep", "zero_terminal_snr", "noise_offset",
             "multires_noise_iterations")


def schedule_problem(o: Objective, flow: bool, steps: int) -> tuple[str, str] | None:
    """(option, what is wrong) with the timestep draw for a model of `steps` training timesteps, or None."""
    own = SAMPLINGS if flow else DDPM_SAMPLINGS
    if o.timestep_sampling not in own:
        other = "DDPM models (SD 1.x/2.x/XL)" if flow else "rectified-flow models (SD3, Flux)"
        return "timestep_sampling", f"{o.timestep_sampling} is for {other}; this model takes {', '.join(own)}"
    if o.max_timestep is not None and o.max_timestep > steps:
        return "max_timestep", f"must be at most the schedule's {steps} timesteps (got {o.max_timestep})"
    if o.min_timestep >= (o.max_timestep or steps):
        return "min_timestep", f"must be below {o.max_timestep or steps} (--max-timestep) (got {o.min_timestep})"
    for name, default in (("logit_mean", 0.0), ("logit_std", 1.0)):  # DDPM reads them in its logit-normal draw only
        if not flow and getattr(o, name) != default and o.timestep_sampling != "logit_normal":
            return name, "shapes --timestep-sampling logit_normal's draw on a DDPM model: give that too, or drop it"
    return None


def trained_schedule(schedule, o: Objective):
    """The noise schedule the run trains on, and so the trained model samples by: the base's, rescaled to zero
    terminal SNR when the run trains into it (--zero-terminal-snr). The step, the grids and the exports read it."""
    return zero_snr_schedule(schedule) if o.zero_terminal_snr else schedule


# ---------------------------------------------------------------------------------------------
# The step's pieces

def draw_noise(o: Objective, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """ε for a batch (on the generator's device): Gaussian, plus the offset or pyramid noise the run asks for."""
    dev = generator.device
    noise = torch.randn(shape, generator=generator, device=dev)
    if o.noise_offset:  # (Guttenberg 2023) lets the model shift mean brightness
        noise = noise + o.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=dev)
    if o.multires_noise_iterations:
        noise = multires_noise(noise, generator, o.multires_noise_iterations, o.multires_noise_discount)
    return noise


def multires_noise(noise: torch.Tensor, generator: torch.Generator, levels: int, discount: float) -> torch.Tensor:
    """kohya's pyramid noise (after Whitaker 2023): level i adds Gaussian noise on a grid r^i times coarser
    (r ~ U[2, 4) per level), upsampled bilinearly and weighted by discount^i, until a 1-cell grid; the sum is scaled
    back to unit standard deviation. Low frequencies so vary more than white noise lets them."""
    B, C, H, W = noise.shape
    for i in range(levels):
        r = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        h, w = max(1, int(H / r ** i)), max(1, int(W / r ** i))
        coarse = torch.randn((B, C, h, w), generator=generator, device=generator.device)
        noise = noise + F.interpolate(coarse, size=(H, W), mode="bilinear") * discount ** i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def example_weights(process, t: torch.Tensor, o: Objective) -> torch.Tensor | None:
    """Each example's loss weight: the process's (min-SNR-γ; a flow density's), times debiased estimation's."""
    w = process.loss_weights(t, o.snr_gamma)
    if o.debiased_estimation:
        d = process.debiased_weights(t)
        w = d if w is None else w * d
    return w


def cell_loss(process, t: torch.Tensor, o: Objective):
    """The loss of each latent cell as a function of d = prediction - target, for examples at timesteps t."""
    loss = LOSSES[o.loss_type]
    if o.loss_type not in HUBER:
        return lambda d: loss(d, None)
    c = HUBER_SCHEDULES[o.huber_schedule](process, t, o.huber_c)
    return lambda d: loss(d, c.to(d).reshape(-1, *([1] * (d.ndim - 1))))
