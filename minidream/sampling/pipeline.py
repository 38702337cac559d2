"""Text → image: the conditioning (with an unconditional branch) → denoising loop with classifier-free guidance →
VAE decode → uint8 pixels. Same seed, prompt, sampler and steps give the same image as diffusers'
StableDiffusionPipeline (StableDiffusionXLPipeline) with generator=torch.Generator("cpu").manual_seed(seed).

`SamplingParams` are the settings of a sampling run; `sample`, the validation grids, the class images, the
attention maps and the demo all pass one.
"""
from dataclasses import dataclass, replace

import torch

from minidream.models.compile import call
from minidream.models.noise_schedule import SchedulerConfig
from minidream.models.flow_matching import FlowConfig
from minidream.models.stable_diffusion import StableDiffusion, encode_text, image_conditioning, size_ids
from minidream.models.vae import to_uint8
from minidream.options import first_problem, in_range, option, optional, optional_at_least, text
from minidream.progress import Progress
from minidream.sampling.timestep_samplers import PureNoiseStart, Sampler
from minidream.sampling.samplers import SAMPLERS, make_sampler


MAX_SIDE = 4096  # an image side beyond this needs more memory than any card has


def image_side(v, factor: int = 8):
    """A multiple of 8 (the VAE), and once the model is known of its whole downsampling factor (VAE x UNet)."""
    if v is None or (v >= factor and v % factor == 0 and v <= MAX_SIDE):
        return None
    if v > MAX_SIDE:
        return f"must be at most {MAX_SIDE} (got {v})"
    return f"must be a positive multiple of {factor}{' for this model' if factor != 8 else ''} (got {v})"


# ε(∅) + w·(ε(c) − ε(∅)) past w ≈ 1000 leaves any useful range (SD is used at 1-30) and, larger, overflows: a run
# whose grids or class images are sure to fail is refused before it starts
MAX_GUIDANCE = 1000


@dataclass(frozen=True)
class SamplingParams:
    """The settings of a sampling run, each declared once (minidream/options.py): `sample` and `attention-maps`
    take them as options."""
    steps: int | None = option(None, "Denoising steps; default: the model's pipeline's (50; SD3 28).",
                               check=optional_at_least(1))
    guidance: float | None = option(None, "Classifier-free guidance scale; <= 1 turns CFG off. Flux.1 [dev]: the "
                                    "guidance its embedding is fed (one pass; CFG is --true-cfg). Default: the "
                                    "model's pipeline's (7.5; SD3 7.0; Flux 3.5).",
                                    check=optional(in_range(0, MAX_GUIDANCE)))
    guidance_rescale: float = option(0.0, "SD 1.x/2.x/XL: rescale the guided prediction's spread to the "
                                     "conditional one's by this share (Lin et al. 2024 eq. 15-16; 0.7 is theirs; "
                                     "diffusers' guidance_rescale); mends washed-out zero-terminal-SNR images.",
                                     check=in_range(0, 1))
    true_cfg: float = option(1.0, "Flux: classifier-free guidance with --negative-prompt at this scale, two passes "
                             "a step (FluxPipeline's true_cfg_scale); 1 = off.", check=in_range(1, MAX_GUIDANCE))
    sampler: str | None = option(None, "Sampler; default: the model's own scheduler (scheduler_config.json's class).",
                                 choices=SAMPLERS, flag="--scheduler")
    eta: float = option(0.0, "DDIM eta (0 = deterministic, 1 = DDPM's variance; more has no variance to take).",
                        check=in_range(0, 1))
    negative_prompt: str | None = option(None, "Negative prompt (the unconditional branch of CFG); default none: the "
                                         "empty prompt, for SDXL zeros (as diffusers).", check=text)
    height: int | None = option(None, "Image height in pixels (multiple of 8); default: the model's.",
                                check=image_side)
    width: int | None = option(None, "Image width in pixels (multiple of 8); default: the model's.",
                               check=image_side)

    def for_model(self, model: StableDiffusion) -> "SamplingParams":
        """These settings with what they leave out (steps, guidance) as the model's family samples by default."""
        steps, guidance = model.pipeline_defaults
        return replace(self, steps=self.steps or steps, guidance=guidance if self.guidance is None else self.guidance)

    def guidance_problem(self, model: StableDiffusion) -> tuple[str, str] | None:
        """What Flux's guidance settings ask that the model does not take: CFG is --true-cfg there (with a negative
        prompt, which is read nowhere else), and [schnell] has no guidance input."""
        if self.guidance_rescale and isinstance(model.scheduler, FlowConfig):
            title = model.family.title
            return "guidance_rescale", f"is for SD 1.x/2.x/XL (diffusers' {title} pipeline has none); drop it"
        if not model.family.distilled_guidance:
            return ("true_cfg", f"is for Flux ({model.family.title} takes CFG from --guidance); drop it") \
                if self.true_cfg != 1.0 else None
        if self.guidance is not None and not model.guidance_embedded:
            return "guidance", f"is not read by {model.family.title} [schnell], which has no guidance input; drop it"
        if (self.true_cfg > 1.0) != (self.negative_prompt is not None):
            return ("true_cfg", "needs --negative-prompt (its unconditional branch, as FluxPipeline's)") \
                if self.true_cfg > 1.0 else ("negative_prompt", "is read by Flux only with true CFG (sample's "
                                                             "--true-cfg above 1); drop it")
        return None

    def make_sampler(self, schedule: SchedulerConfig) -> Sampler:
        """The sampler these settings name, over a model's noise schedule (ValueError when it cannot be had)."""
        return make_sampler(self.sampler, schedule, self.eta)

    def problem(self, model: StableDiffusion | None = None, schedule=None) -> tuple[str, str] | None:
        """(field, what is wrong) with these settings, or None; with the model, also its image sides, its scheduler
        and the steps its schedule has room for (`schedule`: the one it will sample by, when not yet the model's).
        Callers check before they write anything."""
        wrong = first_problem(self)
        if wrong or model is None:
            return wrong
        wrong = self.guidance_problem(model)
        if wrong:
            return wrong
        self = self.for_model(model)
        if self.guidance_rescale and self.guidance <= 1:
            return "guidance_rescale", "rescales classifier-free guidance, which is off (guidance <= 1); drop it"
        for name in ("height", "width"):
            wrong = image_side(getattr(self, name), model.downsampling)
            if wrong:
                return name, wrong
            side = getattr(self, name)
            if side is not None and model.max_side is not None and side > model.max_side:
                return name, f"must be at most {model.max_side} for this model (its position table; got {side})"
        try:
            sampler = self.make_sampler(schedule or model.scheduler)
        except ValueError as e:
            return "sampler", str(e)
        if self.eta and not sampler.reads_eta:
            other = "" if isinstance(model.scheduler, FlowConfig) else ", or --scheduler ddim"
            return "eta", f"is DDIM's noise scale; this sampler ({type(sampler).__name__}) has none (drop it{other})"
        try:
            sampler.set_timesteps(self.steps, **schedule_size(model, self.height or model.native_resolution,
                                                              self.width or model.native_resolution))
        except PureNoiseStart as e:
            return "sampler", str(e)
        except ValueError as e:
            return "steps", str(e)
        return None


