"""The demo (`minidream demo`): DreamBooth on a held-out subject with the embedded model, before/after grids, where
the identifier looks before and after, and a report; and `minidream eval`, the base model and DreamBooth with and
without the prior loss over subjects and seeds."""
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minidream.demo import world
from minidream.demo.evaluation import (CLASS_PROMPT, CLASSES, CONTEXTS, EVAL_CLASSES, IDENTIFIER, INSTANCE_PROMPT,
                                       PROMPTS, SAMPLING, attention_localisation, eval_noise, eval_prompts,
                                       evaluate_dreambooth, identifier_maps, read_samples, score,
                                       best_prompt_fidelity, vocabulary_prompts, word_localisation)
from minidream.demo.architecture import DEMO_DIR
from minidream.demo.recognizer import load_recognizer
from minidream.formats.files import write_text
from minidream.formats.loading import load
from minidream.image_files import save_png
from minidream.inspect.attention_maps import attention_sheet
from minidream.plots import labelled_grid
from minidream.sampling.pipeline import generate
from minidream.training import TrainError
from minidream.training.config import TrainConfig
from minidream.training.dreambooth import dreambooth

# The demo model of #54, whose subjects each have a shape or a pattern no caption names, must learn to draw something
# new, not only bind a word to a combination it can draw: the #34 settings (175 steps, UNet lr 1e-4) left the subjects
# at 0.50 mean fidelity and a red crescent at 0.03-0.11 (seeds 3-5; benchmarks/results/demo-seeds-cpu.json,
# "model_54", m54_default). The UNet at 5e-4 for 250 steps without mirroring the photos held all 9 runs at 0.94-1.00
# (m54_lr5e-4_noflip_250): the crescent is not mirror-symmetric, and flipped photos (the #34 demo's flip 0.5) taught
# its mirror image half the time (its mean 0.14 with them, 0.64 without, at lr 3e-4: m54_lr3e-4, m54_lr3e-4_noflip).
# Seeds 3-5 were tuned on; `minidream eval`'s 0-2 were not.
STEPS = 250


def demo_config(out: Path, prior: bool = True, seed: int = 0, steps: int = STEPS, model: Path = DEMO_DIR):
    """The demo's run: the whole UNet and the text encoder, batches of 4 + 4 at the world's 32 px, cached
    latents (TRAIN_DEFAULTS); everything not named here is TrainConfig's default.

    The text encoder learns 2x faster than the UNet (kohya's --unet_lr / --text_encoder_lr split): the binding of the
    word is quick, the drawing of a new shape is the UNet's slower work. In the earlier worlds, where the subjects
    were combinations of named attributes, a UNet 10x slower than the text encoder let the text carry the binding
    and lifted fidelity (sweep_4, world_2, model_34 in demo-seeds-cpu.json); both lrs decay on a cosine after the
    warmup."""
    return TrainConfig(**{**TRAIN_DEFAULTS, "steps": steps},
                       model=str(model), instance_dir=str(out / "instance"), class_noun=world.CLASS_NOUN, out=str(out),
                       instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, prior=prior, seed=seed,
                       checkpoint_every=0, keep_last=1, device="cpu")


# The demo model's training settings, which `minidream train --model demo` also takes for each one not given:
# TrainConfig's defaults are SD's (200 class images of 50 steps each, then 5e-6 lrs), which on this model take 20
# minutes before step 1 and learn nothing in the demo's 175 steps.
TRAIN_DEFAULTS = {
    "resolution": world.SIZE, "num_class_images": 32, "class_steps": 10, "class_guidance": 4.0, "class_batch_size": 64,
    "train_text_encoder": True, "lr": 5e-4, "text_encoder_lr": 1e-3, "warmup_steps": 10, "lr_schedule": "cosine",
    "max_grad_norm": 0.0,  # the demo's lrs and steps were chosen without clipping
    "steps": STEPS, "batch_size": 4, "cache_latents": True, "validation_steps": 20,
    "validation_every": 50}  # the validation losses (curves.png): the fit and the drift, which the training loss hides


