"""DreamBooth under torchrun: two gloo processes on the CPU with --batch-size 1 are the same computation as one
process with --batch-size 2 (the draws are global, the gradients averaged), only rank 0 writes, and a killed
process ends the run instead of hanging it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minidream.training.runtime import older_torch

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)

COMMON = ["--train", "lora", "--train-text-encoder", "--save-as", "lora-diffusers", "--device", "cpu", "--flip", 0.5,
          "--random-crop", "--noise-offset", 0.1, "--checkpoint-every", 2, "--num-class-images", 3]


def torchrun(*args, script=None, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *([script] if script else ["-m", "minidream"]), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def one_and_two_processes(model, instance_dir, tmp_path):
    """The same run as one process with --batch-size 2 and as two torchrun processes with --batch-size 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli(*train_args(model, instance_dir, one, "--batch-size", 2, *COMMON))
    assert r.exit_code == 0, r.output
    r = torchrun(*train_args(model, instance_dir, two, "--batch-size", 1, *COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    return one, two


def test_two_processes_train_as_one_process_with_the_global_batch(sd1_dir, instance_dir, tmp_path):
    one, two = one_and_two_processes(sd1_dir, instance_dir, tmp_path)
    # class images: the same set (image i depends on i alone), split across the ranks
    for i in range(3):
        a, b = (torch.tensor(list(Image.open(d / "class_images" / f"class-{i:05d}.png").tobytes())) for d in (one, two))
        assert (a - b).abs().max() <= 1
    # the same losses, step by step, and the same trained weights, to float rounding
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [x["step"] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]) + 1e-7
    a = load_file(one / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any("text_encoder" in k for k in a)
    # lora_B starts at zero: it is the change training made. Compared as a whole (‖Δ₂ − Δ₁‖ ≤ 5e-2 ‖Δ₁‖): Adam's
    # first steps divide each gradient by its own size, so an element whose gradient is ~1e-8 moves by ±lr on
    # float rounding alone (here ~17 of 13k elements), and an element-wise bound would measure only that. One such
    # element moving differently is 1-2.5e-2 ‖Δ₁‖ (lr x steps over ‖Δ₁‖; a full-suite run measured 6.6e-3, where 1e-3
    # failed); a wrong row split or unaveraged gradients moves every element, O(‖Δ₁‖), and the losses above by far more.
    up = [k for k in a if "lora_B" in k]
    da, db = torch.cat([a[k].flatten() for k in up]), torch.cat([b[k].flatten() for k in up])
    assert da.norm() > 0 and (da - db).norm() <= 5e-2 * da.norm()
    # rank 0 alone wrote: one run.json, the checkpoints of step 2 and of the last step, nothing twice
    names = ["step-000002.safetensors", "step-000003.safetensors"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == names
    assert json.loads((two / "run.json").read_text())["batch_size"] == 1
    # the two processes' step-2 checkpoint resumed by one: --batch-size 2 on it (the run's global batch), and step
    # 3 is the one-process run's step 3
    (two / "checkpoints" / names[1]).unlink()
    r = run_cli(*train_args(sd1_dir, instance_dir, two, "--batch-size", 1, *COMMON, "--resume", "latest"))
    assert r.exit_code == 0 and "--batch-size 2" in r.output, r.output
    # the run keeps its own settings (--batch-size 1 for 2 processes): the same command extends it again
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    import shutil
    shutil.copytree(two, tmp_path / "again")
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "again", "--batch-size", 1, *COMMON, "--steps", 4,
                            "--resume", "latest"))
    assert r.exit_code == 0 and "at step 3" in r.output, r.output
    lc = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lc] == [1, 2, 3] and abs(lc[2]["loss"] - la[2]["loss"]) <= 1e-4 * abs(la[2]["loss"])
    c = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    dc = torch.cat([c[k].flatten() for k in up])
    assert (da - dc).norm() <= 5e-2 * da.norm()


def kill_rank1_driver(path: Path) -> Path:
    """The CLI, with rank 1 killed (SIGKILL, from outside the trainer) before its 3rd optimizer step."""
    path.write_text("\n".join([
        "import os, runpy, signal, sys",
        "from torch.optim.optimizer import register_optimizer_step_pre_hook",
        "steps = []",
        "def hook(*args):",
        "    steps.append(1)",
        "    if os.environ['RANK'] == '1' and len(steps) == 3:",
        "        os.kill(os.getpid(), signal.SIGKILL)",
        "register_optimizer_step_pre_hook(hook)",
        "sys.argv[0] = 'minidream'",
        "runpy.run_module('minidream', run_name='__main__')"]))
    return path


