"""SD3 and SD3.5 at parity with diffusers' StableDiffusion3Pipeline, on tiny random pipelines of each MMDiT variant
built by diffusers: the MMDiT, T5, the text conditioning (both CLIPs + T5, padded and joined), the shifted VAE,
flow-matching Euler, and whole images (CFG on and off, non-square, negative prompts, without T5)."""
import json
from pathlib import Path

import pytest
import torch

from minidream.formats import loading
from minidream.models.stable_diffusion import encode_text
from minidream.sampling.pipeline import SamplingParams, generate
from tests.conftest import SD3_VARIANTS, build_sd3_pipeline_dir, max_rel_err

PROMPTS = ["a red star on a white background", "a blue dotted dog"]


@pytest.fixture(scope="module", params=list(SD3_VARIANTS))
def pipes(request, tmp_path_factory, tiny_tokenizer, tiny_t5_tokenizer):
    from diffusers import StableDiffusion3Pipeline
    folder = build_sd3_pipeline_dir(tmp_path_factory.mktemp(request.param), tiny_tokenizer, tiny_t5_tokenizer,
                                    request.param, seed=30)
    ref = StableDiffusion3Pipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref, loading.load(str(folder))


def test_loads_as_sd3(pipes):
    ref, m = pipes
    assert m.family.name == "sd3" and m.denoiser is m.transformer and m.unet is None
    assert m.denoiser.config.qk_norm == ref.transformer.config.qk_norm
    assert m.denoiser.config.dual_attention_layers == tuple(ref.transformer.config.dual_attention_layers)
    assert m.vae.config.shift_factor == 0.0609 and m.scheduler.shift == 3.0
    assert list(m.components()) == ["transformer", "text_encoder", "text_encoder_2"]


def test_transformer_matches(pipes):
    ref, m = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 90, 96, generator=g), torch.randn(2, 64)
    t = torch.tensor([999.0, 3.5])
    with torch.no_grad():
        want = ref.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        got = m.denoiser(x, t, ctx, pooled)
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("length", [256, 7])
def test_text_conditioning_matches_encode_prompt(pipes, length):
    ref, m = pipes
    m.max_sequence_length = length
    try:
        with torch.no_grad():
            want, _, want_pooled, _ = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                        max_sequence_length=length)
            got = encode_text(m, PROMPTS)
    finally:
        m.max_sequence_length = 256
    assert got["context"].shape == (2, 77 + length, 96)
    assert max_rel_err(got["context"], want) <= 1e-5
    assert max_rel_err(got["pooled"], want_pooled) <= 1e-5


