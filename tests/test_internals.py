"""The internals tools: `minidream diff` (what training changed), `minidream attention-maps` (where each token
looks; the captured probabilities against diffusers' own attention scores), the identifier's localisation, and
the run's curves (OUT/curves.png, TensorBoard)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from minidream.formats import loading
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "minidream", *map(str, args)], capture_output=True, text=True)


def test_diff_is_zero_exactly_where_nothing_changed_and_the_norm_ratio_where_it_did(sd1_dir, tmp_path):
    m = loading.load(str(sd1_dir))
    names = [n for n, mod in m.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n in names:
        w = m.unet.get_submodule(n).weight
        sd[f"unet.{n}.lora_A.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.1
        sd[f"unet.{n}.lora_B.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.1
    lora = tmp_path / "kv.safetensors"
    save_file(sd, str(lora))
    emb = tmp_path / "tok.safetensors"
    save_file({"<tok>": torch.randn(2, 32, generator=g)}, str(emb))
    r = cli("diff", sd1_dir, sd1_dir, "--out", tmp_path / "d", "--lora", f"{lora}:0.5", "--embedding", emb)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert (tmp_path / "d" / "diff.png").stat().st_size > 0 and "cross K" in (tmp_path / "d" / "diff.md").read_text()
    changed = {k for k, v in d["tensors"].items() if v["rel_change"] > 0}
    assert changed == {f"unet.{n}.weight" for n in names}
    n = names[0]
    w = m.unet.get_submodule(n).weight.double()
    delta = 0.5 * sd[f"unet.{n}.lora_B.weight"].double() @ sd[f"unet.{n}.lora_A.weight"].double()
    got = d["tensors"][f"unet.{n}.weight"]["rel_change"]
    assert got == pytest.approx((delta.norm() / w.norm()).item(), rel=1e-4)
    assert d["tensors"][f"unet.{n}.weight"]["type"] in ("cross K", "cross V")
    by_type = d["groups"]["by_type"]["unet"]
    assert by_type["cross K"]["changed"] == by_type["cross K"]["tensors"] > 0 and by_type["self Q"]["rel_change"] == 0
    tok = d["tensors"]["text_encoder.embeddings.token_embedding.weight"]
    assert tok["new_rows"] == 2 and tok["rows_changed"] == 0 and tok["rel_change"] == 0
    assert d["groups"]["by_component"]["vae"]["changed"] == 0


def test_diff_of_two_architectures_is_one_line(sd1_dir, sd2_dir, tmp_path):
    r = cli("diff", sd1_dir, sd2_dir, "--out", tmp_path / "d")
    assert r.returncode != 0 and "same layout" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_captured_probabilities_are_diffusers_attention_scores(sd1_dir):
    """The hooks' softmax(QKᵀ/√d), head-averaged, against what diffusers' own Attention computes
    (attn.get_attention_scores) in every cross-attention layer, for the same UNet input."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from minidream.inspect.attention_maps import CrossAttentionStore, capture_cross_attention
    theirs = []

    class Recording(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                kk = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                p = attn.get_attention_scores(q, kk)
                theirs.append(p.view(hidden_states.shape[0], attn.heads, *p.shape[1:]).mean(1))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    ref = UNet2DConditionModel.from_pretrained(sd1_dir / "unet")
    ref.set_attn_processor(Recording())
    m = loading.load(str(sd1_dir))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))

    class Raw(CrossAttentionStore):
        def add(self, probs):
            self.raw = getattr(self, "raw", []) + [probs]
    store = Raw(2, (8, 8))
    handles = capture_cross_attention(m.unet, store)
    with torch.no_grad():
        out = m.unet(x, torch.tensor([500]), ctx)
        ref(x, 500, encoder_hidden_states=ctx)
    for h in handles:
        h.remove()
    assert len(store.raw) == len(theirs) > 0
    for a, b in zip(store.raw, theirs):
        assert (a - b).abs().max().item() <= 1e-5
    with torch.no_grad():  # the hooks only watch: the output is the same without them
        assert torch.equal(out, m.unet(x, torch.tensor([500]), ctx))


