"""Where the demo model's words look (`python -m benchmarks.demo_attention runs/eval [--control NAME=DIR ...]`, about
20 s on 2 CPU cores, more per control): every prompt token's attention localisation (demo.evaluation's ratio: the
token's cross-attention mass on the drawn toy over the toy's share of the image, 1.0 = none) for the base model and, per
subject of a `minidream eval` folder, its seed-0 runs with and without the prior; the attribute words of the base
model and of each control model (say, one pretrained with `--grounding 0`), overall and by the resolution of the
layers they are read at; and demo-attention-maps.png, where "sks" looks before DreamBooth and after it on each
subject. Writes benchmarks/results/demo-attention-cpu.json, keeping the control models an earlier call measured."""
import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minidream.demo import world
from minidream.demo.evaluation import (IDENTIFIER, INSTANCE_PROMPT, SAMPLING, attribute_prompts, subject_mask,
                                       token_span, word_ratios)
from minidream.demo.architecture import DEMO_DIR
from minidream.formats.loading import load
from minidream.inspect.attention_maps import (CrossAttentionStore, attention_maps, attention_sheet, localisation,
                                              sample_captured, token_positions)


class ByResolution:
    """A capture_cross_attention store that keeps one CrossAttentionStore per layer resolution."""

    def __init__(self, batch: int, latent_hw: tuple[int, int]):
        self.batch, self.hw, self.stores = batch, latent_hw, {}

    def add(self, probs: torch.Tensor):
        side = round(probs.shape[1] ** 0.5)
        self.stores.setdefault(f"{side}x{side}", CrossAttentionStore(self.batch, self.hw)).add(probs)


@torch.no_grad()
def by_resolution(model, n: int = 24, seed: int = 301) -> dict:
    """The attribute words' localisation (evaluation.word_localisation's prompts and samples) read from the layers
    of each resolution alone, and from all together."""
    prompts, words = attribute_prompts(n, seed)
    side = model.native_resolution
    store = ByResolution(n, (side // model.latent_scale,) * 2)
    masks = subject_mask(sample_captured(model, prompts, SAMPLING, seed, store))
    maps = {k: F.interpolate(s.mean(), size=(side, side), mode="bilinear", align_corners=False)
            for k, s in store.stores.items()}
    total = sum(s.total for s in store.stores.values()) / sum(s.calls for s in store.stores.values())
    maps["all layers"] = F.interpolate(total, size=(side, side), mode="bilinear", align_corners=False)
    out = {k: word_ratios(model.tokenizer, prompts, words, m, masks) for k, m in maps.items()}
    for k, s in store.stores.items():
        out[k]["layers"] = s.calls // SAMPLING.steps
    return out


@torch.no_grad()
def token_table(model, prompt: str, n: int, seed: int):
    """(each token's localisation, the toy's share, images, maps) on n samples of `prompt`."""
    images, maps = attention_maps(model, [prompt] * n, SAMPLING, seed=seed)
    masks = subject_mask(images)
    per = {}
    for pos, text in token_positions(model.tokenizer, prompt):
        r = [x for x in (localisation(maps[b, pos], masks[b]) for b in range(n)) if math.isfinite(x)]
        per[f"{pos}:{text}"] = sum(r) / len(r) if r else float("nan")
    return per, masks.float().mean().item(), images, maps


def main(eval_dir: Path, controls: dict[str, str], results: Path = Path("benchmarks/results"), n: int = 16,
         seed: int = 300) -> dict:
    t0, models = time.time(), {"base model": str(DEMO_DIR)}
    for subject in world.SUBJECTS:
        name = world.subject_name(subject)
        for label, d in (("no prior loss", "without"), ("prior loss", "with")):
            if (eval_dir / name / f"{d}-prior-seed0" / "model").is_dir():
                models[f"{name}, {label}"] = str(eval_dir / name / f"{d}-prior-seed0" / "model")
    record = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "eval_folder": str(eval_dir), "samples": n,
              "seed": seed, "steps": SAMPLING.steps, "guidance": SAMPLING.guidance,
              "device": f"{platform.machine()} CPU", "models": {}, "attribute_words": {}}
    sheet = []
    for name, path in models.items():
        m = load(path, dtype=torch.float32)
        rows = {}
        for prompt in (INSTANCE_PROMPT, f"a {world.subject_words(world.SUBJECTS[0])} {world.CLASS_NOUN}"):
            per, share, images, maps = token_table(m, prompt, n, seed)
            rows[prompt] = {"toy_share": share, "tokens": per}
            if prompt == INSTANCE_PROMPT and "no prior" not in name:
                span = token_span(m.tokenizer, prompt, IDENTIFIER)  # every token of the word, as identifier_maps
                sheet.append((name, images[:6], maps[:6, span.start:span.stop].sum(1)))
        record["models"][name] = rows
        print(f"{name}: {json.dumps({p: r['tokens'] for p, r in rows.items()})}")
    out = results / "demo-attention-cpu.json"
    # controls measured by an earlier call (their models need not be here any more) are kept
    kept = json.loads(out.read_text()).get("attribute_words", {}) if out.exists() else {}
    record["attribute_words"] = {k: v for k, v in kept.items() if k != "base model" and k not in controls}
    for name, path in {"base model": str(DEMO_DIR), **controls}.items():
        record["attribute_words"][name] = {"model": path, **by_resolution(load(path, dtype=torch.float32))}
        print(f"{name}, attribute words: {json.dumps(record['attribute_words'][name])}")
    results.mkdir(parents=True, exist_ok=True)
    record["wall_time_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(record, indent=1))
    attention_sheet(sheet, results / "demo-attention-maps.png")
    return record


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("eval_dir", type=Path, help="a `minidream eval --subjects all` folder")
    ap.add_argument("--control", action="append", default=[], metavar="NAME=DIR",
                    help="another demo model whose attribute words are measured too")
    a = ap.parse_args()
    main(a.eval_dir, dict(c.split("=", 1) for c in a.control))