def test_a_killed_process_ends_the_run_and_the_checkpoint_resumes_exactly(sd1_dir, instance_dir, tmp_path):
    out, full = tmp_path / "run", tmp_path / "full"
    driver = kill_rank1_driver(tmp_path / "kill_rank1.py")
    args = lambda o: train_args(sd1_dir, instance_dir, o, "--batch-size", 1, *COMMON, "--steps", 6)  # noqa: E731
    r = torchrun(*args(out), script=str(driver), timeout=240)  # a hang fails here with TimeoutExpired
    assert r.returncode != 0
    # rank 0 sees its peer gone (or takes torchrun's SIGTERM as Ctrl-C), saves the last finished step and says so in
    # one line; when the SIGTERM lands while it waits inside a gloo collective it can end without that line, and the
    # periodic checkpoint is what resumes
    line = next((x for x in r.stderr.splitlines() if x.startswith("error: rank 0: ")), None)
    assert line is None or (("another process stopped" in line or "interrupted" in line) and "--resume latest" in line)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-000002.safetensors" in saved and saved[-1] <= "step-000003.safetensors"
    r = torchrun(*args(out), "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    r = torchrun(*args(full))
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_timeout_setting_is_a_one_line_error(sd1_dir, instance_dir, tmp_path):
    r = torchrun(*train_args(sd1_dir, instance_dir, tmp_path / "x", "--device", "cpu"), timeout=120,
                 env={"MINIDREAM_DIST_TIMEOUT_MIN": "soon"})
    assert r.returncode != 0
    assert "error: MINIDREAM_DIST_TIMEOUT_MIN='soon' must be a positive number of minutes" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x" / "run.json").exists()


def test_sdxl_two_processes_train_as_one(xl_dir, instance_dir, tmp_path):
    """SDXL under torchrun (size ids drawn per row with the global draw): two processes with batch 1 = one with 2."""
    one, two = one_and_two_processes(xl_dir, instance_dir, tmp_path)
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]) + 1e-7
    b = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in b)


FSDP = ["--train", "unet", "--save-as", "diffusers", "--device", "cpu", "--flip", 0.5, "--checkpoint-every", 2,
        "--num-class-images", 3, "--validation-prompt", "a photo of sks dog", "--validation-steps", 2]


def unet_change(base, run) -> torch.Tensor:
    """What training changed in the whole UNet, as one vector."""
    f = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(base / f), load_file(run / "model" / f)
    return torch.cat([(b[k] - a[k]).flatten() for k in sorted(a)])


OLD_TORCH = pytest.mark.skipif(older_torch("2.13"), reason="--fsdp on the CPU needs torch >= 2.13 (refused below)")


@OLD_TORCH
def test_fsdp_trains_as_one_process_with_the_global_batch_and_resumes_anywhere(sd1_dir, instance_dir, tmp_path):
    """--fsdp: two gloo processes with their shards of the whole UNet (weights, gradients, Adam's moments) train as
    one process with the global batch (the DDP test's bounds); the checkpoints hold the full tensors and resume on
    one process and on two; every process's peak memory is reported; the validation grid is drawn."""
    import shutil
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*train_args(sd1_dir, instance_dir, one, "--batch-size", 2, *FSDP)).exit_code == 0
    r = torchrun(*train_args(sd1_dir, instance_dir, two, "--batch-size", 1, "--fsdp", *FSDP))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "peak memory per process (peak RSS): rank 0 " in r.stderr and "rank 1 " in r.stderr
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [x["step"] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]) + 1e-7
    da, db = unet_change(sd1_dir, one), unet_change(sd1_dir, two)
    assert da.norm() > 0 and (da - db).norm() <= 5e-2 * da.norm()
    assert (two / "samples" / "final.png").is_file()
    names = ["step-000002.safetensors", "step-000003.safetensors"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == names
    a, b = (load_file(d / "checkpoints" / names[1]) for d in (one, two))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # full tensors, as one process's
    (two / "checkpoints" / names[1]).unlink()
    shutil.copytree(two, tmp_path / "two-again")
    r = run_cli(*train_args(sd1_dir, instance_dir, two, "--batch-size", 1, *FSDP, "--resume", "latest"))
    assert r.exit_code == 0 and "without --fsdp" in r.output and "at step 2" in r.output, r.output
    r = torchrun(*train_args(sd1_dir, instance_dir, tmp_path / "two-again", "--batch-size", 1, *FSDP,
                             "--resume", "latest"))
    assert r.returncode == 0 and "at step 2" in r.stderr, r.stderr[-3000:]
    for run in (two, tmp_path / "two-again"):
        lc = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lc] == [1, 2, 3] and abs(lc[2]["loss"] - la[2]["loss"]) <= 1e-4 * la[2]["loss"]
        dc = unet_change(sd1_dir, run)
        assert (da - dc).norm() <= 5e-2 * da.norm()


