"""Flux.1 in the diffusers layout (`FluxPipeline`): `transformer/` (often sharded), `vae/` (16 channels, shifted),
`text_encoder/` (CLIP-L, unprojected), `text_encoder_2/` (T5 v1.1 XXL, sharded: our model's `text_encoder_3`, as
SD3 names its T5), `tokenizer/`, `tokenizer_2/` (T5's) and `scheduler/` (flow matching; [dev]'s shift depends on
the image size). Each config is read and checked into our dataclasses before any weights; each component's
weights load strictly.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.formats.configs import (check_fields, clip_config, clip_config_json, load_tokenizer, require,
                                       vae_config, vae_config_json)
from minidream.formats.diffusers_layout import load_text_encoder, load_vae, text_encoder_state
from minidream.formats.files import ModelError, build, read_json, read_weights, save_safetensors, weight_file
from minidream.formats.sd3_layout import flow_config, load_t5, load_t5_tokenizer, t5_config, t5_config_json
from minidream.models import clip, flux, t5, vae
from minidream.models.flow_matching import FlowConfig
from minidream.models.stable_diffusion import FAMILIES, StableDiffusion

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def flux_config(d: dict, file: Path) -> flux.FluxConfig:
    require(d, file, {"_class_name": ["FluxTransformer2DModel"], "patch_size": [1]}, "a Flux.1 transformer")
    defaults = flux.FluxConfig()
    try:
        values = {k: d.get(k, getattr(defaults, k)) for k in defaults.__dataclass_fields__ if k != "sample_size"}
        values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        config = check_fields(flux.FluxConfig(**values), file)
    except TypeError as e:
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    if sum(config.axes_dims_rope) != config.attention_head_dim or any(a % 2 for a in config.axes_dims_rope):
        raise ModelError(f"{file}: axes_dims_rope {list(config.axes_dims_rope)} must be even and sum to "
                         f"attention_head_dim ({config.attention_head_dim})")
    if len(config.axes_dims_rope) != 3 or config.in_channels % 4 or \
            config.out_channels not in (None, config.in_channels):
        raise ModelError(f"{file}: not a Flux.1 transformer (three rope axes; in_channels a multiple of 4, a 2x2 "
                         f"patch; out_channels = in_channels)")
    return config


def schedule_of(folder: Path) -> FlowConfig:
    """The scheduler's config, with FluxPipeline's way of spacing σ (it passes linspace(1, 1/n, n))."""
    return FlowConfig(**{**asdict(flow_config(folder)), "pipeline_sigmas": True})


def is_flux(path: Path) -> bool:
    """A folder in Flux's layout: its model_index.json names the pipeline."""
    index = Path(path) / "model_index.json"
    return index.exists() and read_json(index).get("_class_name") == "FluxPipeline"


def check_parts(source, configs: dict):
    """The parts fit together before any weights: the packed latent (4 x the VAE's channels), the pooled width
    (CLIP-L's), the text width (T5's)."""
    net, problems = configs["transformer"], []
    if configs["vae"].latent_channels * 4 != net.in_channels:
        problems.append(f"the VAE's latent_channels ({configs['vae'].latent_channels}) x 4 (a 2x2 patch) are not "
                        f"the transformer's in_channels ({net.in_channels})")
    if configs["text_encoder"].width != net.pooled_projection_dim:
        problems.append(f"CLIP's width ({configs['text_encoder'].width}) is not the transformer's "
                        f"pooled_projection_dim ({net.pooled_projection_dim})")
    if configs["text_encoder_2"].d_model != net.joint_attention_dim:
        problems.append(f"T5's d_model ({configs['text_encoder_2'].d_model}) is not the transformer's "
                        f"joint_attention_dim ({net.joint_attention_dim})")
    if problems:
        raise ModelError(f"{source}: its parts do not fit together: {problems[0]}")


