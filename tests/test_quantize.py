"""--quantize-base fp8|int8|nf4 (models/quantize.py): a quantized layer is exactly its dequantized weight, forward
and backward, each format's rounding is within its bound, a whole quantized model stays near the dense one, and
training on a quantized base trains (LoRA, DoRA, attention), exports the base's frozen tensors bit-identical, and a
resume keeps the run's format."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from minidream.formats import loading
from minidream.models.quantize import FORMATS, QuantizedLinear, quantize_frozen
from minidream.models.stable_diffusion import encode_text
from tests.conftest import build_flux_pipeline_dir
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)

# relative error ||W_q - W|| / ||W|| of normal weights (std 0.02) with one outlier, and the stored bytes per bf16 byte
ROUNDING = {"fp8": (0.03, 0.51), "fp8-matmul": (0.03, 0.51), "int8": (0.01, 0.51), "nf4": (0.10, 0.29)}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory, tiny_tokenizer, tiny_t5_tokenizer):
    return build_flux_pipeline_dir(tmp_path_factory.mktemp("flux-q"), tiny_tokenizer, tiny_t5_tokenizer, seed=52)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_layer_is_its_dequantized_weight(fmt):
    torch.manual_seed(0)
    dense = nn.Linear(512, 384).requires_grad_(False)
    dense.weight.data = torch.randn(384, 512) * 0.02
    dense.weight.data[3, 7] = 0.5
    q = QuantizedLinear(dense, fmt)
    w = q.weight
    err, size = ROUNDING[fmt]
    assert (w - dense.weight).norm() / dense.weight.norm() <= err
    stored = sum(t.numel() * t.element_size() for t in q.stored().values())
    assert stored <= size * dense.weight.numel() * 2
    assert not torch.equal(w, dense.weight)  # it did round
    x = torch.randn(2, 5, 512, requires_grad=True)
    g = torch.randn(2, 5, 384)
    y = q(x)
    (gx,) = torch.autograd.grad(y, x, g)
    want = nn.functional.linear(x, w, dense.bias)
    (gw,) = torch.autograd.grad(want, x, g)
    assert torch.allclose(y, want, atol=1e-6) and torch.allclose(gx, gw, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computes in autocast's dtype, as F.linear would
        assert q(x).dtype == torch.bfloat16


def test_quantized_flux_stays_near_the_dense_one(flux_dir):
    """The tiny Flux model (every linear of its transformer, CLIP-L and T5 quantized) against fp32, as a fraction of
    the distance of the model cast to bf16: fp8 within 0.5x, int8 0.15x, nf4 2x (4 bits). (Random tiny models amplify
    rounding far more than trained ones: bf16 itself is ~20% off here; the ratio is what the bound states.)"""
    m = loading.load(str(flux_dir))
    for net in m.networks():
        net.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, t, guidance = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([300.0, 700.0]), torch.full((2,), 3.5)
    prompts = ["a photo of a dog", "a cat on a sofa"]

    def out(model, dtype=torch.float32):
        with torch.no_grad():
            cond = {k: v.to(dtype) for k, v in encode_text(model, prompts).items()}
            return model.denoiser.to(dtype)(x.to(dtype), t, **cond, guidance=guidance).float()
    ref = out(m)
    bf16 = (out(copy.deepcopy(m), torch.bfloat16) - ref).norm() / ref.norm()
    for fmt, times in {"fp8": 0.5, "int8": 0.15, "nf4": 2.0}.items():  # measured: 0.26, 0.07, 1.16
        q = copy.deepcopy(m)
        quantize_frozen([q.denoiser, *q.text_networks()], fmt)
        linears = [mod for net in [q.denoiser, *q.text_networks()] for mod in net.modules()]
        assert not any(type(mod) is nn.Linear for mod in linears)
        assert (out(q) - ref).norm() / ref.norm() <= times * bf16, fmt


def flux_args(folder, instance, out, *extra):
    return train_args(folder, instance, out, "--resolution", 32, "--no-prior", *extra)


def test_lora_on_a_fp8_base_trains_and_a_resume_keeps_the_format(flux_dir, instance_dir, tmp_path):
    """LoRA on a fp8 Flux base lowers the validation loss (fixed noise and timesteps); the run records the format,
    and a resume given another one is refused."""
    out = tmp_path / "run"
    r = run_cli(*flux_args(flux_dir, instance_dir, out, "--train", "lora", "--quantize-base", "fp8", "--lr", 1e-2,
                           "--steps", 20, "--validation-every", 10, "--checkpoint-every", 10,
                           "--save-as", "lora-diffusers"))
    assert r.exit_code == 0, r.output
    assert "--quantize-base fp8: the frozen linear weights" in r.output
    losses = [x["val_loss_instance"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "val_loss_instance" in x]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert json.loads((out / "run.json").read_text())["quantize_base"] == "fp8"
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 25, "--quantize-base", "nf4")
    assert r.exit_code != 0 and "--quantize-base cannot change in a resumed run" in r.output, r.output


def test_attention_and_dora_on_quantized_bases(sd1_dir, instance_dir, tmp_path):
    """--train attention on an int8 base: the export's attention projections changed, every other tensor the
    base's, bit for bit; DoRA on an nf4 base trains and exports (mixed precision bf16: the stored bits keep their
    dtype)."""
    from safetensors.torch import load_file
    out = tmp_path / "attn"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--quantize-base", "int8",
                            "--no-prior", "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    base = load_file(str(sd1_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    attention = {k for k in base if any(f".{p}." in k for p in ("to_q", "to_k", "to_v", "to_out"))}
    assert attention and all(not torch.equal(got[k], base[k]) for k in attention if k.endswith("weight"))
    assert all(torch.equal(got[k], base[k]) for k in base.keys() - attention)
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "dora", "--train", "lora", "--dora", "--quantize-base",
                            "nf4", "--mixed-precision", "bf16", "--save-as", "lora-diffusers"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dora" / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("args, says", [
    (["--train", "unet", "--quantize-base", "fp8"], "--quantize-base keeps frozen weights in fewer bits, and --train "
                                                    "unet trains them all"),
    (["--train", "lora", "--quantize-base", "fp8", "--fsdp"], "--quantize-base and --fsdp do not go together yet"),
    (["--train", "lora", "--quantize-base", "fp4"], "--quantize-base"),
])
def test_what_a_quantized_base_cannot_do_is_refused(sd1_dir, instance_dir, tmp_path, args, says):
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "run", *args))
    assert r.exit_code != 0 and says in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_fp8_layers_multiply_in_fp8_where_the_device_can(monkeypatch):
    """--quantize-base fp8-matmul: on Hopper's fp8 tensor cores a layer's forward pass is one torch._scaled_mm with
    row-wise scales (x rounded to e4m3 per row): here forced on the CPU, whose torch runs the same op. Within 3% of
    the dense weight's product (x's 3 mantissa bits), backward the dense one's exactly; a size that is no multiple
    of 16, fp32, or plain fp8 takes the dense path."""
    from minidream.models import quantize
    torch.manual_seed(0)
    dense = nn.Linear(256, 96).requires_grad_(False)
    q = QuantizedLinear(dense, "fp8-matmul")
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, requires_grad=True)
    want = nn.functional.linear(x, q.dense(torch.bfloat16), dense.bias.to(torch.bfloat16))
    called = []
    monkeypatch.setattr(quantize, "fp8_tensor_cores", lambda device: True)
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: called.append(1) or scaled_mm(*a, **k))
    y = q(x)
    assert called and y.dtype == torch.bfloat16 and y.shape == want.shape
    assert ((y.float() - want.float()).norm() / want.float().norm()) < 0.03
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gw,) = torch.autograd.grad(want, x, g)
    assert torch.equal(gx, gw)
    called.clear()
    q(x.float())
    QuantizedLinear(nn.Linear(250, 96).requires_grad_(False), "fp8-matmul")(x[..., :250])
    QuantizedLinear(dense, "fp8")(x)  # fp8 alone: weights only, the dense product
    assert not called
