"""An exponential moving average of the trained weights (EMA; Polyak & Juditsky 1992), as diffusers' EMAModel keeps
it: after every --ema-every-th optimizer step, the k-th update

    θ̄ ← d_k θ̄ + (1 - d_k) θ,    d_k = min(D, k / (9 + k)),  d_1 = 0,

so the average starts at the weights after the first update and its warm-up (EMAModel's default) keeps it from
being dominated by the initial weights (a LoRA's zero B) early in a short DreamBooth run. The average is of every
trained tensor (the whole UNet, attention projections, LoRA/DoRA factors and magnitudes, a text encoder, a new
token), in fp32, on the weights' device or the CPU (--ema-device). It lives in the checkpoint (a resumed run is
exact); the exports write it beside the raw weights, in OUT/ema/ (the same formats, the same names); with
--validation-ema the grids are drawn from it.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from minidream.options import Needs, at_least, option

PANEL = "EMA: a moving average of the weights"
NEEDS_EMA = (Needs(lambda c: c.ema_decay is not None, "{flag} is a setting of the moving average: give --ema-decay"),)


def decay_check(v):
    return None if v is None or 0 < v < 1 else f"must be in (0, 1), e.g. 0.999 (got {v})"


@dataclass(frozen=True)
class EMAOptions:
    """The options of the moving average (TrainConfig is made of these too)."""
    ema_decay: float | None = option(None, "Keep an exponential moving average of the trained weights with this "
                                     "decay (e.g. 0.999; diffusers' EMAModel with its warm-up); the exports write it "
                                     "beside the raw weights, in OUT/ema/.", check=decay_check, panel=PANEL,
                                     needs=(Needs(lambda c: not c.fsdp, "{flag}: the average of sharded weights "
                                                  "(--fsdp) is not kept; drop one of them"),))
    ema_every: int = option(1, "Update the moving average every N optimizer steps.", check=at_least(1, 10 ** 8),
                            panel=PANEL,
                            needs=(*NEEDS_EMA, Needs(lambda c: c.epochs or c.ema_every <= c.steps, "{flag} "
                                                     "{cfg.ema_every} is more than the run's --steps: the average "
                                                     "would never be updated")))
    ema_device: str = option("same", "Where the moving average lives: same (the weights' device) or cpu (no "
                             "accelerator memory; a copy each update).", choices=("same", "cpu"), needs=NEEDS_EMA,
                             panel=PANEL, resumable=True)
    validation_ema: bool = option(False, "Draw the validation grids from the moving average's weights.",
                                  panel=PANEL, resumable=True, needs=(*NEEDS_EMA, Needs(
                                      lambda c: c.validation_prompts or c.validation_set, "{flag} draws the grids "
                                      "from the average: give --validation-prompt (or --validation-file)")))


class EMA:
    """The moving average of `named` (name, parameter) pairs."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, every: int = 1,
                 device: str = "same"):
        self.named, self.decay, self.every = named, decay, every
        self.steps = self.updates = 0  # optimizer steps seen, updates made
        self.shadow = {name: p.detach().to("cpu" if device == "cpu" else p.device, torch.float32, copy=True)
                       for name, p in named}

    def current_decay(self) -> float:
        """d_k of the update now being made (k = self.updates)."""
        k = self.updates - 1  # (diffusers counts from the first update after none)
        return 0.0 if k <= 0 else min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def step(self):
        """After an optimizer step: the average updated, every --ema-every-th step."""
        self.steps += 1
        if self.steps % self.every:
            return
        self.updates += 1
        d = self.current_decay()
        for name, p in self.named:
            s = self.shadow[name]
            s.sub_((1 - d) * (s - p.detach().to(s.device, s.dtype)))  # θ̄ - (1-d)(θ̄ - θ) = d θ̄ + (1-d) θ

    @contextmanager
    def applied(self):
        """The trained tensors hold the average inside the block (a validation grid), their own values after."""
        with torch.no_grad():
            own = {name: p.detach().to("cpu", copy=True) for name, p in self.named}  # (no second copy on the GPU)
            for name, p in self.named:
                p.copy_(self.shadow[name])
            try:
                yield
            finally:
                for name, p in self.named:
                    p.copy_(own[name])

    def state_dict(self) -> dict:
        """(The average's own tensors: a checkpoint writes them before the next step changes them.)"""
        return {"steps": self.steps, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, sd: dict):
        if sd["shadow"].keys() != self.shadow.keys():
            raise ValueError("its moving average (--ema-decay) is of other tensors")
        if not all(isinstance(sd[k], int) and sd[k] >= 0 for k in ("steps", "updates")):
            raise ValueError("its moving average's step counts are not counts")
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(sd["shadow"][name])
        self.steps, self.updates = sd["steps"], sd["updates"]


def for_grids(cfg, ema: EMA | None):
    """What a validation grid samples with: the moving average's weights with --validation-ema, else the raw ones."""
    return ema.applied() if cfg.validation_ema and ema is not None else nullcontext()


def averaged(state) -> dict[str, torch.Tensor] | None:
    """The moving average's tensors, for the exports (None without --ema-decay)."""
    return dict(state.ema.shadow) if state.ema is not None else None
