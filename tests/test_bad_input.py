"""Bad input, round three: every value a user can get wrong is a one-line error that names the flag or file and what
to do, before anything is written; seeded fuzz of --concepts files and LoRA files (metadata, α, shapes)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from minidream.cli import app
from minidream.formats import loading
from minidream.formats.lora_files import apply_loras
from minidream.training import TrainError
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def refused(r, needle):
    """Exit 2, the last line names what is wrong; no traceback."""
    assert r.exit_code == 2 and "Traceback" not in r.output, (needle, r.output, r.exception)
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, (needle, last)


def concepts_json(tmp_path, body, name="c.json"):
    (tmp_path / name).write_text(json.dumps(body))
    return tmp_path / name


TRAIN_CASES = [  # (extra options, what the error names)
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--prior-loss-weight", "inf"], "--prior-loss-weight must be >= 0 and finite"),
    (["--noise-offset", "nan"], "--noise-offset"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--max-aspect", "20"], "--max-aspect must be in [1, 10]"),
    (["--resolution", "8192"], "--resolution"),
    (["--num-class-images", "1000000"], "--num-class-images must be at most 100000"),
    (["--num-class-images", "0"], "--num-class-images must be at least 1 with prior"),
    (["--identifier", "two words"], "--identifier"),
    (["--identifier", "<sks>"], "--identifier"),
    (["--class-noun", "caf\udce9"], "--class-noun is not UTF-8 text"),
    (["--instance-prompt", "a photo of sks \udcff"], "--instance-prompt is not UTF-8"),
    (["--validation-prompt", "\udcff"], "--validation-prompt"),
    (["--model", ""], "--model is empty"),
    (["--class-dir", ""], "--class-dir is empty"),
    (["--train-token", "--instance-prompt", "a photo of sks dog"], "does not hold the token <sks>"),
    (["--resume", ""], "--resume is empty"),
    (["--resume", "latest", "--overwrite"], "pass one of them"),
    (["--class-steps", "2000"], "--class-steps"),
    (["--validation-prompt", "a dog", "--validation-steps", "5000"], "--validation-steps"),
    (["--class-noun", " "], "--class-noun is empty"),
    (["--instance-dir", ""], "--instance-dir is empty"),
    (["--concepts", ""], "--concepts is empty"),
]


@pytest.mark.parametrize("extra,needle", TRAIN_CASES, ids=[c[1].split(":")[0] + str(i) for i, c in
                                                            enumerate(TRAIN_CASES)])
def test_bad_train_settings_are_one_line_and_write_nothing(sd1_dir, instance_dir, tmp_path, extra, needle):  # noqa: F811
    out = tmp_path / "run"
    refused(run_cli(*train_args(sd1_dir, instance_dir, out, *extra)), needle)
    assert not out.exists()


def test_folders_that_would_mix_a_runs_files(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    import shutil
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    refused(run_cli(*train_args(sd1_dir, photos, photos)), "is the instance folder")  # --out: the photos
    refused(run_cli(*train_args(sd1_dir, photos, tmp_path / "o", "--class-dir", photos)), "choose another --class-dir")
    assert sorted(p.name for p in photos.iterdir()) == sorted(p.name for p in instance_dir.iterdir())
    both = concepts_json(tmp_path, [{"instance_dir": str(photos), "identifier": "sks", "class_noun": "dog"}])
    refused(run_cli(*train_args(sd1_dir, photos, tmp_path / "o", "--concepts", both)), "--instance-dir")
    out = tmp_path / "o"  # --class-dir is --out: the run's curves and grids would be class images
    refused(run_cli(*train_args(sd1_dir, photos, out, "--class-dir", out)), "is --out")
    other = concepts_json(tmp_path, [{"instance_dir": str(photos), "identifier": "sks", "class_noun": "dog"},
                                     {"instance_dir": str(instance_dir), "identifier": "sks", "class_noun": "dog",
                                      "class_dir": str(photos)}], "other.json")
    r = run_cli("train", "--model", sd1_dir, "--concepts", other, "--out", out, "--resolution", 16)
    refused(r, "is concept 0's instance folder")
    assert sorted(p.name for p in photos.iterdir()) == sorted(p.name for p in instance_dir.iterdir())


def test_bad_concepts_entries(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    good = {"instance_dir": str(instance_dir), "identifier": "sks", "class_noun": "dog"}
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    cases = [
        (tmp_path, "not a file"),
        (fifo, "not a file"),
        (concepts_json(tmp_path, [{**good, "num_class_images": -1}], "n.json"), "num_class_images must be an integer"),
        (concepts_json(tmp_path, [{**good, "num_class_images": True}], "b.json"), "num_class_images must be"),
        (concepts_json(tmp_path, [{**good, "identifier": "a b"}], "i.json"), "is not one word"),
        (concepts_json(tmp_path, [{**good, "class_noun": ""}], "e.json"), "class_noun must be non-empty"),
        (concepts_json(tmp_path, [{**good, "instance_dir": 3}], "d.json"), "needs \"instance_dir\""),
        (concepts_json(tmp_path, [good, {**good, "class_dir": str(tmp_path / "shared")}, {
            **good, "class_dir": str(tmp_path / "shared")}], "s.json"), "share the class folder"),
        (concepts_json(tmp_path, [good, {**good, "identifier": "xyz"}], "t.json"), "--train-token learns one token"),
    ]
    for spec, needle in cases:
        out = tmp_path / "run"
        extra = ["--train-token"] if "token" in needle else []
        r = run_cli("train", "--model", sd1_dir, "--concepts", spec, "--out", out, "--resolution", 16, *extra)
        refused(r, needle)
        assert not out.exists()


GARBAGE = [None, -1, 0, 1, 7, 3.5, 1e300, float("nan"), "x", "", "<a>", "a b", [], [0], {}, {"x": 1}, True,
           10 ** 12, "\udcff"]


def test_concepts_fuzz_is_accepted_or_one_line(instance_dir, tmp_path):  # noqa: F811
    """A seeded mutation loop over a valid concept list: each either passes every check or is a TrainError."""
    from minidream.training.concepts_file import check_run_concepts, concepts_file
    from minidream.training.config import TrainConfig, validate
    rng = random.Random(0)
    keys = ["instance_dir", "instance_prompt", "identifier", "class_noun", "class_prompt", "class_dir",
            "num_class_images", "colour"]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(150):
        body = [{"instance_dir": str(instance_dir), "identifier": "sks", "class_noun": "dog"} for _ in range(2)]
        for _ in range(rng.randint(1, 3)):
            entry = rng.choice(body)
            key = rng.choice(keys)
            if rng.random() < 0.2:
                entry.pop(key, None)
            else:
                entry[key] = rng.choice(GARBAGE)
        spec = tmp_path / f"{i}.json"
        spec.write_text(json.dumps(body, allow_nan=True))
        try:
            cfg = TrainConfig(model="m", out=str(tmp_path / "out"), concepts=concepts_file(spec),
                              train_token=rng.random() < 0.3, prior=rng.random() < 0.7)
            validate(cfg)
            check_run_concepts(cfg, tmp_path / "out")
            outcomes["ok"] += 1
        except TrainError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["ok"] > 10 and outcomes["refused"] > 50, outcomes


@pytest.fixture(scope="module")
def lora_files(sd1_dir, tmp_path_factory):
    """A real LoRA of the tiny model in kohya's layout and in diffusers' with PEFT metadata."""
    from safetensors.torch import save_file
    from minidream.formats.lora_export import (diffusers_lora_state_dict, kohya_lora_state_dict, save_lora_diffusers,
                                               save_lora_kohya)
    from minidream.models.lora import AdapterSpec
    from minidream.training.trainable import Adapters, denoiser_lora
    d = tmp_path_factory.mktemp("loras")
    m = loading.load(str(sd1_dir))
    denoiser_lora(m.unet, Adapters(AdapterSpec(2, 2.0)), m.family.lora_targets)
    g = torch.Generator().manual_seed(0)
    for p in m.unet.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    save_file(kohya_lora_state_dict(m), d / "kohya.safetensors")
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.rank_pattern": {},
                                                 "unet.alpha_pattern": {}})}
    save_file(diffusers_lora_state_dict(m), d / "peft.safetensors", metadata=meta)
    # DoRA on attention, feed-forward and the resnets' convolutions, in both layouts, as our exports write them
    m = loading.load(str(sd1_dir))
    denoiser_lora(m.unet, Adapters(AdapterSpec(2, 2.0, conv_rank=3, dora=True), targets="all"), m.family.lora_targets)
    for p in m.unet.parameters():
        if p.requires_grad:
            p.data = p.data * 1.1 + torch.randn(p.shape, generator=g) * 0.1
    save_lora_kohya(m, d / "kohya_dora.safetensors")
    save_lora_diffusers(m, d / "peft_dora.safetensors")
    return d


def test_lora_fuzz_loads_or_is_one_line(sd1_dir, lora_files, tmp_path):
    """Mutated metadata, α tensors and factor shapes: each file merges into finite weights or is one ModelError
    that names it (and leaves the model as it was)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    base = loading.load(str(sd1_dir))
    rng = random.Random(1)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(80):
        src = lora_files / rng.choice(["kohya.safetensors", "peft.safetensors", "kohya_dora.safetensors",
                                       "peft_dora.safetensors"])
        sd = load_file(src)
        with safe_open(str(src), "pt") as f:
            meta = dict(f.metadata() or {})
        what = rng.choice(["meta", "alpha", "shape", "drop", "value"])
        key = rng.choice(sorted(sd))
        if what == "meta":
            cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
            cfg[rng.choice(["unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern",
                            "unet.use_rslora", "unet.use_dora"])] = rng.choice(GARBAGE[:-1])
            meta["lora_adapter_metadata"] = rng.choice([json.dumps(cfg), "{not json", "[1]", ""])
        elif what == "alpha":
            alphas = [k for k in sd if k.endswith(".alpha")] or [key.rsplit(".", 2)[0] + ".alpha"]
            sd[rng.choice(alphas)] = rng.choice([torch.tensor(float("nan")), torch.tensor(0.0), torch.tensor(-2.0),
                                                 torch.tensor(1e30), torch.zeros(2), torch.tensor(float("inf"))])
        elif what == "shape":
            v = sd[key].reshape(1, -1) if sd[key].ndim < 2 else sd[key]
            sd[key] = rng.choice([v.T.contiguous(), v[:0], v.reshape(-1), v[..., None]])
        elif what == "drop":
            del sd[key]
        else:
            sd[key] = sd[key] * rng.choice([float("nan"), 1e30, -1.0, 0.0])
        f = tmp_path / f"{i}.safetensors"
        save_file(sd, f, metadata=meta)
        m = loading.load(str(sd1_dir))
        try:
            apply_loras(m, [(f, rng.choice([1.0, 1e20]))])
            assert all(torch.isfinite(p).all() for p in m.unet.parameters())
            outcomes["ok"] += 1
        except loading.ModelError as e:
            assert str(f) in str(e) and "\n" not in str(e), str(e)
            assert all(torch.equal(a, b) for a, b in zip(m.unet.parameters(), base.unet.parameters()))
            outcomes["refused"] += 1
    assert outcomes["ok"] > 5 and outcomes["refused"] > 20, outcomes


