"""--blocks-to-swap N (models/block_swap.py): the swapped blocks' weights are empty outside their block's calls, and
the model computes the same loss and gradients with them swapped, with and without gradient checkpointing; a run
with it (and checkpointing, which it needs) trains bit-identically to one without (losses, weights, optimizer state
after 3 steps); what it cannot do is refused in one line."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from minidream.formats import loading
from minidream.models.block_swap import swap_blocks
from minidream.models.stable_diffusion import encode_text
from minidream.training.trainable import select_trainable
from tests.test_quantize import flux_args, flux_dir  # noqa: F401 (a fixture)
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)


def loss_and_grads(model, x, t, cond, checkpointing: bool):
    model.denoiser.set_gradient_checkpointing(checkpointing)
    out = model.denoiser(x, t, **cond, guidance=torch.full((len(x),), 3.5))
    loss = out.square().mean()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_blocks_compute_the_same_and_stay_empty_between_calls(flux_dir, checkpointing):
    m = loading.load(str(flux_dir), dtype=torch.float32)
    torch.manual_seed(0)
    trainable = select_trainable(m, "lora")
    g = torch.Generator().manual_seed(0)
    for p in trainable.params():  # LoRA's B starts at zero: give both factors a gradient
        p.data += 0.01 * torch.randn(p.shape, generator=g)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        cond = encode_text(m, ["a photo of a dog", "a cat on a sofa"])
    want = loss_and_grads(m, x, t, cond, checkpointing)
    swapped = copy.deepcopy(m)
    n = len(swapped.denoiser.blocks())
    swap = swap_blocks(swapped.denoiser, n - 1, torch.device("cpu"))
    got = loss_and_grads(swapped, x, t, cond, checkpointing)
    assert torch.equal(want[0], got[0]) and len(got[1]) == len(want[1])
    assert all(torch.equal(a, b) for a, b in zip(want[1], got[1]))
    blocks = [b for _, b in swapped.denoiser.blocks().values()]
    assert all(p.numel() > 0 for p in blocks[0].parameters())  # the first block is not swapped
    for i in range(1, n):  # the swapped ones hold nothing but what trains between calls
        assert all(p.numel() == 0 for p in blocks[i].parameters() if not p.requires_grad), i
        assert swap.stored[i] and not swap.ready


def test_a_run_with_swapped_blocks_trains_as_one_without(flux_dir, instance_dir, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("swapped", ["--blocks-to-swap", 3])):
        out = tmp_path / name
        r = run_cli(*flux_args(flux_dir, instance_dir, out, "--train", "lora", "--lr", 1e-2, "--checkpoint-every", 3,
                               "--save-as", "lora-diffusers", "--gradient-checkpointing", *extra))
        assert r.exit_code == 0, r.output
        losses = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
        runs[name] = ([{k: v for k, v in row.items() if "loss" in k} for row in losses],
                      load_file(str(out / "checkpoints" / "step-000003.safetensors")))
    (losses, ckpt), (losses2, ckpt2) = runs["plain"], runs["swapped"]
    assert losses and losses == losses2
    assert ckpt.keys() == ckpt2.keys() and all(torch.equal(ckpt[k], ckpt2[k]) for k in ckpt)
    assert json.loads((tmp_path / "swapped" / "run.json").read_text())["blocks_to_swap"] == 3


SWAP = ["--blocks-to-swap", 2, "--gradient-checkpointing"]


@pytest.mark.parametrize("args, says", [
    (["--train", "unet", *SWAP], "--blocks-to-swap moves frozen blocks to the GPU and back: it needs --train lora"),
    (["--train", "lora", "--dora", *SWAP], "(without --dora)"),
    (["--train", "lora", "--blocks-to-swap", 2], "--blocks-to-swap needs --gradient-checkpointing"),
    (["--train", "lora", "--prior", "--class-precision", "fp32", *SWAP], "drop --class-precision fp32"),
    (["--train", "lora", "--blocks-to-swap", -1], "--blocks-to-swap"),
    (["--train", "lora", "--blocks-to-swap", 99, "--gradient-checkpointing"],
     "--blocks-to-swap 99: this transformer has 4 blocks; give at most 4"),
])
def test_what_block_swap_cannot_do_is_refused(flux_dir, instance_dir, tmp_path, args, says):
    r = run_cli(*flux_args(flux_dir, instance_dir, tmp_path / "run", *args))
    assert r.exit_code != 0 and says in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_block_swap_is_for_transformers(sd1_dir, instance_dir, tmp_path):
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "run", "--train", "lora", "--blocks-to-swap", 1,
                            "--gradient-checkpointing"))
    assert r.exit_code != 0 and "--blocks-to-swap: " in r.output and "it is for SD3 and Flux" in r.output, r.output
    assert not (tmp_path / "run").exists()
