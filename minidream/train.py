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
import torch.nn as nn
import torch.nn.functional as F

from minidream import lora as lora_lib
from minidream.attention import resolve_backend, set_attention_backend
from minidream.loading import StableDiffusion, load, save_pretrained, save_safetensors
from minidream.pipeline import generate, grid, save_png
from minidream.progress import Progress
from minidream.schedulers import NoiseSchedule

MODES = ("unet", "attention", "lora")
EXPORTS = ("diffusers", "single-file", "lora-diffusers", "lora-kohya")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class TrainError(Exception):
    """Bad input or a failed run, worded for the user (one line)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; stored in run.json and in every checkpoint. Defaults: `cli.py train`."""
    model: str
    instance_dir: str
    out: str
    class_dir: str | None
    identifier: str
    class_noun: str
    instance_prompt: str | None
    class_prompt: str | None
    resolution: int
    center_crop: bool
    flip: float
    prior: bool
    num_class_images: int
    prior_loss_weight: float
    class_steps: int
    class_guidance: float
    class_batch_size: int
    train: str
    lora_rank: int
    lora_alpha: float
    train_text_encoder: bool
    train_token: bool
    lr: float | None
    token_lr: float
    lr_schedule: str
    warmup_steps: int
    steps: int
    batch_size: int
    grad_accum: int
    mixed_precision: str
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

# Settings that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "validation_prompts", "validation_every",
                     "validation_images", "validation_steps", "save_as", "device", "attention")


# ---------------------------------------------------------------------------------------------
# Data

def load_instance_images(folder: Path, resolution: int, flag: str = "--instance-dir") -> list:
    """The subject's photos (or the class images), RGB, EXIF orientation applied; every unreadable file
    named before any compute."""
    from PIL import Image, ImageOps
    if not folder.is_dir():
        raise TrainError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainError(f"{flag} {folder}: no images (.jpg, .png, .webp) in it")
    images, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
            images.append(im.convert("RGB"))  # RGBA, grayscale, CMYK, palette -> RGB
        except Exception:
            bad.append(f.name)
    if bad:
        raise TrainError(f"{flag} {folder}: unreadable image(s): {', '.join(bad)}; remove or fix them")
    small = [f.name for f, im in zip(files, images) if min(im.size) < resolution]
    if small:
        print(f"warning: {len(small)} image(s) smaller than --resolution {resolution} will be upscaled: "
              f"{', '.join(small[:5])}", file=sys.stderr)
    return images


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


def make_class_images(model: StableDiffusion, cfg: TrainConfig, class_dir: Path, device):
    """Top up `class_dir` to --num-class-images images of the class prompt, drawn by the base model.
    Existing images are kept, so an interrupted generation resumes where it stopped."""
    try:
        class_dir.mkdir(parents=True, exist_ok=True)
        probe = class_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--class-dir {class_dir}: not writable ({e.strerror}); choose another folder") from None
    have = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return
    prompt = cfg.prompts[1]
    print(f"generating {missing} class images for {prompt!r} into {class_dir}", file=sys.stderr)
    bar = Progress(missing, "class images")
    i = len(have)
    while i < cfg.num_class_images:
        n = min(cfg.class_batch_size, cfg.num_class_images - i)
        g = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + i)  # depends only on the index
        imgs = generate(model, [prompt] * n, steps=cfg.class_steps, guidance=cfg.class_guidance, generator=g,
                        height=cfg.resolution, width=cfg.resolution, progress=False)
        for img in imgs:
            save_png(img, class_dir / f"class-{i:05d}.png", {"prompt": prompt, "index": i})
            i += 1
        bar.update(n)


# ---------------------------------------------------------------------------------------------
# What is trained

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
        return F.embedding(ids, self.weight)


def add_token(model: StableDiffusion, token: str, init_word: str) -> int:
    """A new token for the identifier, its embedding initialised from the class noun's."""
    init_ids = model.tokenizer.encode(init_word)
    emb = model.text_encoder.embeddings.token_embedding
    init = emb.weight[init_ids].mean(0, keepdim=True)
    tid = model.tokenizer.add_token(token)
    model.text_encoder.embeddings.token_embedding = TokenEmbedding(emb, init)
    return tid


