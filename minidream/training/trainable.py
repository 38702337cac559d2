"""What DreamBooth trains: functions that select (or add) the trainable parts of a loaded model, one row per
`--train` mode in `MODES`.

`--train unet` unfreezes the whole UNet, `attention` the Q/K/V/out projections of every attention layer, `lora`
wraps those projections in adapters (models/lora.py); `--train-text-encoder` and `--train-token` add the text
encoder (or its adapters) and a new token row (models/tokens.py) — for SDXL in both text encoders (pivotal tuning,
as diffusers' advanced SDXL script: the new token gets a row in each). Everything else stays frozen, and
`cast_frozen` may put only the frozen tensors in half precision: what trains keeps its exact fp32 values.
"""
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from minidream.models import lora
from minidream.models.stable_diffusion import StableDiffusion
from minidream.models.tokens import add_token

# The projections DreamBooth's attention variant trains (and LoRA adapts): Q, K, V and out of every self-
# (attn1) and cross-attention (attn2) layer of the UNet, and of the text encoder's self-attention.
UNET_ATTENTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_ATTENTION = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def unfreeze(net: nn.Module, rank: int, alpha: float):
    net.requires_grad_(True)


def unfreeze_unet_attention(net: nn.Module, rank: int, alpha: float):
    for name, m in net.named_modules():
        if UNET_ATTENTION.fullmatch(name) and isinstance(m, nn.Linear):
            m.requires_grad_(True)


def unet_lora(net: nn.Module, rank: int, alpha: float):
    lora.add_lora(net, UNET_ATTENTION, rank, alpha)


def text_encoder_lora(net: nn.Module, rank: int, alpha: float):
    lora.add_lora(net, TEXT_ATTENTION, rank, alpha)


@dataclass(frozen=True)
class Mode:
    denoiser: Callable  # (UNet, rank, alpha): unfreezes or adds what trains in it
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
    "attention": Mode(unfreeze_unet_attention, unfreeze, 2e-5, ("diffusers",), "Q/K/V/out of every attention layer"),
    "lora": Mode(unet_lora, text_encoder_lora, 1e-4, ("lora-diffusers", "lora-kohya"), "LoRA adapters on those",
                 adapters=True),
}


@dataclass
class Trainable:
    """The parameters a run trains, by group (each has its learning rate), named as in the checkpoints."""
    unet: list[tuple[str, nn.Parameter]]
    text_encoder: list[tuple[str, nn.Parameter]]  # both SDXL encoders in one group (one learning rate)
    token: list[tuple[str, nn.Parameter]]  # the new token's rows

    def groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "token": self.token}

    def named(self) -> list[tuple[str, nn.Parameter]]:
        return [*self.unet, *self.text_encoder, *self.token]

    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named()]


def select_trainable(model: StableDiffusion, mode: str, lora_rank: int = 4, lora_alpha: float = 4.0,
                     train_text_encoder: bool = False, token: str | None = None, init_word: str | None = None
                     ) -> Trainable:
    """Freeze everything, then unfreeze (or add) what --train / --train-text-encoder / --train-token ask for."""
    encoders = [(name, te) for name, _, te in model.text_encoders()]
    for m in model.networks():
        m.requires_grad_(False)
    row = MODES[mode]
    row.denoiser(model.denoiser, lora_rank, lora_alpha)
    for _, te in encoders if train_text_encoder else ():
        row.text_encoder(te, lora_rank, lora_alpha)
    if token:
        add_token(model, token, init_word)
    trainable = Trainable([], [], [])
    for name, p in model.denoiser.named_parameters():
        if p.requires_grad:
            trainable.unet.append((f"unet.{name}", p))
    for prefix, te in encoders:
        for name, p in te.named_parameters():
            if p.requires_grad:
                group = trainable.token if name.endswith("token_embedding.new") else trainable.text_encoder
                group.append((f"{prefix}.{name}", p))
    return trainable


def print_summary(trainable: Trainable, model: StableDiffusion):
    encoders = [te for _, _, te in model.text_encoders()]
    total = {"unet": [model.denoiser], "text_encoder": encoders,
             "token": [te.embeddings.token_embedding for te in encoders]}
    print(f"{'component':<14}{'trainable':>14}{'of':>16}{'tensors':>9}", file=sys.stderr)
    for name, params in trainable.groups().items():
        n = sum(p.numel() for _, p in params)
        of = sum(p.numel() for m in total[name] for p in m.parameters())
        print(f"{name:<14}{n:>14,}{of:>16,}{len(params):>9}", file=sys.stderr)


def cast_frozen(model: StableDiffusion, dtype: torch.dtype):
    """Frozen weights (and floating buffers) to `dtype` for speed and memory; trainable parameters keep
    their fp32 values untouched (master weights), so nothing that trains starts from rounded values.
    The exports never read these rounded copies: they start again from the base file (training/export.py)."""
    for m in model.networks():
        for p in m.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        for b in m.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