def test_vae_decode_shifts(pipes):
    ref, m = pipes
    z = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.vae.decode(z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample
        got = m.vae.decode_latents(z)
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("guidance, height, width, negative, sampler", [
    (5.0, 16, 16, None, None),              # CFG with the empty negative prompt, the model's size and sampler
    (1.0, 16, 24, None, None),              # CFG off, non-square
    (4.0, 24, 16, "a green cube", None),    # a negative prompt through all three encoders
    (4.0, 16, 16, None, "heun"),            # flow-matching Heun
    (4.0, 32, 16, None, "dynamic"),         # Euler with the shift by image size (use_dynamic_shifting)
])
def test_images_match_sd3_pipeline(pipes, guidance, height, width, negative, sampler):
    from dataclasses import replace
    from diffusers import FlowMatchHeunDiscreteScheduler
    from minidream.models.flow_matching import FlowConfig
    ref, m = pipes
    if sampler == "dynamic":
        ref = type(ref)(**{**ref.components, "scheduler": type(ref.scheduler).from_config(
            ref.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=2, max_image_seq_len=8)})
        ref.set_progress_bar_config(disable=True)
        m = replace(m, scheduler=FlowConfig.from_dict(dict(ref.scheduler.config)).check())
        sampler = None
    elif sampler:
        ref = type(ref)(**{**ref.components, "scheduler": FlowMatchHeunDiscreteScheduler.from_config(
            ref.scheduler.config)})
        ref.set_progress_bar_config(disable=True)
    want = ref(PROMPTS, negative_prompt=[negative] * 2 if negative is not None else None, num_inference_steps=4,
               guidance_scale=guidance, height=height, width=width, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    params = SamplingParams(steps=4, guidance=guidance, negative_prompt=negative, height=height, width=width,
                            sampler=sampler)
    got = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1


def test_without_t5_matches_pipeline_without_text_encoder_3(tmp_path, tiny_tokenizer, tiny_t5_tokenizer):
    """A model saved without T5 (text_encoder_3: null) reads zeros in its place, as diffusers does."""
    from diffusers import StableDiffusion3Pipeline
    folder = build_sd3_pipeline_dir(tmp_path, tiny_tokenizer, tiny_t5_tokenizer, seed=31, with_t5=False)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    m = loading.load(str(folder))
    assert m.text_encoder_3 is None
    want = ref(PROMPTS, num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    got = generate(m, PROMPTS, SamplingParams(steps=3, guidance=3.0, height=16, width=16),
                   generator=torch.Generator().manual_seed(0), progress=False)
    assert (got.int() - want.int()).abs().max() <= 1


def test_single_file_both_ways(pipes, tmp_path):
    """Stability's single-file layout: what we write, diffusers' converter reads to the same MMDiT and VAE; what we
    read of it (--config for the tiny architecture) draws the pipeline's image; the MMDiT's shapes alone name its
    config; a file without its text encoders takes them from --config's folder; with --no-t5 none is needed."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file
    from minidream.formats.files import ModelError
    from minidream.formats.sd3_single_file import T5_PREFIX, mmdit_from_keys, to_sd3_single_file
    ref, m = pipes
    folder = m.source
    sd = {k: v.contiguous() for k, v in to_sd3_single_file(m).items()}
    f = tmp_path / "sd3.safetensors"
    save_file(sd, f)
    kw = dict(config=folder, local_files_only=True)
    theirs_t = SD3Transformer2DModel.from_single_file(str(f), subfolder="transformer", **kw).state_dict()
    assert all(torch.equal(v, theirs_t[k]) for k, v in ref.transformer.state_dict().items())
    theirs_v = AutoencoderKL.from_single_file(str(f), subfolder="vae", **kw).state_dict()
    assert all(torch.equal(v, theirs_v[k]) for k, v in ref.vae.state_dict().items())
    if m.denoiser.config.qk_norm:  # the head width is the qk-norm's; without one the released models' 64
        inferred = mmdit_from_keys(sd, f)
        assert inferred == type(inferred)(**{**m.denoiser.config.__dict__, "sample_size": inferred.sample_size})
    else:
        with pytest.raises(ModelError, match="heads of 64"):
            mmdit_from_keys(sd, f)
    params = SamplingParams(steps=3, guidance=4.0, height=16, width=24)
    want = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    got = generate(loading.load(str(f), config=folder), PROMPTS, params, generator=torch.Generator().manual_seed(0),
                   progress=False)
    assert torch.equal(got, want)
    bare = tmp_path / "bare.safetensors"  # the MMDiT and VAE only, as sd3.5_medium.safetensors without encoders
    save_file({k: v for k, v in sd.items() if not k.startswith("text_encoders.")}, bare)
    got = generate(loading.load(str(bare), config=folder), PROMPTS, params,
                   generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(got, want)
    no_t5 = tmp_path / "no_t5.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith(T5_PREFIX)}, no_t5)
    assert loading.load(str(no_t5), config=folder, t5=False).text_encoder_3 is None


def test_single_file_problems_are_one_line(pipes, tmp_path):
    from safetensors.torch import save_file
    from minidream.formats.files import ModelError
    from minidream.formats.sd3_single_file import to_sd3_single_file
    _, m = pipes
    sd = {k: v.contiguous() for k, v in to_sd3_single_file(m).items()}
    cases = {
        "extra": ({**sd, "model.diffusion_model.joint_blocks.0.x_block.attn.bogus": torch.zeros(1)}, "unexpected key"),
        "missing": ({k: v for k, v in sd.items() if "final_layer.linear.weight" not in k}, "missing key"),
    }
    for name, (tensors, says) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ModelError, match=says):
            loading.load(str(tmp_path / f"{name}.safetensors"), config=m.source)
    with pytest.raises(ModelError, match="--preset 'sd15' is not one of"):
        loading.load(str(tmp_path / "extra.safetensors"), preset="sd15")


def test_joint_attention_runs_on_the_triton_kernel():
    """--attention triton serves the MMDiT's joint attention: head dim 64 over image + 77 CLIP + T5 tokens (a length
    no block size divides), forward and gradients as SDPA's."""
    from minidream.models.attention import set_attention_backend
    from minidream.models.mmdit import MMDiTConfig, SD3Transformer2DModel
    torch.manual_seed(0)
    config = MMDiTConfig(sample_size=8, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                         joint_attention_dim=48, caption_projection_dim=128, pooled_projection_dim=16,
                         pos_embed_max_size=8, in_channels=4, out_channels=4, dual_attention_layers=(0,),
                         qk_norm="rms_norm")
    net = SD3Transformer2DModel(config)
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 77 + 19, 48, generator=g), torch.randn(1, 16)
    outs = []
    for backend in ("sdpa", "triton"):
        net.zero_grad()
        out = set_attention_backend(net, backend)(x, torch.tensor([500.0]), ctx, pooled)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (a, ga), (b, gb) = outs
    assert max_rel_err(b, a) <= 1e-4
    assert max(max_rel_err(y, x_) for x_, y in zip(ga, gb) if x_.abs().max() > 0) <= 1e-3


def test_diff_charts_the_mmdit(pipes, tmp_path):
    """diff BASE BASE --lora L, L on the image stream's Q and the text stream's out of block 0: exactly those two
    groups change (block 00), nothing else; the chart is drawn."""
    from safetensors.torch import save_file
    from tests.test_train import run_cli
    _, m = pipes
    width, g = m.denoiser.config.width, torch.Generator().manual_seed(3)
    lora = tmp_path / "lora.safetensors"
    save_file({f"transformer.transformer_blocks.0.attn.{name}.lora_{side}.weight": torch.randn(shape, generator=g)
               for name in ("to_q", "to_add_out") for side, shape in (("A", (2, width)), ("B", (width, 2)))}, lora)
    r = run_cli("diff", m.source, m.source, "--lora", lora, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "out" / "diff.json").read_text())
    changed = {(k, kind) for k, kinds in d["groups"]["by_block_type"]["transformer"].items()
               for kind, s in kinds.items() if s["rel_change"] > 0}
    assert changed == {("block 00", "image Q"), ("block 00", "text out")}
    assert all(s["changed"] == 0 for c in ("text_encoder", "vae") for s in d["groups"]["by_type"][c].values())
    assert (tmp_path / "out" / "diff.png").is_file()