def test_every_odd_metadata_value_loads_or_is_one_line(sd1_dir, lora_files, tmp_path):
    """Each PEFT setting the scale is read from, set to each odd value (not a sample of them, as the fuzz above)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    src = lora_files / "peft.safetensors"
    sd = load_file(src)
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    model = loading.load(str(sd1_dir))
    for i, (key, value) in enumerate((k, v) for k in ("unet.r", "unet.lora_alpha", "unet.rank_pattern",
                                                      "unet.alpha_pattern", "unet.use_rslora") for v in GARBAGE):
        cfg = {**json.loads(meta["lora_adapter_metadata"]), key: value}
        f = tmp_path / f"{i}.safetensors"
        save_file(sd, f, metadata={**meta, "lora_adapter_metadata": json.dumps(cfg)})
        try:
            apply_loras(model, [(f, 1.0)])
        except loading.ModelError as e:
            assert str(f) in str(e) and "\n" not in str(e), str(e)


def test_odd_image_files(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """A FIFO among the photos is skipped (reading it would block forever); a decompression bomb is refused
    by name; an embedding of more vectors than a prompt holds is refused."""
    import shutil
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    os.mkfifo(photos / "pipe.png")
    r = run_cli(*train_args(sd1_dir, photos, tmp_path / "o1", "--steps", 1, "--no-prior"))
    assert r.exit_code == 0, r.output
    os.unlink(photos / "pipe.png")
    Image.new("1", (14000, 14000)).save(photos / "bomb.png")  # 196 Mpixel: past PIL's bomb limit (2 x 89 M)
    r = run_cli(*train_args(sd1_dir, photos, tmp_path / "o2", "--steps", 1, "--no-prior"))
    refused(r, "bomb.png")
    assert "too large" in r.output and not (tmp_path / "o2").exists()
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(80, 32)}, tmp_path / "long.safetensors")
    r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(tmp_path / "s"),
                                 "--steps", 1, "--embedding", str(tmp_path / "long.safetensors"), "--no-progress"])
    refused(r, "long.safetensors")
    assert not (tmp_path / "s").exists()


SAMPLE_CASES = [
    (["--steps", "0"], "--steps"),
    (["--steps", "5000"], "--steps"),
    (["--guidance", "nan"], "--guidance"),
    (["--height", "12"], "--height must be a positive multiple of 8"),
    (["--width", "100000"], "--width"),
    (["--num-images", "0"], "--num-images"),
    (["--eta", "inf"], "--eta"),
    (["--eta", "1.5", "--scheduler", "ddim"], "--eta must be in [0, 1]"),
    (["--eta", "0.5", "--scheduler", "euler"], "this sampler (Euler) has none (drop it, or --scheduler ddim)"),
    (["--prompt", "\udcff"], "--prompt"),
    (["--lora", "missing.safetensors"], "no such file"),
    (["--lora", "x.safetensors:nan"], "finite number"),
    (["--out", ""], "--out is empty"),
    (["--embedding", ""], "--embedding is empty"),
]


@pytest.mark.parametrize("extra,needle", SAMPLE_CASES, ids=[str(i) for i in range(len(SAMPLE_CASES))])
def test_bad_sampling_settings_are_one_line_and_write_nothing(sd1_dir, tmp_path, extra, needle):
    (tmp_path / "x.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    args = ["sample", "--model", str(sd1_dir), "--prompt", "a red star", "--out", str(out), "--steps", "2",
            "--no-progress", *extra]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    refused(r, needle)
    assert not out.exists()


def test_demo_refuses_another_runs_folder(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--no-prior")).exit_code == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "minidream", "demo", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(out) in r.stderr.strip().splitlines()[-1]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_the_demo_knows_its_own_folder_however_it_is_spelled(tmp_path, monkeypatch):
    from minidream.demo.run import refuse_other_runs
    out = tmp_path / "demo"
    out.mkdir()
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "site-packages" / "weights" / "demo"
    for instance, model_was in ((out / "instance", model), (Path("demo/instance"), "/elsewhere/weights/demo")):
        (out / "run.json").write_text(json.dumps({"model": str(model_was), "instance_dir": str(instance)}))
        refuse_other_runs(Path("demo"), model)
    (out / "run.json").write_text(json.dumps({"model": str(model), "instance_dir": str(tmp_path / "photos")}))
    with pytest.raises(TrainError, match="holds another run"):
        refuse_other_runs(out, model)
