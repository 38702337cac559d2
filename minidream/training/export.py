"""A run's exports (--save-as). Every export starts from a fresh fp32 copy of the *base model*, read again from its
files, with the run's trainable structure (adapters, a new token) and the trained tensors (the fp32 master weights)
written in; LoRA is merged into the base weights in fp32 (formats/exports.py). So a tensor that did not train is
written bit-identical to the base, whatever precision training ran in, and the model that trained is never
changed by exporting.
"""
import os
import shutil
from pathlib import Path

import torch

from minidream.formats import exports
from minidream.formats.loading import load
from minidream.models.device import DTYPES
from minidream.models.stable_diffusion import StableDiffusion, with_clip_skip
from minidream.training import TrainError
from minidream.training.config import TrainConfig
from minidream.training.trainable import select_trainable


def load_base(cfg: TrainConfig) -> StableDiffusion:
    """The base model in fp32 (master weights, whatever the file stores), with the run's loader options and clip
    skip."""
    try:
        model = load(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                     dtype=torch.float32, tokenizer=cfg.tokenizer, preset=cfg.preset, config=cfg.config)
        return with_clip_skip(model, cfg.clip_skip)
    except Exception as e:
        raise TrainError(str(e)) from None


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


def snapshot(cfg: TrainConfig, trained: dict[str, torch.Tensor], step: int) -> Path:
    """OUT/snapshots/step-NNNNNN (--save-every): the run's exports at `step`, to pick the best step by eye (DreamBooth
    overfits quickly). Written whole under a temporary name, then renamed; the oldest beyond --keep-snapshots go."""
    snapshots = Path(cfg.out) / "snapshots"
    folder = snapshots / f"step-{step:06d}"
    tmp = snapshots / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.random.fork_rng(devices=[]):  # building the base draws initial weights: keep the run's RNG
            export(load_base(cfg), trained, cfg, tmp)
        if folder.exists():  # a resumed run redoing this step writes it again (the same tensors)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(snapshots.glob("step-*"))[:-cfg.keep_snapshots] if cfg.keep_snapshots else []:
        shutil.rmtree(old)
    return folder