def test_attention_maps_read_the_joint_attention(pipes, tmp_path):
    """The MMDiT's maps: the image rows of each joint attention's softmax over [image; text] at the CLIP tokens'
    columns; our hooks' equal those recomputed on diffusers' transformer (its own projections and qk-norms) in one
    forward pass; the command draws them."""
    from minidream.inspect.attention_maps import CrossAttentionStore, capture_cross_attention
    from tests.test_train import run_cli
    ref, m = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 90, 96, generator=g), torch.randn(2, 64)
    t = torch.tensor([700.0, 20.0])
    ours, theirs = CrossAttentionStore(2, (8, 12)), CrossAttentionStore(2, (8, 12))
    handles = capture_cross_attention(m.denoiser, ours)

    def hook(attn, args, kwargs, output):
        image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        heads = lambda v: v.view(2, -1, attn.heads, v.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q, k, ck = heads(attn.to_q(image)), heads(attn.to_k(image)), heads(attn.add_k_proj(text))
        if attn.norm_q is not None:
            q, k, ck = attn.norm_q(q), attn.norm_k(k), attn.norm_added_k(ck)
        probs = (q @ torch.cat([k, ck], 2).transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1).mean(1)
        theirs.add(probs[:, :, image.shape[1]:image.shape[1] + 77])
    handles += [mod.register_forward_hook(hook, with_kwargs=True) for name, mod in ref.transformer.named_modules()
                if name.endswith(".attn")]
    try:
        with torch.no_grad():
            m.denoiser(x, t, ctx, pooled)
            ref.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
    finally:
        for h in handles:
            h.remove()
    assert ours.calls == theirs.calls == m.denoiser.config.num_layers
    assert max_rel_err(ours.mean(), theirs.mean()) <= 1e-5
    r = run_cli("attention-maps", "--model", m.source, "--prompt", "a blue dog", "--out", tmp_path / "maps",
                "--steps", "1", "--height", "16", "--width", "16")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "maps" / "maps.png").is_file()


def _copy(folder, tmp_path):
    import shutil
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_t5_never_runs_in_fp16(pipes):
    """T5 v1.1 overflows fp16: a model put in fp16 (sample --dtype fp16, --mixed-precision fp16) keeps T5 in fp32."""
    from minidream.training.trainable import cast_frozen
    _, m = pipes
    fresh = loading.load(m.source)
    fresh.to(dtype=torch.float16)
    assert next(fresh.text_encoder_3.parameters()).dtype == torch.float32
    assert next(fresh.text_encoder.parameters()).dtype == torch.float16
    fresh = loading.load(m.source)
    cast_frozen(fresh, torch.float16)
    assert next(fresh.text_encoder_3.parameters()).dtype == torch.float32
    assert next(fresh.denoiser.parameters()).dtype == torch.float16


