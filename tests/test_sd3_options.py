"""The options an SD 1.x/2.x/XL run takes, on SD3 (SD3.5 Medium's layout): two torchrun processes with --batch-size 1
train as one process with the global batch (the σ draws and targets of rectified flow split by rows), --fsdp shards
the MMDiT's blocks and trains as one process, --compile traces the MMDiT's step (aot_eager, as tests/test_compile.py)
to eager's, and a loss mask weighs the flow loss per latent cell."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_compile import aot_eager, assert_same_training  # noqa: F401 (aot_eager is a fixture)
from tests.test_distributed import OLD_TORCH, torchrun
from tests.test_run_workflow import masks_for
from tests.test_sd3_train import sd3_dir  # noqa: F401 (a fixture)
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (a fixture)

LORA = "lora/pytorch_lora_weights.safetensors"
COMMON = ["--train", "lora", "--train-text-encoder", "--save-as", "lora-diffusers", "--device", "cpu", "--flip", 0.5,
          "--random-crop", "--num-class-images", 3, "--weighting-scheme", "mode"]


def losses(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def same_losses(one, two):
    la, lb = losses(one), losses(two)
    assert [x["step"] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]) + 1e-7, (x, y)


def change(base, run, file: str) -> torch.Tensor:
    """What training changed in a file of the run (against `base`'s, or from zero), as one vector."""
    b = load_file(run / file)
    a = load_file(base / file) if base is not None else {k: torch.zeros_like(v) for k, v in b.items()}
    return torch.cat([(b[k] - a[k]).flatten() for k in sorted(a)])


def test_two_processes_train_sd3_as_one(sd3_dir, instance_dir, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*train_args(sd3_dir, instance_dir, one, "--batch-size", 2, *COMMON)).exit_code == 0
    r = torchrun(*train_args(sd3_dir, instance_dir, two, "--batch-size", 1, *COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    same_losses(one, two)
    da, db = change(None, one, LORA), change(None, two, LORA)  # lora_B from zero (see tests/test_distributed.py)
    assert da.norm() > 0 and (da - db).norm() <= 5e-2 * da.norm()


@OLD_TORCH
def test_fsdp_shards_the_mmdit_and_trains_as_one(sd3_dir, instance_dir, tmp_path):  # noqa: F811
    full = ["--train", "unet", "--save-as", "diffusers", "--device", "cpu", "--num-class-images", 3]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*train_args(sd3_dir, instance_dir, one, "--batch-size", 2, *full)).exit_code == 0
    r = torchrun(*train_args(sd3_dir, instance_dir, two, "--batch-size", 1, "--fsdp", *full))
    assert r.returncode == 0, r.stderr[-3000:]
    same_losses(one, two)
    f = "transformer/diffusion_pytorch_model.safetensors"
    da, db = change(sd3_dir, one / "model", f), change(sd3_dir, two / "model", f)
    assert da.norm() > 0 and (da - db).norm() <= 5e-2 * da.norm()


@pytest.mark.slow  # 30 s here; the SD 1.x compiled run (tests/test_compile.py) covers the mechanism in the suite
def test_compiled_sd3_step_trains_as_eager(sd3_dir, instance_dir, tmp_path, aot_eager):  # noqa: F811
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli(*train_args(sd3_dir, instance_dir, eager, *COMMON)).exit_code == 0
    r = run_cli(*train_args(sd3_dir, instance_dir, compiled, *COMMON, "--compile", "on"))
    assert r.exit_code == 0, r.output
    assert_same_training(eager, compiled, LORA)


def test_a_mask_weighs_the_flow_loss(sd3_dir, instance_dir, tmp_path):  # noqa: F811
    """All-white masks train exactly as no mask; left-half masks train something else."""
    plain, white, half = tmp_path / "plain", tmp_path / "white", tmp_path / "half"
    common = ["--train", "lora", "--save-as", "lora-diffusers", "--device", "cpu", "--num-class-images", 3]
    assert run_cli(*train_args(sd3_dir, instance_dir, plain, *common)).exit_code == 0
    for out, value in ((white, 255), (half, None)):
        masks = masks_for(instance_dir, tmp_path / f"masks-{out.name}", value)
        r = run_cli(*train_args(sd3_dir, instance_dir, out, *common, "--mask-dir", masks))
        assert r.exit_code == 0, r.output
    a, b, c = (change(None, run, LORA) for run in (plain, white, half))
    assert torch.equal(a, b) and (a - c).norm() > 1e-3 * a.norm()


def test_one_run_with_the_rest_of_the_options(sd3_dir, instance_dir, tmp_path):  # noqa: F811
    """Aspect buckets, captions, a validation grid and the held-out loss, snapshots, fused backward with Adafactor,
    in one SD3 run: it trains and writes what each promises."""
    import shutil
    photos, out = tmp_path / "photos", tmp_path / "run"
    shutil.copytree(instance_dir, photos)
    for p in photos.glob("*.png"):
        p.with_suffix(".txt").write_text(f"a photo of sks dog, number {p.stem}")
    r = run_cli(*train_args(sd3_dir, photos, out, "--train", "lora", "--device", "cpu", "--aspect-buckets",
                            "--caption-ext", ".txt", "--validation-prompt", "a photo of sks dog", "--validation-every",
                            2, "--validation-steps", 2, "--save-every", 2, "--steps", 4, "--fused-backward",
                            "--optimizer", "adafactor", "--save-as", "lora-diffusers"))
    assert r.exit_code == 0, r.output
    assert (out / "samples" / "step-000002.png").is_file() and (out / "samples" / "final.png").is_file()
    assert any("val_loss_instance" in line for line in (out / "metrics.jsonl").read_text().splitlines())
    assert any((out / "snapshots").iterdir()) and (out / LORA).is_file()
