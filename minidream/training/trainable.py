"""What DreamBooth trains: functions that select (or add) the trainable parts of a loaded model, one row per
`--train` mode in `MODES`.

`--train unet` unfreezes the whole UNet, `attention` the Q/K/V/out projections of every attention layer, `lora`
wraps those projections in adapters (models/lora.py; --lora-targets widens them, --lora-blocks picks stages);
`--train-text-encoder` and `--train-token` add the text encoder (or its adapters) and a new token row
(models/new_token.py) — for SDXL in both text encoders (pivotal tuning, as diffusers' advanced SDXL script: the new
token gets a row in each). Everything else stays frozen, and
`cast_frozen` may put only the frozen tensors in half precision: what trains keeps its exact fp32 values.
"""
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from minidream.models import lora
from minidream.models.lora import AdapterSpec, TargetSet, ending
from minidream.models.stable_diffusion import FAMILIES, StableDiffusion, t5_dtype
from minidream.models.new_token import add_token, learned_tokens
from minidream.models.quantize import QuantizedLinear
from minidream.training import TrainError


# the text encoders' (CLIP's, in every family): q/k/v/out of each self-attention layer, or those and the MLP
TEXT_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
TEXT_ATTENTION = ending(TEXT_ATTN)
TEXT_MLP = r"mlp\.(fc1|fc2)"
TEXT_TARGETS = {
    "attn": TargetSet(TEXT_ATTENTION, "q/k/v/out of every self-attention layer"),
    "attn-mlp": TargetSet(ending(TEXT_ATTN, TEXT_MLP), "and the MLP (fc1, fc2) of every layer"),
}
# the denoiser's are its family's (FAMILIES' lora_targets); the CLI offers the names and describes the UNet's
UNET_TARGETS = FAMILIES["sd1"].lora_targets


def block_prefix(net: nn.Module, block: str) -> str:
    """A --lora-blocks entry as a module-name prefix: a stage the denoiser names (down.1 -> down_blocks.1., mid ->
    mid_block., up.0 -> up_blocks.0.: its `blocks()`); anything else is taken as a prefix of its own (diffusers)
    module names."""
    stages = net.blocks()
    return stages[block][0] if block in stages else block.rstrip(".") + "."


def check_blocks(v: str | None) -> str | None:
    if v is None:
        return None
    entries = [b.strip() for b in v.split(",")]
    if not all(entries) or not all(re.fullmatch(r"[a-z_0-9.]+", b) for b in entries):
        return (f"{v!r}: give stages as down.N, mid, up.N (or UNet module prefixes; SD3: block numbers; Flux: "
                f"double.N, single.N), separated by commas")
    return None


@dataclass(frozen=True)
class Adapters:
    """What LoRA adapts and how (--lora-* options): the target sets, the UNet stages, the adapters' shape."""
    spec: AdapterSpec = AdapterSpec()
    targets: str = "attn"  # the denoiser's (--lora-targets)
    text_encoder: str = "attn"
    blocks: str | None = None  # comma-separated --lora-blocks entries; None: every stage

    def denoiser_modules(self, net: nn.Module, targets: dict[str, TargetSet]) -> list[str]:
        """The modules --lora-targets names in this denoiser (`targets`: its family's sets), in --lora-blocks."""
        names = _matching(net, targets[self.targets].pattern)
        if self.blocks is None:
            return names
        picked = []
        for block in (b.strip() for b in self.blocks.split(",")):
            prefix = block_prefix(net, block)
            inside = [n for n in names if n.startswith(prefix) or n == prefix[:-1]]
            if not inside:
                raise TrainError(f"--lora-blocks {block}: no --lora-targets {self.targets} module of this denoiser is "
                                 f"in it (its blocks: {', '.join(net.blocks())})")
            picked += inside
        picked = set(picked)
        return [n for n in names if n in picked]


def _matching(net: nn.Module, pattern: re.Pattern) -> list[str]:
    return [n for n, m in net.named_modules() if pattern.fullmatch(n) and isinstance(m, (nn.Linear, nn.Conv2d))]


def unfreeze(net: nn.Module, adapters: Adapters, targets: dict | None = None):
    net.requires_grad_(True)


def unfreeze_attention(net: nn.Module, adapters: Adapters, targets: dict[str, TargetSet]):
    for name in _matching(net, targets["attn"].pattern):
        net.get_submodule(name).requires_grad_(True)


def denoiser_lora(net: nn.Module, adapters: Adapters, targets: dict[str, TargetSet]) -> dict[str, lora.LoRA]:
    return lora.add_lora(net, adapters.denoiser_modules(net, targets), adapters.spec)


def text_encoder_lora(net: nn.Module, adapters: Adapters) -> dict[str, lora.LoRA]:
    return lora.add_lora(net, _matching(net, TEXT_TARGETS[adapters.text_encoder].pattern), adapters.spec)


