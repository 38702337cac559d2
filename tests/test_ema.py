"""The moving average of the trained weights (--ema-decay, training/ema.py): diffusers' EMAModel's numbers, the
closed form on the weights a run recorded, exact resume, the exports beside the raw ones, the grids from it."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minidream.training.ema import EMA
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def test_the_average_is_diffusers_ema_model():
    from diffusers.training_utils import EMAModel
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    ours = EMA([("a", params[0]), ("b", params[1])], 0.95)
    ref = EMAModel(params, decay=0.95)
    for _ in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ours.step()
        ref.step(params)
    for mine, theirs in zip(ours.shadow.values(), ref.shadow_params):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-6)


def test_applied_swaps_the_average_in_and_back():
    p = torch.nn.Parameter(torch.ones(4))
    ema = EMA([("p", p)], 0.5)
    with torch.no_grad():
        p.mul_(3)
    ema.step()  # the first update copies: the average is 3
    with torch.no_grad():
        p.add_(1)
    before = p.detach().clone()
    with ema.applied():
        assert torch.equal(p, torch.full((4,), 3.0))
    assert torch.equal(p, before)


def closed_form(weights: list[torch.Tensor], decay: float, every: int) -> torch.Tensor:
    """θ̄ after the run from the weights after each step: updated every `every`-th, d_k = min(D, k/(9+k)), d_1 = 0."""
    avg, k = None, 0
    for step, w in enumerate(weights, 1):
        if step % every:
            continue
        k += 1
        d = 0.0 if k == 1 else min(decay, k / (9 + k))
        avg = w.clone() if avg is None else d * avg + (1 - d) * w
    return avg


def checkpoint(path):
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["minidream"])
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def test_a_run_keeps_the_closed_form_average_and_exports_it_beside_the_raw(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--steps", 6, "--checkpoint-every", 1,
                            "--keep-last", 0, "--ema-decay", 0.8, "--ema-every", 2, "--ema-device", "cpu",
                            "--save-as", "lora-diffusers", "--save-as", "lora-kohya"))
    assert r.exit_code == 0, r.output
    steps = [checkpoint(out / "checkpoints" / f"step-{s:06d}.safetensors") for s in range(1, 7)]
    meta, last = steps[-1]
    assert meta["ema"] == {"steps": 6, "updates": 3}
    names = [k for k in last if not k.startswith(("optim.", "rng.", "ema."))]
    assert names
    for name in names:
        want = closed_form([t[name] for _, t in steps], 0.8, 2)
        assert torch.allclose(last[f"ema.{name}"], want, atol=1e-6), name
    raw = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    avg = load_file(out / "ema" / "lora" / "pytorch_lora_weights.safetensors")
    assert raw.keys() == avg.keys() and any(not torch.equal(raw[k], avg[k]) for k in raw)
    assert (out / "ema" / "lora_kohya.safetensors").is_file()


def test_resume_keeps_the_average_exact(sd1_dir, instance_dir, tmp_path):
    args = ("--train", "lora", "--ema-decay", 0.9, "--save-as", "lora-diffusers")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*train_args(sd1_dir, instance_dir, a, *args, "--steps", 4)).exit_code == 0
    r = run_cli(*train_args(sd1_dir, instance_dir, b, *args, "--steps", 2, "--checkpoint-every", 2))
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--out", b, "--resume", "latest", "--steps", 4)
    assert r.exit_code == 0, r.output
    x = load_file(a / "ema" / "lora" / "pytorch_lora_weights.safetensors")
    y = load_file(b / "ema" / "lora" / "pytorch_lora_weights.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_validation_grids_from_the_average(sd1_dir, instance_dir, tmp_path):
    """--validation-ema: the final grid is drawn from the average (which, after 3 steps of a large learning rate,
    is not the last weights), the raw weights' otherwise."""
    grids = []
    for name, extra in (("raw", []), ("avg", ["--validation-ema"])):
        out = tmp_path / name
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--ema-decay", 0.5,
                                "--lr", 0.05, "--validation-prompt", "a dog", "--resolution", 32,
                                "--validation-steps", 2, "--validation-images", 1, *extra))
        assert r.exit_code == 0, r.output
        from PIL import Image
        grids.append(list(Image.open(out / "samples" / "final.png").getdata()))
    assert grids[0] != grids[1]


@pytest.mark.parametrize("args,needle", [
    (["--ema-every", "2"], "--ema-every is a setting of the moving average: give --ema-decay"),
    (["--ema-decay", "1.0"], "--ema-decay must be in (0, 1)"),
    (["--validation-ema"], "give --ema-decay"),
    (["--ema-decay", "0.9", "--ema-every", "5"], "--ema-every 5 is more than the run's --steps"),
    (["--ema-decay", "0.9", "--validation-ema"], "--validation-ema draws the grids from the average: give"),
    (["--ema-decay", "0.9", "--ema-device", "disk"], "--ema-device"),
])
def test_bad_ema_options_are_one_line(sd1_dir, instance_dir, tmp_path, args, needle):
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "out", "--train", "lora", *args))
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output


def test_the_exports_come_with_a_model_card(sd1_dir, instance_dir, tmp_path):
    """OUT/README.md: the Hub's header (base model, tags, trigger prompt, the final grid), the files, how to draw."""
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--lora-rank", 2, "--validation-prompt",
                            "a sks dog on grass", "--validation-steps", 2, "--validation-images", 1))
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert "base_model" not in head and 'instance_prompt: "a photo of sks dog"' in head  # (a local base: no hub id)
    assert "- lora" in head and "- dreambooth" in head and "url: samples/final.png" in head
    assert (out / "samples" / "final.png").is_file()
    assert "`lora/pytorch_lora_weights.safetensors`" in card and "`lora_kohya.safetensors`" in card
    assert f"minidream sample --model {sd1_dir} --lora lora/pytorch_lora_weights.safetensors" in card
    assert "| `lora_rank` | `2` |" in card and "`out`" not in card
    assert f"wrote {out / 'README.md'}" in r.output
