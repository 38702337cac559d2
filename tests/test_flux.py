"""Flux.1 [dev] and [schnell] at parity with diffusers' FluxPipeline, on tiny random pipelines built by diffusers:
the transformer (double- and single-stream blocks, rotary positions, packing, the guidance embedding), the text
conditioning (T5's states, CLIP-L's pooled), the shifted VAE, flow-matching Euler with the shift by image size, and
whole images (the distilled guidance, true CFG with a negative prompt, non-square sizes, schnell's defaults)."""
from pathlib import Path

import pytest
import torch

from minidream.formats import loading
from minidream.models import flux
from minidream.models.stable_diffusion import encode_text
from minidream.sampling.pipeline import SamplingParams, generate
from tests.conftest import build_flux_pipeline_dir, max_rel_err

PROMPTS = ["a red star on a white background", "a blue dotted dog"]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def pipes(request, tmp_path_factory, tiny_tokenizer, tiny_t5_tokenizer):
    from diffusers import FluxPipeline
    folder = build_flux_pipeline_dir(tmp_path_factory.mktemp(request.param), tiny_tokenizer, tiny_t5_tokenizer,
                                     dev=request.param == "dev", seed=40)
    ref = FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref, loading.load(str(folder))


def test_loads_as_flux(pipes):
    ref, m = pipes
    dev = ref.transformer.config.guidance_embeds
    assert m.family.name == "flux" and m.denoiser is m.transformer and m.unet is None
    assert m.guidance_embedded == dev and m.max_sequence_length == (512 if dev else 256)
    assert m.pipeline_defaults == ((28, 3.5) if dev else (4, 0.0)) and m.scheduler.dynamic == dev
    assert m.vae.config.shift_factor == 0.1159 and m.vae.config.scaling_factor == 0.3611
    assert list(m.components()) == ["transformer", "text_encoder"]
    assert m.native_resolution == 128 * m.latent_scale  # FluxPipeline's default: default_sample_size x the VAE's scale


def test_transformer_matches(pipes):
    ref, m = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 9, 96, generator=g), torch.randn(2, 32)
    t, guidance = torch.tensor([999.0, 3.5]), torch.tensor([3.5, 1.0])
    guidance = guidance if ref.transformer.config.guidance_embeds else None
    with torch.no_grad():
        want = ref.transformer(hidden_states=flux.pack(x), timestep=t / 1000, guidance=guidance,
                               encoder_hidden_states=ctx, pooled_projections=pooled, txt_ids=torch.zeros(9, 3),
                               img_ids=flux.image_ids(4, 6)).sample
        got = m.denoiser(x, t, ctx, pooled, guidance)
    assert want.abs().max() > 0.1
    assert max_rel_err(flux.pack(got), want) <= 1e-5


@pytest.mark.parametrize("length", [512, 7])
def test_text_conditioning_matches_encode_prompt(pipes, length):
    ref, m = pipes
    default, m.max_sequence_length = m.max_sequence_length, length
    try:
        with torch.no_grad():
            want, want_pooled, _ = ref.encode_prompt(PROMPTS, None, max_sequence_length=length)
            got = encode_text(m, PROMPTS)
    finally:
        m.max_sequence_length = default
    assert got["context"].shape == (2, length, 96)
    assert max_rel_err(got["context"], want) <= 1e-5
    assert max_rel_err(got["pooled"], want_pooled) <= 1e-5


