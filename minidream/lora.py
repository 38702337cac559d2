"""LoRA (Hu et al. 2021): W x + (α/r)·B A x with A (r × in), B (out × r), B = 0 at the start, so a
freshly adapted model is exactly the base model. Functions here transform a loaded model; the model
files know nothing about LoRA.

File formats written and read:
- diffusers / PEFT: `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight` (α/r folded into B,
  so the file needs no alpha and loads at scale 1 anywhere);
- kohya (A1111, ComfyUI): `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  text encoder modules as `lora_te_text_model_<...>`.
"""
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from minidream.files import read_weights

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


def diffusers_lora_state_dict(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, m in loras(model).items() if model is not None else []:
            sd[f"{prefix}.{name}.lora_A.weight"] = m.lora_down.weight.detach().float()
            sd[f"{prefix}.{name}.lora_B.weight"] = m.lora_up.weight.detach().float() * m.scale
    return sd


def kohya_lora_state_dict(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
        for name, m in loras(model).items() if model is not None else []:
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = m.lora_down.weight.detach().float()
            sd[f"{key}.lora_up.weight"] = m.lora_up.weight.detach().float()
            sd[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return sd


def _lora_deltas(sd: dict[str, torch.Tensor], file) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module name) -> ΔW from either file format."""
    deltas = {}
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in sd):
        return _kohya_deltas(sd, file)
    for k in sd:
        m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora_A\.weight", k)
        if m:
            b = sd.get(k.replace("lora_A", "lora_B"))
            if b is None:
                raise ValueError(f"{file}: {k} has no matching lora_B")
            if b.ndim != 2 or sd[k].ndim != 2 or b.shape[1] != sd[k].shape[0]:
                raise ValueError(f"{file}: {k} and its lora_B ({list(sd[k].shape)}, {list(b.shape)}) are not a linear LoRA pair")
            name = m[2].removeprefix("text_model.")
            deltas[(m[1], name)] = b.float() @ sd[k].float()
    if not deltas:
        raise ValueError(f"{file}: no LoRA weights found (expected diffusers `unet.*.lora_A.weight` or kohya `lora_unet_*` keys)")
    return deltas


def _kohya_deltas(sd, file):
    deltas = {}
    for k in sd:
        if not k.endswith(".lora_down.weight"):
            continue
        stem = k[: -len(".lora_down.weight")]
        comp = "unet" if stem.startswith("lora_unet_") else "text_encoder"
        flat = stem.removeprefix("lora_unet_").removeprefix("lora_te_text_model_").removeprefix("lora_te_")
        if f"{stem}.lora_up.weight" not in sd:
            raise ValueError(f"{file}: {k} has no matching {stem}.lora_up.weight; the file is incomplete")
        down, up = sd[k].float(), sd[f"{stem}.lora_up.weight"].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{file}: {stem} is a {down.ndim}-d (convolution / LoCon) or mismatched adapter "
                             f"({list(down.shape)} and {list(up.shape)}); only linear LoRA layers load here")
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else down.shape[0]
        deltas[(comp, flat)] = up @ down * (alpha / down.shape[0])
    return deltas


def load_lora(model, file: Path, scale: float = 1.0):
    """Merge a LoRA file into a loaded StableDiffusion's UNet (and text encoder) weights."""
    deltas = _lora_deltas(read_weights(Path(file)), file)
    targets = {"unet": model.unet, "text_encoder": model.text_encoder}
    # kohya names flatten dots to underscores; index our module names the same way to find them
    flat = {comp: {n.replace(".", "_"): n for n, _ in targets[comp].named_modules()} for comp in targets}
    for (comp, name), delta in deltas.items():
        name = flat[comp].get(name.replace(".", "_"))
        lin = targets[comp].get_submodule(name) if name else None
        if not isinstance(lin, nn.Linear) or lin.weight.shape != delta.shape:
            raise ValueError(f"{file}: LoRA module {comp}:{name} does not match this model")
        with torch.no_grad():
            lin.weight += (scale * delta).to(lin.weight.dtype)
    return model
