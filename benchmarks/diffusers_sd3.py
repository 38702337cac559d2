"""SD3 for the step benchmarks: a random model folder at SD3.5 Medium's width, and the reference step — the loop body
of diffusers' train_dreambooth_lora_sd3.py with prior preservation, on its defaults: LoRA r = α = 4 (gaussian init)
on both streams' attention projections, the prompts encoded once by the frozen text encoders (T5's 77 tokens;
zeros when the model has none, as with text_encoder_3=None), the VAE encoding every step, σ drawn by logit_normal(0,
1), the preconditioned output against the latents, compute_loss_weighting_for_sd3, AdamW (weight decay 1e-4),
clipping at 1.0.
"""
from pathlib import Path

import torch

from minidream.formats.sd3_layout import is_sd3

# SD3.5 Medium's MMDiT (width 1536, 24 heads of 64, MMDiT-X's attn2 in the first blocks, qk-norm) at `layers` of
# its 24 blocks: the same per-block work at a depth a 2-core CPU times in minutes
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm")
# SD3.5 Large's (width 2432, 38 heads of 64, qk-norm, no attn2): the memory benchmark's proxy, at a few of its 38
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")


def is_model(folder: str) -> bool:
    """An SD3 pipeline folder (this module's reference step)."""
    return is_sd3(folder)


def make_folder(folder: str, layers: int = 4, seed: int = 0, large: bool = False):
    """A random SD3.5 Medium-width pipeline with `layers` blocks (the first half with attn2; `large`: SD3.5 Large's
    width, no attn2), its VAE, CLIP-L and CLIP-G at their real sizes and no T5, written by diffusers'
    save_pretrained."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from minidream.models.tokenizer import train_bpe
    from .sd import PROMPTS
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35_LARGE, num_layers=layers) if large else SD3Transformer2DModel(
        **SD35_MEDIUM, num_layers=layers, dual_attention_layers=tuple(range(layers // 2)))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    tok_dir = Path(folder) / "_tok"
    tok = train_bpe(PROMPTS * 4, 300)
    tok.save(tok_dir)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=768, **common))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
        hidden_act="gelu", **common))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)


def encode(folder: str, prompts: list[str], transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """The script's encode_prompt, once, then the encoders are gone: both CLIPs' penultimate states padded to T5's
    width, T5's 77 positions (zeros without T5), both pooled embeddings."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, vae=None, text_encoder_3=None,
                                                    tokenizer_3=None)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=77)
    return context, pooled


def lora_step(folder: str, mode: str, res: int, device: str = "cpu", cache_latents: bool = False):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from .common import script_pixels
    if mode != "lora":
        raise ValueError("the SD3 reference is diffusers' LoRA script")
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").requires_grad_(False)
    context, pooled = (t.to(device) for t in encode(folder, ["a photo of sks dog", "a photo of dog"], transformer))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False).to(device)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=[
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
        "attn.to_q", "attn.to_v"]))
    transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    pixels = script_pixels(res, device, torch.float32)
    dist = vae.encode(pixels).latent_dist if cache_latents else None

    def step():
        x = ((dist or vae.encode(pixels).latent_dist).sample() - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling("logit_normal", x.shape[0], logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29)
        t = sched.timesteps[(u * sched.config.num_train_timesteps).long()].to(device)
        sigma = (t / sched.config.num_train_timesteps).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x + sigma * noise
        pred = transformer(noisy, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample
        pred = pred * -sigma + noisy  # --precondition_outputs 1
        w = compute_loss_weighting_for_sd3("logit_normal", sigma)
        err = (w.float() * (pred.float() - x.float()) ** 2).reshape(2, -1).mean(1)
        (err[0] + 1.0 * err[1]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step
