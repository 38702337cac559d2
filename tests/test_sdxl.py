"""SDXL at parity with diffusers' StableDiffusionXLPipeline: the UNet (per-stage transformer depth, text_time
micro-conditioning), both text encoders (penultimate states, pooled projection), whole images (CFG on and off,
non-square, negative prompts, zeroed negative), the original single-file layout and the real widths."""
import gc

import pytest
import torch

from minidream.formats import configs, diffusers_layout, loading
from minidream.models import stable_diffusion as model_lib
from minidream.models.stable_diffusion import encode_text
from minidream.sampling.pipeline import SamplingParams, generate
from tests.conftest import max_rel_err, perturb, tiny_clip_config

PROMPTS = ["a red star on a white background", "a blue dotted dog"]


@pytest.fixture(scope="module")
def pipes(xl_dir):
    from diffusers import StableDiffusionXLPipeline
    ref = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, loading.load(str(xl_dir))


def test_loads_as_sdxl(pipes):
    _, m = pipes
    assert m.family.name == "sdxl" and m.version == "tiny-xl" and m.force_zeros_for_empty_prompt
    assert m.tokenizer_2.pad_token == "!" and m.tokenizer.pad_token == "<|endoftext|>"
    assert m.text_encoder_2.config.projection_dim == 32 and m.unet.config.depth == (1, 1, 2)
    assert len(m.unet.mid_block.attentions[0].transformer_blocks) == 2
    assert not hasattr(m.unet.down_blocks[0], "attentions") or len(m.unet.down_blocks[0].attentions) == 0


def test_text_conditioning_matches_encode_prompt(pipes):
    ref, m = pipes
    with torch.no_grad():
        want, _, want_pooled, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        got = encode_text(m, PROMPTS)
    assert got["context"].shape == (2, 77, 80)
    assert max_rel_err(got["context"], want) <= 1e-5
    assert max_rel_err(got["text_embeds"], want_pooled) <= 1e-5


def test_legacy_eos_rule_reads_the_largest_id(tiny_tokenizer):
    """A config with eos_token_id=2 (the official SDXL ones) pools at the largest id, as transformers does."""
    from transformers import CLIPTextModelWithProjection
    from minidream.models.clip import CLIPTextModel
    cfg = tiny_clip_config(len(tiny_tokenizer), sd2=True)
    cfg.eos_token_id, cfg.projection_dim = 2, 16
    torch.manual_seed(0)
    ref = perturb(CLIPTextModelWithProjection(cfg), 3).eval()
    as_projected = {**cfg.to_dict(), "architectures": ["CLIPTextModelWithProjection"]}
    ours = CLIPTextModel(configs.clip_config(as_projected, "config.json"))
    ours.load_state_dict(diffusers_layout._strip_text_model(ref.state_dict()))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        pen, pooled = ours.penultimate_and_pooled(ids)
    assert max_rel_err(pooled, out.text_embeds) <= 1e-5
    assert max_rel_err(pen, out.hidden_states[-2]) <= 1e-5


