"""The optimizer and the learning-rate schedule, each a table whose rows `--optimizer` and `--lr-schedule` offer.

An optimizer row builds the optimizer from the run's parameter groups and settings, names the state entries that are
shaped like their parameter (a checkpoint's are checked against the parameters when it is restored), the optional
package it needs (checked before any work), the learning rate it is used with when --lr is not given, and whether it
can step one parameter at a time inside backward (--fused-backward: fused_backward.py).
A schedule row is the multiplier of each group's learning rate after the linear warmup.
"""
import contextlib
import importlib
import importlib.util
import io
import math
from dataclasses import dataclass
from typing import Callable

import torch

from minidream.options import one_of
from minidream.training.trainable import Trainable


def adamw(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with the run's betas, epsilon and weight decay; fused: one kernel over all
    tensors, on the CPU and CUDA (the for-loop version was about half of a full-UNet step on the CPU)."""
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, fused=True)


def adamw8bit(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW with both moments stored in 8 bits, block-wise quantized (Dettmers et al. 2022, arXiv 2110.02861):
    2 bytes of optimizer state per parameter instead of 8. bitsandbytes' kernels, the ones kohya's and diffusers'
    scripts use (tensors under 4096 elements keep 32-bit moments, as bitsandbytes decides)."""
    bnb = importlib.import_module("bitsandbytes")  # installed: check_optimizer said
    return bnb.optim.AdamW8bit(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                               weight_decay=cfg.weight_decay)


def adafactor(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): the second moment of a matrix kept as its row and column
    means (factored), no first moment, so almost no optimizer state. torch's version scales each update by the
    parameter's RMS (at least 1e-3): --lr is relative to the weights' size."""
    return torch.optim.Adafactor(param_groups, beta2_decay=cfg.adafactor_beta2_decay,
                                 weight_decay=cfg.weight_decay, foreach=False)


def prodigy(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, arXiv 2306.06101): Adam whose step size d is estimated as it trains,
    used with --lr 1 (a multiplier of d). prodigyopt, by its authors."""
    prodigyopt = importlib.import_module("prodigyopt")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        return prodigyopt.Prodigy(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay, d_coef=cfg.prodigy_d_coef,
                                  use_bias_correction=cfg.prodigy_bias_correction,
                                  safeguard_warmup=cfg.prodigy_safeguard_warmup)


@dataclass(frozen=True)
class Optimizer:
    build: Callable[[list[dict], object], torch.optim.Optimizer]  # (param groups, the run's TrainConfig)
    param_shaped: tuple[str, ...]  # its per-parameter state entries shaped like the parameter
    help: str
    package: str | None = None  # the optional package it needs (import name = the pip extra's name)
    extra: str | None = None  # minidream's extra that installs it
    lr: float | None = None  # every group's learning rate when --lr (--text-encoder-lr, --token-lr) is not given
    per_parameter: bool = True  # each parameter's update depends on its own gradient only: --fused-backward works
    one_lr: bool = False  # one learning rate for every group (--text-encoder-lr and --token-lr refused)
    evolving: tuple[str, ...] = ("lr",)  # group settings it changes as it trains (the others are the run's)


OPTIMIZERS = {
    "adamw": Optimizer(adamw, ("exp_avg", "exp_avg_sq"), "AdamW, fused (--adam-beta1/2, --adam-epsilon, "
                                                         "--weight-decay)"),
    "adamw8bit": Optimizer(adamw8bit, ("state1", "state2"), "AdamW with 8-bit moments, a quarter of AdamW's state "
                           "(bitsandbytes: pip install 'minidream[bnb]'; same settings as adamw)",
                           package="bitsandbytes", extra="bnb"),
    "adafactor": Optimizer(adafactor, (), "Adafactor, factored second moments, almost no state (torch's; its --lr is "
                           "relative to each weight's RMS: try 1e-4 to 1e-3; --adafactor-beta2-decay, "
                           "--weight-decay)"),
    "prodigy": Optimizer(prodigy, ("exp_avg", "exp_avg_sq"), "Prodigy, Adam that finds its own step size; "
                         "--lr defaults to 1 (prodigyopt: pip install 'minidream[prodigy]'; --prodigy-d-coef, "
                         "--prodigy-bias-correction, --prodigy-safeguard-warmup, the AdamW settings)",
                         package="prodigyopt", extra="prodigy", lr=1.0, per_parameter=False, one_lr=True,
                         evolving=("lr", "d", "d_max", "d_numerator", "d_denom", "d_hat", "k")),
}


def check_optimizer(name: str) -> str | None:
    """The check of --optimizer: one of the table's, and its package installed (else the command that installs it)."""
    wrong = one_of(tuple(OPTIMIZERS))(name)
    row = OPTIMIZERS.get(name)
    if wrong or row.package is None or importlib.util.find_spec(row.package) is not None:
        return wrong
    return f"{name} needs the {row.package} package: pip install 'minidream[{row.extra}]'"


def polynomial(done: float, lr0: float, power: float) -> float:
    """(1 - progress)^power from the group's lr down to 1e-7, as a multiplier of lr0."""
    lr_end = min(1e-7, lr0)
    return ((lr0 - lr_end) * (1 - done) ** power + lr_end) / lr0 if lr0 > 0 else 1.0


# the multiplier after warmup, of the fraction `done` of the steps after warmup (diffusers' get_scheduler curves)
LR_SCHEDULES = {
    "constant": lambda done, lr0, power: 1.0,
    "cosine": lambda done, lr0, power: 0.5 * (1 + math.cos(math.pi * done)),  # half a period, to 0
    "linear": lambda done, lr0, power: 1.0 - done,  # to 0
    "polynomial": polynomial,
}


def lr_lambdas(cfg, base_lrs: list[float]):
    """One multiplier per parameter group: linear warmup, then the schedule. Warmup starts at 1/warmup rather
    than 0, so the first step is not wasted."""
    curve = LR_SCHEDULES[cfg.lr_schedule]

    def make(lr0: float):
        def f(step):
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
            return curve(done, lr0, cfg.lr_power)
        return f
    return [make(lr0) for lr0 in base_lrs]


def make_optimizer(cfg, trainable: Trainable, device: torch.device):
    """The optimizer over the trainable groups (each its own learning rate; no weight decay on a new token), the
    LR schedule, and for fp16 a gradient scaler."""
    lr = cfg.unet_lr
    param_groups = [{"params": [p for _, p in trainable.denoiser], "lr": lr},
                    {"params": [p for _, p in trainable.text_encoder],
                     "lr": lr if OPTIMIZERS[cfg.optimizer].one_lr else cfg.text_encoder_lr or lr},
                    {"params": [p for _, p in trainable.token], "lr": cfg.new_token_lr, "weight_decay": 0.0}]
    param_groups = [pg for pg in param_groups if pg["params"]]
    opt = OPTIMIZERS[cfg.optimizer].build(param_groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, [pg["lr"] for pg in param_groups]))
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    return opt, sched, scaler
