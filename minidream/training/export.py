"""A run's exports (--save-as). Every export starts from a fresh fp32 copy of the *base model*, read again from its
files, with the run's trainable structure (adapters, a new token) and the trained tensors (the fp32 master weights)
written in; LoRA is merged into the base weights in fp32 (formats/exports.py). So a tensor that did not train is
written bit-identical to the base, whatever precision training ran in, and the model that trained is never
changed by exporting.
"""
from pathlib import Path

import torch

from minidream.formats import exports
from minidream.models.device import DTYPES
from minidream.models.stable_diffusion import StableDiffusion
from minidream.training.config import TrainConfig
from minidream.training.trainable import select_trainable


def with_trained(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg: TrainConfig) -> StableDiffusion:
    """The base model with the run's trainable structure (adapters, new token) and its trained values."""
    with torch.random.fork_rng(devices=[]):  # adapter init draws are overwritten below; keep the caller's RNG
        trainable = select_trainable(base, cfg.mode, cfg.lora_rank, cfg.lora_alpha, cfg.train_text_encoder,
                                     cfg.token, cfg.init_word)
    params = dict(trainable.named())
    if params.keys() != trained.keys():
        raise RuntimeError(f"trained tensors do not match the run's selection: "
                           f"{sorted(params.keys() ^ trained.keys())[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trained[name])
    return base


def export(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> list[Path]:
    """Write the formats cfg.save_as asks for (and the learned token, when there is one). `base` is a fresh fp32
    load of the base model, used up by this call."""
    return exports.export(with_trained(base, trained, cfg), cfg.save_as, out, DTYPES.get(cfg.save_precision))