GRID = 4  # columns of the before/after grids


def grid_rows(n: int = 16) -> list[int]:
    """Where each of PROMPTS' first GRID samples sits in the evaluation's batch."""
    prompts = eval_prompts(n)
    return [prompts.index(p) + i for p in PROMPTS for i in range(GRID)]


def save_grid(images: torch.Tensor, path: Path, title: str, photos: list):
    """The training photos, then a row per demo prompt (labelled with it); columns: the evaluation's first draws, so
    before/after grids line up. 32 px tiles are drawn 3x (plots.labelled_grid)."""
    shown = torch.stack([world.to_uint8(img) for img in photos])
    rows = [("training photos (what DreamBooth sees)", shown)] + \
        [(f'"{prompt}"', images[k * GRID:(k + 1) * GRID]) for k, prompt in enumerate(PROMPTS)]
    picture, layout = labelled_grid(rows, title)
    save_png(picture, path, {"rows": ["training photos", *PROMPTS], "layout": layout})


# what run_demo decides itself: a `changes` entry may not move the run elsewhere or relabel its report
OWN_FIELDS = ("out", "instance_dir", "model", "seed", "prior")


def run_demo(out: Path, prior: bool = True, seed: int = 0, steps: int = STEPS, grids: bool = True,
             model_dir: Path = DEMO_DIR, localise: bool = False, classes: int = CLASSES,
             subject: dict = world.SUBJECTS[0], changes: dict | None = None) -> dict:
    """Train DreamBooth on a held-out subject's photos and measure it; writes report.json and report.md, and with
    `grids` before.png, after.png and attention.png (then the identifier's localisation is measured, before and
    after, whatever `localise` says). `changes`: TrainConfig fields to set other than demo_config's
    (benchmarks/demo_sweep.py's settings), none of OWN_FIELDS."""
    if set(changes or {}) & set(OWN_FIELDS):
        raise ValueError(f"changes {sorted(set(changes) & set(OWN_FIELDS))}: run_demo's own arguments set these")
    t0 = time.time()
    out = Path(out)
    refuse_other_runs(out, model_dir)
    (out / "instance").mkdir(parents=True, exist_ok=True)
    photos = world.subject_images(subject, 4)
    for i, img in enumerate(photos):
        img.save(out / "instance" / f"subject-{i}.png")
    net = load_recognizer(model_dir)
    cfg = replace(demo_config(out, prior=prior, seed=seed, steps=steps, model=model_dir), **(changes or {}))
    looks = [before_dreambooth(cfg.model, out, classes, photos)] if grids else []
    model, _ = dreambooth(cfg, overwrite=True, keep_model=True)  # sampled below
    found, images = evaluate_dreambooth(model, net, subject, classes=classes)
    metrics = {"subject": world.subject_words(subject), "prior_preservation": prior, "steps": cfg.steps, "seed": seed,
               **found}
    if grids:
        how = f"{cfg.steps} steps on the photos, {'with' if prior else 'without'} prior preservation"
        save_grid(images[grid_rows()], out / "after.png", f"after DreamBooth ({how})", photos)
        looks.append(("after DreamBooth", *identifier_maps(model)))
        attention_sheet([(name, shown[:GRID], maps[:GRID]) for name, _, shown, maps in looks], out / "attention.png",
                        title=f'where "{IDENTIFIER}" looks in "{INSTANCE_PROMPT}": each sample, then its map')
        metrics["base_attention_localisation"] = looks[0][1]
        metrics["attention_localisation"] = looks[1][1]
    elif localise:
        metrics["attention_localisation"] = attention_localisation(model)
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    write_text(out / "report.json", json.dumps(metrics, indent=2))
    write_text(out / "report.md", report_md(metrics))
    return metrics


