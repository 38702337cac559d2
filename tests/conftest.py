"""Reference models with random weights, built by diffusers / transformers from a seed and saved in
the official layouts, so that every test loads them through minidream's production loader."""
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CAPTIONS = [f"a {c} {p} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
            for p in ("striped", "dotted", "plain") for s in ("star", "ball", "cube", "toy", "dog")
            for b in ("white", "black", "blue")] + ["a photo of sks dog", "a photo of a dog"]


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05):
    """Nudge every parameter so that no zero-init or identity-init layer hides a wiring mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_unet_kwargs(sd2: bool = False):
    return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=sd2)


def tiny_vae_kwargs():
    return dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
                sample_size=32)


def tiny_clip_config(vocab_size: int, sd2: bool = False):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                          hidden_act="gelu" if sd2 else "quick_gelu")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from minidream.models.tokenizer import train_bpe
    return train_bpe(CAPTIONS, 400)


def build_pipeline_dir(folder: Path, tokenizer, sd2: bool = False, seed: int = 0):
    """A tiny random StableDiffusionPipeline written by diffusers' save_pretrained (the official layout)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**tiny_unet_kwargs(sd2)), seed)
    vae = perturb(AutoencoderKL(**tiny_vae_kwargs()), seed + 1)
    text = perturb(CLIPTextModel(tiny_clip_config(len(tokenizer), sd2)), seed + 2)
    tokenizer.save(folder / "_tok")
    hf_tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=hf_tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_xl_unet_kwargs():
    """SDXL's layout at test size: no attention in the first stage, mixed head counts, transformer depth 1 and 2,
    the text_time micro-conditioning (pooled 32 + 6 x 8)."""
    return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
                attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80)


def build_xl_pipeline_dir(folder: Path, tokenizer, seed: int = 0):
    """A tiny random StableDiffusionXLPipeline (two text encoders, 32 and 48 wide, the second projected to 32;
    tokenizer_2 pads with "!"), written by diffusers' save_pretrained."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**tiny_xl_unet_kwargs()), seed)
    vae = perturb(AutoencoderKL(**tiny_vae_kwargs(), scaling_factor=0.13025), seed + 1)
    text = perturb(CLIPTextModel(tiny_clip_config(len(tokenizer))), seed + 2)
    cfg2 = tiny_clip_config(len(tokenizer), sd2=True)
    # a wider second encoder (as bigG is): diffusers' single-file reader tells the two apart by width
    cfg2.hidden_size, cfg2.num_attention_heads, cfg2.num_hidden_layers, cfg2.projection_dim = 48, 2, 3, 32
    text_2 = perturb(CLIPTextModelWithProjection(cfg2), seed + 3)
    tokenizer.save(folder / "_tok")
    hf_tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    hf_tok_2 = CLIPTokenizer.from_pretrained(folder / "_tok", pad_token="!")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=hf_tok,
                                     tokenizer_2=hf_tok_2, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def xl_dir(tmp_path_factory, tiny_tokenizer):
    return build_xl_pipeline_dir(tmp_path_factory.mktemp("xl"), tiny_tokenizer, seed=20)


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory, tiny_tokenizer):
    return build_pipeline_dir(tmp_path_factory.mktemp("sd1"), tiny_tokenizer, sd2=False, seed=0)


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory, tiny_tokenizer):
    return build_pipeline_dir(tmp_path_factory.mktemp("sd2"), tiny_tokenizer, sd2=True, seed=10)


def max_rel_err(a, b):
    """max |a - b| relative to the scale of the reference output."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_same_loss_and_grads(parts, ref_parts, ours: torch.nn.Module, theirs: torch.nn.Module):
    """Loss parts within 1e-5 of the reference's and every gradient the reference has within 1e-4 of its scale."""
    for a, b in zip(parts, ref_parts):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    theirs_p = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if theirs_p[name].grad is not None and theirs_p[name].grad.abs().max() > 0:
            assert max_rel_err(p.grad, theirs_p[name].grad) <= 1e-4, name


