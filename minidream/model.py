"""The text-to-image model as one object, the named architectures, and what the UNet is conditioned on.

`StableDiffusion` holds the parts a loader (`loading.load`) returns: tokenizer, text encoder, UNet, VAE and
the noise-schedule config. `PRESETS` names the architectures minidream implements (the CLI's `--preset`
choices); a new model family adds its row here, its conditioning in `encode_text`, its key table in
`single_file.py`.
"""
from dataclasses import dataclass, fields

import torch

from minidream import choices, clip, unet, vae
from minidream.schedulers import PRESETS as SCHEDULER_PRESETS
from minidream.schedulers import SchedulerConfig
from minidream.tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class Preset:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    text_encoder: clip.CLIPConfig
    scheduler: SchedulerConfig


# SD 2.x and 2.x-base share every tensor shape; only the UNet's sample size and the prediction type differ.
PRESETS = {name: Preset(unet.PRESETS[name], vae.PRESETS[name], clip.PRESETS["sd21" if name.startswith("sd21") else name],
                        SCHEDULER_PRESETS[name])
           for name in ("sd15", "sd21", "sd21-base", "tiny")}
assert tuple(PRESETS) == choices.PRESETS, "choices.PRESETS lists the presets defined here"


def preset_of(cfg, presets: dict) -> str:
    """The preset a config equals (ignoring the sample size), or 'custom'."""
    def key(c):
        return {f.name: getattr(c, f.name) for f in fields(c) if f.name != "sample_size"}
    return next((name for name, p in presets.items() if key(p) == key(cfg)), "custom")


@dataclass
class StableDiffusion:
    """The parts of a text-to-image model, as loaded."""
    tokenizer: CLIPTokenizer
    text_encoder: clip.CLIPTextModel
    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    scheduler: SchedulerConfig
    source: str

    @property
    def version(self) -> str:
        """Which preset family the UNet matches: sd15, sd21, sd21-base, tiny or custom."""
        name = preset_of(self.unet.cfg, unet.PRESETS)
        if name in ("sd21", "sd21-base"):
            return "sd21" if self.scheduler.prediction_type == "v_prediction" else "sd21-base"
        return name

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell: the VAE's downsampling (8 for SD)."""
        return 2 ** (len(self.vae.cfg.channels) - 1)

    @property
    def downsampling(self) -> int:
        """Pixels per latent cell at the UNet's deepest stage: the VAE's, then the UNet's downsamplings.
        Image sides must be multiples of it."""
        return self.latent_scale * 2 ** (len(self.unet.cfg.channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at: the UNet's latent size times the VAE's downsampling."""
        return self.unet.cfg.sample_size * self.latent_scale

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self


def encode_text(model: StableDiffusion, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Everything the UNet is conditioned on, as keyword arguments of its forward: for SD 1.x/2.x the
    CLIP context (B, 77, C). A model family with more (SDXL's pooled embedding and size ids) adds them here."""
    p = next(model.text_encoder.parameters())
    return {"context": model.text_encoder(model.tokenizer(prompts).to(p.device))}


def random_model(preset: str, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> StableDiffusion:
    """A model at a preset's architecture with random weights (benchmarks, tests: nothing to download)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    p = PRESETS[preset]
    return StableDiffusion(tokenizer=tokenizer, text_encoder=clip.CLIPTextModel(p.text_encoder).eval(),
                           unet=unet.UNet2DConditionModel(p.unet).eval(), vae=vae.AutoencoderKL(p.vae).eval(),
                           scheduler=p.scheduler, source=f"random:{preset}")


def resolve_device(name: str | None) -> torch.device:
    """--device: cuda when available, else cpu; a named device that is not here is an error (ValueError)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name!r}: only cuda and cpu are supported")
    return device
