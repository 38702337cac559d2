"""The prior-preservation images (DreamBooth §3.3): drawn by the base model from the class prompt, before any weight
changes, into each concept's class folder. Existing images are kept, so an interrupted generation resumes; a
PNG records its prompt, and images made for another class prompt are refused.
"""
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from minidream.image_files import save_png
from minidream.models.device import DTYPES
from minidream.models.stable_diffusion import StableDiffusion
from minidream.progress import Progress
from minidream.sampling.pipeline import generate
from minidream.training import TrainError
from minidream.training.distributed import barrier
from minidream.training.photos import image_files, png_prompt
from minidream.training.runtime import Runtime, autocast, class_precision


def make_class_images(model: StableDiffusion, cfg, concept, rt: Runtime, k: int = 0,
                      sizes: list[tuple[int, int]] | None = None):
    """Top up the concept's class dir to its number of class images of its class prompt, drawn by the base model
    (under autocast in --class-precision; a base held in half precision: in that). Existing images are kept, so an
    interrupted generation resumes where it stopped. Image i starts from noise seeded by i alone (and --seed, and the
    concept's index), so the set does not depend on the batch size or on how many processes share the work.
    With buckets, image i is drawn at sizes[i % len(sizes)] (the shapes of the concept's instance images)."""
    class_dir, prompt, wanted, group = concept.class_dir, concept.class_prompt, concept.num_class_images, rt.group
    if group.main:
        prepare_class_dir(class_dir, prompt)
    barrier(group)
    have, free = planned(class_dir, wanted)
    missing = len(free)
    barrier(group)  # every process has looked at the folder before any writes to it (else a slow one sees them)
    if missing <= 0:
        return
    mine = free[group.rank::group.size]
    precision = class_precision(cfg, rt.device, model.family.bf16_only)
    held = next(model.denoiser.parameters()).dtype  # a LoRA run's frozen base may be held in half already
    if precision == "fp32" and held != torch.float32:  # (training/holding.py): it draws in that
        precision = next(name for name, dtype in DTYPES.items() if dtype == held)
    params = cfg.class_sampling.for_model(model)  # left out: the steps and guidance of the family's pipeline
    guided = params.true_cfg > 1 if model.family.distilled_guidance else params.guidance > 1  # two passes a step
    calls = params.steps * (2 if guided else 1)
    print(f"generating {missing} class images for {prompt!r} into {class_dir} ({precision}; each image is {calls} "
          f"passes of the {model.family.denoiser}: --class-steps, or images of your own in --class-dir, shorten it)",
          file=sys.stderr)
    size = lambda i: sizes[i % len(sizes)] if sizes else (cfg.resolution, cfg.resolution)  # noqa: E731
    s = model.latent_scale
    sampler = params.make_sampler(model.scheduler)
    bar = Progress(len(mine), "class images")  # this process's share (all of them on one process)
    for shape in sorted({size(i) for i in mine}):
        same = [i for i in mine if size(i) == shape]
        for start in range(0, len(same), cfg.class_batch_size):
            batch = same[start:start + cfg.class_batch_size]
            seeds = [cfg.seed * 1_000_003 + k * 100_000_007 + i for i in batch]
            noise = torch.stack([torch.randn((model.vae.config.latent_channels, shape[1] // s, shape[0] // s),
                                             generator=torch.Generator().manual_seed(seed)) for seed in seeds])
            with autocast(rt.device, None if precision == "fp32" else DTYPES[precision]):
                try:
                    imgs = generate(model, [prompt] * len(batch), replace(params, height=shape[1], width=shape[0]),
                                    sampler=sampler, latents=noise, progress=False)
                except ValueError as e:  # sampling overflowed: the images made so far stay
                    raise TrainError(f"the class images for {prompt!r} could not be drawn ({e}); those made are "
                                     f"kept in {class_dir}; start over (--overwrite) with --class-precision fp32 "
                                     f"or a lower --class-guidance") from None
            for i, img in zip(batch, imgs):
                save_png(img, class_dir / f"class-{i:05d}.png", {"prompt": prompt, "index": i})
            bar.update(len(batch))
    bar.close()
    barrier(group)


def planned(class_dir: Path, wanted: int) -> tuple[list[Path], list[int]]:
    """The class images the folder has, and the indices of those to draw to have `wanted` (the numbering's gaps
    first: class-NNNNN.png)."""
    have = image_files(class_dir) if class_dir.is_dir() else []
    missing = wanted - len(have)
    free = [i for i in range(wanted + len(have)) if not (class_dir / f"class-{i:05d}.png").exists()]
    return have, free[:max(missing, 0)]


def prepare_class_dir(class_dir: Path, prompt: str):
    """Make the folder, drop a killed generation's unfinished files, refuse images made for another prompt."""
    try:
        class_dir.mkdir(parents=True, exist_ok=True)
        probe = class_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--class-dir {class_dir}: not writable ({e.strerror}); choose another folder") from None
    for stale in class_dir.glob(".*.tmp*"):  # a killed generation's unfinished file
        stale.unlink()
    refuse_other_prompts(class_dir, prompt)


def refuse_other_prompts(class_dir: Path, prompt: str):
    other = [p.name for p in image_files(class_dir) if png_prompt(p) not in (None, prompt)]
    if other:
        raise TrainError(f"--class-dir {class_dir}: {len(other)} image(s) were generated for another class prompt "
                         f"({png_prompt(class_dir / other[0])!r}, not {prompt!r}); choose another --class-dir or "
                         f"empty it")


def check_class_dir(class_dir: Path, prompt: str | None):
    """A --class-dir that cannot be made or written, or holds another prompt's images (`prompt`: None, it will be
    emptied first), fails before run.json exists."""
    ancestor = next(p for p in (class_dir, *class_dir.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is a file or below one" if not ancestor.is_dir() else "not writable"
        raise TrainError(f"--class-dir {class_dir}: {what}; choose another folder")
    if prompt is not None and class_dir.is_dir():
        refuse_other_prompts(class_dir, prompt)
    return class_dir
