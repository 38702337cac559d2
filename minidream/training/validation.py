"""Validation grids: the model being trained, sampled for each --validation-prompt from fixed seeds, so grids are
comparable across steps (OUT/samples/step-NNNNNN.png, and final.png after training)."""
from pathlib import Path

import torch

from minidream.images import grid, save_png
from minidream.models.stable_diffusion import StableDiffusion
from minidream.sampling.pipeline import generate


@torch.no_grad()
def validation_grid(model: StableDiffusion, cfg, path: Path, write: bool = True):
    """One row per validation prompt, one column per fixed seed (written where `write`: under --fsdp every
    process samples, rank 0 writes)."""
    denoiser = model.denoiser
    was_training = denoiser.training
    denoiser.eval()
    params = cfg.validation_sampling
    sampler = params.make_sampler(model.scheduler)
    weight = next(denoiser.parameters())
    rows = []
    with torch.autocast(weight.device.type, dtype=weight.dtype, enabled=weight.dtype != torch.float32):
        for p in cfg.validation_prompts:
            rows.append(generate(model, [p] * cfg.validation_images, params, sampler=sampler,
                                 generator=torch.Generator("cpu").manual_seed(cfg.seed), progress=False))
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(grid(torch.cat(rows), cols=cfg.validation_images), path, {"prompts": list(cfg.validation_prompts)})
    denoiser.train(was_training)