@dataclass(frozen=True)
class Mode:
    denoiser: Callable  # (denoiser, Adapters, its family's target sets): unfreezes or adds what trains in it
    text_encoder: Callable  # the same for each text encoder, with --train-text-encoder
    lr: float  # the default learning rate (AdamW)
    save_as: tuple[str, ...]  # the default export formats
    help: str
    adapters: bool = False  # it trains adapters, which the adapter export formats write


# Learning rates: the whole UNet needs a small step to keep the prior (diffusers' DreamBooth default); the attention
# projections alone tolerate a few times more; LoRA adapters start at zero and need ~1e-4. The text encoder, when
# trained, uses the same rate as the UNet part unless --text-encoder-lr says otherwise. Exports: a whole model, or
# for LoRA the adapter files the other tools load.
MODES = {
    "unet": Mode(unfreeze, unfreeze, 5e-6, ("diffusers",), "whole UNet"),
    "attention": Mode(unfreeze_attention, unfreeze, 2e-5, ("diffusers",), "Q/K/V/out of every attention layer"),
    "lora": Mode(denoiser_lora, text_encoder_lora, 1e-4, ("lora-diffusers", "lora-kohya"),
                 "LoRA adapters on those (or --lora-targets)", adapters=True),
}


@dataclass
class Trainable:
    """The parameters a run trains, by group (each has its learning rate), named as in the checkpoints."""
    denoiser: list[tuple[str, nn.Parameter]]  # named as its diffusers component ("unet.…", "transformer.…")
    text_encoder: list[tuple[str, nn.Parameter]]  # both SDXL encoders in one group (one learning rate)
    token: list[tuple[str, nn.Parameter]]  # the new token's rows

    def groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {"unet": self.denoiser, "text_encoder": self.text_encoder, "token": self.token}

    def named(self) -> list[tuple[str, nn.Parameter]]:
        return [*self.denoiser, *self.text_encoder, *self.token]

    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named()]

    @property
    def t5_row(self) -> bool:
        """The new token has a row in T5 that trains (--train-token-t5)."""
        return any(name.startswith("text_encoder_3.") for name, _ in self.token)


def select_trainable(model: StableDiffusion, mode: str, adapters: Adapters = Adapters(),
                     train_text_encoder: bool = False, token: str | None = None, init_word: str | None = None,
                     token_vectors: int = 1, token_t5: bool = False) -> Trainable:
    """Freeze everything, then unfreeze (or add) what --train / --train-text-encoder / --train-token(-t5) ask for."""
    encoders = [(name, te) for name, _, te in model.text_encoders()]
    for m in model.networks():
        m.requires_grad_(False)
    row = MODES[mode]
    row.denoiser(model.denoiser, adapters, model.family.lora_targets)
    for _, te in encoders if train_text_encoder else ():
        row.text_encoder(te, adapters)
    if token:
        add_token(model, token, init_word, token_vectors, t5=token_t5)
    trainable = Trainable([], [], [])
    for name, p in model.denoiser.named_parameters():
        if p.requires_grad:
            trainable.denoiser.append((f"{model.family.denoiser}.{name}", p))
    for prefix, te in encoders:
        for name, p in te.named_parameters():
            if p.requires_grad:
                group = trainable.token if name.endswith("token_embedding.new") else trainable.text_encoder
                group.append((f"{prefix}.{name}", p))
    if token and token_t5:  # T5 learns the token's row, nothing else (it is never trained)
        trainable.token.append(("text_encoder_3.shared.new", model.text_encoder_3.shared.new))
    return trainable


def print_summary(trainable: Trainable, model: StableDiffusion):
    encoders = [te for _, _, te in model.text_encoders()]
    total = {"unet": [model.denoiser], "text_encoder": encoders,
             "token": list(learned_tokens(model).values()) or [te.embeddings.token_embedding for te in encoders]}
    print(f"{'component':<14}{'trainable':>14}{'of':>16}{'tensors':>9}", file=sys.stderr)
    for name, params in trainable.groups().items():
        n = sum(p.numel() for _, p in params)
        of = sum(weights(m) for m in total[name])
        label = model.family.denoiser if name == "unet" else name  # the UNet's group is any denoiser's
        print(f"{label:<14}{n:>14,}{of:>16,}{len(params):>9}", file=sys.stderr)


def weights(net: nn.Module) -> int:
    """The network's weight count: its parameters, and the weights its quantized layers keep as buffers."""
    quantized = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in net.parameters()) + quantized


def cast_frozen(model: StableDiffusion, dtype: torch.dtype):
    """Frozen weights (and floating buffers) to `dtype` for speed and memory; trainable parameters keep
    their fp32 values untouched (master weights), so nothing that trains starts from rounded values.
    The exports never read these rounded copies: they start again from the base file (training/export.py)."""
    for m in model.networks():
        to = t5_dtype(dtype) if m is model.text_encoder_3 else dtype  # T5 overflows fp16
        for p in m.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(to)
        for part in m.modules():
            kept = getattr(part, "kept", ())  # a quantized layer's stored bits and scales (models/quantize.py)
            for name, b in part.named_buffers(recurse=False):
                if b.is_floating_point() and name not in kept:
                    b.data = b.data.to(to)
