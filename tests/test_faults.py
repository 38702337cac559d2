"""Faults for real: a run stopped by a signal at each phase, and a disk that fills up (a small tmpfs), each ends in
one line, and `--resume latest` then finishes the run with the weights of a run that was never stopped."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import instance_dir, train_args  # noqa: F401  (instance_dir is a fixture)

# Stops the CLI from outside the trainer (it has no test hook): the n-th call of MODULE.NAME sends SIGNAL to the
# process itself, then the call goes on as the interrupted code would.
DRIVER = """
import importlib, os, runpy, signal, sys
module, name, sig, nth = sys.argv[1:5]
m = importlib.import_module(module)
original, calls = getattr(m, name), []
def stopping(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(nth):
        os.kill(os.getpid(), getattr(signal, sig))
    return original(*args, **kwargs)
setattr(m, name, stopping)
sys.argv = ["minidream", *sys.argv[5:]]
runpy.run_module("minidream", run_name="__main__")
"""
STEP_DRIVER = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
sig, nth = sys.argv[1:3]
calls = []
def stopping(*args):
    calls.append(1)
    if len(calls) == int(nth):
        os.kill(os.getpid(), getattr(signal, sig))
register_optimizer_step_pre_hook(stopping)
sys.argv = ["minidream", *sys.argv[3:]]
runpy.run_module("minidream", run_name="__main__")
"""

# Fills the disk (a file at FILLER, written until no byte more fits) just before the run opens metrics.jsonl.
FILL_DRIVER = """
import runpy, sys
from minidream.training.report import Log
filler = sys.argv[1]
original = Log.__init__
def filling(self, *args, **kwargs):
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError:
                pass
    original(self, *args, **kwargs)
Log.__init__ = filling
sys.argv = ["minidream", *sys.argv[2:]]
runpy.run_module("minidream", run_name="__main__")
"""


def cli(*args, driver=None, hook=()):
    """The CLI in a fresh process, as from a terminal (SIGINT at its default: a background test run inherits it
    ignored)."""
    head = [sys.executable, "-c", driver, *map(str, hook)] if driver else [sys.executable, "-m", "minidream"]
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=os.getcwd(),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stopped(r, *needles):
    """Exit 2 with one line (after the progress lines) that says how to go on; no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    how = "continue with: minidream train --out "
    assert last.startswith("error: ") and how in last and "--resume latest" in last, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def lora_run(model, photos, out, *extra):
    return train_args(model, photos, out, "--train", "lora", "--steps", 4, "--checkpoint-every", 2,
                      "--class-batch-size", 1, "--validation-prompt", "a photo of sks dog", "--validation-steps", 2,
                      "--save-as", "lora-diffusers", "--device", "cpu", *extra)


def same_weights(a, b):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


def steps_logged(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(sd1_dir, instance_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli(*lora_run(sd1_dir, instance_dir, out)).returncode == 0
    return out


LORA = "lora/pytorch_lora_weights.safetensors"
PHASES = {  # where the signal comes: (the call that sends it, which call, the signal), what the last line says
    "class images": (("minidream.training.class_images", "save_png", "SIGTERM", 2), "before training"),
    "the optimizer's update": (("SIGINT", 3), "saved"),
    "the final grid": (("minidream.training.validation", "generate", "SIGTERM", 2), "after training"),  # 1: step 0
    "the export": (("minidream.formats.exports", "swap_in", "SIGINT", 1), "after training"),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_at_each_phase_resumes_to_the_same_weights(sd1_dir, instance_dir, uninterrupted, tmp_path,  # noqa: F811
                                                            phase):
    (hook, said) = PHASES[phase]
    out = tmp_path / "run"
    driver = STEP_DRIVER if len(hook) == 2 else DRIVER
    r = cli(*lora_run(sd1_dir, instance_dir, out), driver=driver, hook=hook)
    stopped(r, said)
    if phase == "class images":  # the first image is kept; no checkpoint yet: the run starts again from step 0
        assert [p.name for p in (out / "class_images").iterdir()] == ["class-00000.png"]
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    if phase == "the optimizer's update":  # the update came whole, and step 3 was saved
        assert (out / "checkpoints" / "step-000003.safetensors").is_file() and steps_logged(out) == [1, 2, 3]
    if phase in ("the final grid", "the export"):  # the trained weights were saved before the line
        assert (out / "checkpoints" / "step-000004.safetensors").is_file() and not (out / LORA).exists()
    r = cli(*lora_run(sd1_dir, instance_dir, out, "--resume", "latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_weights(uninterrupted / LORA, out / LORA)
    assert steps_logged(out) == [1, 2, 3, 4]
    assert (out / "samples" / "final.png").read_bytes() == (uninterrupted / "samples" / "final.png").read_bytes()
    assert not list(out.rglob(".*.tmp*")) and not list(out.rglob(".tmp*"))


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a few MB (tmpfs, mounted as root: skipped elsewhere); `small_disk.grow()` frees it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    where = tmp_path / "disk"
    where.mkdir()

    class Disk:
        path = where

        def resize(self, size: str):
            subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    yield Disk()
    subprocess.run(["umount", "-l", str(where)])


def test_a_full_disk_at_a_checkpoint_then_resume(sd1_dir, instance_dir, small_disk, tmp_path):  # noqa: F811
    """The whole UNet's checkpoint (17 MB with Adam's moments) on a 6 MB disk: one line, no half file, and the
    run (no checkpoint yet) starts again from step 0 once there is room, to the weights of an unstopped run."""
    args = ["--checkpoint-every", 2, "--steps", 3, "--device", "cpu"]
    ref = tmp_path / "ref"
    assert cli(*train_args(sd1_dir, instance_dir, ref, *args)).returncode == 0
    out = small_disk.path / "run"
    r = cli(*train_args(sd1_dir, instance_dir, out, *args))
    last = stopped(r, "No space left on device", "no checkpoint was written yet")
    assert "step-000002.safetensors" in last
    assert not list((out / "checkpoints").iterdir()) and len(list((out / "class_images").iterdir())) == 2
    small_disk.resize("64m")
    r = cli(*train_args(sd1_dir, instance_dir, out, *args, "--resume", "latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        same_weights(ref / "model" / part, out / "model" / part)
    assert steps_logged(out) == [1, 2, 3]


def test_a_full_disk_at_export_keeps_the_trained_weights(sd1_dir, instance_dir, small_disk, tmp_path):  # noqa: F811
    """LoRA checkpoints (small) fit; the merged diffusers folder (8 MB) does not: the trained weights are saved,
    the half-written export is removed, and the resumed run exports what an unstopped run does."""
    args = ["--train", "lora", "--save-as", "lora-diffusers", "--save-as", "diffusers", "--device", "cpu"]
    ref = tmp_path / "ref"
    assert cli(*train_args(sd1_dir, instance_dir, ref, *args)).returncode == 0
    out = small_disk.path / "run"
    r = cli(*train_args(sd1_dir, instance_dir, out, *args))
    stopped(r, "No space left on device", "after training", "saved ")
    assert (out / "checkpoints" / "step-000003.safetensors").is_file()
    assert not (out / "model").exists() and not list(out.rglob(".*.tmp*"))
    small_disk.resize("64m")
    r = cli(*train_args(sd1_dir, instance_dir, out, *args, "--resume", "latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_weights(ref / LORA, out / LORA)
    same_weights(ref / "model/unet/diffusion_pytorch_model.safetensors",
                 out / "model/unet/diffusion_pytorch_model.safetensors")


def test_a_full_disk_at_the_metrics_then_resume(sd1_dir, instance_dir, small_disk, tmp_path):  # noqa: F811
    """metrics.jsonl cannot take the first lines (written at step 3, the last: --log-every is 10) and no checkpoint
    fits either: one line naming the file, and the run starts again from step 0 once there is room."""
    args = ["--train", "lora", "--checkpoint-every", 0, "--save-as", "lora-diffusers", "--device", "cpu"]
    ref = tmp_path / "ref"
    assert cli(*train_args(sd1_dir, instance_dir, ref, *args)).returncode == 0
    out, filler = small_disk.path / "run", small_disk.path / "filler"
    r = cli(*train_args(sd1_dir, instance_dir, out, *args), driver=FILL_DRIVER, hook=[filler])
    stopped(r, f"{out / 'metrics.jsonl'}: No space left on device at step 3", "no checkpoint could be written either")
    filler.unlink()
    r = cli(*train_args(sd1_dir, instance_dir, out, *args, "--resume", "latest"))
    assert r.returncode == 0 and "starting again from step 0" in r.stderr, r.stderr[-3000:]
    same_weights(ref / LORA, out / LORA)
    assert steps_logged(out) == [1, 2, 3]


def test_sample_diff_and_maps_on_a_full_disk_are_one_line(sd1_dir, small_disk):
    small_disk.resize("16k")
    (small_disk.path / "filler").write_bytes(b"\0" * 12000)
    for args in (["sample", "--model", sd1_dir, "--prompt", "a red star", "--steps", 2, "--height", 64, "--width", 64,
                  "--num-images", 4, "--out", small_disk.path / "s"],
                 ["diff", sd1_dir, sd1_dir, "--out", small_disk.path / "d"],
                 ["attention-maps", "--model", sd1_dir, "--prompt", "a red star", "--steps", 2, "--height", 64,
                  "--width", 64, "--out", small_disk.path / "m"]):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args[0], r.stderr[-3000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "No space left on device" in last, (args[0], last)
        assert str(small_disk.path) in last and "a file:" not in last, (args[0], last)  # the line names where


def test_ctrl_c_while_the_modules_load_is_one_line(tmp_path):
    """A real SIGINT while `minidream` imports torch (the first second or so): one line, exit 1, no traceback.
    A signal that comes after `--help` has finished finds no process to stop (exit 0)."""
    import time
    codes = []
    for delay in (0.3, 0.6):
        p = subprocess.Popen([sys.executable, "-m", "minidream", "train", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert p.returncode in (0, 1) and (p.returncode == 0 or err == "interrupted while starting; nothing was "
                                           "written\n"), (p.returncode, err)
        codes.append(p.returncode)
    assert 1 in codes, codes


@pytest.mark.slow  # 25 s: a whole demo run up to its stop
def test_ctrl_c_in_the_demo_is_one_line_and_the_demo_starts_over(tmp_path):
    """A real SIGINT while the demo measures where "sks" looks on the base model (before training), then on the
    tuned one (after it): one line each, no traceback; the same folder then gives a whole demo."""
    out = tmp_path / "demo"
    for nth in (1, 2):
        r = cli("demo", "--out", out, "--steps", 2, driver=DRIVER,
                hook=("minidream.demo.run", "identifier_maps", "SIGINT", nth))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == (f"error: interrupted; {out} holds a partial demo run, which "
                                                     f"`minidream demo --out {out}` starts over")
        assert not (out / "report.json").exists()
    r = cli("demo", "--out", out, "--steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"before.png", "after.png", "attention.png", "report.json"} <= {p.name for p in out.iterdir()}


def test_a_kill_after_a_snapshot_sets_nothing_aside(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """kill -9 at step 5, after the snapshot of step 4 and the checkpoint of step 3: `--resume latest` replays
    step 4 and writes its snapshot again (the same line of steps), without a copy set aside in abandoned/."""
    extra = ("--steps", 6, "--checkpoint-every", 3, "--save-every", 2)
    whole = tmp_path / "whole"
    assert cli(*lora_run(sd1_dir, instance_dir, whole, *extra)).returncode == 0
    out = tmp_path / "run"
    r = cli(*lora_run(sd1_dir, instance_dir, out, *extra), driver=STEP_DRIVER, hook=("SIGKILL", 5))
    assert r.returncode == -signal.SIGKILL and (out / "snapshots" / "step-000004" / LORA).is_file()
    r = cli(*lora_run(sd1_dir, instance_dir, out, *extra, "--resume", "latest"))
    assert r.returncode == 0 and "at step 3" in r.stderr, r.stderr[-3000:]
    assert not (out / "snapshots" / "abandoned").exists()
    same_weights(whole / "snapshots" / "step-000004" / LORA, out / "snapshots" / "step-000004" / LORA)
    same_weights(whole / LORA, out / LORA)
