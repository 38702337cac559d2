"""SD3 and SD3.5 at parity with diffusers' StableDiffusion3Pipeline, on tiny random pipelines of each MMDiT variant
built by diffusers: the MMDiT, T5, the text conditioning (both CLIPs + T5, padded and joined), the shifted VAE,
flow-matching Euler, and whole images (CFG on and off, non-square, negative prompts, without T5)."""
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


@pytest.mark.parametrize("guidance, height, width, negative", [
    (5.0, 16, 16, None),              # CFG with the empty negative prompt, the model's size
    (1.0, 16, 24, None),              # CFG off, non-square
    (4.0, 24, 16, "a green cube"),    # a negative prompt through all three encoders
])
def test_images_match_sd3_pipeline(pipes, guidance, height, width, negative):
    ref, m = pipes
    want = ref(PROMPTS, negative_prompt=[negative] * 2 if negative is not None else None, num_inference_steps=4,
               guidance_scale=guidance, height=height, width=width, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    params = SamplingParams(steps=4, guidance=guidance, negative_prompt=negative, height=height, width=width)
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