@pytest.mark.parametrize("guidance, height, width, negative, true_cfg", [
    (None, 32, 32, None, 1.0),             # the model's own defaults
    (5.0, 32, 48, None, 1.0),              # another distilled guidance ([dev]), non-square
    (3.5, 48, 32, "a green cube", 4.0),    # true CFG with a negative prompt
])
def test_images_match_flux_pipeline(pipes, guidance, height, width, negative, true_cfg):
    ref, m = pipes
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    steps = m.pipeline_defaults[0] if guidance is None else 3
    want = ref(PROMPTS, negative_prompt=[negative] * 2 if negative else None, true_cfg_scale=true_cfg,
               num_inference_steps=steps, height=height, width=width, max_sequence_length=m.max_sequence_length,
               generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    params = SamplingParams(steps=None if guidance is None else 3, negative_prompt=negative, height=height,
                            width=width, true_cfg=true_cfg, guidance=guidance if m.guidance_embedded else None)
    assert params.problem(m) is None
    got = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1


def test_bfl_single_file_both_ways(pipes, tmp_path):
    """BFL's layout: what we write (the transformer, fused qkv and linear1), diffusers' converter reads to the same
    transformer; what we read of it, with ComfyUI's separate clip_l / t5xxl files and BFL's ae.safetensors (the
    original autoencoder layout), draws the folder's image; a file without them says what to give."""
    from safetensors.torch import load_file, save_file
    from minidream.formats.files import ModelError
    from minidream.formats.flux_single_file import save_flux_single_file
    from minidream.formats.single_file import VAE, key_table, vae_rows
    ref, m = pipes
    folder = Path(m.source)
    save_flux_single_file(m, tmp_path / "flux1.safetensors")
    table = key_table(vae_rows(m.vae.config), m.vae.state_dict())  # BFL's ae.safetensors: the LDM names, bare
    save_file({table[k][0].removeprefix(VAE): (v[:, :, None, None] if table[k][1] == "conv1x1" else v)
               for k, v in m.vae.state_dict().items()}, str(tmp_path / "ae.safetensors"))
    encoders = [str(folder / name / "model.safetensors") for name in ("text_encoder", "text_encoder_2")]
    with pytest.raises(ModelError, match="--text-encoders"):
        loading.load(str(tmp_path / "flux1.safetensors"), tokenizer=str(folder))
    with pytest.raises(ModelError, match="--vae"):
        loading.load(str(tmp_path / "flux1.safetensors"), tokenizer=str(folder), text_encoders=tuple(encoders))
    one = loading.load(str(tmp_path / "flux1.safetensors"), tokenizer=str(folder), text_encoders=tuple(encoders[::-1]),
                       vae=str(tmp_path / "ae.safetensors"))
    assert one.family.name == "flux" and one.scheduler == m.scheduler
    comfy = {"model.diffusion_model." + k: v for k, v in load_file(str(tmp_path / "flux1.safetensors")).items()}
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    two = loading.load(str(tmp_path / "comfy.safetensors"), config=str(folder))  # ComfyUI's prefix; --config's parts
    params = SamplingParams(steps=2, height=32, width=32)
    images = [generate(x, PROMPTS[:1], params, generator=torch.Generator().manual_seed(1), progress=False)
              for x in (m, one, two)]
    # the same weights, but in other memory (the file's fused tensors split): the matmuls may round differently
    assert all((images[0].int() - other.int()).abs().max() <= 1 for other in images[1:])


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_bfl_names_are_what_diffusers_converter_reads(preset):
    """At the released size (diffusers' converter knows no other: its widths are written in), on the meta device:
    the converter reads our BFL file into exactly diffusers' keys and shapes, and every key we write is read."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from minidream.formats.flux_single_file import bfl_state
    config = flux.PRESETS[preset]
    with torch.device("meta"):
        ours = flux.FluxTransformer2DModel(config)
        want = FluxTransformer2DModel(guidance_embeds=config.guidance_embeds).state_dict()
    written = bfl_state(ours.state_dict())
    got = convert_flux_transformer_checkpoint_to_diffusers(dict(written))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}


def test_bf16_rounds_the_timestep_and_guidance_as_the_pipeline(pipes):
    """In bf16 the pipeline rounds t to the latents' dtype, then t/1000 and the guidance to the hidden states': the
    embedding's fast sinusoids see that rounding, so ours is the same (both models in bf16, the pipeline's call)."""
    import copy
    ref, m = pipes
    theirs, ours = copy.deepcopy(ref.transformer).to(torch.bfloat16), copy.deepcopy(m.denoiser).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 8, 8, generator=g).bfloat16(), torch.randn(1, 9, 96, generator=g).bfloat16()
    pooled, guidance = torch.randn(1, 32, generator=g).bfloat16(), torch.tensor([3.5])
    guidance = guidance if ref.transformer.config.guidance_embeds else None
    for t in (torch.tensor([964.2857]), torch.tensor([517.8571])):  # [dev]'s 28-step timesteps that bf16 moves
        with torch.no_grad():
            want = theirs(hidden_states=flux.pack(x), timestep=t.to(torch.bfloat16) / 1000, guidance=guidance,
                          encoder_hidden_states=ctx, pooled_projections=pooled, txt_ids=torch.zeros(9, 3),
                          img_ids=flux.image_ids(4, 4)).sample
            got = flux.pack(ours(x, t, ctx, pooled, guidance))
        assert max_rel_err(got.float(), want.float()) <= 2e-2


def test_what_flux_does_not_take_is_refused_by_name(pipes, tmp_path):
    from tests.test_train import run_cli
    ref, m = pipes
    dev = ref.transformer.config.guidance_embeds
    cases = [(["--clip-skip", 2], "--clip-skip: Flux.1 reads CLIP-L's pooled output only"),
             (["--negative-prompt", "x"], "--negative-prompt is read by Flux only with true CFG"),
             (["--true-cfg", 3], "--true-cfg needs --negative-prompt"),
             (["--true-cfg", 0.5, "--negative-prompt", "x"], "--true-cfg must be in [1, "),
             (["--eta", 0.5], "--eta is DDIM's noise scale; this sampler (FlowEuler) has none (drop it)")]
    if not dev:
        cases.append((["--guidance", 3], "--guidance is not read by Flux.1 [schnell]"))
    for args, says in cases:
        r = run_cli("sample", "--model", m.source, "--prompt", "a dog", "--out", tmp_path / "out", *args)
        assert r.exit_code != 0 and says in r.output, r.output
        assert not (tmp_path / "out").exists()
    r = run_cli("attention-maps", "--model", m.source, "--prompt", "a dog", "--out", tmp_path / "maps")
    assert r.exit_code != 0 and "Flux.1's attention is not captured yet" in r.output, r.output


def test_diff_charts_double_and_single_blocks(pipes, tmp_path):
    """diff BASE BASE --lora L, L on block 0's text-stream Q and single block 1's MLP input: exactly those groups
    change, named as Flux's blocks are."""
    import json
    from safetensors.torch import save_file
    from tests.test_train import run_cli
    _, m = pipes
    width, g = m.denoiser.config.width, torch.Generator().manual_seed(3)
    lora = tmp_path / "lora.safetensors"
    save_file({f"transformer.{name}.lora_{side}.weight": torch.randn(shape(rows), generator=g)
               for name, rows in (("transformer_blocks.0.attn.add_q_proj", width),
                                  ("single_transformer_blocks.1.proj_mlp", 4 * width))
               for side, shape in (("A", lambda r: (2, width)), ("B", lambda r: (r, 2)))}, lora)
    r = run_cli("diff", m.source, m.source, "--lora", lora, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "out" / "diff.json").read_text())
    changed = {(k, kind) for k, kinds in d["groups"]["by_block_type"]["transformer"].items()
               for kind, s in kinds.items() if s["rel_change"] > 0}
    assert changed == {("block 00", "text Q"), ("single 01", "single mlp")}
