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
    still reads its values (from the file again); a page written in place and a tensor of the process's own memory
    are left alone."""
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
    w[3, 5] = 7.0  # a page written in place keeps what was written
    give_back_pages([w])
    assert w[3, 5] == 7.0 and torch.equal(w[4:], want[4:])


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


@pytest.mark.slow  # 24 s on 2 cores (two Flux runs with class images and grids); the suite keeps its budget:
# every frozen-text run of the suite goes through the memo, and the disk-cache test checks a resume's bits
def test_frozen_text_encoders_go_before_the_denoiser_is_placed(flux_dir, instance_dir, tmp_path, monkeypatch):
    """A Flux LoRA run with class images and a validation grid: every prompt it uses is encoded first and the text
    encoders (T5 among them) are released before the transformer is placed on the device; its class images, losses
    and grid equal those of the same run with the encoders kept (the demo's path, keep_model)."""
    import json
    from minidream.training.config import TrainConfig
    from minidream.training.dreambooth import dreambooth
    from minidream.training.runtime import Runtime
    seen = []
    place = Runtime.place

    def watched(self, model):
        seen.append([any(p.is_meta for p in net.parameters()) for net in model.text_networks()])
        return place(self, model)
    monkeypatch.setattr(Runtime, "place", watched)
    cfg = TrainConfig(model=str(flux_dir), instance_dir=str(instance_dir), class_noun="dog", out=str(tmp_path / "a"),
                      resolution=32, num_class_images=2, class_steps=2, class_batch_size=2, steps=3,
                      checkpoint_every=0, device="cpu", mode="lora", validation_prompts=("a sks dog on grass",),
                      validation_steps=2, validation_every=2, mixed_precision="bf16", save_as=("lora-diffusers",))
    dreambooth(cfg)
    dreambooth(replace(cfg, out=str(tmp_path / "b")), keep_model=True)
    assert seen == [[True, True], [False, False]]

    def losses(run):
        rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if "loss" in k} for r in rows]
    assert losses("a") == losses("b") and losses("a")
    from PIL import Image
    for name in ("class_images/class-00000.png", "class_images/class-00001.png", "samples/final.png"):
        a, b = (torch.frombuffer(bytearray(Image.open(tmp_path / r / name).tobytes()), dtype=torch.uint8).int()
                for r in "ab")
        assert (a - b).abs().max() <= 1, name


def test_text_encoder_outputs_on_disk_are_read_again_on_resume(sd1_dir, instance_dir, tmp_path, monkeypatch):
    """--cache-text-encoder-outputs disk: OUT/text_cache holds one file per prompt; a resumed run encodes nothing
    (it reads them) and ends as the uninterrupted run does; a run with a new prompt encodes that one alone."""
    from minidream.models.text_memo import TextMemo
    encoded = []
    add = TextMemo.add

    def counted(self, model, prompts):
        encoded.append(list(prompts))
        return add(self, model, prompts)
    monkeypatch.setattr(TextMemo, "add", counted)
    args = ["--train", "lora", "--cache-text-encoder-outputs", "disk", "--checkpoint-every", 2,
            "--validation-prompt", "a sks dog on the moon", "--validation-steps", 2]
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert run_cli(*train_args(sd1_dir, instance_dir, whole, *args, "--steps", 4)).exit_code == 0
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 2))
    assert r.exit_code == 0, r.output
    files = sorted((out / "text_cache").glob("*.safetensors"))
    assert encoded[-1] and len(files) == len({p for batch in encoded[-2:] for p in batch})
    encoded.clear()
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 4)
    assert r.exit_code == 0, r.output
    assert encoded == []
    last = [load_file(str(run / "checkpoints" / "step-000004.safetensors")) for run in (whole, out)]
    assert last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 2, "--overwrite",
                            "--validation-prompt", "a sks dog in the snow"))
    assert r.exit_code == 0, r.output
    assert encoded == [["a sks dog in the snow"]]
    assert len(list((out / "text_cache").glob("*.safetensors"))) == len(files) + 1
    files[0].write_bytes(files[0].read_bytes()[:40])  # a damaged entry: encoded again and written whole
    encoded.clear()
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 3)
    assert r.exit_code == 0, r.output
    assert len(encoded) == 1 and len(files[0].read_bytes()) > 40