def merged_text_encoder_state(model: StableDiffusion) -> None:
    """Turn a TokenEmbedding back into a plain, larger nn.Embedding (for export)."""
    emb = model.text_encoder.embeddings.token_embedding
    if isinstance(emb, TokenEmbedding):
        w = emb.weight.detach()
        plain = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        plain.weight = nn.Parameter(w.clone(), requires_grad=False)
        model.text_encoder.embeddings.token_embedding = plain
        model.text_encoder.cfg = replace(model.text_encoder.cfg, vocab_size=w.shape[0])


def select_trainable(model: StableDiffusion, train: str, lora_rank: int = 4, lora_alpha: float = 4.0,
                     train_text_encoder: bool = False, token: str | None = None, init_word: str | None = None
                     ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze (or add) what --train / --train-text-encoder / --train-token ask
    for. Returns the trainable parameters by group, named as in the checkpoints."""
    for m in (model.unet, model.text_encoder, model.vae):
        m.requires_grad_(False)
    if train == "unet":
        model.unet.requires_grad_(True)
    elif train == "attention":
        for lin in lora_lib.matching_linears(model.unet, lora_lib.UNET_ATTENTION).values():
            lin.requires_grad_(True)
    else:
        lora_lib.add_lora(model.unet, lora_lib.UNET_ATTENTION, lora_rank, lora_alpha)
    if train_text_encoder:
        if train == "lora":
            lora_lib.add_lora(model.text_encoder, lora_lib.TEXT_ATTENTION, lora_rank, lora_alpha)
        else:
            model.text_encoder.requires_grad_(True)
    if token:
        add_token(model, token, init_word)
    groups = {"unet": [], "text_encoder": [], "token": []}
    for name, p in model.unet.named_parameters():
        if p.requires_grad:
            groups["unet"].append((f"unet.{name}", p))
    for name, p in model.text_encoder.named_parameters():
        if p.requires_grad:
            groups["token" if name.endswith("token_embedding.new") else "text_encoder"].append((f"text_encoder.{name}", p))
    return groups


def print_summary(groups, model: StableDiffusion):
    total = {"unet": model.unet, "text_encoder": model.text_encoder,
             "token": model.text_encoder.embeddings.token_embedding}
    print(f"{'component':<14}{'trainable':>14}{'of':>16}{'tensors':>9}", file=sys.stderr)
    for name, params in groups.items():
        n = sum(p.numel() for _, p in params)
        of = sum(p.numel() for p in total[name].parameters())
        print(f"{name:<14}{n:>14,}{of:>16,}{len(params):>9}", file=sys.stderr)


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
# Export

def export(model: StableDiffusion, cfg: TrainConfig, out: Path):
    """Write the formats asked for by --save-as (and the learned token, when there is one)."""
    written = []
    emb = model.text_encoder.embeddings.token_embedding
    if isinstance(emb, TokenEmbedding):
        token = f"<{cfg.identifier}>"
        save_safetensors({token: emb.new.detach()[0].float()}, out / "learned_embeds.safetensors")
        written.append(out / "learned_embeds.safetensors")
    if "lora-diffusers" in cfg.save_as:
        save_safetensors(lora_lib.diffusers_lora_state_dict(model.unet, model.text_encoder),
                         out / "lora" / "pytorch_lora_weights.safetensors")
        written.append(out / "lora" / "pytorch_lora_weights.safetensors")
    if "lora-kohya" in cfg.save_as:
        save_safetensors(lora_lib.kohya_lora_state_dict(model.unet, model.text_encoder),
                         out / "lora_kohya.safetensors", metadata={"ss_network_dim": str(cfg.lora_rank),
                                                                    "ss_network_alpha": str(cfg.lora_alpha)})
        written.append(out / "lora_kohya.safetensors")
    if "diffusers" in cfg.save_as or "single-file" in cfg.save_as:
        # a plain model: adapters merged into their base weights, the learned token a normal row
        lora_lib.merge_lora(model.unet)
        lora_lib.merge_lora(model.text_encoder)
        merged_text_encoder_state(model)
        for m in (model.unet, model.text_encoder, model.vae):
            m.float()
        if "diffusers" in cfg.save_as:
            save_pretrained(model, out / "model")
            written.append(out / "model")
        if "single-file" in cfg.save_as:
            from minidream.convert import save_single_file
            save_single_file(model, out / "model.safetensors")
            written.append(out / "model.safetensors")
    return written


# ---------------------------------------------------------------------------------------------
# The run

def validate(cfg: TrainConfig):
    if cfg.train not in MODES:
        raise TrainError(f"--train {cfg.train!r} is not one of {', '.join(MODES)}")
    bad = [s for s in cfg.save_as if s not in EXPORTS]
    if bad:
        raise TrainError(f"--save-as {bad[0]!r} is not one of {', '.join(EXPORTS)}")
    if any(s.startswith("lora") for s in cfg.save_as) and cfg.train != "lora":
        raise TrainError("--save-as lora-* needs --train lora")
    for flag, v in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                    ("--resolution", cfg.resolution)):
        if v < 1:
            raise TrainError(f"{flag} must be at least 1 (got {v})")
    if cfg.resolution % 8:
        raise TrainError(f"--resolution must be a multiple of 8 (got {cfg.resolution})")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise TrainError(f"--mixed-precision {cfg.mixed_precision!r} is not one of no, fp16, bf16")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise TrainError(f"--lr-schedule {cfg.lr_schedule!r} is not one of constant, cosine")


def lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return f


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False):
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
        stored = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in start_meta["config"].items()})
        cfg = replace(stored, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES})
        print(f"resuming from {ck} at step {start_meta['step']}", file=sys.stderr)
    elif run_file.exists() and not overwrite:
        raise TrainError(f"--out {out} holds another run (run.json); pass --resume latest to continue it, "
                         f"--overwrite to start over, or choose another folder")
    instance_images = load_instance_images(Path(cfg.instance_dir), cfg.resolution)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(asdict(cfg), indent=2))

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise TrainError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    half = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    torch.manual_seed(cfg.seed)
    try:
        model = load(cfg.model, dtype=torch.float32)  # fp32 master weights, whatever the file stores
    except Exception as e:
        raise TrainError(str(e)) from None
    model.to(device)
    set_attention_backend(model.unet, resolve_backend(cfg.attention, device))
    set_attention_backend(model.vae, resolve_backend(cfg.attention, device))

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
    if half is not None:  # frozen weights in half precision; what trains keeps fp32 master weights
        for m in (model.unet, model.text_encoder, model.vae):
            m.to(half)
        for p in trainable:
            p.data = p.data.float()
    model.unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
    model.unet.train()
    model.text_encoder.train(bool(groups["text_encoder"]))

    lr = cfg.lr or DEFAULT_LR[cfg.train]
    param_groups = [{"params": [p for _, p in groups["unet"]], "lr": lr},
                    {"params": [p for _, p in groups["text_encoder"]], "lr": lr},
                    {"params": [p for _, p in groups["token"]], "lr": cfg.token_lr, "weight_decay": 0.0}]
    param_groups = [pg for pg in param_groups if pg["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=1e-2, **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    g = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop: data, noise, timesteps
    step = 0
    if start_meta is not None:
        restore(start_meta, start_tensors, groups, opt, sched, scaler, g)
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
    te_trains = bool(groups["text_encoder"]) or token_trains
    prompt_ids = model.tokenizer(list(cfg.prompts)).to(device)
    fixed_context = None
    if not te_trains:
        with torch.no_grad():
            fixed_context = model.text_encoder(prompt_ids)

    def context_for(n_inst, n_class):
        c = model.text_encoder(prompt_ids) if te_trains else fixed_context
        return torch.cat([c[:1].expand(n_inst, -1, -1), c[1:].expand(n_class, -1, -1)])

    metrics = open(out / "metrics.jsonl", "a")
    crash_at = int(os.environ.get("MINIDREAM_CRASH_AFTER_STEP", "0"))  # test hook: simulate a killed process
    bar = Progress(cfg.steps, "training", start=step)
    last_good = step

    def checkpoint_now(at):
        path = out / "checkpoints" / f"step-{at:06d}.safetensors"
        save_checkpoint(path, at, cfg, groups, opt, sched, scaler, g)
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
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            bar.update(loss=tot, inst=inst, prior=prior)
            metrics.write(json.dumps({"step": step, "loss": tot, "loss_instance": inst, "loss_prior": prior,
                                      "lr": sched.get_last_lr()[0], "step_s": dt}) + "\n")
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
    return model, export(model, cfg, out)


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