@pytest.fixture(scope="session")
def clip_vocab_dir():
    """The real CLIP BPE vocabulary (49,408 tokens), taken from the open_clip_torch wheel, where it ships,
    and written as vocab.json + merges.txt the way OpenAI's simple_tokenizer builds it. Cached."""
    cache = Path(os.environ.get("MINIDREAM_TEST_CACHE", Path.home() / ".cache" / "minidream-tests"))
    out = cache / "clip-vocab"
    if (out / "merges.txt").exists():
        return out
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("open_clip_torch-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "open_clip_torch", "-d", str(wheels)], check=True)
    whl = sorted(wheels.glob("open_clip_torch-*.whl"))[-1]
    with zipfile.ZipFile(whl) as z:
        raw = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    merges = raw.split("\n")[1:49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    units = [chr(c) for c in cs]
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


# SD3's three MMDiT variants at test size: SD3 Medium (joint attention only), SD3.5 Medium (MMDiT-X: a second,
# image-only attention in the first blocks; qk-norm), SD3.5 Large (qk-norm)
SD3_VARIANTS = {"sd3-medium": {}, "sd35-medium": {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
                "sd35-large": {"qk_norm": "rms_norm"}}


def tiny_sd3_transformer_kwargs(variant: str = "sd3-medium"):
    return dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=16, **SD3_VARIANTS[variant])


@pytest.fixture(scope="session")
def tiny_t5_tokenizer():
    from minidream.models.t5_tokenizer import train_unigram
    return train_unigram(CAPTIONS, 120)


def build_sd3_pipeline_dir(folder: Path, tokenizer, t5_tokenizer, variant: str = "sd3-medium", seed: int = 0,
                           with_t5: bool = True):
    """A tiny random StableDiffusion3Pipeline written by diffusers' save_pretrained: CLIP-L (32 wide) and CLIP-G
    (48 wide), both projected to 32; a 3-layer T5 v1.1 96 wide; the 16-channel VAE with its shift; the MMDiT
    `variant`; flow-matching Euler with shift 3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    torch.manual_seed(seed)
    transformer = perturb(SD3Transformer2DModel(**tiny_sd3_transformer_kwargs(variant)), seed, scale=0.1)
    vae = perturb(AutoencoderKL(**{**tiny_vae_kwargs(), "latent_channels": 16}, use_quant_conv=False,
                                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609), seed + 1)
    cfg = tiny_clip_config(len(tokenizer))
    cfg.projection_dim = 32
    text = perturb(CLIPTextModelWithProjection(cfg), seed + 2)
    cfg2 = tiny_clip_config(len(tokenizer), sd2=True)
    cfg2.hidden_size, cfg2.num_attention_heads, cfg2.num_hidden_layers, cfg2.projection_dim = 48, 2, 3, 32
    text_2 = perturb(CLIPTextModelWithProjection(cfg2), seed + 3)
    t5 = perturb(T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=96, d_kv=8, d_ff=64, num_layers=3,
                                         num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
                 seed + 4, scale=0.2)
    tokenizer.save(folder / "_tok")
    t5_tokenizer.save(folder / "_tok3")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder / "_tok"),
        text_encoder_2=text_2, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "_tok", pad_token="!"),
        text_encoder_3=t5 if with_t5 else None,
        tokenizer_3=T5TokenizerFast.from_pretrained(folder / "_tok3") if with_t5 else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux_transformer_kwargs(dev: bool = True):
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32, guidance_embeds=dev,
                axes_dims_rope=(4, 6, 6))


def build_flux_pipeline_dir(folder: Path, tokenizer, t5_tokenizer, dev: bool = True, seed: int = 0):
    """A tiny random FluxPipeline written by diffusers' save_pretrained: CLIP-L 32 wide (unprojected), a 3-layer
    T5 v1.1 96 wide, the 16-channel VAE with Flux's scale and shift, a transformer of 2 double and 2 single blocks
    ([dev]: with the guidance embedder), and the scheduler of [dev] (shift by image size) or [schnell] (none). T5's
    table has rows past its vocabulary, as the released T5's (32128 for 32100 pieces)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    torch.manual_seed(seed)
    transformer = perturb(FluxTransformer2DModel(**tiny_flux_transformer_kwargs(dev)), seed, scale=0.1)
    vae = perturb(AutoencoderKL(**{**tiny_vae_kwargs(), "latent_channels": 16}, use_quant_conv=False,
                                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159), seed + 1)
    text = perturb(CLIPTextModel(tiny_clip_config(len(tokenizer))), seed + 2)
    t5 = perturb(T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer) + 8, d_model=96, d_kv=8, d_ff=64, num_layers=3,
                                         num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
                 seed + 4, scale=0.2)
    shift = dict(use_dynamic_shifting=True, shift=3.0) if dev else dict(use_dynamic_shifting=False, shift=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, **shift)
    tokenizer.save(folder / "_tok")
    t5_tokenizer.save(folder / "_tok2")
    pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text,
                        tokenizer=CLIPTokenizer.from_pretrained(folder / "_tok"), text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "_tok2"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