def schedule_size(model: StableDiffusion, height: int, width: int) -> dict:
    """What a flow sampler's set_timesteps takes of the image: its token count (Flux's shift depends on it)."""
    if not isinstance(model.scheduler, FlowConfig):
        return {}
    return {"image_tokens": (height // model.downsampling) * (width // model.downsampling)}


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], params: SamplingParams = SamplingParams(), *,
             sampler: Sampler | None = None, generator: torch.Generator | None = None,
             latents: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 for B prompts. `sampler`: one already made from `params` (a caller that samples
    many batches makes it once); `latents`: the starting noise (else drawn from `generator`)."""
    params = params.for_model(model)
    s = model.latent_scale
    height = params.height or model.native_resolution
    width = params.width or model.native_resolution
    factor = model.downsampling
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"--height/--width must be positive multiples of {factor} for this model "
                         f"(got {height}x{width})")
    sampler = sampler or params.make_sampler(model.scheduler)
    param = next(model.denoiser.parameters())
    device, dtype = param.device, param.dtype
    B = len(prompts)
    # Ho & Salimans 2022: ε̃ = ε(∅) + w·(ε(c) - ε(∅)); w = 1 is plain conditioning. Flux [dev] was distilled to
    # draw guided in one pass (its guidance is an input): CFG there is only with a negative prompt (--true-cfg)
    distilled = model.family.distilled_guidance
    scale = params.true_cfg if distilled else params.guidance
    guided = scale > 1.0 and (params.negative_prompt is not None or not distilled)
    cond = encode_text(model, prompts)  # the denoiser's keyword arguments: the CLIP context for SD 1.x/2.x
    if guided:
        if params.negative_prompt is None and model.force_zeros_for_empty_prompt:  # SDXL: zero conditioning
            uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
        else:
            uncond = encode_text(model, [params.negative_prompt or ""] * B)
        cond = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
    # SDXL's micro-conditioning: drawn as if from a photo of this size, uncropped
    ids = size_ids((height, width), (0, 0), (height, width)).expand(2 * B if guided else B, 6).to(device)
    cond = {k: v.to(dtype) for k, v in {**cond, **image_conditioning(model, ids, params.guidance)}.items()}
    shape = (B, model.vae.config.latent_channels, height // s, width // s)
    if latents is None:
        gdev = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
    sampler.set_timesteps(params.steps, device=device, **schedule_size(model, height, width))
    latents = latents.to(device=device, dtype=dtype) * sampler.init_sigma  # σ-space samplers start from σ_max ε
    bar = Progress(len(sampler.timesteps), "sampling", enabled=progress)
    for t in sampler.timesteps:
        x = sampler.scale_input(latents)
        x = torch.cat([x] * 2) if guided else x
        out = call(model.denoiser, x, t, **cond)  # (copied out of a CUDA graph's memory: --compile graphs)
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = rescaled(out_uncond + scale * (out_cond - out_uncond), out_cond, params.guidance_rescale)
        latents = sampler.step(out, t, latents, generator=generator)
        bar.update()
    bar.close()
    if not torch.isfinite(latents).all():  # else NaN decodes to an all-black image that looks like a result
        raise ValueError("sampling produced NaN/inf latents (a broken model, schedule or LoRA, or fp16 overflow: "
                         "try --dtype fp32); no image written")
    return decode(model, latents)


def rescaled(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024 §3.4, eq. 15-16: the guided prediction scaled to the conditional one's standard deviation
    (per image), mixed in by φ; CFG at a high scale over-exposes images of a zero-terminal-SNR model without it."""
    if not phi:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * matched + (1 - phi) * guided


def decode(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    vae_dtype = next(model.vae.parameters()).dtype
    dev = latents.device.type
    autocast_fp16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
    fp16 = vae_dtype == torch.float16 or autocast_fp16
    if model.family.vae_fp32_decode and fp16 and model.vae.config.force_upcast:  # SDXL's VAE overflows in fp16
        try:
            with torch.autocast(dev, enabled=False):
                return to_uint8(model.vae.float().decode_latents(latents.float()))
        finally:
            model.vae.to(vae_dtype)
    return to_uint8(model.vae.decode_latents(latents.to(vae_dtype)))