def test_sharded_weights_load_and_missing_shards_are_named(pipes, tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    from minidream.formats.files import ModelError, weight_file
    _, m = pipes
    folder = _copy(m.source, tmp_path)
    sub = folder / "transformer"
    sd = load_file(str(sub / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, sub / name)
    (sub / "diffusion_pytorch_model.safetensors").unlink()
    index = sub / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, part in shards.items() for k in part}}))
    got = loading.load(str(folder)).denoiser.state_dict()
    assert all(torch.equal(got[k], v) for k, v in m.denoiser.state_dict().items())
    (sub / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{}")  # how diffusers names a variant's
    assert weight_file(sub, "diffusion_pytorch_model", "fp16", False).name.endswith(".index.fp16.json")
    (sub / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="a shard .* names is missing"):
        loading.load(str(folder))


@pytest.mark.parametrize("change, says", [
    (lambda f: _edit_json(f / "model_index.json", text_encoder_3=None), None),  # saved without T5: loads without
    (lambda f: (f / "tokenizer_3" / "tokenizer.json").unlink(), "not a readable T5 tokenizer"),
    (lambda f: _edit_json(f / "transformer" / "config.json", pooled_projection_dim=48), "do not fit together"),
    (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", invert_sigmas=True),
     "invert_sigmas=True is not supported"),
    (lambda f: _edit_json(f / "transformer" / "config.json", qk_norm="layer_norm"), "qk_norm='layer_norm'"),
])
def test_folder_problems_are_one_line(pipes, tmp_path, change, says):
    from minidream.formats.files import ModelError
    _, m = pipes
    folder = _copy(m.source, tmp_path)
    change(folder)
    if says is None:
        assert loading.load(str(folder)).text_encoder_3 is None
        return
    with pytest.raises(ModelError, match=says) as e:
        loading.load(str(folder))
    assert "\n" not in str(e.value)


def _edit_json(file, **changes):
    import json
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_single_file_edge_cases(pipes, tmp_path, sd1_dir):
    """CLIP-L's projection left out (some of Stability's files): the identity; --config of another family, and an
    MMDiT cut short without --config: one line each; an SD 1.x LoRA (kohya's or diffusers' layout): one line."""
    from safetensors.torch import save_file
    from minidream.formats.files import ModelError
    from minidream.formats.lora_files import apply_loras
    from minidream.formats.sd3_single_file import DIT, to_sd3_single_file
    _, m = pipes
    sd = {k: v.contiguous() for k, v in to_sd3_single_file(m).items()}
    f = tmp_path / "no-proj.safetensors"
    save_file({k: v for k, v in sd.items() if k != "text_encoders.clip_l.transformer.text_projection.weight"}, f)
    proj = loading.load(str(f), config=m.source).text_encoder.text_projection.weight
    assert torch.equal(proj, torch.eye(proj.shape[0]))
    with pytest.raises(ModelError, match="not an SD3 diffusers folder"):
        loading.load(str(f), config=str(sd1_dir))
    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in sd.items() if k != DIT + "context_embedder.weight"}, cut)
    with pytest.raises(ModelError, match="missing key 'model.diffusion_model.context_embedder.weight'"):
        loading.load(str(cut))
    kohya = tmp_path / "kohya.safetensors"  # an SD 1.x LoRA in kohya's layout, then in diffusers'
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}, kohya)
    with pytest.raises(ModelError, match="transformer:down_blocks_0_attentions_0_proj_in does not match this model"):
        apply_loras(loading.load(m.source), [(kohya, 1.0)])
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2)}, kohya)
    with pytest.raises(ModelError, match="it adapts a UNet: a LoRA for SD 1.x/2.x/XL"):
        apply_loras(loading.load(m.source), [(kohya, 1.0)])


def test_the_pipelines_own_defaults(pipes):
    """Nothing given but the prompts and a size: the steps (28) and guidance (7.0) of StableDiffusion3Pipeline."""
    ref, m = pipes
    want = ref(PROMPTS, height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    got = generate(m, PROMPTS, SamplingParams(height=16, width=16), generator=torch.Generator().manual_seed(0),
                   progress=False)
    assert (got.int() - want.int()).abs().max() <= 1