def flux_model(parts: dict, scheduler: FlowConfig, source: str) -> StableDiffusion:
    """The loaded parts as one model; T5 reads 512 tokens per prompt for [dev], 256 for [schnell] (the lengths
    they were trained with, as their pipelines are run)."""
    dev = parts["transformer"].config.guidance_embeds
    return StableDiffusion(**parts, scheduler=scheduler, source=source, family=FAMILIES["flux"],
                           max_sequence_length=512 if dev else 256)


def load_flux(path: Path, variant=None, allow_pickle=False, dtype=None) -> StableDiffusion:
    for comp in COMPONENTS:
        if not (path / comp).is_dir():
            raise ModelError(f"{path}: missing component folder {comp}/; is the download complete?")
    parse = {"transformer": flux_config, "vae": vae_config, "text_encoder": clip_config, "text_encoder_2": t5_config}
    configs = {k: f(read_json(path / k / "config.json"), path / k / "config.json") for k, f in parse.items()}
    schedule = schedule_of(path / "scheduler")  # every config read, parts checked, first
    check_parts(path, configs)
    f = weight_file(path / "transformer", "diffusion_pytorch_model", variant, allow_pickle)
    parts = dict(
        tokenizer=load_tokenizer(path / "tokenizer"), tokenizer_3=load_t5_tokenizer(path / "tokenizer_2"),
        text_encoder=load_text_encoder(path / "text_encoder", variant, allow_pickle, dtype),
        text_encoder_3=load_t5(path / "text_encoder_2", variant, allow_pickle, dtype),
        transformer=build(flux.FluxTransformer2DModel, configs["transformer"], read_weights(f, allow_pickle), str(f),
                          dtype),
        vae=load_vae(path / "vae", variant, allow_pickle, dtype))
    return flux_model(parts, schedule, str(path))


# ---------------------------------------------------------------------------------------------
# Writing the layout (the inverse of `load_flux`): loadable by us and by FluxPipeline.from_pretrained

def model_index(model: StableDiffusion) -> dict:
    return {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", model.scheduler.class_name],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "feature_extractor": [None, None], "image_encoder": [None, None]}


def transformer_config_json(c: flux.FluxConfig) -> dict:
    d = {k: v for k, v in asdict(c).items() if k != "sample_size"}
    return {"_class_name": "FluxTransformer2DModel", **d, "axes_dims_rope": list(c.axes_dims_rope)}


def save_flux(model: StableDiffusion, folder: Path, dtype: torch.dtype | None = None):
    """Write a Flux diffusers-layout folder; each weights file atomically (in `dtype`, when given)."""
    folder = Path(folder)
    write = {"model_index.json": model_index(model), "scheduler/scheduler_config.json": model.scheduler.to_dict(),
             "transformer/config.json": transformer_config_json(model.denoiser.config),
             "vae/config.json": vae_config_json(model.vae.config),
             "text_encoder/config.json": clip_config_json(model.text_encoder.config, model.tokenizer),
             "text_encoder_2/config.json": t5_config_json(model.text_encoder_3.config)}
    for rel, content in write.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content, indent=2))
    model.tokenizer.save(folder / "tokenizer")
    model.tokenizer_3.save(folder / "tokenizer_2")
    save_safetensors(text_encoder_state(model.text_encoder), folder / "text_encoder" / "model.safetensors",
                     dtype=dtype)
    save_safetensors(model.text_encoder_3.state_dict(), folder / "text_encoder_2" / "model.safetensors", dtype=dtype)
    save_safetensors(model.denoiser.state_dict(), folder / "transformer" / "diffusion_pytorch_model.safetensors",
                     dtype=dtype)
    save_safetensors(model.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", dtype=dtype)


# the released models' parts, for a single file that does not say (formats/flux_single_file.py)
RELEASED = {"vae": vae.PRESETS["flux"], "text_encoder": clip.CLIPConfig(eos_token_id=2),
            "text_encoder_2": t5.PRESETS["t5-v1_1-xxl"]}
