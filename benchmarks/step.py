"""The DreamBooth step as users run it, on any device: the trainer's own step (training.step: prepare → Stepper,
built from a TrainConfig as `minidream train` builds it) eager, `--compile on` and `--compile graphs`, against the
step of diffusers' train_dreambooth.py (train_dreambooth_lora.py for LoRA) eager and under torch.compile (the best
a diffusers user can do). 1 instance + 1 class image, bf16 autocast on CUDA (fp32 on the CPU), AdamW.

Interleaved rounds: every round times each variant for a few steps, in an order rotated round by round, so a GPU
that warms up or a CPU that throttles biases no side; the medians and spreads are over rounds. All variants live in
one process (the GPU's memory: peak per variant is measured alone, after the timing).
"""
import statistics
import sys

import torch

from benchmarks.common import images, prior_preservation_update, sync

# name: (side, compile). "graphs" only on CUDA.
VARIANTS = {"ours": ("ours", "off"), "ours --compile on": ("ours", "on"), "ours --compile graphs": ("ours", "graphs"),
            "diffusers": ("diffusers", False), "diffusers + torch.compile": ("diffusers", True)}


def ours(folder: str, mode: str, device: str, res: int, cache_latents: bool = True, compile: str = "off",
         **settings):
    """The trainer's step: a callable that runs step k, k+1, ... (`settings`: other TrainConfig fields)."""
    from minidream.models.attention import resolve_backend
    from minidream.training.concepts import plain
    from minidream.training.config import TrainConfig
    from minidream.training.export import load_base
    from minidream.training.runtime import PRECISIONS, Runtime
    from minidream.training.step import prepare
    settings.setdefault("mixed_precision", "bf16" if torch.device(device).type == "cuda" else "no")
    cfg = TrainConfig(model=folder, instance_dir="", class_noun="dog", out="", mode=mode, resolution=res,
                      steps=10 ** 6, device=device, cache_latents=cache_latents, compile=compile, **settings)
    dev = torch.device(device)
    rt = Runtime(dev, resolve_backend(cfg.attention, dev), PRECISIONS[cfg.mixed_precision])
    model = rt.place(load_base(cfg))
    inst, cls = images(res)
    stepper = prepare(cfg, model, rt, [plain([inst], cfg.prompts[0], res), plain([cls], cfg.prompts[1], res)])
    state = {"step": 0}

    def step():
        stepper(state["step"])
        state["step"] += 1
    return step


def diffusers(folder: str, mode: str, device: str, res: int, cache_latents: bool = True, compile: bool = False,
              use_8bit_adam: bool = False, gradient_checkpointing: bool = False):
    """train_dreambooth.py's loop body with prior preservation, on its defaults: AdamW(betas 0.9/0.999, weight decay
    1e-2, eps 1e-8), clipping at 1.0, the prompt encoded every step, bf16 autocast with the frozen VAE and text
    encoder in bf16 (accelerate's --mixed_precision bf16) on CUDA. `cache_latents`: the latents' distribution
    computed once (as train_dreambooth_lora_sdxl.py's --cache_latents), else the VAE encodes every step; `compile`:
    the UNet under torch.compile."""
    import numpy as np
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from benchmarks import diffusers_sdxl
    if diffusers_sdxl.is_sdxl(folder):  # train_dreambooth_lora_sdxl.py
        return diffusers_sdxl.lora_step(folder, mode, res, gradient_checkpointing, device, cache_latents, compile)
    cuda = torch.device(device).type == "cuda"
    half = torch.bfloat16 if cuda else None
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device, half or torch.float32)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device, half or torch.float32)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae.requires_grad_(False)
    text.requires_grad_(False)
    unet.requires_grad_(mode == "unet")
    if mode == "attention":  # diffusers has no such mode; the same projections as ours, unfrozen
        from minidream.training.trainable import UNET_ATTENTION
        for name, m in unet.named_modules():
            if UNET_ATTENTION.fullmatch(name):
                m.requires_grad_(True)
    elif mode == "lora":  # train_dreambooth_lora.py
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    from minidream.training.trainable import MODES  # our learning rates (the step's cost does not depend on them)
    adamw = torch.optim.AdamW
    if use_8bit_adam:
        import bitsandbytes
        adamw = bitsandbytes.optim.AdamW8bit
    opt = adamw(params, lr=MODES[mode].lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    forward = torch.compile(unet) if compile else unet
    pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1
                          for im in images(res)]).to(device, vae.dtype)
    ids = tok(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    dist = vae.encode(pixels).latent_dist if cache_latents else None

    def step():
        with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
            latents = (dist or vae.encode(pixels).latent_dist).sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2,), device=device)
            context = text(ids)[0]
            pred = forward(noise_scheduler.add_noise(latents, noise, t), t, context, return_dict=False)[0]
        prior_preservation_update(pred, noise, params, opt)
    return step


