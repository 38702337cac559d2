"""How far apart the demo world's toys lie where the diffusion model works (`python -m benchmarks.demo_subjects
--model DIR --label L`): for every shape-colour-pattern combination, the rms distance between its VAE latents and
those of each combination one attribute away (the same 32 poses, backgrounds and sizes; latents × the scaling
factor, so in units of their std), and so its nearest neighbour. The held-out subjects of the #34 world (attribute
combinations) were chosen with it; those of #54 have a shape or pattern with no word (world.UNNAMED) and need no such
choice. Adds an entry `label` to benchmarks/results/demo-subjects-cpu.json."""
import argparse
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from minidream.demo import world
from minidream.formats.loading import load


def poses(n: int = 32, seed: int = 5) -> list[world.Toy]:
    rng = random.Random(seed)
    return [world.random_toy(rng, allow_subject=True) for _ in range(n)]


@torch.no_grad()
def latents(vae, at: list[world.Toy], combo: tuple[str, str, str]) -> torch.Tensor:
    shape, colour, pattern = combo
    toys = []
    for t in at:
        t = replace(t, shape=shape, colour=colour, pattern=pattern)
        if world.COLOURS[colour] == world.BACKGROUNDS.get(t.background) or colour == t.background == "blue":
            t = replace(t, background="gray")  # invisible on its own colour
        toys.append(t)
    x = torch.stack([world.to_tensor(world.render(t)) for t in toys])
    return vae.encode(x)[0] * vae.config.scaling_factor


def neighbours(vae) -> dict:
    """{combination: [(distance, neighbour), ...] nearest first} over every combination one attribute away."""
    at, cache = poses(), {}
    combos = list(itertools.product(world.SHAPES, world.COLOURS, world.PATTERNS))
    for c in combos:
        cache[c] = latents(vae, at, c)
    found = {}
    for c in combos:
        near = [o for o in combos if sum(a != b for a, b in zip(c, o)) == 1]
        found[c] = sorted(((cache[o] - cache[c]).square().mean().sqrt().item(), " ".join(o[1:] + o[:1]))
                          for o in near)
    return found


def main(model: Path, label: str, results: Path = Path("benchmarks/results")):
    found = neighbours(load(str(model), dtype=torch.float32).vae)
    name = lambda c: f"{c[1]} {c[2]} {c[0]}"  # noqa: E731  "yellow striped star"
    ranked = sorted(found.items(), key=lambda kv: -kv[1][0][0])
    entry = {
        "model": str(model),
        "subjects": {world.subject_words(s): [[round(d, 3), n] for d, n in found[(s["shape"], s["colour"],
                                                                                     s["pattern"])][:3]]
                     for s in world.SUBJECTS},
        "farthest_from_their_nearest": [[round(v[0][0], 3), name(c), v[0][1]] for c, v in ranked[:20]],
        "median_nearest": round(sorted(v[0][0] for v in found.values())[len(found) // 2], 3),
    }
    path = results / "demo-subjects-cpu.json"
    record = json.loads(path.read_text()) if path.exists() else {"what": __doc__.split("\n\n")[0].strip()}
    record[label] = entry
    path.write_text(json.dumps(record, indent=1))
    return entry


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True, help="a demo model folder (its VAE is used)")
    ap.add_argument("--label", required=True, help="the entry's name in demo-subjects-cpu.json")
    a = ap.parse_args()
    print(json.dumps(main(a.model, a.label), indent=1))
