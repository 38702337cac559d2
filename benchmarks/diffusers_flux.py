"""Flux.1 for the step benchmarks: a random model folder at Flux.1 [dev]'s width, and the reference step — the loop
body of diffusers' train_dreambooth_lora_flux.py with prior preservation, on its defaults: LoRA r = α = 4 (gaussian
init) on both streams' attention and feed-forward projections (and the single blocks' Q/K/V, which the same names
reach), the prompts encoded once by the frozen text encoders (T5's 512 tokens), the VAE encoding every step, σ drawn
uniformly ("none") from the unshifted levels, the guidance input 3.5, the velocity against noise − latents, AdamW
(weight decay 1e-4), clipping at 1.0.
"""
import json
from pathlib import Path

import torch

# Flux.1 [dev]'s transformer (width 3072, 24 heads of 128, rope axes 16/56/56, the guidance embedder) at `layers`
# double- and 2 x `layers` single-stream blocks of its 19 and 38: the same per-block work at a depth a 2-core CPU
# times in minutes
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2"]


def is_model(folder: str) -> bool:
    """A Flux pipeline folder (this module's reference step)."""
    return is_flux(folder)


def is_flux(folder: str) -> bool:
    index = Path(folder) / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"


def make_folder(folder: str, layers: int = 1, seed: int = 0):
    """A random Flux.1 [dev]-width pipeline with `layers` double and 2 x `layers` single blocks, its VAE and CLIP-L
    at their real sizes and a T5 of T5-XXL's width with one layer (the prompts are encoded once, before the timed
    steps), written by diffusers' save_pretrained."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    from minidream.models.t5_tokenizer import train_unigram
    from minidream.models.tokenizer import train_bpe
    from .sd import PROMPTS
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_DEV, num_layers=layers, num_single_layers=2 * layers)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    tok, t5_tok = train_bpe(PROMPTS * 4, 300), train_unigram(PROMPTS * 4, 100)
    tok.save(Path(folder) / "_tok")
    t5_tok.save(Path(folder) / "_tok2")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, bos_token_id=tok.bos_id,
                                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip,
                 tokenizer=CLIPTokenizer.from_pretrained(Path(folder) / "_tok"), text_encoder_2=t5,
                 tokenizer_2=T5TokenizerFast.from_pretrained(Path(folder) / "_tok2")).save_pretrained(folder)


def encode(folder: str, prompts: list[str], transformer):
    """The script's encode_prompt, once, then the encoders are gone: T5's 512 states, CLIP-L's pooled, the ids."""
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folder, transformer=transformer, vae=None)
    with torch.no_grad():
        return pipe.encode_prompt(prompts, None, max_sequence_length=512)


def lora_step(folder: str, mode: str, res: int, device: str = "cpu", cache_latents: bool = False):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from .common import script_pixels
    if mode != "lora":
        raise ValueError("the Flux reference is diffusers' LoRA script")
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").requires_grad_(False)
    context, pooled, text_ids = (t.to(device) for t in encode(folder, ["a photo of sks dog", "a photo of dog"],
                                                               transformer))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False).to(device)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    pixels = script_pixels(res, device, torch.float32)
    dist = vae.encode(pixels).latent_dist if cache_latents else None
    side = res // 8
    image_ids = FluxPipeline._prepare_latent_image_ids(2, side // 2, side // 2, device, torch.float32)
    guidance = torch.full((2,), 3.5, device=device)

    def step():
        x = ((dist or vae.encode(pixels).latent_dist).sample() - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling("none", x.shape[0], logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        t = sched.timesteps[(u * sched.config.num_train_timesteps).long()].to(device)
        sigma = (t / sched.config.num_train_timesteps).view(-1, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - sigma) * x + sigma * noise, 2, 16, side, side)
        pred = transformer(noisy, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=context, txt_ids=text_ids, img_ids=image_ids).sample
        pred = FluxPipeline._unpack_latents(pred, res, res, 8)
        w = compute_loss_weighting_for_sd3("none", sigma)
        err = (w.float() * (pred.float() - (noise - x).float()) ** 2).reshape(2, -1).mean(1)
        (err[0] + 1.0 * err[1]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step