def make(variant: str, folder: str, mode: str, device: str, res: int, cache_latents: bool):
    side, compiled = VARIANTS[variant]
    build = ours if side == "ours" else diffusers
    return build(folder, mode, device, res, cache_latents=cache_latents, compile=compiled)


def available(device: str, diffusers_ok: bool, compiled: bool = True) -> list[str]:
    """The variants this device and these packages can run (`compiled`: False leaves the compiled ones out)."""
    cuda = torch.device(device).type == "cuda"
    return [v for v, (side, c) in VARIANTS.items()
            if (cuda or c != "graphs") and (diffusers_ok or side == "ours") and (compiled or c in ("off", False))]


def timed(step, device, n: int) -> float:
    """Seconds per step over n steps."""
    import time
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def interleaved(steps: dict, device, rounds: int, per_round: int, warmup: int, say=None) -> dict:
    """{variant: seconds-per-step stats} over `rounds` rounds, each variant's steps once per round, the order rotated.
    `steps`: variant -> its step callable (already built; warm-up compiles what compiles)."""
    names = list(steps)
    for n in names:
        for _ in range(warmup):
            steps[n]()
        if say:
            say(f"warmed up {n}")
    per = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            per[n].append(timed(steps[n], device, per_round))
        if say:
            say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {per[n][-1] * 1e3:.1f} ms" for n in names))
    return {n: spread(v) for n, v in per.items()}


def spread(per_round: list[float]) -> dict:
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
    ms = [x * 1e3 for x in per_round]
    return {"median_ms": statistics.median(ms), "p25_ms": q[0] * 1e3, "p75_ms": q[2] * 1e3, "min_ms": min(ms),
            "max_ms": max(ms), "per_round_ms": ms}


def peak_bytes(step, device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench(folder: str, device: str, res: int, modes, variants: list[str], rounds: int = 5, per_round: int = 3,
          warmup: int = 3, caches=(True, False), say=print) -> list[dict]:
    """Rows of the step benchmark: one per (mode, cached latents), every variant in interleaved rounds. The compiled
    variants run on the cached rows only: latents cached or not changes the VAE's part, which no variant compiles,
    and each compiled variant costs a compilation (about a minute) per row."""
    rows = []
    for mode in modes:
        for cache in caches:
            steps, errors = {}, {}
            for v in (v for v in variants if cache or VARIANTS[v][1] in ("off", False)):
                try:
                    steps[v] = make(v, folder, mode, device, res, cache)
                except Exception as e:  # a variant this machine cannot build (a missing compiler, ...): said
                    errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            say(f"step --train {mode}, {'cached' if cache else 'uncached'} latents: {', '.join(steps)}")
            try:
                stats = interleaved(steps, device, rounds, per_round, warmup, say)
            except Exception as e:
                stats, errors = {}, {**errors, "all": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            for v in stats:
                stats[v]["peak_bytes"] = peak_bytes(steps[v], device)
            row = {"benchmark": "dreambooth_step", "mode": mode, "cached_latents": cache, "res": res,
                   "rounds": rounds, "steps_per_round": per_round, "variants": stats, "errors": errors}
            base = stats.get("diffusers", {}).get("median_ms")
            for v, s in stats.items():
                if base:
                    s["speedup_vs_diffusers"] = base / s["median_ms"]
                compiled = stats.get("diffusers + torch.compile", {}).get("median_ms")
                if compiled:
                    s["speedup_vs_diffusers_compiled"] = compiled / s["median_ms"]
            rows.append(row)
            del steps
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)
