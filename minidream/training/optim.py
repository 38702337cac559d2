"""The optimizer and the learning-rate schedule, each a table whose rows `--optimizer` and `--lr-schedule` offer.

An optimizer row builds the optimizer from the run's parameter groups and settings, and names the state entries
that are shaped like their parameter (a checkpoint's are checked against the parameters when it is restored).
A schedule row is the multiplier of each group's learning rate after the linear warmup.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch

from minidream.training.trainable import Trainable


def adamw(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with the run's betas, epsilon and weight decay; fused: one kernel over all
    tensors, on the CPU and CUDA (the for-loop version was about half of a full-UNet step on the CPU)."""
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, fused=True)


@dataclass(frozen=True)
class Optimizer:
    build: Callable[[list[dict], object], torch.optim.Optimizer]  # (param groups, the run's TrainConfig)
    param_shaped: tuple[str, ...]  # its per-parameter state entries shaped like the parameter
    help: str


OPTIMIZERS = {"adamw": Optimizer(adamw, ("exp_avg", "exp_avg_sq"), "AdamW, fused (--adam-beta1/2, --adam-epsilon, "
                                                                   "--weight-decay)")}


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
    param_groups = [{"params": [p for _, p in trainable.unet], "lr": lr},
                    {"params": [p for _, p in trainable.text_encoder], "lr": cfg.text_encoder_lr or lr},
                    {"params": [p for _, p in trainable.token], "lr": cfg.token_lr, "weight_decay": 0.0}]
    param_groups = [pg for pg in param_groups if pg["params"]]
    opt = OPTIMIZERS[cfg.optimizer].build(param_groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, [pg["lr"] for pg in param_groups]))
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    return opt, sched, scaler
