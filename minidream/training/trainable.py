"""What DreamBooth trains: functions that select (or add) the trainable parts of a loaded model.

`--train unet` unfreezes the whole UNet, `attention` the Q/K/V/out projections of every attention layer,
`lora` wraps those projections in adapters (lora.py); `--train-text-encoder` and `--train-token` add the
text encoder (or its adapters) and a new token row — for SDXL in both text encoders (pivotal tuning, as
diffusers' advanced SDXL script: the new token gets a row in each). Everything else stays frozen, and `cast_frozen` may
put only the frozen tensors in half precision: what trains keeps its exact fp32 values.
"""
import math
import re
import sys
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.models import lora as lora_lib
from minidream.training.config import TrainConfig
from minidream.models.stable_diffusion import StableDiffusion

# The projections DreamBooth's attention variant trains (and LoRA adapts): Q, K, V and out of every self-
# (attn1) and cross-attention (attn2) layer of the UNet, and of the text encoder's self-attention.
UNET_ATTENTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_ATTENTION = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


class TokenEmbedding(nn.Module):
    """The text encoder's token table plus new rows for learned tokens; only the new rows are
    parameters that train (textual inversion, Gal et al. 2022), the original table stays frozen."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(init.detach().clone().float().reshape(-1, base.embedding_dim))

    @property
    def weight(self):
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids):
        # rows of the frozen table and of the new ones, picked per id: no copy of the 49k-row table per call
        n = self.base.num_embeddings
        old = F.embedding(ids.clamp(max=n - 1), self.base.weight)
        new = F.embedding((ids - n).clamp(min=0), self.new.to(old.dtype))
        return torch.where((ids >= n)[..., None], new, old)


def add_token(model: StableDiffusion, token: str, init_word: str):
    """A new token for the identifier in each text encoder, its embedding initialised from the class noun's."""
    for _, tok, te in model.text_encoders():
        emb = te.embeddings.token_embedding
        init = emb.weight[tok.encode(init_word)].mean(0, keepdim=True)
        tok.add_token(token)
        te.embeddings.token_embedding = TokenEmbedding(emb, init)


def learned_tokens(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """The new token rows by text encoder, as the run learned them."""
    return {name: te.embeddings.token_embedding.new.detach() for name, _, te in model.text_encoders()
            if isinstance(te.embeddings.token_embedding, TokenEmbedding)}


def merged_text_encoder_state(model: StableDiffusion) -> None:
    """Turn a TokenEmbedding back into a plain, larger nn.Embedding (for export)."""
    for _, _, te in model.text_encoders():
        emb = te.embeddings.token_embedding
        if isinstance(emb, TokenEmbedding):
            w = emb.weight.detach()
            plain = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            plain.weight = nn.Parameter(w.clone(), requires_grad=False)
            te.embeddings.token_embedding = plain
            te.cfg = replace(te.cfg, vocab_size=w.shape[0])


def select_trainable(model: StableDiffusion, train: str, lora_rank: int = 4, lora_alpha: float = 4.0,
                     train_text_encoder: bool = False, token: str | None = None, init_word: str | None = None
                     ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze (or add) what --train / --train-text-encoder / --train-token ask
    for. Returns the trainable parameters by group, named as in the checkpoints."""
    encoders = [(name, te) for name, _, te in model.text_encoders()]
    for m in (model.unet, *[te for _, te in encoders], model.vae):
        m.requires_grad_(False)
    if train == "unet":
        model.unet.requires_grad_(True)
    elif train == "attention":
        for name, m in model.unet.named_modules():
            if UNET_ATTENTION.fullmatch(name) and isinstance(m, nn.Linear):
                m.requires_grad_(True)
    else:
        lora_lib.add_lora(model.unet, UNET_ATTENTION, lora_rank, lora_alpha)
    for _, te in encoders if train_text_encoder else ():
        if train == "lora":
            lora_lib.add_lora(te, TEXT_ATTENTION, lora_rank, lora_alpha)
        else:
            te.requires_grad_(True)
    if token:
        add_token(model, token, init_word)
    groups = {"unet": [], "text_encoder": [], "token": []}
    for name, p in model.unet.named_parameters():
        if p.requires_grad:
            groups["unet"].append((f"unet.{name}", p))
    for prefix, te in encoders:  # both SDXL encoders in one group (one learning rate), named by prefix
        for name, p in te.named_parameters():
            if p.requires_grad:
                groups["token" if name.endswith("token_embedding.new") else "text_encoder"].append((f"{prefix}.{name}", p))
    return groups


def print_summary(groups, model: StableDiffusion):
    encoders = [te for _, _, te in model.text_encoders()]
    total = {"unet": [model.unet], "text_encoder": encoders, "token": [te.embeddings.token_embedding for te in encoders]}
    print(f"{'component':<14}{'trainable':>14}{'of':>16}{'tensors':>9}", file=sys.stderr)
    for name, params in groups.items():
        n = sum(p.numel() for _, p in params)
        of = sum(p.numel() for m in total[name] for p in m.parameters())
        print(f"{name:<14}{n:>14,}{of:>16,}{len(params):>9}", file=sys.stderr)


def cast_frozen(model: StableDiffusion, dtype: torch.dtype):
    """Frozen weights (and floating buffers) to `dtype` for speed and memory; trainable parameters keep
    their fp32 values untouched (master weights), so nothing that trains starts from rounded values.
    The exports never read these rounded copies: they start again from the base file (export.py)."""
    for m in (model.unet, *[te for _, _, te in model.text_encoders()], model.vae):
        for p in m.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        for b in m.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)


def lr_lambdas(cfg: TrainConfig, base_lrs: list[float]):
    """One multiplier per parameter group: linear warmup, then constant, cosine (half a period to 0),
    linear (to 0) or polynomial ((1 - progress)^power from the group's lr to 1e-7), as diffusers' get_scheduler
    after warmup. Warmup starts at 1/warmup rather than 0, so the first step is not wasted."""
    def make(lr0: float):
        lr_end = min(1e-7, lr0)

        def f(step):
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
            if cfg.lr_schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * done))
            if cfg.lr_schedule == "linear":
                return 1.0 - done
            if cfg.lr_schedule == "polynomial":
                return ((lr0 - lr_end) * (1 - done) ** cfg.lr_power + lr_end) / lr0 if lr0 > 0 else 1.0
            return 1.0
        return f
    return [make(lr0) for lr0 in base_lrs]



def make_optimizer(cfg: TrainConfig, groups: dict, device: torch.device):
    """AdamW over the trainable groups (each its own learning rate; no weight decay on a new token), the
    LR schedule, and for fp16 a gradient scaler."""
    lr = cfg.unet_lr
    param_groups = [{"params": [p for _, p in groups["unet"]], "lr": lr},
                    {"params": [p for _, p in groups["text_encoder"]], "lr": cfg.text_encoder_lr or lr},
                    {"params": [p for _, p in groups["token"]], "lr": cfg.token_lr, "weight_decay": 0.0}]
    param_groups = [pg for pg in param_groups if pg["params"]]
    opt = torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                            weight_decay=cfg.weight_decay, fused=True)  # one kernel over all tensors, CPU and CUDA
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, [pg["lr"] for pg in param_groups]))
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    return opt, sched, scaler