def before_dreambooth(model_dir: str, out: Path, classes: int, photos: list) -> tuple:
    """before.png (the base model on the evaluation's starting latents of the grid's rows) and where "sks" looks on
    the base model: ("before DreamBooth", localisation, samples, maps). The base model is freed before training."""
    base, rows, prompts = load(model_dir, dtype=torch.float32), grid_rows(), eval_prompts()
    save_grid(generate(base, [prompts[i] for i in rows], SAMPLING, latents=eval_noise(classes=classes)[rows],
                       progress=False), out / "before.png", "before DreamBooth: the base model", photos)
    return ("before DreamBooth", *identifier_maps(base))


# What each number of a report is, in one sentence: a fraction of what, and which way is good.
DEFINITIONS = {
    "subject fidelity": f"the fraction of the {(1 + len(CONTEXTS)) * 16} samples of \"{INSTANCE_PROMPT}\" (alone "
                        f"and on each of {len(CONTEXTS)} backgrounds) that the recogniser reads as the subject (its "
                        f"shape, colour and pattern); higher is better.",
    "prompt fidelity": f"the fraction of the {len(CONTEXTS) * 16} samples asking for a background that are the "
                       f"subject on that background; higher is better.",
    "PRES": f"the fraction of samples of \"{CLASS_PROMPT}\" that are the subject (the class drifting into it); "
            f"lower is better.",
    "DIV": f"the mean fraction of attributes (shape, colour, pattern, background) that differ between two samples of "
           f"\"{CLASS_PROMPT}\" (the class's variety); higher is better.",
    "localisation": f"the share of \"{IDENTIFIER}\"'s cross-attention on the drawn toy over the toy's share of the "
                    f"image (1.0: it looks everywhere alike); higher is better.",
}


def report_md(m: dict) -> str:
    """report.md: the run, its Table 3 numbers and, when it drew the maps, where the identifier looks; then what
    each number is."""
    looks = "" if "base_attention_localisation" not in m else (
        f"\nwhere \"{IDENTIFIER}\" looks (localisation): {m['base_attention_localisation']:.2f} before DreamBooth, "
        f"{m['attention_localisation']:.2f} after (attention.png)\n")
    return (f"# DreamBooth demo ({'with' if m['prior_preservation'] else 'without'} prior preservation)\n\n"
            f"subject: {m['subject']} ('{INSTANCE_PROMPT}'); "
            f"{m['steps']} steps, seed {m['seed']}, {m['wall_time_s']} s on {platform.machine()} CPU\n\n"
            "| subject fidelity ↑ | prompt fidelity ↑ | PRES ↓ | DIV ↑ |\n"
            "|---|---|---|---|\n"
            f"| {m['subject_fidelity']:.3f} | {m['prompt_fidelity']:.3f} | {m['PRES']:.3f} | {m['DIV']:.3f} |\n"
            + looks + "\n## What the numbers are\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in DEFINITIONS.items())
            + "\nbefore.png / after.png: the base model and the tuned one on the same starting noise; "
              "curves.png: the losses over the steps.\n")


