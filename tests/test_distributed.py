"""DreamBooth under torchrun: two gloo processes on the CPU with --batch-size 1 are the same computation as one
process with --batch-size 2 (the draws are global, the gradients averaged), only rank 0 writes, and a killed
process ends the run instead of hanging it."""
import json
import os
import subprocess
import sys

import torch
from PIL import Image
from safetensors.torch import load_file

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


def test_a_killed_process_ends_the_run_and_the_checkpoint_resumes_exactly(sd1_dir, instance_dir, tmp_path):
    out, full = tmp_path / "run", tmp_path / "full"
    driver = tmp_path / "kill_rank1.py"  # from outside the trainer: rank 1 dies before its 3rd optimizer step
    driver.write_text("\n".join([
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