@OLD_TORCH
@pytest.mark.slow  # 17 s (a killed process without --fsdp is tested in the fast suite)
def test_a_killed_process_under_fsdp_is_the_one_line_too(sd1_dir, instance_dir, tmp_path):
    """Under --fsdp the lost process shows in FSDP's own gathers (gloo's RuntimeError from inside the forward), not in
    the trainer's collectives: rank 0 still ends with the one line (or with torchrun's SIGTERM taken as Ctrl-C), no
    traceback from the trainer, and the last checkpoint resumes."""
    out = tmp_path / "run"
    args = train_args(sd1_dir, instance_dir, out, "--batch-size", 1, "--fsdp", *FSDP, "--steps", 5)
    r = torchrun(*args, script=str(kill_rank1_driver(tmp_path / "kill_rank1.py")), timeout=240)
    assert r.returncode != 0
    assert "/minidream/" not in r.stderr, r.stderr[-3000:]  # no frame of ours: no traceback from the trainer
    line = next((x for x in r.stderr.splitlines() if x.startswith("error: rank 0: ")), None)
    assert line is None or (("another process stopped" in line or "interrupted" in line) and "--resume latest" in line)
    assert "step-000002.safetensors" in [p.name for p in (out / "checkpoints").iterdir()]
    r = torchrun(*args, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_fsdp_needs_torchrun_and_says_what_it_cannot_do(sd1_dir, instance_dir, tmp_path):
    for extra, needle in ((["--fsdp"], "run it under torchrun"),
                          (["--fsdp", "--mixed-precision", "bf16"], "--fsdp works with --optimizer adamw"),
                          (["--fsdp", "--optimizer", "adafactor"], "--fsdp works with --optimizer adamw"),
                          (["--fsdp", "--train-token"], "--fsdp and --train-token do not go together yet")):
        out = tmp_path / "run"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, *extra))
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()


@pytest.mark.slow  # 15 s (the other torchrun runs make class images too)
def test_a_slow_process_makes_the_same_class_images(sd1_dir, instance_dir, tmp_path):
    """Rank 1 held back after the processes agree to start writing (as a loaded machine does): each still draws
    the indices both listed before any write, so the run has exactly images 0..n-1, each once."""
    driver = tmp_path / "slow_rank1.py"
    driver.write_text("\n".join([
        "import os, runpy, sys, time",
        "from minidream.training import class_images",
        "real = class_images.barrier",
        "def slow(group):",
        "    real(group)",
        "    if os.environ['RANK'] == '1':",
        "        time.sleep(3)",
        "class_images.barrier = slow",
        "sys.argv[0] = 'minidream'",
        "runpy.run_module('minidream', run_name='__main__')"]))
    out = tmp_path / "run"
    r = torchrun(*train_args(sd1_dir, instance_dir, out, "--batch-size", 1, *COMMON, "--steps", 1), script=str(driver))
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (out / "class_images").iterdir())
    assert names == [f"class-{i:05d}.png" for i in range(3)], names


def test_a_resume_cannot_bring_fused_backward_under_torchrun(sd1_dir, instance_dir, tmp_path):
    """The settings a resume merges are checked as the command line's: a --fused-backward run resumed by two
    processes would update before averaging the gradients, so it is refused in one line."""
    out = tmp_path / "run"
    args = train_args(sd1_dir, instance_dir, out, "--batch-size", 2, "--fused-backward", "--steps", 1,
                      "--checkpoint-every", 1, "--no-prior", "--device", "cpu")
    assert run_cli(*args).exit_code == 0
    r = torchrun(*args, "--steps", 2, "--resume", "latest", "--batch-size", 1)
    assert r.returncode != 0 and "--fused-backward updates each weight during backward" in r.stderr, r.stderr[-2000:]
    ours = r.stderr.split("Traceback")[0]  # before torchrun's own report of the failed children
    assert "error: rank 0: --fused-backward" in ours and "error: rank 1: --fused-backward" in ours
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001.safetensors"]


@OLD_TORCH
def test_fsdp_text_encoder_that_stops_training_with_captions(sd1_dir, instance_dir, tmp_path):
    """The sharded text encoder freezes at step 1: every process encodes every caption together (one process
    encoding only its own would leave the other waiting in a gather)."""
    import shutil
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    for i, f in enumerate(sorted(photos.glob("*.png"))):
        f.with_suffix(".txt").write_text(f"a photo of sks dog, view {i}")
    r = torchrun(*train_args(sd1_dir, photos, tmp_path / "run", "--batch-size", 1, "--fsdp", "--train", "lora",
                             "--train-text-encoder", "--text-encoder-steps", 1, "--caption-ext", ".txt",
                             "--device", "cpu"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
