"""The reference SDXL step for the memory benchmark: the loop body of diffusers' train_dreambooth_lora_sdxl.py with
prior preservation, on its defaults — LoRA r = α = 4 (gaussian init) on the UNet's attention projections, the
prompts encoded once by both frozen text encoders, which are then freed (as the script does when the text encoder
does not train), the VAE encoding every step, SDXL's size ids, AdamW (weight decay 1e-4), clipping at 1.0 — or with
its --gradient_checkpointing. (diffusers has no whole-UNet SDXL DreamBooth script: no such row.)
"""
import gc

import torch


def is_sdxl(folder: str) -> bool:
    import json
    from pathlib import Path
    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def encode(folder: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompt of the script: both encoders' penultimate states side by side, and the second's pooled
    projection."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    states, pooled = [], None
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{sub}")
        te = cls.from_pretrained(folder, subfolder=f"text_encoder{sub}").requires_grad_(False)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out = te(ids, output_hidden_states=True)
        pooled = out[0]  # CLIPTextModelWithProjection's text_embeds
        states.append(out.hidden_states[-2])
        del te
    gc.collect()
    return torch.cat(states, dim=-1), pooled


def lora_step(folder: str, mode: str, res: int, gradient_checkpointing: bool = False, device: str = "cpu",
              cache_latents: bool = False, compile: bool = False):
    """The script's step (on CUDA with bf16 autocast and the frozen VAE in bf16, as accelerate's --mixed_precision
    bf16 runs it); `cache_latents`: its --cache_latents; `compile`: the UNet under torch.compile."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from .common import prior_preservation_update, script_noising, script_pixels
    if mode != "lora":
        raise ValueError("diffusers' SDXL DreamBooth script trains LoRA only")
    half = torch.bfloat16 if torch.device(device).type == "cuda" else None
    context, pooled = (t.to(device) for t in encode(folder, ["a photo of sks dog", "a photo of dog"]))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False).to(device, half or torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    forward = torch.compile(unet) if compile else unet
    pixels = script_pixels(res, device, vae.dtype)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32, device=device)
    dist = vae.encode(pixels).latent_dist if cache_latents else None

    def step():
        with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
            noisy, noise, t = script_noising(vae, dist, pixels, noise_scheduler, device)
            pred = forward(noisy, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                           return_dict=False)[0]
        prior_preservation_update(pred, noise, params, opt)
    return step
