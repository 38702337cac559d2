"""A run's exports (--save-as). Every export starts from a fresh fp32 copy of the *base model*, read again from its
files, with the run's trainable structure (adapters, a new token) and the trained tensors (the fp32 master weights)
written in; LoRA is merged into the base weights in fp32 (formats/exports.py). So a tensor that did not train is
written bit-identical to the base, whatever precision training ran in, and the model that trained is never
changed by exporting.
"""
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch

from minidream.formats import exports
from minidream.formats.loading import ModelError, load
from minidream.models.device import DTYPES
from minidream.models.stable_diffusion import StableDiffusion, with_clip_skip, with_t5_length
from minidream.training import TrainError
from minidream.training.config import TrainConfig
from minidream.training.objective import trained_schedule
from minidream.training.trainable import select_trainable


def load_base(cfg: TrainConfig, whole: bool = False, dtype: torch.dtype | None = torch.float32) -> StableDiffusion:
    """The base model in `dtype` (fp32: master weights, whatever the file stores; None: as stored, memory-mapped,
    nothing read until used), with the run's loader options and clip skip; `whole`: with SD3's T5 even after
    --no-t5 where the base has one (an export writes it untouched)."""
    def loaded(t5: bool):
        return load(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                    dtype=dtype, tokenizer=cfg.tokenizer, preset=cfg.preset, config=cfg.original_config, t5=t5,
                    text_encoders=cfg.text_encoders, vae=cfg.vae)
    try:
        try:
            model = loaded(cfg.t5 or whole)
        except ModelError:
            if cfg.t5 or not whole:
                raise
            model = loaded(False)  # a base without T5 anywhere (a single file the run read with --no-t5)
        model.guidance = 3.5 if cfg.guidance_scale is None else cfg.guidance_scale  # Flux.1 [dev]'s, as diffusers
        return with_t5_length(with_clip_skip(model, cfg.clip_skip), cfg.max_sequence_length)
    except Exception as e:
        raise TrainError(str(e)) from None


def base_for_exports(cfg: TrainConfig) -> StableDiffusion:
    """The base the exports start from: in fp32 when one writes a whole model (adapters are merged into fp32
    weights); else as stored, memory-mapped, since an adapter or token file reads no base weight."""
    whole = any(exports.EXPORTERS[f].plain for f in cfg.save_as)
    base = load_base(cfg, whole=True, dtype=torch.float32 if whole else None)
    base.scheduler = trained_schedule(base.scheduler, cfg)  # which the exports' scheduler config states
    return base


def with_trained(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg: TrainConfig) -> StableDiffusion:
    """The base model with the run's trainable structure (adapters, new token) and its trained values."""
    with torch.random.fork_rng(devices=[]):  # adapter init draws are overwritten below; keep the caller's RNG
        trainable = select_trainable(base, cfg.mode, cfg.adapters, cfg.train_text_encoder,
                                     cfg.token, cfg.init_word, cfg.token_vectors, cfg.train_token_t5)
    params = dict(trainable.named())
    if params.keys() != trained.keys():
        raise RuntimeError(f"trained tensors do not match the run's selection: "
                           f"{sorted(params.keys() ^ trained.keys())[:3]}")
    for name, p in params.items():  # taken as they are, not copied in: the base's own pages of them are never read
        t = trained[name]
        if t.shape != p.shape:
            raise RuntimeError(f"trained tensor {name} is {tuple(t.shape)}, the run's selection {tuple(p.shape)}")
        p.data = t.detach().to(p.device)  # in fp32 (masters), whatever the base was read in
    return base


def export(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg: TrainConfig, out: Path,
           step: int | None = None) -> list[Path]:
    """Write the formats cfg.save_as asks for (and the learned token, when there is one), the weights of `step`
    (default: the last). `base` is a fresh fp32 load of the base model, used up by this call."""
    return exports.export(with_trained(base, trained, cfg), cfg.save_as, out, DTYPES.get(cfg.save_precision),
                          run_facts(cfg, cfg.steps if step is None else step))


