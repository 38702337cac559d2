"""The DreamBooth step as users run it, on any device: the trainer's own step (training.step: prepare → Stepper,
built from a TrainConfig as `minidream train` builds it) eager, `--compile on` and `--compile graphs`, against the
step of diffusers' train_dreambooth.py (train_dreambooth_lora.py for LoRA) eager and under torch.compile (the best
a diffusers user can do). 1 instance + 1 class image, bf16 autocast on CUDA (fp32 on the CPU), AdamW.

Interleaved rounds: every round times each variant for a few steps, in an order rotated round by round, so a GPU
that warms up or a CPU that throttles biases no side; the medians and spreads are over rounds. The eager variants
are one interleaved group, the compiled ones another (five models with their optimizer state do not fit one GPU
together). Each variant's peak GPU memory is measured as it is built and warmed up, above what the process held
before it.
"""
import statistics
import sys

import torch

from .common import images, prior_preservation_update, script_noising, script_pixels, sync

# name: (side, compile). "graphs" only on CUDA.
VARIANTS = {"ours": ("ours", "off"), "ours --compile on": ("ours", "on"), "ours --compile graphs": ("ours", "graphs"),
            "diffusers": ("diffusers", False), "diffusers + torch.compile": ("diffusers", True)}


def ours(folder: str, mode: str, device: str, res: int, cache_latents: bool = True, compile: str = "off",
         **settings):
    """The trainer's step: a callable that runs step k, k+1, ... (`settings`: other TrainConfig fields)."""
    from minidream.models.attention import resolve_backend
    from minidream.training.dataset import plain
    from minidream.training.config import TrainConfig
    from minidream.training.export import load_base
    from minidream.training.runtime import PRECISIONS, Runtime
    from minidream.training.step import prepare
    settings.setdefault("mixed_precision", "bf16" if torch.device(device).type == "cuda" else "no")
    from .diffusers_flux import is_flux
    from .diffusers_sd3 import is_sd3
    if is_sd3(folder):  # the T5 length of diffusers' SD3 script (its --max_sequence_length default)
        settings.setdefault("max_sequence_length", 77)
    if is_flux(folder):  # the LoRA targets of diffusers' Flux script (attention and feed-forward)
        settings.setdefault("lora_targets", "attn-ff")
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
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from . import diffusers_flux, diffusers_sd3, diffusers_sdxl
    for family in (diffusers_flux, diffusers_sd3):  # train_dreambooth_lora_flux.py, train_dreambooth_lora_sd3.py
        if family.is_model(folder):
            if compile:
                raise ValueError(f"the {family.__name__} reference runs eager")
            return family.lora_step(folder, mode, res, device, cache_latents)
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
        from minidream.models.lora_targets import UNET_TARGETS
        for name, m in unet.named_modules():
            if UNET_TARGETS["attn"].pattern.fullmatch(name):
                m.requires_grad_(True)
    elif mode == "lora":  # train_dreambooth_lora.py: the frozen UNet in the mixed-precision dtype, adapters added on it
        from peft import LoraConfig
        unet.to(dtype=half or torch.float32)
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
    pixels = script_pixels(res, device, vae.dtype)
    ids = tok(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    dist = vae.encode(pixels).latent_dist if cache_latents else None

    def step():
        with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
            noisy, noise, t = script_noising(vae, dist, pixels, noise_scheduler, device)
            pred = forward(noisy, t, text(ids)[0], return_dict=False)[0]
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


def interleaved(steps: dict, device, rounds: int, per_round: int, say=None) -> dict:
    """{variant: seconds-per-step stats} over `rounds` rounds, each variant's steps once per round, the order rotated.
    `steps`: variant -> its step callable, built and warmed up (`built`)."""
    names = list(steps)
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


def built(variants: list[str], folder, mode, device, res, cache, warmup: int, say) -> tuple[dict, dict, dict]:
    """Each variant built and warmed up (its compilation happens here), one after another: (steps, peak bytes, errors).
    A variant's peak is what its own model, optimizer state and step held at most above what the process held
    before it was built (CUDA; None on the CPU, where cpu.py measures each side in its own process)."""
    steps, peaks, errors = {}, {}, {}
    cuda = torch.device(device).type == "cuda"
    for v in variants:
        try:
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            steps[v] = make(v, folder, mode, device, res, cache)
            for _ in range(warmup):
                steps[v]()
            sync(device)
            peaks[v] = torch.cuda.max_memory_allocated() - before if cuda else None
            say(f"built and warmed up {v}")
        except Exception as e:  # a variant this machine cannot build or run (a missing compiler, memory): said
            steps.pop(v, None)
            errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            say(f"{v}: {errors[v]}")
    return steps, peaks, errors


def bench(folder: str, device: str, res: int, modes, variants: list[str], rounds: int = 5, per_round: int = 3,
          warmup: int = 3, caches=(True, False), compiled_modes=("unet", "lora"), say=print) -> list[dict]:
    """Rows of the step benchmark: one per (mode, cached latents). The eager variants run in interleaved rounds, then
    the compiled ones in theirs (all five at once would not fit one GPU beside each other for --train unet); the
    compiled ones only on the cached rows of `compiled_modes` (cached or not changes the VAE's part, which nothing
    compiles, and each compiled variant costs a compilation, about a minute, per row)."""
    rows = []
    for mode in modes:
        for cache in caches:
            groups = [[v for v in variants if VARIANTS[v][1] in ("off", False)]]
            if cache and mode in compiled_modes:
                groups.append([v for v in variants if VARIANTS[v][1] not in ("off", False)])
            stats, errors = {}, {}
            for group in filter(None, groups):
                say(f"step --train {mode}, {'cached' if cache else 'uncached'} latents: {', '.join(group)}")
                steps, peaks, failed = built(group, folder, mode, device, res, cache, warmup, say)
                errors.update(failed)
                try:
                    timed_here = interleaved(steps, device, rounds, per_round, say)
                except Exception as e:
                    timed_here, errors[" + ".join(steps)] = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                stats.update({v: {**t, "peak_bytes": peaks[v]} for v, t in timed_here.items()})
                del steps
                release(device)
            rows.append(row_of(mode, cache, res, rounds, per_round, stats, errors))
    return rows


def row_of(mode, cache, res, rounds, per_round, stats: dict, errors: dict) -> dict:
    """A row, with each variant's ratio to diffusers' script eager and under torch.compile."""
    for s in stats.values():
        for key, ref in (("speedup_vs_diffusers", "diffusers"),
                         ("speedup_vs_diffusers_compiled", "diffusers + torch.compile")):
            if ref in stats:
                s[key] = stats[ref]["median_ms"] / s["median_ms"]
    return {"benchmark": "dreambooth_step", "mode": mode, "cached_latents": cache, "res": res, "rounds": rounds,
            "steps_per_round": per_round, "variants": stats, "errors": errors,
            "note": "eager and compiled variants are timed in separate interleaved groups"}


def release(device):
    """What a group of variants left behind: compiled graphs (and their CUDA graph memory pools), cached blocks."""
    import gc
    torch.compiler.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)
