"""`minidream bench`: what this machine does with minidream, run from the installed package (no checkout needed).

Sections (SECTIONS): the attention kernels per SD shape and backend; the DreamBooth step as `minidream train` runs
it, per mode, eager / --compile on / --compile graphs (CUDA), against diffusers' script step eager and under
torch.compile, in interleaved rounds; the UNet forward and forward+backward per batch with FLOPs and MFU; sampling
(50 DDIM steps with CFG); the VAE. Peak GPU memory beside the step. Random weights at the real architecture (SD 1.5,
512 px on a GPU, 256 px on a CPU): nothing is downloaded. diffusers' rows come when diffusers, transformers and peft
are installed; otherwise ours alone, said once.

A table per section on the terminal as it finishes (progress on stderr while it runs) and everything in one JSON
file, bench-<device>.json, in --out.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention, sd, step as trainer_step
from .common import device_tag, environment
from .step import log
from minidream.kernels.shapes import SD_SHAPES
from minidream.formats.files import write_text


@dataclass(frozen=True)
class Plan:
    """How much of each section a pass measures."""
    preset: dict  # device type -> architecture
    res: dict  # device type -> image side
    shapes: dict  # attention shapes
    modes: tuple  # --train modes of the step
    caches: tuple  # cached latents or not
    compiled: bool  # the --compile variants (their first steps compile: minutes)
    rounds: int
    warmup: int
    repeat: int


PLANS = {
    "full": Plan({"cuda": "sd15", "cpu": "sd15"}, {"cuda": 512, "cpu": 256}, SD_SHAPES, ("unet", "attention", "lora"),
                 (True, False), True, 5, 3, 10),
    # on a CPU the quick pass runs the tiny architecture: it shows the suite works there, its numbers say little
    "quick": Plan({"cuda": "sd15", "cpu": "tiny"}, {"cuda": 512, "cpu": 32},
                  {k: SD_SHAPES[k] for k in ("sd1-self-1024-d80", "sd1-cross-1024-d80", "sd2-self-1024-d64")},
                  ("lora",), (True,), False, 2, 1, 3),
}


def section_attention(plan, device, ours, res, quick, say):
    shapes = plan.shapes if device == "cuda" else {k: (1, *v[1:]) for k, v in list(plan.shapes.items())[:3]}
    return attention.measure(shapes, device, plan.warmup, plan.repeat, say=say)


def section_step(plan, device, ours, res, quick, say):
    import tempfile
    from minidream.formats.diffusers_layout import save_pretrained
    variants = trainer_step.available(device, sd.has_reference(), compiled=plan.compiled)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        return trainer_step.bench(d, device, res, plan.modes, variants, rounds=plan.rounds, per_round=1 if quick else 3,
                                  warmup=plan.warmup, caches=plan.caches, say=say)


def with_model(fn):
    def section(plan, device, ours, res, quick, say):
        rows = fn(ours, device, res, quick, plan.warmup, plan.repeat)  # quick: fewer batches and steps, no compile
        for r in rows:
            r.pop("smoke", None)
        return rows
    return section


# name: (what it measures, how)
SECTIONS = {
    "attention": ("the attention kernels per SD shape: ours (Triton, on CUDA) and every SDPA backend",
                  section_attention),
    "step": ("the DreamBooth step per mode: eager, --compile on, --compile graphs, against diffusers'", section_step),
    "unet": ("the UNet forward and forward+backward per batch: ms, TFLOP/s, MFU", with_model(sd.bench_unet)),
    "sampling": ("DDIM sampling with CFG, one image (50 steps; --quick: 2)", with_model(sd.bench_sampling)),
    "vae": ("VAE encode and decode", with_model(sd.bench_vae)),
}


def quiet():
    """The reference libraries' own notices (weights loading bars, dtype advice) would bury the progress lines."""
    for name in ("diffusers", "transformers"):
        try:
            __import__(name).utils.logging.set_verbosity_error()
        except (ImportError, AttributeError):
            pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def show(name: str, rows: list[dict]):
    """The section's table on the terminal (the README's renderers)."""
    from . import report
    table = {"attention": report.attention_table, "step": report.step_table}.get(name, report.model_table)
    print(f"\n{name}: {SECTIONS[name][0]}\n", flush=True)
    table({"results": rows})


def result_path(out: Path, device: str) -> Path:
    """Where the pass's JSON goes: bench-<device name>.json in `out`."""
    return out / f"bench-{device_tag(environment(device))}.json"


def run(quick: bool, device: str, path: Path, only: list[str] | None = None) -> list[str]:
    """Every section (or `only` those), each table shown as it finishes; the JSON (`path`) written after each (a
    stopped pass keeps what it measured). Returns the sections that failed."""
    plan = PLANS["quick" if quick else "full"]
    quiet()
    if not sd.has_reference():
        log("diffusers/transformers/peft are not installed: ours alone (pip install diffusers transformers peft for "
            "the reference rows)")
    kind = torch.device(device).type
    preset, res = plan.preset[kind], plan.res[kind]
    log(f"building {preset} with random weights on {device} ({res} px)")
    ours, _ = sd.setup(preset, device)
    env = environment(device)
    doc = {"benchmark": "minidream-bench", **env, "pass": "quick" if quick else "full", "preset": preset,
           "res": res, "cpu_threads": torch.get_num_threads(), "sections": {}}
    names = [n for n in SECTIONS if not only or n in only]
    failed = []
    for k, name in enumerate(names):
        log(f"[{k + 1}/{len(names)}] {name}: {SECTIONS[name][0]}")
        try:
            rows = SECTIONS[name][1](plan, device, ours, res, quick, log)
        except Exception as e:  # one section that fails on this machine costs only itself
            rows = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}]
            log(f"{name}: {rows[0]['error']}")
        doc["sections"][name] = rows
        if "error" in rows[0]:
            failed.append(f"{name} ({rows[0]['error']})")
        else:
            show(name, rows)
        write_text(path, json.dumps(doc, indent=2))  # whole or not at all
    return failed
