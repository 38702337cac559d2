"""The embedded demo: the world, the shipped model and recogniser, and DreamBooth's claims measured on it."""
import json
import random

import pytest
import torch

from minidream.demo import world
from minidream.demo.evaluation import CLASSES, EVAL_CLASSES
from minidream.demo.architecture import DEMO_DIR
from minidream.demo.recognizer import load_recognizer
from minidream.demo.run import run_demo
from minidream.formats.loading import load

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model_index.json").exists(), reason="demo model not built")


def test_world_is_deterministic_and_the_subjects_are_never_pretrained():
    a = [world.pretraining_example(random.Random(3)) for _ in range(2)]
    assert a[0][1] == a[1][1] and a[0][0].tobytes() == a[1][0].tobytes()
    rng = random.Random(0)
    seen = {(t.shape, t.colour, t.pattern) for t in (world.pretraining_example(rng)[2] for _ in range(3000))}
    assert len(seen) == 5 * 6 * 3  # every combination of named attributes is shown (backgrounds aside)
    unnamed = {v for vs in world.UNNAMED.values() for v in vs}
    for subject in world.SUBJECTS:
        assert all(t.size == (world.SIZE, world.SIZE) for t in world.subject_images(subject, 4))
        # a shape or a pattern of its own: no pretraining image shows it, no caption names it
        own = {subject["shape"], subject["pattern"]} & unnamed
        assert own and not own & {v for toy in seen for v in toy}
    captions = " ".join(world.pretraining_example(rng)[1] for _ in range(3000))
    assert not any(word in captions.split() for word in unnamed)
    assert len({s["colour"] for s in world.SUBJECTS}) == len(world.SUBJECTS)


def test_subjects_are_picked_by_number_or_name():
    assert world.pick_subjects("all") == world.SUBJECTS
    assert world.pick_subjects("1, green-checked-heart") == world.SUBJECTS[:2]
    assert world.pick_subjects("1,1,Yellow-Striped-Cross") == world.SUBJECTS[:1] and world.pick_subjects("ALL")
    for bad in ("0", "4", "blue-star", "", "1,,2"):
        with pytest.raises(ValueError, match="not a subject"):
            world.pick_subjects(bad)
    # the demo takes one subject: its errors do not offer "all" (which it would refuse)
    assert world.pick_subjects("2", several=False) == world.SUBJECTS[1:2]
    for bad in ("all", "1,2"):
        with pytest.raises(ValueError, match="name one subject"):
            world.pick_subjects(bad, several=False)
    with pytest.raises(ValueError, match="not a subject") as e:
        world.pick_subjects("blue-star", several=False)
    assert "all" not in str(e.value)


def test_demo_model_ships_small_and_loads_through_the_loader():
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*.safetensors"))
    assert size <= 20 * 2 ** 20
    m = load(str(DEMO_DIR))
    assert m.unet.config.sample_size == 8 and len(m.tokenizer) == m.text_encoder.config.vocab_size
    record = json.loads((DEMO_DIR / "PRETRAIN.json").read_text())
    assert {"command", "seed", "device", "wall_time_s"} <= record.keys()


def test_recognizer_reads_the_world():
    """Its accuracy on fresh renders (the number stated in PRETRAIN.json is measured the same way)."""
    import numpy as np
    net = load_recognizer()
    rng = random.Random(4242)
    toys = [world.random_toy(rng, allow_subject=True, unnamed=True) for _ in range(200)]
    pred = net.predict(torch.stack([torch.from_numpy(np.array(world.render(t))) for t in toys]))
    for k in world.ATTRIBUTES:
        assert sum(p[k] == getattr(t, k) for p, t in zip(pred, toys)) / len(toys) >= 0.95, k


def test_dreambooth_binds_the_subject_over_seeds_and_prior_preservation_lowers_pres_keeps_div(tmp_path, monkeypatch):
    """Two seeds with prior preservation (what CI can afford) and one without, on the demo's subject, a yellow
    striped cross (a shape no caption names). The base model draws it in 0 of 80 samples of "a sks toy"; with the
    prior, seeds 0, 1, 2 reach 1.000, 1.000, 0.988, and the three subjects 0.887-1.000 (benchmarks/results/
    demo-eval-cpu.json; the settings were tuned on seeds 3-5). A DreamBooth that does not bind falls towards the
    base; the issue's goal is >= 0.8 on every run. Where the identifier looks on this subject: 1.96 and 2.07 on seeds
    0 and 1 (>= 1.5; the base model's "sks" 2.04, see docs/demo.md). The prior's side on `minidream eval`'s
    EVAL_CLASSES (128) class samples: without the prior 94-96% of "a toy" samples are the cross, with it 0-1%; DIV
    0.20-0.21 without, 0.63-0.68 with. Seed 0 draws the demo's attention.png too, checked against what was measured
    (check_attention_sheet)."""
    measured, drawn = capture_attention(monkeypatch)
    with_prior = [run_demo(tmp_path / f"with-{s}", prior=True, seed=s, grids=s == 0, localise=True,
                           classes=EVAL_CLASSES if s == 0 else CLASSES) for s in (0, 1)]  # seed 1: no PRES/DIV read
    without = run_demo(tmp_path / "without", prior=False, grids=False, classes=EVAL_CLASSES)
    assert all(r["subject_fidelity"] >= 0.8 for r in with_prior), with_prior
    assert all(r["attention_localisation"] >= 1.5 for r in with_prior), with_prior
    assert with_prior[0]["PRES"] < without["PRES"], (with_prior[0], without)
    assert with_prior[0]["DIV"] > without["DIV"], (with_prior[0], without)
    check_attention_sheet(tmp_path / "with-0", with_prior[0], measured[:2], drawn)


