"""LoRA (Hu et al. 2021): W x + (α/r)·B A x with A (r × in), B (out × r), B = 0 at the start, so a
freshly adapted model is exactly the base model. Functions here transform a loaded model; the model
files know nothing about LoRA. The files LoRA is saved in and read from are formats/lora_files.py.
"""
import math
import re

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))).to(x.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        """(α/r)·B A: what the adapter adds to the base weight."""
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, pattern: re.Pattern, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every Linear whose name matches `pattern` (e.g. trainable.UNET_ATTENTION); only the adapters
    require grad."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1 (got {rank})")
    out = {}
    linears = {n: m for n, m in model.named_modules() if pattern.fullmatch(n) and isinstance(m, nn.Linear)}
    for name, lin in linears.items():
        lin.requires_grad_(False)
        out[name] = LoRALinear(lin, rank, alpha)
        _replace(model, name, out[name])
    return out


def loras(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrapper: a plain model again."""
    for name, m in loras(model).items():
        with torch.no_grad():
            m.base.weight += m.delta().to(m.base.weight.dtype)
        _replace(model, name, m.base)
    return model
