"""How a run holds its base (training/holding.py): read as stored, each network settles in the form it keeps —
frozen ones in the step's precision, what trains in fp32, --quantize-base's layers quantized as they load — with the
file pages of what was replaced given back at once; the settled model is the one the step used to build later
(the same bits); the exports of an adapter read no base weight, and keep the trained fp32 values of a bf16 base."""
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minidream.formats import loading
from minidream.formats.files import give_back_pages
from minidream.models.quantize import QuantizedLinear, quantize_frozen
from minidream.training.config import TrainConfig
from minidream.training.holding import hold
from minidream.training.trainable import cast_frozen
from tests.test_quantize import flux_dir  # noqa: F401 (a fixture)
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not hasattr(torch, "frombuffer") or not shutil.which("true"), reason="Linux only")
def test_pages_given_back_leave_memory_and_read_the_same(tmp_path):
    """A mapped file's tensor, read whole, then given back: the process's memory drops by its size and the tensor
    still reads its values (from the file again); a tensor of the process's own memory is left alone."""
    file = tmp_path / "w.safetensors"
    want = torch.randn(64, 2 ** 18)  # 64 MiB
    save_file({"w": want}, str(file))
    w = load_file(str(file))["w"]
    assert torch.equal(w, want)  # every page read
    before = rss()
    give_back_pages([w])
    assert before - rss() > 48 * 2 ** 20
    assert torch.equal(w, want)
    own = want.clone()
    give_back_pages([own])
    assert torch.equal(own, want)


def test_a_settled_base_is_the_one_the_step_built(flux_dir):
    """LoRA with bf16 and fp8: the denoiser's linears quantized at load from the stored weights, every other frozen
    tensor bf16 (T5 too), exactly what quantizing and casting a fp32 load gives; a CLIP learning a token stays
    fp32 until the step (its new row starts from its fp32 values)."""
    cfg = TrainConfig(model=str(flux_dir), instance_dir=".", out=".", mode="lora", mixed_precision="bf16",
                      quantize_base="fp8", prior=False)
    held = hold(loading.load(str(flux_dir)), cfg, torch.bfloat16)
    ref = loading.load(str(flux_dir), dtype=torch.float32)
    for net in ref.networks():
        net.requires_grad_(False)
    quantize_frozen([ref.denoiser], "fp8")
    cast_frozen(ref, torch.bfloat16)
    assert not any(type(m) is nn.Linear for m in held.denoiser.modules())
    for a, b in zip(held.networks(), ref.networks()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert held.text_encoder_3.shared.weight.dtype == torch.bfloat16
    token = hold(loading.load(str(flux_dir)), replace(cfg, train_token=True, quantize_base=None), torch.bfloat16)
    assert token.text_encoder.embeddings.token_embedding.weight.dtype == torch.float32
    assert token.denoiser.x_embedder.weight.dtype == torch.bfloat16
    assert isinstance(held.denoiser.x_embedder, QuantizedLinear)


def test_a_bf16_base_exports_its_lora_in_fp32(sd1_dir, instance_dir, tmp_path):
    """A base stored in bf16, trained with LoRA in bf16: the run's adapters (fp32 masters) reach the diffusers file
    as the last checkpoint holds them, not rounded to the base's dtype."""
    base = tmp_path / "bf16"
    shutil.copytree(sd1_dir, base)
    for f in base.glob("*/*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    out = tmp_path / "run"
    r = run_cli(*train_args(base, instance_dir, out, "--train", "lora", "--mixed-precision", "bf16", "--no-prior",
                            "--checkpoint-every", 3, "--save-as", "lora-diffusers"))
    assert r.exit_code == 0, r.output
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    ckpt = load_file(str(next((out / "checkpoints").glob("*.safetensors"))))
    down = {k: v for k, v in ckpt.items() if k.endswith("lora_down.weight")}
    assert down and all(v.dtype == torch.float32 for v in lora.values())
    name = next(iter(down))
    key = name.replace("lora_down.weight", "lora_A.weight")
    assert torch.equal(lora[key], down[name]), (key, name)
