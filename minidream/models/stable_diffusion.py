"""The text-to-image model as one object, the named architectures, and what the UNet is conditioned on.

`StableDiffusion` holds the parts a loader (`loading.load`) returns: tokenizer, text encoder, UNet, VAE and
the noise-schedule config (SDXL: a second tokenizer and text encoder). `PRESETS` names the architectures
minidream implements (the CLI's `--preset` choices); a new model family adds its row here, its conditioning
in `encode_text` (and `size_ids`), its key table in `single_file.py`.
"""
import copy
from dataclasses import dataclass, fields

import torch

from minidream import choices
from minidream.models import clip, unet, vae
from minidream.sampling.schedulers import PRESETS as SCHEDULER_PRESETS
from minidream.sampling.schedulers import SchedulerConfig
from minidream.models.tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class Preset:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    text_encoder: clip.CLIPConfig
    scheduler: SchedulerConfig
    text_encoder_2: clip.CLIPConfig | None = None  # SDXL's OpenCLIP bigG


# SD 2.x and 2.x-base share every tensor shape; only the UNet's sample size and the prediction type differ.
PRESETS = {name: Preset(unet.PRESETS[name], vae.PRESETS[name], clip.PRESETS["sd21" if name.startswith("sd21") else name],
                        SCHEDULER_PRESETS[name], clip.PRESETS.get(f"{name}-2"))
           for name in choices.PRESETS}
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
    tokenizer_2: CLIPTokenizer | None = None  # SDXL: OpenCLIP's vocabulary (the same BPE, pads with "!")
    text_encoder_2: clip.CLIPTextModel | None = None  # SDXL: OpenCLIP ViT-bigG, with text_projection
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero conditioning, not the empty prompt's

    @property
    def xl(self) -> bool:
        """SDXL's conditioning: two text encoders, pooled text and size ids."""
        return self.unet.cfg.add_time_dim is not None

    def text_encoders(self) -> list[tuple[str, CLIPTokenizer, clip.CLIPTextModel]]:
        """(checkpoint prefix, tokenizer, encoder) of each text encoder: one for SD 1.x/2.x, two for SDXL."""
        both = [("text_encoder", self.tokenizer, self.text_encoder), ("text_encoder_2", self.tokenizer_2, self.text_encoder_2)]
        return [t for t in both if t[2] is not None]

    @property
    def version(self) -> str:
        """Which preset family the UNet matches: sd15, sd21, sd21-base, sdxl, tiny, tiny-xl or custom."""
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
        for m in (*[te for _, _, te in self.text_encoders()], self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self


def encode_text(model: StableDiffusion, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The UNet's text conditioning, as keyword arguments of its forward: for SD 1.x/2.x the CLIP context
    (B, 77, C); for SDXL both encoders' penultimate states side by side (B, 77, 768 + 1280) and the second's
    pooled, projected embedding (B, 1280) (Podell et al. 2023 §2.1). SDXL's size ids: `size_ids`."""
    p = next(model.text_encoder.parameters())
    if not model.xl:
        return {"context": model.text_encoder(model.tokenizer(prompts).to(p.device))}
    states, pooled = [], None
    for _, tok, te in model.text_encoders():
        h, pooled = te.penultimate_and_pooled(tok(prompts).to(p.device))  # the last encoder's pooled is the one used
        states.append(h)
    return {"context": torch.cat(states, dim=-1), "text_embeds": pooled}


def size_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023 §2.2) for one image: (6,) = original (h, w) of the photo
    before resizing, the crop's top-left (top, left) in the resized photo, and the target (h, w)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def random_model(preset: str, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> StableDiffusion:
    """A model at a preset's architecture with random weights (benchmarks, tests: nothing to download)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    p = PRESETS[preset]
    second = {}
    if p.text_encoder_2:
        second = dict(tokenizer_2=copy.deepcopy(tokenizer), text_encoder_2=clip.CLIPTextModel(p.text_encoder_2).eval(),
                      force_zeros_for_empty_prompt=True)
    return StableDiffusion(tokenizer=tokenizer, text_encoder=clip.CLIPTextModel(p.text_encoder).eval(),
                           unet=unet.UNet2DConditionModel(p.unet).eval(), vae=vae.AutoencoderKL(p.vae).eval(),
                           scheduler=p.scheduler, source=f"random:{preset}", **second)


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
