"""LoRA (Hu et al. 2021): W x + (α/r)·B A x with A (r × in), B (out × r), B = 0 at the start, so a
freshly adapted model is exactly the base model. On a convolution (LoCon) A is a convolution with the base's kernel,
stride and padding into r channels and B a 1×1 convolution out of them, as kohya's LoCon and PEFT build it.

DoRA (Liu et al. 2024, weight-decomposed LoRA) splits the adapted weight into a magnitude and a direction (eq. 5):
W' = m ⊙ (W + ΔW) / ||W + ΔW||_c, with ||·||_c the norm of each output row (output channel) and m a trained
vector, initialised to ||W||_c so that W' = W at the start. The norm is treated as a constant in backward (their
section 4.3), as PEFT does.

Functions here transform a loaded model; the model files know nothing about LoRA. The files LoRA is saved in and
read from are formats/lora_files.py and formats/lora_export.py.
"""
import math
from contextlib import contextmanager
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class AdapterSpec:
    """How each adapter is built: rank and α for linear layers and 1×1 convolutions, conv_rank and conv_alpha for
    larger kernels (kohya's --conv_dim/--conv_alpha), dropout on the adapter's input (PEFT's lora_dropout), DoRA."""
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int = 4
    conv_alpha: float = 4.0
    dropout: float = 0.0
    dora: bool = False

    def rank_alpha(self, base: nn.Module) -> tuple[int, float]:
        big_kernel = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
        return (self.conv_rank, self.conv_alpha) if big_kernel else (self.rank, self.alpha)


def ending(*parts: str) -> re.Pattern:
    """Module names that end in one of `parts` (regular expressions)."""
    return re.compile(rf".*\.({'|'.join(parts)})$")


@dataclass(frozen=True)
class TargetSet:
    """A --lora-targets / --text-encoder-targets choice: the modules it adapts (Linear or Conv2d, by name)."""
    pattern: re.Pattern
    help: str


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """||W||_c: the norm of each output row (a convolution's output channel), shape (out,); an all-zero row counts
    as tiny, not 0 (its magnitude starts at 0 and m / ||W||_c stays finite)."""
    return w.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


class LoRA(nn.Module):
    """An adapter around one nn.Linear or nn.Conv2d (`base`, frozen)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        # where the base lives, read without its weight (a quantized one would be made dense for it)
        device = next(t.device for t in (*base.parameters(recurse=False), *base.buffers(recurse=False)))
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, device=device)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # DoRA's m, shaped like the base's bias (one per output row), starting at ||W||_c
        self.magnitude = nn.Parameter(row_norm(base.weight.detach().float())) if dora else None
        self.enabled = True  # off: the base layer alone (adapters_off)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter(self, x):
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        xd = self.dropout(x)
        if self.magnitude is None:
            return y + self.adapter(xd).to(y.dtype) * self.scale
        # DoRA as PEFT computes it: g = m / ||W + ΔW||_c (the norm detached), then g ⊙ (W x + ΔW x) + bias, written
        # as y + (g - 1) ⊙ W x + g ⊙ ΔW x so that the base's own output (bias included) is used as it is
        with torch.no_grad():
            norm = row_norm(self.base.weight.float() + self.delta())
        g = (self.magnitude / norm).to(y.dtype)
        g = g.view(-1, 1, 1) if isinstance(self.base, nn.Conv2d) else g
        same_input = isinstance(self.dropout, nn.Identity) or not self.training  # no dropout: W x is y - bias
        plain = y - self._bias(y) if same_input else self._no_bias(xd)
        return y + (g - 1) * plain + g * self.adapter(xd).to(y.dtype) * self.scale

    def _bias(self, y):
        b = self.base.bias
        if b is None:
            return 0
        return b.to(y.dtype).view(-1, 1, 1) if isinstance(self.base, nn.Conv2d) else b.to(y.dtype)

    def _no_bias(self, x):
        if isinstance(self.base, nn.Conv2d):
            return self.base._conv_forward(x, self.base.weight, None)
        if hasattr(self.base, "without_bias"):  # a quantized base: its weight made dense for this call only
            return self.base.without_bias(x)
        return F.linear(x, self.base.weight)

    def delta(self) -> torch.Tensor:
        """(α/r)·B A in the base weight's shape (fp32): what the adapter adds to the weight's direction."""
        up, down = self.lora_up.weight.float().flatten(1), self.lora_down.weight.float().flatten(1)
        with torch.autocast(up.device.type, enabled=False):  # fp32 even inside the step's autocast (DoRA's norm)
            return ((up @ down) * self.scale).reshape(self.base.weight.shape)

    def merged(self) -> torch.Tensor:
        """The adapted weight (fp32): W + ΔW, or for DoRA m ⊙ (W + ΔW) / ||W + ΔW||_c."""
        w = self.base.weight.float() + self.delta()
        if self.magnitude is None:
            return w
        g = self.magnitude.float() / row_norm(w)
        return w * g.view(-1, *[1] * (w.dim() - 1))


@contextmanager
def adapters_off(*networks: nn.Module):
    """The networks as they were before their adapters (LoRA, DoRA) were added, inside the block: what the base model
    predicts, for a prior taken from the model itself (training/step.py)."""
    adapters = [m for net in networks for m in net.modules() if isinstance(m, LoRA)]
    for m in adapters:
        m.enabled = False
    try:
        yield
    finally:
        for m in adapters:
            m.enabled = True


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, names: list[str], spec: AdapterSpec) -> dict[str, LoRA]:
    """Wrap each named nn.Linear / nn.Conv2d of `model` in an adapter; only the adapters require grad."""
    if spec.rank < 1 or spec.conv_rank < 1:
        raise ValueError(f"--lora-rank and --conv-rank must be >= 1 (got {spec.rank}, {spec.conv_rank})")
    out = {}
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name} is a {type(base).__name__}, not a Linear or Conv2d")
        if isinstance(base, nn.Conv2d) and (base.groups, base.dilation, base.padding_mode) != (1, (1, 1), "zeros"):
            raise TypeError(f"{name}: a grouped, dilated or non-zero-padded convolution has no LoCon adapter here")
        base.requires_grad_(False)
        out[name] = LoRA(base, *spec.rank_alpha(base), spec.dropout, spec.dora)
        _replace(model, name, out[name])
    return out


def loras(model: nn.Module) -> dict[str, LoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRA)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrapper: a plain model again."""
    for name, m in loras(model).items():
        with torch.no_grad():
            m.base.weight.copy_(m.merged().to(m.base.weight.dtype))
        _replace(model, name, m.base)
    return model
