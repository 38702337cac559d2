"""The diffusers folder layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`;
SDXL adds `text_encoder_2/`, `tokenizer_2/`), read and written: each component's config.json read as configs.py
reads it, its weights loaded strictly, and the inverse (`save_pretrained`), which diffusers'
`StableDiffusionPipeline.from_pretrained` (`StableDiffusionXLPipeline`) loads.
"""
import json
from pathlib import Path

import torch

from minidream.formats.configs import (clip_config, clip_config_json, load_scheduler_config, load_tokenizer,
                                       read_configs, unet_config, unet_config_json, vae_config, vae_config_json)
from minidream.formats.files import ModelError, build, read_json, read_weights, save_safetensors, weight_file
from minidream.models import clip, unet, vae
from minidream.models.stable_diffusion import StableDiffusion, family_of

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what every folder has
SECOND_ENCODER = ("text_encoder_2", "tokenizer_2")  # a family with two text encoders (SDXL)


# ---------------------------------------------------------------------------------------------
# Reading each component

def _strip_text_model(sd: dict) -> dict:
    # The official SD repos write `text_model.` before every key; transformers 5 does not.
    # `position_ids` is a buffer that older transformers saved; we compute positions instead.
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def load_text_encoder(folder: Path, variant=None, allow_pickle=False, dtype=None) -> clip.CLIPTextModel:
    config = clip_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "model", variant, allow_pickle)
    return build(clip.CLIPTextModel, config, _strip_text_model(read_weights(f, allow_pickle)), str(f), dtype)


def load_unet(folder: Path, variant=None, allow_pickle=False, dtype=None) -> unet.UNet2DConditionModel:
    config = unet_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "diffusion_pytorch_model", variant, allow_pickle)
    return build(unet.UNet2DConditionModel, config, read_weights(f, allow_pickle), str(f), dtype)


# Early diffusers VAE checkpoints named the mid-block attention like the original LDM code.
_OLD_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def load_vae(folder: Path, variant=None, allow_pickle=False, dtype=None) -> vae.AutoencoderKL:
    config = vae_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "diffusion_pytorch_model", variant, allow_pickle)
    sd = {}
    for k, v in read_weights(f, allow_pickle).items():
        for old, new in _OLD_VAE_ATTN.items():
            k = k.replace(old, new)
        sd[k] = v
    return build(vae.AutoencoderKL, config, sd, str(f), dtype)


def load_pretrained(path: Path, variant=None, allow_pickle=False, dtype=None) -> StableDiffusion:
    if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
        raise ModelError(f"{path}: not a model folder (no model_index.json, no unet/); expected the diffusers layout "
                         f"or a single .safetensors checkpoint")
    index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    two = (path / "text_encoder_2").is_dir() or bool(index.get("text_encoder_2"))
    for comp in COMPONENTS + (SECOND_ENCODER if two else ()):
        if not (path / comp).is_dir():
            raise ModelError(f"{path}: missing component folder {comp}/; is the download complete?")
    configs, _ = read_configs(path)  # the parts fit together (SDXL's text encoders and UNet) before any weights
    second = {}
    if two:
        second = dict(tokenizer_2=load_tokenizer(path / "tokenizer_2"),
                      text_encoder_2=load_text_encoder(path / "text_encoder_2", variant, allow_pickle, dtype),
                      force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    return StableDiffusion(
        tokenizer=load_tokenizer(path / "tokenizer"),
        text_encoder=load_text_encoder(path / "text_encoder", variant, allow_pickle, dtype),
        unet=load_unet(path / "unet", variant, allow_pickle, dtype),
        vae=load_vae(path / "vae", variant, allow_pickle, dtype),
        scheduler=load_scheduler_config(path / "scheduler"),
        source=str(path), family=family_of(configs["unet"], configs["text_encoder"]), **second)


# ---------------------------------------------------------------------------------------------
# Writing the diffusers layout (the inverse of `load`): loadable by us and by
# diffusers.StableDiffusionPipeline.from_pretrained.

# each pipeline's own entries in model_index.json (the family names its pipeline)
PIPELINE_CONFIG = {
    "StableDiffusionPipeline": lambda m: {"feature_extractor": [None, None], "safety_checker": [None, None],
                                          "requires_safety_checker": False},
    "StableDiffusionXLPipeline": lambda m: {"force_zeros_for_empty_prompt": m.force_zeros_for_empty_prompt},
}


def model_index(model: StableDiffusion) -> dict:
    encoders = {}
    for name, _, te in model.text_encoders():
        projected = te.config.projection_dim
        encoders[name] = ["transformers", "CLIPTextModelWithProjection" if projected else "CLIPTextModel"]
        encoders[tokenizer_name(name)] = ["transformers", "CLIPTokenizer"]
    parts = {"scheduler": ["diffusers", model.scheduler.class_name], **encoders,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    pipeline = model.family.pipeline
    return {"_class_name": pipeline, "_diffusers_version": "0.30.0", **parts, **PIPELINE_CONFIG[pipeline](model)}


def tokenizer_name(encoder: str) -> str:
    """The folder of a text encoder's tokenizer: text_encoder_2 -> tokenizer_2."""
    return encoder.replace("text_encoder", "tokenizer")


def text_encoder_state(te: clip.CLIPTextModel) -> dict:
    # the official SD repos (and transformers 4) keep the `text_model.` prefix; transformers 5 reads both
    return {(k if k.startswith("text_projection.") else f"text_model.{k}"): v for k, v in te.state_dict().items()}


def save_pretrained(model: StableDiffusion, folder: Path, dtype: torch.dtype | None = None):
    """Write a diffusers-layout folder; each weights file atomically (in `dtype`, when given)."""
    folder = Path(folder)
    encoders = [name for name, _, _ in model.text_encoders()]
    for comp in ("unet", "vae", "scheduler", *encoders, *map(tokenizer_name, encoders)):
        (folder / comp).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(model), indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config_json(model.denoiser.config), indent=2))
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config_json(model.vae.config), indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler.to_dict(), indent=2))
    for name, tok, te in model.text_encoders():
        (folder / name / "config.json").write_text(json.dumps(clip_config_json(te.config, tok), indent=2))
        tok.save(folder / tokenizer_name(name))
        save_safetensors(text_encoder_state(te), folder / name / "model.safetensors", dtype=dtype)
    save_safetensors(model.denoiser.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors", dtype=dtype)
    save_safetensors(model.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", dtype=dtype)
