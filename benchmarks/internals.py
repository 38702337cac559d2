"""What DreamBooth changes, measured on the demo world (`python -m benchmarks.internals`, ~5 min on 2 CPU cores):
`minidream diff` between the demo model and four tuned copies — the whole UNet + text encoder (as `minidream
demo` trains), attention projections only, LoRA (rank 4, merged), and a new token (`--train-token`, attention
projections) — summarised into benchmarks/results/demo-diff-cpu.json, with each run's diff.md beside its model. With
`--attention runs/eval`: every prompt token's attention localisation (benchmarks/results/demo-attention-cpu.json)."""
import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

from minidream.inspect import weight_diff
from minidream.demo import world
from minidream.demo.model import DEMO_DIR
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
        for i, img in enumerate(world.subject_images(4)):
            img.save(run / "instance" / f"subject-{i}.png")
        # the settings demo-diff-cpu.json was measured at: 300 steps, UNet and text encoder at the same lr
        cfg = replace(demo_config(run, seed=seed, steps=300), **{"lr": 3e-4, "text_encoder_lr": None, **change})
        dreambooth(cfg, overwrite=True)
        d = weight_diff.diff(base, load(str(run / "model"), dtype=torch.float32))
        weight_diff.write(d, run / "diff", {"base": str(DEMO_DIR), "tuned": str(run / "model")})
        record["variants"][name] = {"settings": {k: v for k, v in change.items()}, **summary(d)}
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo-diff-cpu.json").write_text(json.dumps(record, indent=1))
    return record


@torch.no_grad()
def token_localisation(eval_dir: Path, results: Path = Path("benchmarks/results"), n: int = 16, seed: int = 300):
    """Every prompt token's attention localisation (demo.evaluation.attention_localisation's ratio), for the base model
    and the two runs of a `minidream eval` folder: the identifier, and as a control the words the base model knows."""
    import math
    from minidream.inspect.attention_maps import attention_maps, localisation, token_positions
    from minidream.sampling.pipeline import SamplingParams
    from minidream.demo.evaluation import SUBJECT, subject_mask
    models = {"base model": str(DEMO_DIR), "DreamBooth, no prior loss": str(eval_dir / "without-prior-seed0" / "model"),
              "DreamBooth, prior loss (λ=1)": str(eval_dir / "with-prior-seed0" / "model")}
    record = {"what": "attention localisation per prompt token: share of the token's cross-attention mass on the "
                      "toy's pixels / the toy's share of the image (1.0 = none)",
              "samples": n, "seed": seed, "steps": 20, "guidance": 4.0, "device": f"{platform.machine()} CPU",
              "models": {}}
    for name, path in models.items():
        m = load(path, dtype=torch.float32)
        rows = {}
        for prompt in (SUBJECT, f"a {world.SUBJECT_WORDS} {world.CLASS_NOUN}"):
            images, maps = attention_maps(m, [prompt] * n, SamplingParams(steps=20, guidance=4.0), seed=seed)
            masks = subject_mask(images)
            per = {}
            for pos, text in token_positions(m.tokenizer, prompt):
                r = [x for x in (localisation(maps[b, pos], masks[b]) for b in range(n)) if math.isfinite(x)]
                per[f"{pos}:{text}"] = sum(r) / len(r)
            rows[prompt] = {"toy_share": masks.float().mean().item(), "tokens": per}
        record["models"][name] = rows
    (results / "demo-attention-cpu.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/internals"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", type=Path, default=None,
                    help="instead: per-token attention localisation of a `minidream eval` folder's models")
    a = ap.parse_args()
    if a.attention:
        token_localisation(a.attention)
    else:
        main(a.out, a.seed)
