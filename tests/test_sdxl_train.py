"""DreamBooth on SDXL: the loss and gradients of diffusers' SDXL DreamBooth recipe, micro-conditioning from each
photo's real size and crop, every training mode in both text encoders, and the exports read back by diffusers
(folder, single file, LoRA in diffusers and kohya format, the pivotal-tuning token as clip_l / clip_g)."""
import random

import pytest
import torch
from PIL import Image

from minidream.formats import loading
from minidream.training.config import TrainConfig
from minidream.training.batches import LatentSource
from minidream.training.photos import to_tensor
from minidream.models.stable_diffusion import encode_text
from minidream.training.step import dreambooth_loss
from tests.conftest import max_rel_err
from tests.test_adapters import ours, theirs
from tests.test_train import _changed, instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)


def test_one_step_matches_diffusers_sdxl_dreambooth_loss_and_gradients(xl_dir):
    """Same batch, noise, timesteps and size ids: our loss parts and UNet gradients equal those of diffusers'
    UNet conditioned as train_dreambooth_lora_sdxl.py conditions it (encode_prompt, add_time_ids)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from minidream.models.stable_diffusion import DDPMProcess
    ref = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False)
    ours_m = loading.load(str(xl_dir))
    ours_m.unet.requires_grad_(True)
    ref.unet.requires_grad_(True)
    sched = DDPMScheduler.from_pretrained(xl_dir / "scheduler")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 700, 999])
    prompts = ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    ids = torch.tensor([[40.0, 48, 0, 1, 64, 64], [64, 64, 0, 0, 64, 64], [64, 64, 0, 0, 64, 64],
                        [80, 64, 8, 0, 64, 64]])
    with torch.no_grad():
        ctx, _, pooled, _ = ref.encode_prompt(prompts, do_classifier_free_guidance=False)
    pred = ref.unet(sched.add_noise(latents, noise, t), t, ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    ref_inst = torch.nn.functional.mse_loss(pred[:2], noise[:2])
    ref_prior = torch.nn.functional.mse_loss(pred[2:], noise[2:])
    (ref_inst + 0.7 * ref_prior).backward()

    s = DDPMProcess(ours_m.scheduler)
    with torch.no_grad():
        cond = encode_text(ours_m, prompts)
    pred = ours_m.unet(s.add_noise(latents, noise, t), t, **cond, time_ids=ids)
    loss, inst, prior = dreambooth_loss(pred, s.target(latents, noise, t), 2, 0.7)
    loss.backward()
    for a, b in ((inst, ref_inst), (prior, ref_prior)):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    theirs_p = dict(ref.unet.named_parameters())
    for name, p in ours_m.unet.named_parameters():
        assert max_rel_err(p.grad, theirs_p[name].grad) <= 1e-4, name


def test_size_ids_are_each_views_real_size_and_crop():
    im = Image.new("RGB", (48, 40))  # w 48, h 40 -> covers 16 px at 19 x 16
    x, ids = to_tensor(im, 16, True, False, None)
    assert x.shape == (3, 16, 16) and ids.tolist() == [40, 48, 0, 1, 16, 16]
    _, ids = to_tensor(im, 16, True, True, None)  # mirrored: the crop as if mirrored first
    assert ids.tolist() == [40, 48, 0, 2, 16, 16]
    lefts = {to_tensor(im, 16, False, False, random.Random(s))[1][3].item() for s in range(30)}
    assert lefts == {0, 1, 2, 3}
    _, ids = to_tensor(Image.new("RGB", (40, 80)), (16, 32), True, False, None)  # a portrait bucket (w, h)
    assert ids.tolist() == [80, 40, 0, 0, 32, 16]


@pytest.mark.parametrize("cache", [False, True])
def test_each_drawn_row_carries_its_views_size_ids(xl_dir, tmp_path, cache):
    from minidream.training.dataset import Example
    m = loading.load(str(xl_dir))
    pools = [[Example(Image.new("RGB", (48, 40)), tmp_path / "a.png", "a photo of sks dog", 0, (16, 16))],
             [Example(Image.new("RGB", (16, 16)), tmp_path / "c.png", "a photo of dog", 0, (16, 16))]]
    cfg = TrainConfig(model="x", out=str(tmp_path), class_noun="dog", cache_latents=cache, flip=0.5, resolution=16)
    src = LatentSource(m, cfg, pools, torch.device("cpu"), torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(8):
        latents, prompts, extra, _ = src.draw_step(2, 2)
        assert latents.shape == (4, 4, 8, 8) and extra["time_ids"].shape == (4, 6)
        for row in extra["time_ids"][:2].tolist():
            assert row in ([40, 48, 0, 1, 16, 16], [40, 48, 0, 2, 16, 16])
            seen.add(row[3])
        assert extra["time_ids"][2:].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert seen == {1, 2}  # both the plain and the mirrored view were drawn


def changed_encoders(base, tuned):
    return {name: _changed(te.state_dict(), getattr(tuned, name).state_dict()) for name, _, te in base.text_encoders()
            if te.state_dict().keys() == getattr(tuned, name).state_dict().keys()}


@pytest.mark.parametrize("mode,extra", [
    ("unet", []), ("attention", ["--train-text-encoder"]), ("lora", ["--train-text-encoder"]),
    ("attention", ["--train-token"]),
])
def test_each_mode_trains_both_encoders_and_keeps_the_rest(xl_dir, instance_dir, tmp_path, mode, extra):
    out = tmp_path / "run"
    r = run_cli(*train_args(xl_dir, instance_dir, out, "--train", mode, "--save-as", "diffusers", *extra))
    assert r.exit_code == 0, r.output
    base, tuned = loading.load(str(xl_dir)), loading.load(str(out / "model"))
    assert tuned.family.name == "sdxl" and tuned.tokenizer_2.pad_token == "!"
    u = _changed(base.unet.state_dict(), tuned.unet.state_dict())
    assert u and (mode == "unet" or all(".attn1." in k or ".attn2." in k for k in u))
    assert mode != "unet" or any(k.startswith("add_embedding.") for k in u)  # the size embedding trains too
    assert not _changed(base.vae.state_dict(), tuned.vae.state_dict())
    if "--train-token" in extra:
        for name, _, te in base.text_encoders():
            b = te.embeddings.token_embedding.weight
            t = getattr(tuned, name).embeddings.token_embedding.weight
            assert t.shape[0] == b.shape[0] + 1 and torch.equal(t[:-1], b) and not torch.equal(t[-1], t[-2])
        assert "<sks>" in tuned.tokenizer.added and "<sks>" in tuned.tokenizer_2.added
    else:
        te = changed_encoders(base, tuned)
        want = "--train-text-encoder" in extra
        assert bool(te["text_encoder"]) == want and bool(te["text_encoder_2"]) == want
        if mode == "lora" and want:  # adapters on the attention projections only (else the whole encoder trains)
            assert all("self_attn" in k for ks in te.values() for k in ks)


def test_lora_and_token_exports_give_diffusers_images(xl_dir, instance_dir, tmp_path):
    """train --train lora --train-text-encoder --train-token: the diffusers and kohya LoRA files load in
    StableDiffusionXLPipeline.load_lora_weights (unet, text_encoder, text_encoder_2), the token (clip_l, clip_g)
    in load_textual_inversion; `sample --lora --embedding` gives the same image; the single file and the
    folder load in diffusers with the merged weights."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*train_args(xl_dir, instance_dir, out, "--train", "lora", "--train-text-encoder", "--train-token",
                            "--lr", 3e-2, "--token-lr", 0.1, "--save-as", "lora-diffusers", "--save-as", "lora-kohya",
                            "--save-as", "single-file", "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    emb = load_file(str(out / "learned_embeds.safetensors"))
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape == (1, 32) and emb["clip_g"].shape == (1, 48)
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in kohya)
    prompt = "a photo of <sks> dog"
    for lora in (out / "lora" / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False)
        pipe.load_lora_weights(str(lora))
        encoders = (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
        for key, tok, te in encoders:
            pipe.load_textual_inversion(emb[key], token="<sks>", tokenizer=tok, text_encoder=te)
        want = theirs(pipe, prompt)
        got = ours(xl_dir, tmp_path / lora.stem, prompt, "--lora", lora, "--embedding",
                   out / "learned_embeds.safetensors")
        assert (got.int() - want.int()).abs().max() <= 1, lora.name
        merged = ours(out / "model", tmp_path / f"merged-{lora.stem}", prompt)
        assert (merged.int() - want.int()).abs().max() <= 1
    # the single file has the base's vocabulary (the token is in learned_embeds.safetensors): the base's config
    single = StableDiffusionXLPipeline.from_single_file(str(out / "model.safetensors"), config=str(xl_dir),
                                                        local_files_only=True, add_watermarker=False)
    folder = loading.load(str(out / "model"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        theirs_sd = {k.removeprefix("text_model."): v for k, v in getattr(single, name).state_dict().items()}
        for k, v in getattr(folder, name).state_dict().items():
            if k.endswith("token_embedding.weight"):  # the folder's table has the token's row after the base's
                v = v[:theirs_sd[k].shape[0]]
                assert v.shape[0] == getattr(folder, name).config.vocab_size - 1
            assert torch.equal(theirs_sd[k], v), (name, k)


def test_buckets_and_resume_carry_both_encoders(xl_dir, tmp_path):
    """Aspect buckets (size ids at each bucket's shape), random crops, flips, LoRA on the UNet and both encoders and a
    token in both: a run stopped at step 2 and resumed to 4 ends bit-identical to one that ran 4 steps."""
    from safetensors.torch import load_file
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (w, h) in enumerate([(48, 32), (32, 48), (40, 40)]):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(photos / f"{i}.png")
    common = ["--train", "lora", "--train-text-encoder", "--train-token", "--aspect-buckets", "--random-crop",
              "--flip", 0.5, "--checkpoint-every", 2, "--save-as", "lora-diffusers", "--device", "cpu",
              "--resolution", 24, "--num-class-images", 3]  # buckets 16x32, 24x24, 32x16
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_cli(*train_args(xl_dir, photos, full, *common, "--steps", 4))
    assert r.exit_code == 0, r.output
    r = run_cli(*train_args(xl_dir, photos, cut, *common, "--steps", 2))
    assert r.exit_code == 0, r.output
    r = run_cli(*train_args(xl_dir, photos, cut, *common, "--steps", 4, "--resume", "latest"))
    assert r.exit_code == 0, r.output
    a, b = (load_file(d / "lora" / "pytorch_lora_weights.safetensors") for d in (full, cut))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (load_file(d / "learned_embeds.safetensors") for d in (full, cut))
    assert torch.equal(ea["clip_g"], eb["clip_g"]) and torch.equal(ea["clip_l"], eb["clip_l"])
    import json
    rows = json.loads((full / "data.json").read_text())["images"]
    assert {tuple(r["bucket"]) for r in rows if r["kind"] == "instance"} == {(32, 16), (16, 32), (24, 24)}
