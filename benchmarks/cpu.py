"""The DreamBooth step on the CPU: the trainer's own step (training.step: prepare → Stepper, with the optimizer,
precision and attention choices `minidream train` makes) against the step of diffusers' train_dreambooth.py
(train_dreambooth_lora.py for LoRA), same architecture and weights, fp32, 1 instance + 1 class image.

Each measurement runs in its own child process, so each has its own peak RSS (what `ps` would show the
user), and the rounds rotate the sides (ours eager, ours --compile on, diffusers) and which goes first, so a machine
that slows down or speeds up during the run biases none. The compiled side's warm-up steps compile (Inductor's
generated C++; cached across processes after the first); only the steps after them are timed.

    python -m benchmarks sd --device cpu --res 256      # -> benchmarks/results/step-cpu-sd15-256-<cpu>.json
    python -m benchmarks.cpu --preset sd35-medium --mode lora --no-compile   # SD3.5 Medium's width, 4 blocks
    python -m benchmarks.cpu --preset flux-dev --layers 1 --mode lora --no-compile   # Flux [dev]'s width, 1 + 2
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("unet", "attention", "lora")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(side: str, folder: str, mode: str, res: int, warmup: int, steps: int):
    """One side, one mode: warm-up steps, then timed ones; prints one JSON line."""
    torch.manual_seed(0)
    from .step import VARIANTS, make
    if side not in VARIANTS:
        raise SystemExit(f"--child: {side!r} is not one of {', '.join(VARIANTS)}")
    step = make(side, folder, mode, "cpu", res, cache_latents=False)
    before = rss_now()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": times, "rss_before_first_step": before, "peak_rss": peak_rss()}))


def run_child(side, folder, mode, res, warmup, steps) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cpu", "--child", side, "--folder", folder, "--mode", mode,
           "--res", str(res), "--warmup", str(warmup), "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{side} {mode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SIDES = ("ours", "ours --compile on", "diffusers")


def make_model(folder: str, preset: str, layers: int):
    """The benchmark's random model, written in the diffusers layout: a preset's, or SD3.5 Medium's width at
    `layers` blocks (diffusers' SD3 script against ours)."""
    from .sd import PROMPTS
    from minidream.formats.diffusers_layout import save_pretrained
    from minidream.models.stable_diffusion import random_model
    from minidream.models.tokenizer import train_bpe
    if preset == "sd35-medium":
        from .diffusers_sd3 import make_folder
        return make_folder(folder, layers)
    if preset == "flux-dev":
        from .diffusers_flux import make_folder
        return make_folder(folder, layers)
    save_pretrained(random_model(preset, tokenizer=train_bpe(PROMPTS * 4, 300), seed=0), folder)


def run(preset: str = "sd15", res: int = 256, rounds: int = 5, warmup: int = 1, steps: int = 1,
        modes=MODES, out=None, sides=SIDES, layers: int = 4) -> Path:
    from .common import RESULTS, environment
    rows = []
    with tempfile.TemporaryDirectory() as d:
        # the model is built in a process of its own: a child's peak RSS starts from what its parent held when it
        # started (Linux keeps the high-water mark across exec), so this process stays small
        subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--make", d, "--preset", preset, "--layers",
                        str(layers)], check=True)
        for mode in modes:
            runs = {side: [] for side in sides}
            for r in range(rounds):
                for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                    compiles = "compile" in side  # its first steps compile: more warm-up
                    runs[side].append(run_child(side, d, mode, res, warmup + 2 * compiles, steps))
                    print(f"{mode} round {r} {side}: {statistics.median(runs[side][-1]['step_s']):.2f} s/step, "
                          f"peak RSS {runs[side][-1]['peak_rss'] / 2 ** 30:.2f} GiB", file=sys.stderr)
            row = {"benchmark": "dreambooth_step_cpu", "mode": mode, "res": res, "rounds": rounds}
            for side, rs in runs.items():
                per_round = [statistics.median(x["step_s"]) for x in rs]
                q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
                row[side] = {"median_s": statistics.median(per_round), "p25_s": q[0], "p75_s": q[2],
                             "min_s": min(per_round), "max_s": max(per_round), "per_round_s": per_round,
                             "peak_rss_bytes": max(x["peak_rss"] for x in rs),
                             "rss_before_first_step_bytes": max(x["rss_before_first_step"] for x in rs)}
            ratios = [b / a for a, b in zip(row["ours"]["per_round_s"], row["diffusers"]["per_round_s"])]
            row["speedup"] = row["diffusers"]["median_s"] / row["ours"]["median_s"]
            row["speedup_per_round"] = ratios
            if "ours --compile on" in row:
                row["speedup_compiled"] = row["diffusers"]["median_s"] / row["ours --compile on"]["median_s"]
            rows.append(row)
            print(f"{mode}: speedup {row['speedup']:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})", file=sys.stderr)
    env = environment("cpu")
    env.update(device=f"cpu: {cpu_name()}, {os.cpu_count()} cores", torch_threads=torch.get_num_threads())
    depth = {"sd35-medium": {"mmdit_blocks": layers, "mmdit_blocks_of_the_real_model": 24},
             "flux-dev": {"double_blocks": layers, "single_blocks": 2 * layers,
                          "blocks_of_the_real_model": "19 double, 38 single"}}.get(preset, {})
    path = Path(out or RESULTS) / f"step-cpu-{preset}-{res}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "step-cpu", **env, "preset": preset, **depth, "warmup_steps": warmup,
                                "timed_steps_per_round": steps, "results": rows}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--child", help="one side: " + ", ".join(SIDES))
    ap.add_argument("--make", help="write the random model into this folder, and stop")
    ap.add_argument("--folder")
    ap.add_argument("--mode", default=None, help="one of " + ", ".join(MODES) + " (default: all)")
    ap.add_argument("--preset", default="sd15", help="a random model's preset, or sd35-medium (SD3.5 Medium's width "
                    "at --layers blocks, LoRA only, against train_dreambooth_lora_sd3.py), or flux-dev (Flux.1 "
                    "[dev]'s width at --layers double and 2 x --layers single blocks, against "
                    "train_dreambooth_lora_flux.py)")
    ap.add_argument("--layers", type=int, default=4, help="sd35-medium: MMDiT blocks (the real model has 24); "
                    "flux-dev: double blocks (19; single: twice as many, of 38)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compile", action="store_true", help="leave out the --compile on side")
    a = ap.parse_args()
    if a.make:
        return make_model(a.make, a.preset, a.layers)
    if a.child:
        return child(a.child, a.folder, a.mode, a.res, a.warmup, a.steps)
    run(a.preset, a.res, a.rounds, a.warmup, a.steps, (a.mode,) if a.mode else MODES, a.out,
        tuple(s for s in SIDES if not (a.no_compile and "compile" in s)), a.layers)


if __name__ == "__main__":
    main()