def test_attention_maps_command(sd1_dir, tmp_path):
    r = cli("attention-maps", "--model", sd1_dir, "--prompt", "a red striped star", "--out", tmp_path / "a",
            "--steps", 3, "--height", 32, "--width", 32)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "a" / "maps.json").read_text())
    m = loading.load(str(sd1_dir))
    assert [t["index"] for t in meta["tokens"]] == list(range(1, 1 + len(m.tokenizer.encode("a red striped star"))))
    assert all((tmp_path / "a" / t["file"]).exists() for t in meta["tokens"])
    from minidream.inspect.attention_maps import attention_maps
    from minidream.sampling.pipeline import SamplingParams
    _, maps = attention_maps(m, ["a red star"], SamplingParams(steps=2, height=32, width=32))
    assert maps.shape == (1, 77, 32, 32)
    assert torch.allclose(maps.sum(1), torch.ones(1, 32, 32), atol=1e-4)  # a distribution over the 77 tokens per pixel


def test_localisation_ratio():
    from minidream.inspect.attention_maps import localisation
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True  # half the image
    assert localisation(torch.ones(8, 8), mask) == pytest.approx(1.0)
    assert localisation(mask.float(), mask) == pytest.approx(2.0)


def test_demo_identifier_localisation_is_measured():
    from minidream.demo.evaluation import attention_localisation, subject_mask, word_localisation
    from minidream.demo.architecture import DEMO_DIR
    from minidream.demo.world import Toy, render
    import numpy as np
    img = torch.from_numpy(np.array(render(Toy("star", "yellow", "striped", "blue", r=0.3))))[None]
    mask = subject_mask(img)
    assert 0.1 < mask.float().mean() < 0.5  # the toy, not the background
    model = loading.load(str(DEMO_DIR), dtype=torch.float32)
    v = attention_localisation(model, n=2)
    assert 0 < v < 10
    words = word_localisation(model, n=2)
    assert words.keys() == {"colour", "pattern", "shape"} and all(0 < x < 10 for x in words.values())
    # the benchmark's split by layer resolution: its all-layers row is the evaluation's number
    from benchmarks.demo_attention import by_resolution
    split = by_resolution(model, n=2)
    assert set(split) == {"8x8", "4x4", "2x2", "all layers"}
    assert sum(split[k]["layers"] for k in ("8x8", "4x4", "2x2")) == 10  # 3 + 3 + 4 cross-attention layers
    assert all(split["all layers"][k] == pytest.approx(v, rel=1e-5) for k, v in words.items())


def test_curves_and_tensorboard(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 4, "--report-to", "tensorboard",
                            "--validation-prompt", "a dog", "--validation-every", 2, "--validation-images", 1,
                            "--validation-steps", 2))
    assert r.exit_code == 0, r.output
    assert (out / "curves.png").stat().st_size > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "val_loss_instance" in x and "val_loss_prior" in x] == [0, 2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    assert len(ev.Scalars("train/loss_instance")) == 4 and len(ev.Images("validation")) == 3  # steps 0, 2, 4
    assert len(ev.Scalars("validation/val_loss_prior")) == 3


def test_report_to_wandb_offline(sd1_dir, instance_dir, tmp_path, monkeypatch):  # noqa: F811
    """--report-to wandb (WANDB_MODE=offline, no account): the metrics, the grids and the run's settings in the W&B
    run's file under OUT/wandb; a resumed run logs on into the same W&B run (its id kept in OUT/wandb/run-id)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 2, "--report-to", "wandb", "--checkpoint-every",
                            2, "--validation-prompt", "a dog", "--validation-images", 1, "--validation-steps", 2))
    assert r.exit_code == 0, r.output
    run_id = (out / "wandb" / "run-id").read_text()
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    for key in (b"train/loss_instance", b"train/lr", b"lora_rank", b"prior_loss_weight"):  # metrics, settings
        assert key in data, key
    assert list((out / "wandb").glob("offline-run-*/files/media/images/validation_*.png"))
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 3)
    assert r.exit_code == 0, r.output
    assert (out / "wandb" / "run-id").read_text() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same W&B run, continued
