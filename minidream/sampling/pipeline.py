"""Text → image: CLIP embeddings (with an unconditional branch) → denoising loop with classifier-free
guidance → VAE decode → uint8 pixels. Same seed, prompt, scheduler and steps give the same image as
diffusers' StableDiffusionPipeline with generator=torch.Generator("cpu").manual_seed(seed).
"""
import json
import os
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from minidream.models.stable_diffusion import StableDiffusion, encode_text, size_ids
from minidream.progress import Progress
from minidream.sampling.samplers import make_sampler
from minidream.models.vae import to_uint8


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], negative: str | list[str] | None = None, steps: int = 50,
             guidance: float = 7.5, scheduler: str | None = None, eta: float = 0.0, height: int | None = None,
             width: int | None = None, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             progress: bool = True) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 for B prompts. guidance <= 1 turns classifier-free guidance off; scheduler None
    is the model's own (samplers.SAMPLERS has the names)."""
    s = model.latent_scale
    height = height or model.native_resolution
    width = width or model.native_resolution
    factor = model.downsampling
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"--height/--width must be positive multiples of {factor} for this model (got {height}x{width})")
    sampler = make_sampler(scheduler, model.scheduler, eta)
    param = next(model.unet.parameters())
    device, dtype = param.device, param.dtype
    B = len(prompts)
    cfg = guidance > 1.0  # Ho & Salimans 2022: ε̃ = ε(∅) + w·(ε(c) - ε(∅)); w = 1 is plain conditioning
    cond = encode_text(model, prompts)  # the UNet's keyword arguments: the CLIP context for SD 1.x/2.x
    if model.xl:  # SDXL's micro-conditioning: drawn as if from a photo of this size, uncropped
        cond["time_ids"] = size_ids((height, width), (0, 0), (height, width)).expand(B, 6).to(device)
    if cfg:
        if negative is None and model.force_zeros_for_empty_prompt:  # SDXL: no negative prompt = zero conditioning
            uncond = {k: torch.zeros_like(v) for k, v in cond.items() if k != "time_ids"}
        else:
            uncond = encode_text(model, negative if isinstance(negative, list) else [negative or ""] * B)
        cond = {k: torch.cat([uncond.get(k, v), v]) for k, v in cond.items()}
    cond = {k: v.to(dtype) for k, v in cond.items()}
    shape = (B, model.unet.cfg.in_channels, height // s, width // s)
    if latents is None:
        gdev = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
    sampler.set_timesteps(steps, device=device)
    latents = latents.to(device=device, dtype=dtype) * sampler.init_sigma  # σ-space samplers start from σ_max ε
    bar = Progress(len(sampler.timesteps), "sampling", enabled=progress)
    for t in sampler.timesteps:
        x = sampler.scale_input(latents)
        x = torch.cat([x] * 2) if cfg else x
        out = model.unet(x, t, **cond)
        if cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        latents = sampler.step(out, t, latents, generator=generator)
        bar.update()
    bar.close()
    if not torch.isfinite(latents).all():  # else NaN decodes to an all-black image that looks like a result
        raise ValueError("sampling produced NaN/inf latents (a broken model, schedule or LoRA, or fp16 overflow: "
                         "try --dtype fp32); no image written")
    return decode(model, latents)


def decode(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    vae_dtype = next(model.vae.parameters()).dtype
    dev = latents.device.type
    fp16 = vae_dtype == torch.float16 or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16)
    if model.xl and fp16 and model.vae.cfg.force_upcast:  # SDXL's VAE overflows in fp16: decode in fp32
        try:
            with torch.autocast(dev, enabled=False):
                return to_uint8(model.vae.float().decode_latents(latents.float()))
        finally:
            model.vae.to(vae_dtype)
    return to_uint8(model.vae.decode_latents(latents.to(vae_dtype)))


def save_png(img: torch.Tensor, path: Path, meta: dict | None = None):
    """One (H, W, 3) uint8 image as PNG, with the settings that made it in the text chunks."""
    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    # written under a temporary name and renamed: a kill or a full disk never leaves half a PNG
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(img.numpy()).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, H, W, 3) images into one image, row-major, `cols` wide."""
    N, H, W, C = images.shape
    cols = cols or min(N, 4)
    rows = (N + cols - 1) // cols
    out = torch.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return out