def test_unet_matches_with_micro_conditioning(pipes):
    ref, m = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 80, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    ids = torch.tensor([[512.0, 768, 0, 0, 64, 96], [1024, 1024, 32, 16, 64, 96]])
    with torch.no_grad():
        want = ref.unet(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = m.unet(x, 500, ctx, text_embeds=pooled, time_ids=ids)
        other = m.unet(x, 500, ctx, text_embeds=pooled, time_ids=ids.flip(0))
    assert max_rel_err(got, want) <= 1e-5
    assert max_rel_err(other, want) > 1e-3  # the size ids do reach the output


@pytest.mark.parametrize("guidance,height,width,negative,sampler", [
    (5.0, 64, 64, None, None),             # CFG, zeroed negative (force_zeros_for_empty_prompt), Euler (its own)
    (1.0, 64, 96, None, None),             # CFG off, non-square
    (5.0, 96, 64, "a green cube", None),   # a negative prompt through both encoders
    (5.0, 64, 64, "", "dpmpp-2m"),         # the empty negative prompt is encoded, not zeroed; another sampler
])
def test_images_match_sdxl_pipeline(pipes, guidance, height, width, negative, sampler):
    from tests.test_samplers import reference
    ref, m = pipes
    if sampler:
        ref = type(ref)(**{**ref.components, "scheduler": reference(sampler, ref.scheduler.config)})
        ref.set_progress_bar_config(disable=True)
    want = ref(PROMPTS, negative_prompt=[negative] * 2 if negative is not None else None, num_inference_steps=5,
               guidance_scale=guidance, height=height, width=width, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    params = SamplingParams(steps=5, guidance=guidance, sampler=sampler, negative_prompt=negative, height=height,
                            width=width)
    got = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1


def test_saved_folder_loads_in_diffusers(pipes, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    _, m = pipes
    diffusers_layout.save_pretrained(m, tmp_path)
    back = StableDiffusionXLPipeline.from_pretrained(tmp_path, add_watermarker=False)
    assert back.config.force_zeros_for_empty_prompt
    for name, _, te in m.text_encoders():
        theirs = {k.removeprefix("text_model."): v for k, v in getattr(back, name).state_dict().items()}
        assert all(torch.equal(theirs[k], v) for k, v in te.state_dict().items())
    assert all(torch.equal(back.unet.state_dict()[k], v) for k, v in m.unet.state_dict().items())
    assert loading.load(str(tmp_path)).family.name == "sdxl"


def test_bad_sdxl_folders_fail_in_one_line(xl_dir, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(xl_dir, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(loading.ModelError, match="text_encoder_2"):
        loading.load(str(folder))


# ---------------------------------------------------------------------------------------------
# The real SDXL architecture

REAL_XL = dict(sample_size=128, block_out_channels=(320, 640, 1280), down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
    "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def test_real_sdxl_keys_shapes_and_single_file_names():
    """At SDXL's real architecture (on the meta device): our keys and shapes are diffusers', the official config reads
    into our `sdxl` preset, and the single-file table covers every tensor once under the official names."""
    from diffusers import UNet2DConditionModel
    from minidream.models import clip, unet, vae
    from minidream.formats.single_file import clip_rows, key_table, unet_rows, vae_rows
    from minidream.models.stable_diffusion import XL_CLIP_L, XL_OPENCLIP_G
    with torch.device("meta"):
        ref = UNet2DConditionModel(**REAL_XL)
        p = model_lib.PRESETS["sdxl"]
        u, v = unet.UNet2DConditionModel(p.unet), vae.AutoencoderKL(p.vae)
        c1, c2 = clip.CLIPTextModel(p.text_encoder), clip.CLIPTextModel(p.text_encoder_2)
    shapes = {k: tuple(t.shape) for k, t in u.state_dict().items()}
    assert shapes == {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert model_lib.preset_of(configs.unet_config(dict(ref.config), "config.json"), unet.PRESETS) == "sdxl"
    tables = [key_table(unet_rows(u.config), u.state_dict()), key_table(vae_rows(v.config), v.state_dict()),
              key_table(clip_rows(c1.config, XL_CLIP_L.original, False), c1.state_dict()),
              key_table(clip_rows(c2.config, XL_OPENCLIP_G.original, True), c2.state_dict(), XL_OPENCLIP_G.original)]
    origs = [o for t in tables for o, how in t.values() if not isinstance(how, tuple)]
    assert len(origs) == len(set(origs))
    allk = {o for t in tables for o, _ in t.values()}
    for k in ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
              "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
              "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight",
              "model.diffusion_model.output_blocks.2.2.conv.weight",
              "model.diffusion_model.output_blocks.5.2.conv.weight",
              "model.diffusion_model.input_blocks.3.0.op.weight",
              "model.diffusion_model.input_blocks.2.0.in_layers.2.weight",
              "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
              "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
              "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
              "conditioner.embedders.1.model.ln_final.weight"]:
        assert k in allk, k


@pytest.mark.slow
def test_real_sdxl_widths_numeric_forward(tmp_path):
    """The UNet at SDXL's full widths and depths (2.6 B parameters, random), one forward on a 16x16 latent,
    and both text encoders at full width; one side in memory at a time (the weights are shared)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from minidream.models import clip, unet
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 2048, generator=g)
    pooled, ids = torch.randn(1, 1280, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    ref = UNet2DConditionModel(**REAL_XL).eval()
    with torch.no_grad():
        want = ref(x, 400, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        with torch.device("meta"):
            ours = unet.UNet2DConditionModel(configs.unet_config(dict(ref.config), "config.json"))
        ours.load_state_dict(ref.state_dict(), assign=True)
        del ref
        gc.collect()
        assert max_rel_err(ours(x, 400, ctx, text_embeds=pooled, time_ids=ids), want) <= 1e-4
    del ours
    gc.collect()
    tok = torch.randint(0, 49406, (2, 77), generator=g)
    tok[:, 20] = 49407
    towers = ((768, 12, 12, 3072, "quick_gelu", None), (1280, 32, 20, 5120, "gelu", 1280))
    for width, layers, heads, mlp, act, proj in towers:
        cfg = CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=mlp, hidden_act=act, projection_dim=proj or 768, eos_token_id=2,
                             bos_token_id=0, pad_token_id=1)
        ref = (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()
        d = {**cfg.to_dict(), "architectures": [type(ref).__name__]}
        ours = clip.CLIPTextModel(configs.clip_config(d, "config.json"))
        ours.load_state_dict(diffusers_layout._strip_text_model(ref.state_dict()))
        with torch.no_grad():
            out = ref(tok, output_hidden_states=True)
            pen, pooled_ours = ours.penultimate_and_pooled(tok)
        assert max_rel_err(pen, out.hidden_states[-2]) <= 1e-4
        if proj:
            assert max_rel_err(pooled_ours, out.text_embeds) <= 1e-4


def test_fp16_vae_decodes_in_fp32_and_stays_fp16(xl_dir):
    """SDXL's VAE overflows in fp16 (force_upcast): an fp16 model decodes in fp32, as diffusers' pipeline does."""
    from minidream.sampling.pipeline import decode
    from minidream.models.vae import to_uint8
    m = loading.load(str(xl_dir), dtype=torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    got = decode(m, z)
    assert next(m.vae.parameters()).dtype == torch.float16
    with torch.no_grad():
        want = to_uint8(m.vae.float().decode_latents(z.float()))
    assert torch.equal(got, want)
