"""DreamBooth (Ruiz et al. 2022, arXiv 2208.12242): bind a rare identifier ("sks") to a subject seen in
3-5 photos, while a class-specific prior-preservation loss keeps the class noun ("dog") from drifting.

The objective (§3.2, eq. 2), in the ε- (or v-) parametrisation SD is trained with:

    E[ w_t ‖ ε̂(z_t, t, c_inst) − ε ‖² ]  +  λ · E[ w_t' ‖ ε̂(z'_t', t', c_class) − ε' ‖² ]

where z are the latents of the subject's photos, z' the latents of images the *base* model generated
from the class prompt, λ = --prior-loss-weight and w_t = 1 (or min-SNR-γ weights). Instance and class
examples run through the UNet as one batch. One step: `train` → `training_step` → `dreambooth_loss`.
"""
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from minidream.attention import resolve_backend, set_attention_backend
from minidream.choices import CLASS_PRECISIONS, EXPORTS, LR_SCHEDULES, MIXED_PRECISIONS, TRAIN_MODES
from minidream.export import export
from minidream.loading import StableDiffusion, load, save_safetensors
from minidream.pipeline import downsampling, generate, grid, save_png
from minidream.progress import Progress
from minidream.schedulers import NoiseSchedule
from minidream.trainable import cast_frozen, print_summary, select_trainable

HALF = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class TrainError(Exception):
    """Bad input or a failed run, worded for the user (one line)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; stored in run.json and in every checkpoint. Defaults: `cli.py train`."""
    model: str
    revision: str | None
    variant: str | None
    preset: str | None
    config: str | None
    tokenizer: str | None
    allow_pickle: bool
    instance_dir: str
    out: str
    class_dir: str | None
    identifier: str
    class_noun: str
    instance_prompt: str | None
    class_prompt: str | None
    resolution: int | None  # None: the model's native resolution, resolved before run.json is written
    center_crop: bool
    flip: float
    prior: bool
    num_class_images: int
    prior_loss_weight: float
    class_steps: int
    class_guidance: float
    class_batch_size: int
    class_precision: str
    class_negative_prompt: str
    train: str
    lora_rank: int
    lora_alpha: float
    train_text_encoder: bool
    train_token: bool
    lr: float | None
    text_encoder_lr: float | None
    text_encoder_steps: int
    token_lr: float
    lr_schedule: str
    lr_power: float
    warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float
    steps: int
    batch_size: int
    grad_accum: int
    mixed_precision: str
    tf32: bool
    gradient_checkpointing: bool
    cache_latents: bool
    snr_gamma: float | None
    noise_offset: float
    seed: int
    validation_prompts: tuple[str, ...]
    validation_every: int
    validation_images: int
    validation_steps: int
    checkpoint_every: int
    keep_last: int
    save_as: tuple[str, ...]
    attention: str
    device: str | None

    @property
    def prompts(self) -> tuple[str, str]:
        token = f"<{self.identifier}>" if self.train_token else self.identifier
        return (self.instance_prompt or f"a photo of {token} {self.class_noun}",
                self.class_prompt or f"a photo of {self.class_noun}")


# Per-mode learning rates (AdamW): the whole UNet needs a small step to keep the prior (diffusers'
# DreamBooth default); the attention projections alone tolerate a few times more; LoRA adapters start
# at zero and need ~1e-4. The text encoder, when trained, uses the same rate as the UNet part.
DEFAULT_LR = {"unet": 5e-6, "attention": 2e-5, "lora": 1e-4}

# Settings a resumed run takes from the command line when they are given there; everything else comes
# from the checkpoint, and a different value for it is refused. Paths are the user's: moved folders resume.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "validation_prompts", "validation_every",
                     "validation_images", "validation_steps", "save_as", "device", "attention", "tf32",
                     "model", "instance_dir", "class_dir", "out")
# What a run writes into --out: --overwrite removes exactly these before it starts again.
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "checkpoints", "samples", "class_images", "model", "model.safetensors",
               "lora", "lora_kohya.safetensors", "learned_embeds.safetensors")


