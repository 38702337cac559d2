"""What DreamBooth changes, measured on the demo world (`python -m benchmarks.internals`, ~5 min on 2 CPU cores):
`minidream diff` between the demo model and four tuned copies — the whole UNet + text encoder (as `minidream
demo` trains), attention projections only, LoRA (rank 4, merged), and a new token (`--train-token`, attention
projections) — summarised into benchmarks/results/demo-diff-cpu.json, with each run's diff.md beside its model.
Where words look: benchmarks/demo_attention.py."""
import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

from minidream.inspect import weight_diff
from minidream.demo import world
from minidream.demo.architecture import DEMO_DIR
from minidream.demo.run import demo_config
from minidream.formats.loading import load
from minidream.training.dreambooth import dreambooth

VARIANTS = {  # name -> changes to the demo's own run (demo.run.demo_config)
    "unet + text encoder (the demo)": {},
    "attention projections": {"mode": "attention", "train_text_encoder": False},
    "LoRA r=4, merged (UNet + text encoder)": {"mode": "lora", "lr": 1e-3, "save_as": ("diffusers",)},
    "new token + attention projections": {"mode": "attention", "train_text_encoder": False, "train_token": True,
                                          "instance_prompt": "a <sks> toy"},
}


def summary(d: dict) -> dict:
    g = d["groups"]
    rows = {k: v for k, v in d["tensors"].items() if "token_embedding" in k}
    return {"by_component": g["by_component"], "by_type": g["by_type"],
            "tensors_changed": sum(v["rel_change"] > 0 for v in d["tensors"].values()), "tensors": len(d["tensors"]),
            "token_table": next(iter(rows.values()))}


def main(out: Path = Path("runs/internals"), seed: int = 0, results: Path = Path("benchmarks/results")):
    base = load(str(DEMO_DIR), dtype=torch.float32)
    record = {"what": __doc__.split("\n")[0], "seed": seed, "device": f"{platform.machine()} CPU",
              "torch": torch.__version__, "variants": {}}
    for name, change in VARIANTS.items():
        run = out / name.split(" ")[0].lower()
        (run / "instance").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(world.subject_images(world.SUBJECTS[0], 4)):
            img.save(run / "instance" / f"subject-{i}.png")
        # the settings demo-diff-cpu.json was measured at: 300 steps, UNet and text encoder at the same constant lr
        cfg = replace(demo_config(run, seed=seed, steps=300),
                      **{"lr": 3e-4, "text_encoder_lr": None, "lr_schedule": "constant", **change})
        dreambooth(cfg, overwrite=True)
        d = weight_diff.diff(base, load(str(run / "model"), dtype=torch.float32))
        weight_diff.write(d, run / "diff", {"base": str(DEMO_DIR), "tuned": str(run / "model")})
        record["variants"][name] = {"settings": {k: v for k, v in change.items()}, **summary(d)}
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo-diff-cpu.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/internals"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.out, a.seed)