def capture_attention(monkeypatch):
    """Lists that fill with what run_demo's identifier_maps calls returned and what its attention_sheet was given
    (the real functions run)."""
    from minidream.demo import run
    measured, drawn, real_maps, real_sheet = [], [], run.identifier_maps, run.attention_sheet

    def maps_of(model):
        measured.append(real_maps(model))
        return measured[-1]

    def sheet_of(rows, path, **options):
        drawn.append(rows)
        return real_sheet(rows, path, **options)
    monkeypatch.setattr(run, "identifier_maps", maps_of)
    monkeypatch.setattr(run, "attention_sheet", sheet_of)
    return measured, drawn


def check_attention_sheet(out, report: dict, measured: list, drawn: list):
    """The demo's attention.png: a row per model (base, tuned) of GRID samples, each beside its identifier map. What
    the sheet draws is what was measured: the first samples and maps of each model's identifier_maps, whose
    localisation over the drawn toys is report.json's number, and the picture's first tile is the base's sample."""
    import numpy as np
    from PIL import Image
    from minidream.demo.evaluation import subject_mask
    from minidream.demo.run import GRID
    from minidream.inspect.attention_maps import SHEET_LABEL, localisation
    (before, after), (rows,) = measured, drawn
    assert [r[0] for r in rows] == ["before DreamBooth", "after DreamBooth"]
    for (looks, images, maps), (_, shown, shown_maps) in zip(measured, rows):
        assert torch.equal(shown, images[:GRID]) and torch.equal(shown_maps, maps[:GRID])
        each = [localisation(maps[i], mask) for i, mask in enumerate(subject_mask(images))]
        each = [r for r in each if r == r]  # r != r: no toy drawn, no ratio
        assert abs(sum(each) / len(each) - looks) < 1e-6
    assert (report["base_attention_localisation"], report["attention_localisation"]) == (before[0], after[0])
    assert not torch.equal(before[2], after[2])  # the tuned model's maps, not the base's again
    sheet = np.array(Image.open(out / "attention.png"))
    tile = world.SIZE * 3
    assert sheet.shape[:2] == (2 * (tile + 4) + 24 + 30, SHEET_LABEL + 2 * GRID * (tile + 2))  # title, key
    first = before[1][0].repeat_interleave(3, 0).repeat_interleave(3, 1).numpy()
    assert np.array_equal(sheet[24:24 + tile, SHEET_LABEL:SHEET_LABEL + tile], first)
    assert f"{before[0]:.2f} before DreamBooth, {after[0]:.2f} after (attention.png)" in (out / "report.md").read_text()


def test_demo_changes_may_not_move_or_relabel_the_run(tmp_path):
    for own in ({"seed": 3}, {"prior": False}, {"out": str(tmp_path / "x")}, {"model": "elsewhere"}):
        with pytest.raises(ValueError, match="run_demo's own arguments"):
            run_demo(tmp_path / "demo", changes=own)
    assert not (tmp_path / "demo").exists()


def test_eval_seeds_must_be_integers_and_reuse_a_demo_folder(tmp_path):
    from typer.testing import CliRunner
    from minidream.cli import app
    r = CliRunner().invoke(app, ["eval", "--seeds", "0,one"])
    assert r.exit_code != 0 and "--seeds" in r.output and len(r.output.strip().splitlines()) == 1
    for args in (["eval", "--subjects", "purple-star"], ["demo", "--subject", "all"], ["demo", "--subject", "9"]):
        r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "never")])
        assert r.exit_code != 0 and args[1] in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "never").exists()
    r = CliRunner().invoke(app, ["demo-pretrain", "--out", str(tmp_path / "x"), "--reuse", str(tmp_path / "none")])
    assert r.exit_code != 0 and "--reuse" in r.output and len(r.output.strip().splitlines()) == 1
    for bad in ("nan", "-1", "1e9"):
        r = CliRunner().invoke(app, ["demo-pretrain", "--out", str(tmp_path / "x"), "--grounding", bad])
        assert r.exit_code != 0 and "--grounding" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # 17 s