# ---------------------------------------------------------------------------------------------
# Data

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_instance_images(folder: Path, resolution: int, flag: str = "--instance-dir") -> list:
    """The subject's photos (or the class images), RGB, EXIF orientation applied; every unreadable file
    named before any compute."""
    from PIL import Image, ImageOps
    if not folder.is_dir():
        raise TrainError(f"{flag} {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise TrainError(f"{flag} {folder}: no images (.jpg, .png, .webp) in it")
    images, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
            images.append(to_rgb(im, f))
        except Exception:
            bad.append(f.name)
    if bad:
        raise TrainError(f"{flag} {folder}: unreadable image(s): {', '.join(bad)}; remove or fix them")
    small = [f.name for f, im in zip(files, images) if min(im.size) < resolution]
    if small:
        print(f"warning: {len(small)} image(s) smaller than --resolution {resolution} will be upscaled: "
              f"{', '.join(small[:5])}", file=sys.stderr)
    return images


def to_rgb(im, f: Path):
    """8-bit RGB. 16-bit and 32-bit grayscale are scaled down (a plain convert clips them to white);
    RGBA, grayscale, CMYK and palette images convert as usual; anything rarer is converted with a warning."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        top = 65535 if im.mode.startswith("I;16") or (im.getextrema()[1] or 0) > 255 else 255
        return im.convert("I").point(lambda v: v * (255 / top)).convert("L").convert("RGB")
    if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1"):
        print(f"warning: {f.name}: unusual image mode {im.mode}, converted to 8-bit RGB", file=sys.stderr)
    return im.convert("RGB")


def to_tensor(im, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize the short side to `resolution`, crop a square, maybe mirror; -> (3, R, R) in [-1, 1]."""
    from PIL import Image
    w, h = im.size
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else \
        (rng.randint(0, w - resolution), rng.randint(0, h - resolution))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def png_prompt(path: Path) -> str | None:
    """The prompt a generated class image was made for (its PNG text), or None for any other image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.text.get("prompt") if hasattr(im, "text") else None
    except Exception:
        return None


def make_class_images(model: StableDiffusion, cfg: TrainConfig, class_dir: Path, device: torch.device):
    """Top up `class_dir` to --num-class-images images of the class prompt, drawn by the base model
    (under autocast in --class-precision: the weights stay fp32). Existing images are kept, so an
    interrupted generation resumes where it stopped."""
    try:
        class_dir.mkdir(parents=True, exist_ok=True)
        probe = class_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--class-dir {class_dir}: not writable ({e.strerror}); choose another folder") from None
    for stale in class_dir.glob(".*.tmp*"):  # a killed generation's unfinished file
        stale.unlink()
    have = image_files(class_dir)
    prompt = cfg.prompts[1]
    other = [p.name for p in have if png_prompt(p) not in (None, prompt)]
    if other:
        raise TrainError(f"--class-dir {class_dir}: {len(other)} image(s) were generated for another class prompt "
                         f"({png_prompt(class_dir / other[0])!r}, not {prompt!r}); choose another --class-dir or empty it")
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return
    # image i is drawn with a seed that depends only on i, into class-<i>.png; free indices fill gaps
    free = [i for i in range(cfg.num_class_images + len(have)) if not (class_dir / f"class-{i:05d}.png").exists()][:missing]
    precision = cfg.class_precision if cfg.class_precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    half = HALF[precision]
    print(f"generating {missing} class images for {prompt!r} into {class_dir} ({precision})", file=sys.stderr)
    bar = Progress(missing, "class images")
    for start in range(0, missing, cfg.class_batch_size):
        batch = free[start:start + cfg.class_batch_size]
        n = len(batch)
        g = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + batch[0])
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            imgs = generate(model, [prompt] * n, cfg.class_negative_prompt, steps=cfg.class_steps,
                            guidance=cfg.class_guidance, generator=g, height=cfg.resolution, width=cfg.resolution,
                            progress=False)
        for i, img in zip(batch, imgs):
            save_png(img, class_dir / f"class-{i:05d}.png", {"prompt": prompt, "index": i})
        bar.update(n)


# ---------------------------------------------------------------------------------------------
# The loss and one step

def dreambooth_loss(pred, target, n_instance: int, prior_weight: float, weights=None):
    """mse(instance) + λ·mse(prior) over a batch whose first n_instance rows are the subject's.
    Returns (loss, instance part, prior part)."""
    per_example = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights
    inst = per_example[:n_instance].mean()
    prior = per_example[n_instance:].mean() if len(per_example) > n_instance else torch.zeros_like(inst)
    return inst + prior_weight * prior, inst, prior


def min_snr_weights(schedule: NoiseSchedule, t, gamma: float):
    """Min-SNR-γ (Hang et al. 2023, eq. 7-8): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v."""
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if schedule.cfg.prediction_type == "epsilon" else clipped / (snr + 1)


def training_step(unet, schedule: NoiseSchedule, latents, context, n_instance: int, prior_weight: float,
                  g: torch.Generator, snr_gamma: float | None = None, noise_offset: float = 0.0):
    """Noise the latents at random timesteps, predict, and return the DreamBooth loss parts."""
    # draws happen where the generator lives: the trainer's is on the CPU (the same numbers on any device,
    # bit-exact resume), the benchmark's on the GPU (no copy per step)
    B, dev = latents.shape[0], g.device
    noise = torch.randn(latents.shape, generator=g, device=dev).to(latents.device)
    if noise_offset:  # (Guttenberg 2023) lets the model shift mean brightness
        noise = noise + noise_offset * torch.randn((B, latents.shape[1], 1, 1), generator=g, device=dev).to(latents.device)
    t = torch.randint(0, schedule.cfg.num_train_timesteps, (B,), generator=g, device=dev).to(latents.device)
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, context)
    weights = min_snr_weights(schedule, t, snr_gamma) if snr_gamma else None
    return dreambooth_loss(pred, schedule.target(latents, noise, t), n_instance, prior_weight, weights)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file each (trainable weights, optimizer, RNG), config and step in its
# metadata; written to a temporary name and renamed, so a crash never leaves half a checkpoint.

def save_checkpoint(path: Path, step: int, cfg: TrainConfig, groups, opt, sched, scaler, g: torch.Generator):
    tensors = {name: p.detach() for params in groups.values() for name, p in params}
    state = opt.state_dict()
    scalars = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = g.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"step": step, "config": asdict(cfg), "param_groups": state["param_groups"], "optim_scalars": scalars,
            "lr_sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}
    save_safetensors(tensors, path, metadata={"minidream": json.dumps(meta)})


def read_checkpoint(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["minidream"])
        return meta, load_file(path)
    except Exception as e:
        raise TrainError(f"{path}: not a readable minidream checkpoint ({e})") from None


def restore(meta, tensors, groups, opt, sched, scaler, g):
    with torch.no_grad():
        for params in groups.values():
            for name, p in params:
                if name not in tensors:
                    raise TrainError(f"checkpoint has no tensor {name!r}; it was made with other --train settings")
                p.copy_(tensors[name])
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state["state"].setdefault(int(idx), {})[key] = v
    for k, v in meta["optim_scalars"].items():
        idx, key = k.split(".", 1)
        state["state"].setdefault(int(idx), {})[key] = v
    opt.load_state_dict(state)
    for pg in opt.param_groups:  # torch takes any values here; a crafted file would fail mid-step instead
        nums = [pg[k] for k in ("lr", "initial_lr", "weight_decay", "eps") if k in pg] + list(pg["betas"])
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in nums):
            raise ValueError(f"optimizer hyperparameters {nums} are not finite non-negative numbers")
        for p in pg["params"]:
            if any(torch.is_tensor(v) and v.ndim and v.shape != p.shape for v in opt.state[p].values()):
                raise ValueError("optimizer moments do not match the parameters' shapes")
    sched.load_state_dict(meta["lr_sched"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    g.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.safetensors"))


# ---------------------------------------------------------------------------------------------
# The run

def validate(cfg: TrainConfig):
    """Every setting that can be checked without the model, before anything is loaded or written."""
    for flag, v, ok in (("--train", cfg.train, TRAIN_MODES), ("--mixed-precision", cfg.mixed_precision, MIXED_PRECISIONS),
                        ("--lr-schedule", cfg.lr_schedule, LR_SCHEDULES),
                        ("--class-precision", cfg.class_precision, CLASS_PRECISIONS)):
        if v not in ok:
            raise TrainError(f"{flag} {v!r} is not one of {', '.join(ok)}")
    bad = [s for s in cfg.save_as if s not in EXPORTS]
    if bad:
        raise TrainError(f"--save-as {bad[0]!r} is not one of {', '.join(EXPORTS)}")
    if any(s.startswith("lora") for s in cfg.save_as) and cfg.train != "lora":
        raise TrainError("--save-as lora-* needs --train lora")
    for flag, v in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                    ("--class-batch-size", cfg.class_batch_size), ("--lora-rank", cfg.lora_rank),
                    ("--validation-images", cfg.validation_images), ("--validation-steps", cfg.validation_steps),
                    ("--class-steps", cfg.class_steps)):
        if v < 1:
            raise TrainError(f"{flag} must be at least 1 (got {v})")
    if not 0 <= cfg.seed < 2 ** 63:
        raise TrainError(f"--seed must be in [0, 2^63) (got {cfg.seed})")
    if cfg.resolution is not None:
        validate_resolution(cfg.resolution)
    for flag, v in (("--max-grad-norm", cfg.max_grad_norm), ("--weight-decay", cfg.weight_decay),
                    ("--text-encoder-steps", cfg.text_encoder_steps), ("--warmup-steps", cfg.warmup_steps),
                    ("--noise-offset", cfg.noise_offset), ("--prior-loss-weight", cfg.prior_loss_weight),
                    ("--class-guidance", cfg.class_guidance), ("--keep-last", cfg.keep_last),
                    ("--checkpoint-every", cfg.checkpoint_every), ("--validation-every", cfg.validation_every),
                    ("--num-class-images", cfg.num_class_images)):
        if not v >= 0:
            raise TrainError(f"{flag} must be >= 0 (got {v})")
    for flag, v in (("--lr", cfg.lr), ("--text-encoder-lr", cfg.text_encoder_lr), ("--token-lr", cfg.token_lr),
                    ("--snr-gamma", cfg.snr_gamma)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TrainError(f"{flag} must be a positive number (got {v})")
    if not 0 <= cfg.flip <= 1:
        raise TrainError(f"--flip is a probability in [0, 1] (got {cfg.flip})")
    if cfg.prior and cfg.num_class_images < 1:
        raise TrainError("--num-class-images must be at least 1 with prior preservation (or pass --no-prior)")
    for flag, v in (("--adam-beta1", cfg.adam_beta1), ("--adam-beta2", cfg.adam_beta2)):
        if not 0 <= v < 1:
            raise TrainError(f"{flag} must be in [0, 1) (got {v})")
    for flag, v in (("--adam-epsilon", cfg.adam_epsilon), ("--lr-power", cfg.lr_power)):
        if not v > 0:
            raise TrainError(f"{flag} must be > 0 (got {v})")
    if cfg.cache_latents and not cfg.center_crop:
        raise TrainError("--random-crop has no effect with --cache-latents (cached latents are centre crops); "
                         "drop one of them")


def validate_resolution(resolution: int, factor: int = 8):
    """A multiple of 8 (the VAE), and once the model is known of its whole downsampling factor (VAE x UNet)."""
    if resolution < factor or resolution % factor:
        raise TrainError(f"--resolution must be a positive multiple of {factor} for this model (got {resolution})"
                         if factor != 8 else f"--resolution must be a positive multiple of 8 (got {resolution})")


def resolve_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise TrainError(f"--device {name!r}: only cuda and cpu are supported")
    return device


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


def load_base(cfg: TrainConfig) -> StableDiffusion:
    """The base model in fp32 (master weights, whatever the file stores), with the run's loader options."""
    try:
        return load(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                    dtype=torch.float32, tokenizer=cfg.tokenizer, preset=cfg.preset, config=cfg.config)
    except Exception as e:
        raise TrainError(str(e)) from None


def stored_config(meta: dict, path: Path) -> TrainConfig:
    """The run's settings from a checkpoint, checked like the command line's (a crafted file gets no further)."""
    try:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        missing = [f for f in TrainConfig.__dataclass_fields__ if f not in d]
        if missing:
            raise TrainError(f"{path}: written by an older minidream (no {', '.join(missing[:4])}"
                             f"{' …' if len(missing) > 4 else ''}); start a new run")
        cfg = TrainConfig(**{k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__})
        validate(cfg)
        if not (isinstance(meta["step"], int) and 0 <= meta["step"]):
            raise TrainError(f"{path}: step {meta['step']!r} is not a step count")
        return cfg
    except TrainError as e:
        raise TrainError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except Exception as e:
        raise TrainError(f"{path}: its stored settings are not usable ({type(e).__name__}: {e})") from None


def check_prompts(model: StableDiffusion, cfg: TrainConfig):
    """CLIP reads 77 tokens: a prompt cut before its identifier would train on the class alone."""
    for what, prompt in zip(("--instance-prompt", "--class-prompt"), cfg.prompts):
        cut = model.tokenizer.truncated(prompt)
        if cut and what == "--instance-prompt" and cfg.identifier in cut and cfg.identifier not in prompt[:-len(cut)]:
            raise TrainError(f"{what}: the identifier {cfg.identifier!r} falls past the text encoder's "
                             f"{model.tokenizer.max_length}-token limit; shorten the prompt")
        if cut:
            print(f"warning: {what} is longer than {model.tokenizer.max_length} tokens; this part is cut: {cut!r}",
                  file=sys.stderr)


def lock_run(out: Path):
    """One run per --out: a second one would interleave checkpoints and metrics."""
    import fcntl
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise TrainError(f"--out {out} is in use by another minidream run; wait for it or choose another folder") from None
    return f


def flag(field: str) -> str:
    return "--" + {"validation_prompts": "validation_prompt"}.get(field, field).replace("_", "-")


def resumed_config(cfg: TrainConfig, stored: TrainConfig, given: set[str] | None) -> TrainConfig:
    """The checkpoint's settings, with the resumable ones the user gave; a changed fixed one is refused."""
    given = set(RESUMABLE_CHANGES) if given is None else given & set(TrainConfig.__dataclass_fields__)
    fixed = sorted(k for k in given if k not in RESUMABLE_CHANGES and getattr(cfg, k) != getattr(stored, k))
    if fixed:
        was = ", ".join(f"{flag(k)} {getattr(stored, k)!r}" for k in fixed)
        raise TrainError(f"--resume: {', '.join(flag(k) for k in fixed)} cannot change in a resumed run (it has {was}); "
                         f"drop them, or start a new run with --overwrite")
    return replace(stored, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k in given})