def run_facts(cfg: TrainConfig, step: int) -> dict[str, str]:
    """What kohya's trainer records about a run in its LoRA files (ss_* fields; modelspec's title, resolution and
    date), from the settings and OUT/data.json (written as training began: its time is the start)."""
    data_json = Path(cfg.out) / "data.json"
    data = json.loads(data_json.read_text()) if data_json.exists() else {"images": []}
    started = data_json.stat().st_mtime if data_json.exists() else time.time()
    photos = [r for r in data["images"] if r["kind"] == "instance"]
    folders = {}
    for r in photos:
        folder = folders.setdefault(Path(r["file"]).parent.name, {"n_repeats": r.get("repeats", 1), "img_count": 0})
        folder["img_count"] += 1
    tags = {}
    for r in photos:  # kohya counts the comma-separated tags of each caption, per image folder
        if r.get("caption_file"):
            counts = tags.setdefault(Path(r["file"]).parent.name, {})
            for tag in filter(None, (t.strip() for t in r["prompt"].split(","))):
                counts[tag] = counts.get(tag, 0) + 1
    te_lr = (cfg.text_encoder_lr or cfg.unet_lr) if cfg.train_text_encoder else 0
    facts = {
        "ss_sd_model_name": Path(cfg.model).name or str(cfg.model), "ss_output_name": Path(cfg.out).name,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})", "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.steps), "ss_learning_rate": f"{cfg.unet_lr:g}",
        "ss_unet_lr": f"{cfg.unet_lr:g}", "ss_text_encoder_lr": f"{te_lr:g}", "ss_lr_scheduler": cfg.lr_schedule,
        "ss_lr_warmup_steps": str(cfg.warmup_steps), "ss_optimizer": cfg.optimizer, "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision, "ss_clip_skip": str(cfg.clip_skip),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_num_train_images": str(sum(r.get("repeats", 1) for r in photos)),
        "ss_num_reg_images": str(sum(r["kind"] == "class" for r in data["images"])),
        "ss_prior_loss_weight": f"{cfg.prior_loss_weight if cfg.prior else 0:g}",
        "ss_noise_offset": f"{cfg.noise_offset:g}", "ss_min_snr_gamma": f"{cfg.snr_gamma or 0:g}",
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing), "ss_cache_latents": str(cfg.cache_latents),
        "ss_training_started_at": f"{started:.0f}", "ss_training_finished_at": f"{time.time():.0f}",
        "ss_dataset_dirs": json.dumps(folders), "ss_training_comment": f"minidream DreamBooth: {cfg.prompts[0]}",
        "modelspec.title": Path(cfg.out).name, "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if tags:
        facts["ss_tag_frequency"] = json.dumps(tags)
    return {**facts, **objective_facts(cfg)}


def objective_facts(cfg: TrainConfig) -> dict[str, str]:
    """The objective's settings under kohya's metadata names (its --ip_noise_gamma is our --input-perturbation)."""
    return {"ss_zero_terminal_snr": str(cfg.zero_terminal_snr), "ss_loss_type": cfg.loss_type.replace("-", "_"),
            "ss_huber_schedule": cfg.huber_schedule, "ss_huber_c": f"{cfg.huber_c:g}",
            "ss_debiased_estimation": str(cfg.debiased_estimation), "ss_min_timestep": str(cfg.min_timestep),
            "ss_max_timestep": str(cfg.max_timestep), "ss_ip_noise_gamma": f"{cfg.input_perturbation:g}",
            "ss_multires_noise_iterations": str(cfg.multires_noise_iterations),
            "ss_multires_noise_discount": f"{cfg.multires_noise_discount:g}"}


def snapshot(cfg: TrainConfig, trained: dict[str, torch.Tensor], step: int,
             averaged: dict[str, torch.Tensor] | None = None) -> Path:
    """OUT/snapshots/step-NNNNNN (--save-every): the run's exports at `step`, to pick the best step by eye (DreamBooth
    overfits quickly). Written whole under a temporary name, then renamed; the oldest beyond --keep-snapshots go."""
    snapshots = Path(cfg.out) / "snapshots"
    folder = snapshots / f"step-{step:06d}"
    tmp = snapshots / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.random.fork_rng(devices=[]):  # building the base draws initial weights: keep the run's RNG
            export(base_for_exports(cfg), trained, cfg, tmp, step)
            if averaged is not None:  # (--ema-decay) the moving average's, beside them
                export(base_for_exports(cfg), averaged, cfg, tmp / "ema", step)
        if folder.exists():  # a resumed run redoing this step writes it again (the same tensors)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(snapshots.glob("step-*"))[:-cfg.keep_snapshots] if cfg.keep_snapshots else []:
        shutil.rmtree(old)
    return folder
