"""Peak memory of one DreamBooth step per recipe: the trainer's step (benchmarks/cpu.py `ours`: prepare → Stepper,
what `minidream train` runs) with its memory options, beside diffusers' train_dreambooth.py step with its own memory
flags (8-bit Adam, gradient checkpointing). Same architecture and random weights, 1 instance + 1 class image.

On the CPU each recipe runs in its own child process and reports its peak RSS (what `ps` shows: the weights,
the optimizer state, the gradients and the activations); on CUDA it would be torch.cuda.max_memory_allocated
(not measured yet: no GPU in the session that wrote this).

    python -m benchmarks memory --res 256     # -> benchmarks/results/memory-cpu-sd15-256.json
    python -m benchmarks memory --whole --res 256 --only adafactor   # the whole command: benchmarks/whole_run.py
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# name -> (side, --train mode, settings): our TrainConfig fields, or diffusers' flags
RECIPES = {
    "ours unet": ("ours", "unet", {}),
    "ours unet, gradient checkpointing": ("ours", "unet", {"gradient_checkpointing": True}),
    "ours unet, adamw8bit + fused backward + checkpointing": (
        "ours", "unet", {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True}),
    "ours unet, adafactor + fused backward + checkpointing": (
        "ours", "unet", {"optimizer": "adafactor", "fused_backward": True, "gradient_checkpointing": True}),
    "diffusers unet": ("diffusers", "unet", {}),
    "diffusers unet, --use_8bit_adam --gradient_checkpointing": (
        "diffusers", "unet", {"use_8bit_adam": True, "gradient_checkpointing": True}),
    "ours attention": ("ours", "attention", {}),
    "ours lora": ("ours", "lora", {}),
    "ours lora, bf16 frozen weights + checkpointing": (
        "ours", "lora", {"mixed_precision": "bf16", "gradient_checkpointing": True}),
    "diffusers lora": ("diffusers", "lora", {}),
    "diffusers lora, --gradient_checkpointing": ("diffusers", "lora", {"gradient_checkpointing": True}),
}

# Flux.1 [dev] at its real width on a proxy of 2 double and 4 single blocks (of 19 and 38:
# benchmarks/diffusers_flux.py), stored in bf16 as the released files are: the LoRA recipes a 24 GB card runs, and
# diffusers' script at its defaults
FLUX_RECIPES = {
    "ours lora, bf16 + checkpointing": ("ours", "lora", {"mixed_precision": "bf16", "gradient_checkpointing": True}),
    **{f"ours lora, bf16 + checkpointing, {fmt} base": (
        "ours", "lora", {"mixed_precision": "bf16", "gradient_checkpointing": True, "quantize_base": fmt})
       for fmt in ("fp8", "int8", "nf4")},
    "diffusers lora": ("diffusers", "lora", {}),
}
# SD3.5 Large the same way: its width at 6 of its 38 blocks (benchmarks/diffusers_sd3.py; CLIP-L and -G, no T5,
# as that module's reference step), bf16 files; diffusers' side is train_dreambooth_lora_sd3.py's step
LARGE_PROXIES = ("flux-dev", "sd35-large")
# the row each preset's others are measured against: diffusers' default step
REFERENCE = {"flux-dev": "diffusers lora", "sd35-large": "diffusers lora"}


def recipes_of(preset: str) -> dict:
    return FLUX_RECIPES if preset in LARGE_PROXIES else RECIPES


def model_folder(preset: str, folder: str):
    """The preset's random model, written in the diffusers layout (the large models in bf16, as they ship)."""
    if preset in LARGE_PROXIES:
        from safetensors.torch import load_file, save_file
        import torch
        from . import diffusers_flux, diffusers_sd3
        if preset == "flux-dev":
            diffusers_flux.make_folder(folder, layers=2)
        else:
            diffusers_sd3.make_folder(folder, layers=6, large=True)
        for f in Path(folder).glob("*/*.safetensors"):
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
        return
    from .sd import PROMPTS
    from minidream.formats.diffusers_layout import save_pretrained
    from minidream.models.stable_diffusion import random_model
    from minidream.models.tokenizer import train_bpe
    save_pretrained(random_model(preset, tokenizer=train_bpe(PROMPTS * 4, 300), seed=0), folder)


# what a preset's file lacks, and why
NOTES = {"sdxl": "; diffusers' rows are train_dreambooth_lora_sdxl.py's step (benchmarks/diffusers_sdxl.py): diffusers "
                 "has no whole-UNet SDXL DreamBooth script; the full-UNet recipes with AdamW's full state (fp32: ~10 "
                 "GiB of weights, ~31 GiB with Adam's state and the gradients) do not fit this 24 GiB machine and are "
                 "not measured"}