def clear_run(out: Path, cfg: TrainConfig):
    """--overwrite: remove what an earlier run wrote into --out (and only that); a --class-dir elsewhere stays."""
    import shutil
    for name in RUN_OUTPUTS:
        p = out / name
        if name == "class_images" and cfg.class_dir and Path(cfg.class_dir).resolve() != p.resolve():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def truncate_metrics(path: Path, step: int):
    """A resumed run logs from its checkpoint's step on: drop the killed run's later (or half-written) lines."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False, given: set[str] | None = None):
    """Run DreamBooth. `given`: the settings the user named (the CLI knows); on resume only those may
    override the checkpoint's resumable settings (None: all of RESUMABLE_CHANGES come from cfg)."""
    validate(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a folder")
    run_file = out / "run.json"
    start_meta = start_tensors = None
    if resume:
        ck = checkpoints(out)[-1] if resume == "latest" and checkpoints(out) else Path(resume)
        if resume == "latest" and not checkpoints(out):
            raise TrainError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
        if not ck.is_file():
            raise TrainError(f"--resume {resume}: no such checkpoint file")
        start_meta, start_tensors = read_checkpoint(ck)
        cfg = resumed_config(cfg, stored_config(start_meta, ck), given)
        if given is not None and "class_dir" not in given and cfg.class_dir and \
                not Path(cfg.class_dir).resolve().is_relative_to(out.resolve()):
            # a stored class folder outside --out is only read: a crafted checkpoint must not make us write there
            have = len(image_files(Path(cfg.class_dir))) if Path(cfg.class_dir).is_dir() else 0
            if cfg.prior and have < cfg.num_class_images:
                raise TrainError(f"--class-dir {cfg.class_dir} (from the checkpoint) holds {have} of "
                                 f"{cfg.num_class_images} class images; pass --class-dir to say where to make them")
        print(f"resuming from {ck} at step {start_meta['step']}", file=sys.stderr)
    elif run_file.exists() and not overwrite:
        raise TrainError(f"--out {out} holds another run (run.json); pass --resume latest to continue it, "
                         f"--overwrite to start over, or choose another folder")

    device = resolve_device(cfg.device)
    try:
        backend = resolve_backend(cfg.attention, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    for what, precision in (("--mixed-precision", cfg.mixed_precision), ("--class-precision", cfg.class_precision)):
        if precision == "fp16" and device.type != "cuda":
            raise TrainError(f"{what} fp16 needs a GPU; use bf16 or {'no' if what == '--mixed-precision' else 'fp32'} on CPU")
    half = HALF[cfg.mixed_precision]
    if device.type == "cuda":  # TF32 tensor cores for fp32 matmuls/convs: ~10 bits of mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    model = load_base(cfg)
    if cfg.resolution is None:  # the model's own size (768 for SD 2.x 768-v), stored in run.json for resume
        cfg = replace(cfg, resolution=model.native_resolution)
        print(f"--resolution {cfg.resolution} (the model's native resolution)", file=sys.stderr)
    validate_resolution(cfg.resolution, downsampling(model))
    instance_images = load_instance_images(Path(cfg.instance_dir), cfg.resolution)
    check_prompts(model, cfg)
    if cfg.prior:  # checked now, so a bad --class-dir fails before run.json exists
        class_dir = Path(cfg.class_dir) if cfg.class_dir else out / "class_images"
        ancestor = next(p for p in (class_dir, *class_dir.parents) if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise TrainError(f"--class-dir {class_dir}: {'is a file or below one' if not ancestor.is_dir() else 'not writable'}; "
                             f"choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_run(out)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror}); choose another folder or free space") from None
    try:
        return _locked_run(cfg, out, model, device, half, backend, instance_images, start_meta, start_tensors,
                           overwrite and not resume)
    finally:
        lock.close()


def _locked_run(cfg: TrainConfig, out: Path, model: StableDiffusion, device, half, backend, instance_images,
                start_meta, start_tensors, start_over: bool):
    """The run itself, once every setting is checked and --out is this process's."""
    run_file = out / "run.json"
    try:
        if start_over:  # start over: nothing of the old run may be resumed, pruned or reused
            clear_run(out, cfg)
        for stale in out.rglob(".*.tmp*"):  # a killed write's unfinished file (checkpoint, export, image)
            stale.unlink()
        if start_meta is not None:
            truncate_metrics(out / "metrics.jsonl", start_meta["step"])
        run_file.write_text(json.dumps(asdict(cfg), indent=2))
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror}); choose another folder or free space") from None
    model.to(device)
    set_attention_backend(model.unet, backend)
    set_attention_backend(model.vae, backend)

    # Identifier check (§4.1): a rare token carries little prior meaning, so it is cheap to rebind.
    if not cfg.train_token and len(model.tokenizer.encode(cfg.identifier)) != 1:
        print(f"warning: --identifier {cfg.identifier!r} is {len(model.tokenizer.encode(cfg.identifier))} tokens, "
              f"not one rare token; DreamBooth binds best to a single rare token such as 'sks'", file=sys.stderr)

    # Prior preservation data, made by the base model before any weight changes.
    class_images = []
    if cfg.prior:
        class_dir = Path(cfg.class_dir) if cfg.class_dir else out / "class_images"
        make_class_images(model, cfg, class_dir, device)
        class_images = load_instance_images(class_dir, cfg.resolution, "--class-dir")[: cfg.num_class_images]

    groups = select_trainable(model, cfg.train, cfg.lora_rank, cfg.lora_alpha, cfg.train_text_encoder,
                              f"<{cfg.identifier}>" if cfg.train_token else None, cfg.class_noun)
    print_summary(groups, model)
    trainable = [p for params in groups.values() for _, p in params]
    if half is not None:  # frozen weights in half precision; what trains keeps its exact fp32 values
        cast_frozen(model, half)
    model.unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
    model.unet.train()
    model.text_encoder.train(bool(groups["text_encoder"]))

    lr = cfg.lr or DEFAULT_LR[cfg.train]
    param_groups = [{"params": [p for _, p in groups["unet"]], "lr": lr},
                    {"params": [p for _, p in groups["text_encoder"]], "lr": cfg.text_encoder_lr or lr},
                    {"params": [p for _, p in groups["token"]], "lr": cfg.token_lr, "weight_decay": 0.0}]
    param_groups = [pg for pg in param_groups if pg["params"]]
    opt = torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                            weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, [pg["lr"] for pg in param_groups]))
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    g = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop: data, noise, timesteps
    step = 0
    if start_meta is not None:
        try:
            restore(start_meta, start_tensors, groups, opt, sched, scaler, g)
        except TrainError:
            raise
        except Exception as e:  # a crafted or damaged checkpoint: name it, do not crash in torch
            raise TrainError(f"the checkpoint's optimizer, schedule or RNG state is not usable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); resume from another checkpoint") from None
        step = start_meta["step"]
    schedule = NoiseSchedule(model.scheduler)

    # Latents: cached once (mean and log-variance; a fresh draw each step) or encoded every step.
    vae_dtype = next(model.vae.parameters()).dtype
    cache = None
    if cfg.cache_latents:
        cache = []
        with torch.no_grad():
            for pool in (instance_images, class_images):
                stats = []
                for im in pool:
                    views = [to_tensor(im, cfg.resolution, True, False, None)]
                    if cfg.flip > 0:
                        views.append(to_tensor(im, cfg.resolution, True, True, None))
                    x = torch.stack(views).to(device, vae_dtype)
                    stats.append(model.vae.encode(x))
                cache.append(stats)

    def latents_for(pool_idx: int, pool: list, n: int):
        idx = torch.randint(0, len(pool), (n,), generator=g).tolist()
        flips = (torch.rand(n, generator=g) < cfg.flip).tolist()
        if cache is not None:
            mean = torch.stack([cache[pool_idx][i][0][int(f) if cfg.flip > 0 else 0] for i, f in zip(idx, flips)])
            logvar = torch.stack([cache[pool_idx][i][1][int(f) if cfg.flip > 0 else 0] for i, f in zip(idx, flips)])
        else:
            py = random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            x = torch.stack([to_tensor(pool[i], cfg.resolution, cfg.center_crop, f, py) for i, f in zip(idx, flips)])
            with torch.no_grad():
                mean, logvar = model.vae.encode(x.to(device, vae_dtype))
        eps = torch.randn(mean.shape, generator=g).to(device, mean.dtype)
        return ((mean + (0.5 * logvar).exp() * eps) * model.vae.cfg.scaling_factor).float()

    token_trains = bool(groups["token"])
    te_params = [p for _, p in groups["text_encoder"]]
    prompt_ids = model.tokenizer(list(cfg.prompts)).to(device)
    fixed_context = None

    def context_for(n_inst, n_class):
        # The prompts' context: recomputed while the text encoder (or a token) trains, else computed once.
        # --text-encoder-steps N (kohya's --stop_text_encoder_training) freezes the text encoder at step N.
        nonlocal fixed_context
        if te_params and te_params[0].requires_grad and cfg.text_encoder_steps and step >= cfg.text_encoder_steps:
            for p in te_params:
                p.requires_grad_(False)
            fixed_context = None
        if token_trains or (te_params and te_params[0].requires_grad):
            c = model.text_encoder(prompt_ids)
        else:
            if fixed_context is None:
                with torch.no_grad():
                    fixed_context = model.text_encoder(prompt_ids)
            c = fixed_context
        return torch.cat([c[:1].expand(n_inst, -1, -1), c[1:].expand(n_class, -1, -1)])

    metrics = open(out / "metrics.jsonl", "a")
    crash_at = int(os.environ.get("MINIDREAM_CRASH_AFTER_STEP", "0"))  # test hook: simulate a killed process
    bar = Progress(cfg.steps, "training", start=step)
    last_good = step

    def checkpoint_now(at):
        path = out / "checkpoints" / f"step-{at:06d}.safetensors"
        try:
            save_checkpoint(path, at, cfg, groups, opt, sched, scaler, g)
        except OSError as e:
            raise TrainError(f"{path}: could not be written ({e.strerror}); the last good checkpoint is kept "
                             f"(step {last_good}); free space and --resume latest") from None
        for old in checkpoints(out)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            old.unlink()
        return path

    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            tot = inst = prior = 0.0
            for _ in range(cfg.grad_accum):
                n_class = cfg.batch_size if cfg.prior else 0
                lat = [latents_for(0, instance_images, cfg.batch_size)]
                if n_class:
                    lat.append(latents_for(1, class_images, n_class))
                latents = torch.cat(lat)
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    loss, li, lp = training_step(model.unet, schedule, latents, context_for(cfg.batch_size, n_class),
                                                 cfg.batch_size, cfg.prior_loss_weight, g, cfg.snr_gamma, cfg.noise_offset)
                if not torch.isfinite(loss):
                    raise TrainError(f"loss is {loss.item()} at step {step + 1}; stopped, the last good checkpoint is "
                                     f"kept (step {last_good}). Try a lower --lr or --mixed-precision no")
                loss = loss / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                tot, inst, prior = tot + loss.item(), inst + li.item() / cfg.grad_accum, prior + lp.item() / cfg.grad_accum
            if scaler:
                scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item() if cfg.max_grad_norm else None
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            bar.update(loss=tot, inst=inst, prior=prior)
            metrics.write(json.dumps({"step": step, "loss": tot, "loss_instance": inst, "loss_prior": prior,
                                      "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "step_s": dt}) + "\n")
            metrics.flush()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint_now(step)
                last_good = step
            if cfg.validation_prompts and cfg.validation_every and step % cfg.validation_every == 0:
                validation_grid(model, cfg, out / "samples" / f"step-{step:06d}.png")
            if crash_at and step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        bar.close()
        path = checkpoint_now(step)
        raise TrainError(f"interrupted at step {step}; saved {path}; continue with --resume latest") from None
    finally:
        metrics.close()
    bar.close()
    if cfg.validation_prompts:
        validation_grid(model, cfg, out / "samples" / "final.png")
    model.unet.eval()
    trained = {name: p.detach() for params in groups.values() for name, p in params}
    try:
        return model, export(load_base(cfg), trained, cfg, out)
    except OSError as e:  # disk full, read-only: keep the trained weights resumable, then say how to export again
        try:
            kept = f"the trained weights are in {checkpoint_now(step)}; free space and --resume latest to export"
        except TrainError:
            kept = "no checkpoint could be written either"
        raise TrainError(f"export to {out} failed ({e.strerror}); {kept}") from None


@torch.no_grad()
def validation_grid(model: StableDiffusion, cfg: TrainConfig, path: Path):
    """One row per validation prompt, one column per fixed seed: comparable across steps."""
    was_training = model.unet.training
    model.unet.eval()
    rows = []
    autocast = next(model.unet.parameters()).dtype != torch.float32
    dev = next(model.unet.parameters()).device
    with torch.autocast(dev.type, dtype=next(model.unet.parameters()).dtype, enabled=autocast):
        for p in cfg.validation_prompts:
            rows.append(generate(model, [p] * cfg.validation_images, steps=cfg.validation_steps,
                                 generator=torch.Generator("cpu").manual_seed(cfg.seed), progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(torch.cat(rows), cols=cfg.validation_images), path, {"prompts": list(cfg.validation_prompts)})
    model.unet.train(was_training)