def refuse_other_runs(out: Path, model_dir: Path):
    """The demo starts its own folder over each time (--overwrite); a folder that holds another run is not its to
    remove."""
    try:
        run = json.loads((out / "run.json").read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        run = {}

    def same(a, b) -> bool:  # the same place, however it was spelled (relative, absolute, a moved install's copy)
        return isinstance(a, str) and bool(a) and Path(a).resolve() == Path(b).resolve()
    ours = isinstance(run, dict) and same(run.get("instance_dir"), out / "instance") and \
        (same(run.get("model"), model_dir) or Path(str(run.get("model"))).name == model_dir.name)
    if not ours:
        raise TrainError(f"--out {out} holds another run (run.json), not a demo's; choose another folder")


def _spread(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "each": vals}


# The runs `minidream eval` compares, by --recipe: label -> (folder, prior preservation, changes to demo_config). The
# first is without the prior; the claims are checked of each later one against it. LoRA (rank 8 on the UNet's
# attention and the text encoder, lr 1e-3 for both): the prior from class images, or from the model itself.
LORA = {"mode": "lora", "lora_rank": 8, "lora_alpha": 8.0, "lr": 1e-3, "text_encoder_lr": 1e-3,
        "save_as": ("lora-diffusers",)}
RECIPES = {
    "whole": {"DreamBooth, no prior loss": ("without-prior", False, {}),
              "DreamBooth, prior loss (λ=1)": ("with-prior", True, {})},
    "lora": {"LoRA, no prior loss": ("lora-without-prior", False, LORA),
             "LoRA, prior from class images": ("lora-class-images", True, LORA),
             "LoRA, prior from the model (--prior-source model)": ("lora-model-prior", True,
                                                                    {**LORA, "prior_source": "model"})},
}
RUNS = RECIPES["whole"]
KEYS = ("subject_fidelity", "prompt_fidelity", "PRES", "DIV", "attention_localisation")


def run_eval(out: Path, seeds: tuple[int, ...] = (0, 1, 2), steps: int = STEPS, classes: int = EVAL_CLASSES,
             subjects: tuple[dict, ...] = world.SUBJECTS[:1], recipe: str = "whole") -> dict:
    """The base model, and DreamBooth with and without the prior-preservation loss (paper, Table 3), on each subject,
    each DreamBooth run once per seed (its class images, noise and draws): mean, min and every seed's value; PRES and
    DIV from EVAL_CLASSES class-prompt samples. Runs go to out/<subject>/<with|without>-prior-seed<s>."""
    out, runs_of = Path(out), RECIPES[recipe]
    total = len(runs_of) * len(seeds) * len(subjects)
    print(f"eval: the base model, then {total} DreamBooth runs (each with its own progress)", file=sys.stderr)
    base_model, net = load(str(DEMO_DIR), dtype=torch.float32), load_recognizer()
    words = {"identifier": attention_localisation(base_model), **word_localisation(base_model)}
    base_readings = read_samples(base_model, net, classes=classes)[0]  # the same samples score every subject
    print("eval: the base model on every prompt the world's words can form", file=sys.stderr)
    best = best_prompt_fidelity(base_model, net)
    runs, done = {}, 0
    for subject in subjects:
        name = world.subject_name(subject)
        runs[name] = {"base model": {**score(base_readings, subject), "prior_preservation": None,
                                     "attention_localisation": words["identifier"]}}
        for label, (d, p, changes) in runs_of.items():
            runs[name][label] = []
            for s in seeds:
                done += 1
                print(f"eval: run {done}/{total}: {name}, {label}, seed {s}", file=sys.stderr)
                runs[name][label].append(run_demo(out / name / f"{d}-seed{s}", prior=p, seed=s, steps=steps,
                                                  grids=False, localise=True, classes=classes, subject=subject,
                                                  changes=changes))
    rows = {name: {model: {k: _spread(rs if isinstance(rs, list) else [rs], k) for k in KEYS}
                   for model, rs in by_model.items()} for name, by_model in runs.items()}
    best = {name: best[name] for name in runs}
    checks = claims(runs, words, list(runs_of), best)
    table = eval_table(seeds, rows, words, checks, best)
    write_text(out / "eval.md", table)
    record = {"recipe": recipe, "seeds": list(seeds), "steps": steps, "subjects": list(runs),
              "base_model_word_localisation": words, "base_model_best_prompt": best,
              "rows": rows, "checks": checks, "runs": runs}
    write_text(out / "eval.json", json.dumps(record, indent=2))
    return {"rows": rows, "checks": checks, "table": table}


def claims(runs: dict, words: dict, labels: list[str], best: dict) -> dict:
    """The paper's claims per subject (each prior lowers PRES and keeps DIV on every seed, against the first run of
    `labels`, without it), and the demo's goals: the base model draws no subject (≤ 0.2 on its best prompt, `best`);
    over every subject and seed with the prior (the second run), subject fidelity ≥ 0.9 mean and ≥ 0.8 least, the
    identifier localising ≥ 1.5 and more than on the base model; on the base model its attribute words ≥ 1.5."""
    without, with_prior, *others = labels
    checks = {f"{name}: the base model's best prompt draws it ≤ 0.2 ({b['fidelity']:.3f}, \"{b['prompt']}\")":
              b["fidelity"] <= 0.2 for name, b in best.items()}
    for name, by_model in runs.items():
        no = by_model[without]
        for label in (with_prior, *others):
            yes, which = by_model[label], "prior" if not others else label
            checks[f"{name}: {which} lowers PRES on every seed"] = all(b["PRES"] < a["PRES"] for a, b in zip(no, yes))
            checks[f"{name}: {which} keeps DIV on every seed (no lower)"] = all(
                b["DIV"] >= a["DIV"] for a, b in zip(no, yes))
    prior = [r for by_model in runs.values() for r in by_model[with_prior]]
    fidelity = [r["subject_fidelity"] for r in prior]
    looks = [r["attention_localisation"] for r in prior]
    checks["with the prior, subject fidelity ≥ 0.9 mean"] = sum(fidelity) / len(fidelity) >= 0.9
    checks["with the prior, subject fidelity ≥ 0.8 on every run"] = min(fidelity) >= 0.8
    checks["with the prior, the identifier localises ≥ 1.5 (mean)"] = sum(looks) / len(looks) >= 1.5
    checks["with the prior, the identifier localises ≥ 1.5 on every run"] = min(looks) >= 1.5
    checks["with the prior, the identifier localises more than on the base model on every run"] = \
        min(looks) > words["identifier"]
    for role in ("colour", "pattern", "shape"):
        checks[f"base model: {role} words localise ≥ 1.5"] = words[role] >= 1.5
    return checks


def eval_table(seeds: tuple[int, ...], rows: dict, words: dict, checks: dict, best: dict) -> str:
    """eval.md: a row per subject and model, mean (min–max) over the seeds, then whether the claims hold."""
    def cell(v, digits=3):
        return f"{v['mean']:.{digits}f} ({v['min']:.{digits}f}–{v['max']:.{digits}f})" if len(v["each"]) > 1 \
            else f"{v['mean']:.{digits}f}"

    def line(subject, name, v):
        each = " / ".join(f"{x:.3f}" for x in v["subject_fidelity"]["each"])
        return (f"| {subject} | {name} | {cell(v['subject_fidelity'])} | {each} | {cell(v['prompt_fidelity'])} "
                f"| {cell(v['PRES'])} | {cell(v['DIV'])} | {cell(v['attention_localisation'], 2)} |\n")
    head = ("| subject | model | subject fidelity | each seed | prompt fidelity | PRES ↓ | DIV ↑ "
            "| identifier attention localisation |\n|---|---|---|---|---|---|---|---|\n")
    looks = ", ".join(f"{role} {v:.2f}" for role, v in words.items() if role != "identifier")
    asked = "".join(f"\n- {name}: {b['fidelity']:.3f}, asked \"{b['prompt']}\"" for name, b in best.items())
    return (f"seeds {', '.join(map(str, seeds))}; mean (min–max) over the seeds\n\n" + head
            + "".join(line(s, k, v) for s, by_model in rows.items() for k, v in by_model.items())
            + f"\nthe base model's subject fidelity on its best prompt (of {len(vocabulary_prompts())}: every colour, "
              f"pattern and shape word or \"toy\", alone and on each background, screened on 4 samples each; the 3 "
              f"best per subject drawn again on 32):{asked}\n"
            + f"\nthe base model's attribute words localise: {looks}\n"
            + "".join(f"\n{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()) + "\n")