def child(recipe: str, folder: str, res: int, steps: int):
    import torch
    from . import cpu, diffusers_flux, diffusers_sd3, diffusers_sdxl, step as trainer_step
    side, mode, settings = {**RECIPES, **FLUX_RECIPES}[recipe]
    torch.manual_seed(0)
    if side == "ours":
        step = trainer_step.ours(folder, mode, "cpu", res, cache_latents=False, **settings)
    elif diffusers_flux.is_flux(folder):
        step = diffusers_flux.lora_step(folder, mode, res)
    elif diffusers_sd3.is_sd3(folder):
        step = diffusers_sd3.lora_step(folder, mode, res)
    elif diffusers_sdxl.is_sdxl(folder):
        step = diffusers_sdxl.lora_step(folder, mode, res, **settings)
    else:
        step = trainer_step.diffusers(folder, mode, "cpu", res, cache_latents=False, **settings)
    before = cpu.rss_now()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"rss_before_first_step": before, "peak_rss": cpu.peak_rss(),
                      "step_s": (time.perf_counter() - t0) / steps}))


def run_child(recipe: str, folder: str, res: int, steps: int) -> dict:
    import subprocess
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", recipe, "--folder", folder, "--res", str(res),
           "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
        raise RuntimeError(f"{recipe}: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(preset: str = "sd15", res: int = 256, steps: int = 2, recipes=None, out=None) -> Path:
    import torch
    from .common import RESULTS, environment
    from .cpu import cpu_name
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model_folder(preset, d)
        for name in recipes or recipes_of(preset):
            if RECIPES[name][0] == "diffusers" and RECIPES[name][1] != "lora" and preset in ("sdxl", "tiny-xl"):
                print(f"{name}: skipped (diffusers' SDXL DreamBooth script trains LoRA only)", file=sys.stderr)
                continue
            got = run_child(name, d, res, steps)
            side, mode, settings = recipes_of(preset)[name]
            rows.append({"recipe": name, "side": side, "mode": mode, "settings": settings, **got})
            print(f"{name}: peak RSS {got['peak_rss'] / 2 ** 30:.2f} GiB ({got['step_s']:.1f} s/step)",
                  file=sys.stderr)
    reference = REFERENCE.get(preset, "diffusers unet")
    base = next((r["peak_rss"] for r in rows if r["recipe"] == reference), None)  # (SDXL: none)
    for r in rows:
        r["vs_diffusers_unet"] = r["peak_rss"] / base if base else None
    env = environment("cpu")
    env.update(device=f"cpu: {cpu_name()}, {os.cpu_count()} cores", torch_threads=torch.get_num_threads())
    path = Path(out or RESULTS) / f"memory-cpu-{preset}-{res}.json"
    if path.exists() and recipes:  # a partial rerun (--only): the file keeps the other recipes' rows, each with its
        kept = json.loads(path.read_text())  # own run's date and command
        ran = {r["recipe"] for r in rows}
        earlier = [{**r, "run": r.get("run") or {k: kept.get(k) for k in ("date", "command")}}
                   for r in kept["results"] if r["recipe"] not in ran]
        rows = earlier + [{**r, "run": {k: env.get(k) for k in ("date", "command")}} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ("step_s: the mean of each child's steps (the first allocates the optimizer state), not a speed figure "
            "(benchmarks/cpu.py measures speed); peak_rss includes loading the fp32 model" + NOTES.get(preset, ""))
    path.write_text(json.dumps({"benchmark": "memory-cpu", **env, "preset": preset, "res": res, "note": note,
                                "steps_per_child": steps, "measure": "peak RSS of a child process (bytes)",
                                "results": rows}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=[*RECIPES, *FLUX_RECIPES])
    ap.add_argument("--folder")
    ap.add_argument("--preset", default="sd15", choices=["sd15", "sd21", "sdxl", "tiny", "tiny-xl", *LARGE_PROXIES],
                    help="flux-dev: Flux.1 [dev]'s width, 2 double and 4 single blocks; sd35-large: SD3.5 Large's "
                         "width, 6 blocks; bf16 files, LoRA recipes")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="steps per recipe (the optimizer state exists after one)")
    ap.add_argument("--only", default="", help="comma-separated: the recipes whose name contains one of these")
    ap.add_argument("--out", default=None)
    ap.add_argument("--whole", action="store_true", help="the whole `minidream train` command of our recipes "
                    "(loading, class images, steps, checkpoint, exports; benchmarks/whole_run.py)")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, a.folder, a.res, a.steps)
    wanted = [w for w in a.only.split(",") if w]
    table = recipes_of(a.preset)
    chosen = [r for r in table if not wanted or any(w in r for w in wanted)]
    if a.whole:
        from . import whole_run
        from .common import RESULTS
        ours = {r: table[r][1:] for r in chosen if table[r][0] == "ours"}
        return whole_run.run(a.preset, a.res, a.steps, ours, a.out,
                             Path(a.out or RESULTS) / f"memory-cpu-{a.preset}-{a.res}.json",
                             REFERENCE.get(a.preset, "diffusers unet"))
    run(a.preset, a.res, a.steps, chosen, a.out)


if __name__ == "__main__":
    main()
