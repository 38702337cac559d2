"""The original single-file layout: our exporter writes it, diffusers' from_single_file (an independent
reader) and our loader read it, and both give the same outputs."""
import pytest
import torch

from minidream.formats import loading
from minidream.formats.single_file import save_single_file, to_single_file
from tests.conftest import max_rel_err


def test_sdxl_export_reads_back_in_diffusers_and_ours(xl_dir, tmp_path):
    """SDXL: label_emb, both embedders (the second OpenCLIP with packed q/k/v and a transposed text_projection)."""
    from diffusers import StableDiffusionXLPipeline
    m = loading.load(str(xl_dir))
    f = tmp_path / "model.safetensors"
    save_single_file(m, f)
    keys = to_single_file(m).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    ref = StableDiffusionXLPipeline.from_single_file(str(f), config=str(xl_dir), local_files_only=True)
    from minidream.formats.single_file import tokenizers
    toks = tokenizers(xl_dir / "tokenizer", encoders=2)  # a bare vocabulary (--tokenizer): the second pads with "!"
    assert toks["tokenizer"].pad_token == "<|endoftext|>" and toks["tokenizer_2"].pad_token == "!"
    with pytest.raises(loading.ModelError, match="shape"):  # the real sdxl preset, asked for
        loading.load(str(f), tokenizer=str(xl_dir), preset="sdxl")
    # the architecture from --config, and from the file's own metadata (our export writes it)
    for back in (loading.load(str(f), config=str(xl_dir)), loading.load(str(f), tokenizer=str(xl_dir))):
        assert back.family.name == "sdxl" and back.tokenizer_2.pad_token == "!" and back.force_zeros_for_empty_prompt
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            theirs = {k.removeprefix("text_model."): v for k, v in getattr(ref, name).state_dict().items()}
            for k, v in getattr(m, name).state_dict().items():
                assert torch.equal(theirs[k], v) and torch.equal(getattr(back, name).state_dict()[k], v), (name, k)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_export_reads_back_in_diffusers_and_ours(sd1_dir, sd2_dir, tmp_path, family):
    from diffusers import StableDiffusionPipeline
    folder = sd1_dir if family == "sd1" else sd2_dir
    m = loading.load(str(folder))
    f = tmp_path / "model.safetensors"
    save_single_file(m, f)
    keys = to_single_file(m).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    text = "cond_stage_model.model." if family == "sd2" else "cond_stage_model.transformer."
    assert any(k.startswith(text) for k in keys)

    ref = StableDiffusionPipeline.from_single_file(str(f), config=str(folder), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    back = loading.load(str(f), config=str(folder))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = m.tokenizer(["a red star", ""])
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        want_u = ref.unet(x, 300, encoder_hidden_states=ctx).sample
        want_t = ref.text_encoder(ids).last_hidden_state
        want_v = ref.vae.decode(z).sample
        for model in (m, back):
            assert max_rel_err(model.unet(x, 300, ctx), want_u) <= 1e-4
            assert max_rel_err(model.text_encoder(ids), want_t) <= 1e-5
            assert max_rel_err(model.vae.decode(z), want_v) <= 1e-4


def test_real_sd_layouts_round_trip_on_meta():
    """At the real SD 1.5 / 2.1 architectures: the key table covers every parameter exactly once, and
    the original key names are those of the official checkpoints (spot checks)."""
    from minidream.models import clip, unet, vae
    from minidream.formats.single_file import clip_rows, key_table, unet_rows, vae_rows
    from minidream.models.stable_diffusion import CLIP_L, OPENCLIP_H
    for family, openclip in (("sd15", False), ("sd21", True)):
        prefix = OPENCLIP_H.original if openclip else CLIP_L.original
        with torch.device("meta"):
            u = unet.UNet2DConditionModel(unet.PRESETS[family])
            v, c = vae.AutoencoderKL(vae.PRESETS[family]), clip.CLIPTextModel(clip.PRESETS[family])
        tables = [key_table(unet_rows(u.config), u.state_dict()), key_table(vae_rows(v.config), v.state_dict()),
                  key_table(clip_rows(c.config, prefix, openclip), c.state_dict(), prefix if openclip else None)]
        origs = [o for t in tables for o, how in t.values() if not isinstance(how, tuple)]
        assert len(origs) == len(set(origs))
        allk = {o for t in tables for o, _ in t.values()}
        for k in ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                  "model.diffusion_model.output_blocks.2.1.conv.weight",
                  "model.diffusion_model.output_blocks.5.2.conv.weight",
                  "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                  "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.time_embed.2.bias",
                  "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                  "first_stage_model.encoder.mid.attn_1.q.weight",
                  "first_stage_model.decoder.up.3.upsample.conv.weight"]:
            assert k in allk, k
        if openclip:
            assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in allk
            assert "cond_stage_model.model.positional_embedding" in allk
        else:
            assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in allk


def test_unused_key_is_named(sd1_dir, tmp_path):
    from safetensors.torch import save_file
    m = loading.load(str(sd1_dir))
    sd = to_single_file(m)
    sd["model.diffusion_model.extra_thing.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(loading.ModelError, match="extra_thing"):
        loading.load(str(tmp_path / "x.safetensors"), config=str(sd1_dir))