def test_pretrain_can_keep_the_vae_and_recognizer(tmp_path):
    """`demo-pretrain --reuse`: the VAE and the recogniser are the given folder's, bit for bit; the tokenizer, text
    encoder and UNet are trained with the shipped model's schedule, and the record names what was reused."""
    from typer.testing import CliRunner
    from minidream.cli import app
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo-pretrain", "--out", str(out), "--reuse", str(DEMO_DIR), "--images", "64",
                                 "--unet-steps", "2", "--batch", "4"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    for f in ("vae/diffusion_pytorch_model.safetensors", "recognizer.safetensors"):
        a, b = load_file(out / f), load_file(DEMO_DIR / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    m, shipped = load(str(out)), load(str(DEMO_DIR))
    assert m.vae.config == shipped.vae.config and m.scheduler == shipped.scheduler
    record = json.loads((out / "PRETRAIN.json").read_text())
    assert record["vae_and_recognizer_from"] == str(DEMO_DIR) and record["unet_steps"] == 2
    assert record["grounding"] == 0.05 and len(record["held_out_subjects"]) == 3


def test_eval_claims_read_every_subject_and_seed():
    """run.claims on made-up runs: one seed's PRES not lowered fails its subject's claim; one run under 0.8 fails
    the least-fidelity goal while the mean holds."""
    from minidream.demo.run import claims

    def run(fid, pres, div, looks):
        return {"subject_fidelity": fid, "PRES": pres, "DIV": div, "attention_localisation": looks}
    runs = {"a": {"DreamBooth, no prior loss": [run(0.7, 0.5, 0.3, 2), run(0.7, 0.5, 0.3, 2)],
                  "DreamBooth, prior loss (λ=1)": [run(1.0, 0.0, 0.7, 2.0), run(0.95, 0.6, 0.7, 1.6)]},
            "b": {"DreamBooth, no prior loss": [run(0.7, 0.5, 0.3, 2), run(0.7, 0.5, 0.3, 2)],
                  "DreamBooth, prior loss (λ=1)": [run(1.0, 0.0, 0.7, 2.0), run(0.75, 0.0, 0.7, 1.4)]}}
    words = {"identifier": 1.5, "colour": 2.0, "pattern": 1.6, "shape": 1.2}
    best = {"a": {"fidelity": 0.125, "prompt": "a toy"}, "b": {"fidelity": 0.25, "prompt": "a red star"}}
    c = claims(runs, words, list(runs["a"]), best)
    assert c['a: the base model\'s best prompt draws it ≤ 0.2 (0.125, "a toy")']
    assert not c['b: the base model\'s best prompt draws it ≤ 0.2 (0.250, "a red star")']
    assert not c["with the prior, the identifier localises more than on the base model on every run"]
    assert claims(runs, {**words, "identifier": 1.3}, list(runs["a"]), best)[
        "with the prior, the identifier localises more than on the base model on every run"]
    assert not c["a: prior lowers PRES on every seed"] and c["b: prior lowers PRES on every seed"]
    assert c["a: prior keeps DIV on every seed (no lower)"]
    assert c["with the prior, subject fidelity ≥ 0.9 mean"]
    assert not c["with the prior, subject fidelity ≥ 0.8 on every run"]
    assert c["with the prior, the identifier localises ≥ 1.5 (mean)"]
    assert not c["with the prior, the identifier localises ≥ 1.5 on every run"]
    assert c["base model: colour words localise ≥ 1.5"] and not c["base model: shape words localise ≥ 1.5"]


def test_the_base_model_is_asked_every_prompt_the_words_can_form(monkeypatch):
    """vocabulary_prompts: every colour × pattern × shape word (or "toy"), alone and on each background, no unnamed
    word among them; best_prompt_fidelity draws again the prompts that screened best (ties: those naming more of the
    subject) and reports the best of those re-checks, not of the noisy screens."""
    from minidream.demo import evaluation
    prompts = evaluation.vocabulary_prompts()
    assert len(prompts) == 6 * 3 * 6 * 5 and len(set(prompts)) == len(prompts)
    assert "a yellow striped star on a blue background" in prompts and "a green toy" in prompts
    unnamed = {v for vs in world.UNNAMED.values() for v in vs}
    assert not any(set(p.split()) & (unnamed | {"plain"}) for p in prompts)
    subject = world.SUBJECTS[0]
    lucky = "a pink dotted heart on a gray background"  # one subject reading among its 4 screens

    def readings(model, net, asked, seed):
        if seed == 200:  # the screen
            return [dict(subject) if p == lucky and k % 4 == 0 else {} for k, p in enumerate(asked)]
        return [dict(subject) if p.startswith("a yellow striped") and k % 8 == 0 else {} for k, p in enumerate(asked)]
    monkeypatch.setattr(evaluation, "_readings", readings)
    monkeypatch.setattr(evaluation, "is_subject", lambda p, s: p == s)
    best = evaluation.best_prompt_fidelity(None, None)[world.subject_name(subject)]
    assert best["screened"] == 0.25  # the lucky screen
    assert best["prompt"].startswith("a yellow striped") and best["fidelity"] == 4 / 32  # re-drawn: 1 in 8
