"""The demo model as a model like any other (#54): `--model demo` from any folder, `train` on it with settings that
work, the lines `train` starts and ends with, a `<token>` the model lacks, and nothing of a finished run or demo
thrown away; the pictures' labels and colour key."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from minidream.demo import world
from minidream.demo.architecture import DEMO_DIR
from tests.test_train import run_cli

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model_index.json").exists(), reason="demo model not built")


def photos(folder):
    folder.mkdir()
    for i, img in enumerate(world.subject_images(world.SUBJECTS[0], 4)):
        img.save(folder / f"{i}.png")
    return folder


def test_model_demo_from_any_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minidream", "info", "demo"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0 and str(DEMO_DIR) in r.stdout and "SD 1.x" in r.stdout, r.stderr
    (tmp_path / "demo").mkdir()  # a folder of that name here is that folder, not the shipped model
    r = subprocess.run([sys.executable, "-m", "minidream", "info", "demo"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 2 and str(DEMO_DIR) not in r.stdout + r.stderr


def test_train_on_the_demo_model_takes_its_settings_and_ends_with_the_sample_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "demo", "--instance-dir", photos(tmp_path / "photos"), "--class-noun", "toy",
            "--out", "run", "--steps", 2, "--num-class-images", 2, "--class-steps", 2]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    said = next(line for line in r.output.splitlines() if line.startswith("--model demo:"))
    assert "--lr 0.0005" in said and "--class-guidance 4.0" in said and "--resolution 32" in said
    assert "--steps" not in said and "--num-class-images" not in said  # given: the user's
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["lr"], run["steps"], run["num_class_images"], run["resolution"]) == (5e-4, 2, 2, 32)
    assert "training on cpu, fp32, attention " in r.output
    assert "draw with it: minidream sample --model run/model --prompt 'a sks toy' --out run/samples" in r.output
    assert (run["instance_prompt"], run["class_prompt"]) == ("a sks toy", "a toy")
    assert json.loads((tmp_path / "run" / "finished.json").read_text())["step"] == 2
    # a finished run resumed at its last step is said so, and nothing is exported again
    stamp = (tmp_path / "run" / "model" / "model_index.json").stat().st_mtime_ns
    r = run_cli(*args, "--resume", "latest")
    assert r.exit_code == 2 and "already at step 2" in r.output and "--steps M > 2" in r.output, r.output
    assert (tmp_path / "run" / "model" / "model_index.json").stat().st_mtime_ns == stamp
    # a LoRA run's command names the base and the file
    r = run_cli(*args[:-6], "--out", "lora", "--steps", 1, "--no-prior", "--train", "lora")
    assert r.exit_code == 0, r.output
    assert "--lr 0.001" in r.output  # the demo's LoRA lr
    assert "draw with it: minidream sample --model demo --lora lora/lora/pytorch_lora_weights.safetensors" in r.output


def test_an_unfinished_export_is_finished_on_resume(tmp_path, monkeypatch):
    """Stopped after the last checkpoint, before finished.json: --resume latest writes the exports."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "demo", "--instance-dir", photos(tmp_path / "photos"), "--class-noun", "toy",
            "--out", "run", "--steps", 1, "--no-prior"]
    assert run_cli(*args).exit_code == 0
    (tmp_path / "run" / "finished.json").unlink()
    r = run_cli(*args, "--resume", "latest")
    assert r.exit_code == 0 and (tmp_path / "run" / "finished.json").is_file(), r.output


def test_a_locked_folder_is_named_first(sd1_dir, tmp_path):
    from minidream.training.run_folder import lock_run
    from tests.test_train import instance_dir, train_args  # noqa: F401
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")  # another run's folder, and in use: the lock is what to say
    held = lock_run(out)
    try:
        r = run_cli(*train_args(sd1_dir, tmp_path, out, "--steps", 1))
        assert r.exit_code == 2 and "in use by another minidream run" in r.output, r.output
        assert str(out / ".lock") in r.output
    finally:
        held.close()


def test_sample_warns_of_a_token_the_model_lacks(tmp_path):
    r = run_cli("sample", "--model", "demo", "--prompt", "a <sks> toy", "--steps", 1, "--out", tmp_path / "s")
    assert r.exit_code == 0 and "warning: <sks>: not a token of this model" in r.output, r.output
    r = run_cli("sample", "--model", "demo", "--prompt", "a sks toy", "--steps", 1, "--out", tmp_path / "t")
    assert r.exit_code == 0 and "not a token" not in r.output


def test_a_finished_demo_is_not_thrown_away(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("{}")
    r = run_cli("demo", "--out", out)
    assert r.exit_code == 2 and "holds a finished demo" in r.output and "--overwrite" in r.output, r.output
    assert (out / "report.json").read_text() == "{}"


def test_labelled_grid_layout_and_the_colour_key():
    """A tiny model's tiles are scaled up by a whole factor, each row has its label's column, and the layout the
    PNG keeps finds every image again; the key runs from light (low) to dark (high)."""
    from minidream.plots import colour, labelled_grid, legend
    rows = [(f"prompt {k}", torch.randint(0, 256, (3, 32, 24, 3), dtype=torch.uint8)) for k in range(2)]
    picture, layout = labelled_grid(rows, "a title")
    assert layout["zoom"] == 4 and layout["tile"] == [96, 128]
    a = torch.from_numpy(__import__("numpy").array(picture))
    (x0, y0), (dx, dy), z = layout["origin"], layout["step"], layout["zoom"]
    for r, (_, images) in enumerate(rows):
        for c, img in enumerate(images):
            assert torch.equal(a[y0 + r * dy:y0 + r * dy + 32 * z:z, x0 + c * dx:x0 + c * dx + 24 * z:z], img)
    assert sum(colour(0.0)) > sum(colour(1.0))  # low light, high dark
    key = legend(300, "what")
    assert isinstance(key, Image.Image) and key.width == 300
