"""SD3 and SD3.5 in the diffusers layout (`StableDiffusion3Pipeline`): `transformer/` (the MMDiT, often sharded),
`vae/` (16 channels, shifted), `text_encoder/` and `text_encoder_2/` (CLIP-L and CLIP-G, both projected),
`text_encoder_3/` (T5 v1.1 XXL, sharded; absent or null in model_index.json for a model run without it),
`tokenizer*/` and `scheduler/` (flow matching). Each config is read and checked into our dataclasses before any
weights; each component's weights load strictly.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.formats.configs import (check_fields, clip_config, clip_config_json, load_tokenizer, require,
                                       vae_config, vae_config_json)
from minidream.formats.diffusers_layout import load_text_encoder, load_vae, text_encoder_state, tokenizer_name
from minidream.formats.files import ModelError, build, read_json, read_weights, save_safetensors, weight_file
from minidream.models import mmdit, t5
from minidream.models.flow_matching import FlowConfig
from minidream.models.stable_diffusion import FAMILIES, StableDiffusion
from minidream.models.t5_tokenizer import T5Tokenizer

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")


def mmdit_config(d: dict, file: Path) -> mmdit.MMDiTConfig:
    require(d, file, {"_class_name": ["SD3Transformer2DModel"], "qk_norm": [None, "rms_norm"]}, "an SD3 MMDiT")
    defaults = mmdit.MMDiTConfig()
    try:
        values = {k: d.get(k, getattr(defaults, k)) for k in defaults.__dataclass_fields__}
        values["dual_attention_layers"] = tuple(values["dual_attention_layers"])
        config = mmdit.MMDiTConfig(**values)
    except TypeError as e:
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    check_fields(config, file)
    if config.caption_projection_dim != config.width:
        raise ModelError(f"{file}: caption_projection_dim {config.caption_projection_dim} must equal "
                         f"num_attention_heads x attention_head_dim ({config.width}), as in every SD3 model")
    if not all(0 <= i < config.num_layers for i in config.dual_attention_layers):
        raise ModelError(f"{file}: dual_attention_layers {list(config.dual_attention_layers)} must be block "
                         f"indices below num_layers {config.num_layers}")
    return config


def t5_config(d: dict, file: Path) -> t5.T5Config:
    require(d, file, {"model_type": ["t5"], "feed_forward_proj": ["gated-gelu"], "dense_act_fn": ["gelu_new"],
                      "is_gated_act": [True]}, "a T5 v1.1 encoder")
    defaults = t5.T5Config()
    try:
        return check_fields(t5.T5Config(**{k: d.get(k, getattr(defaults, k)) for k in defaults.__dataclass_fields__}),
                            file)
    except TypeError as e:
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None


def flow_config(folder: Path) -> FlowConfig:
    f = folder / "scheduler_config.json"
    try:
        return FlowConfig.from_dict(read_json(f)).check()
    except (TypeError, ValueError) as e:
        raise ModelError(f"{f}: {e}") from None


def t5_state(sd: dict) -> dict:
    """transformers ties `encoder.embed_tokens` to `shared`; a file may hold either name, or both."""
    tied = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    return sd


def load_t5(folder: Path, variant=None, allow_pickle=False, dtype=None) -> t5.T5EncoderModel:
    config = t5_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "model", variant, allow_pickle)
    return build(t5.T5EncoderModel, config, t5_state(read_weights(f, allow_pickle)), str(f), dtype)


def load_transformer(folder: Path, variant=None, allow_pickle=False, dtype=None) -> mmdit.SD3Transformer2DModel:
    config = mmdit_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "diffusion_pytorch_model", variant, allow_pickle)
    return build(mmdit.SD3Transformer2DModel, config, read_weights(f, allow_pickle), str(f), dtype)


def is_sd3(path: Path) -> bool:
    """A folder in SD3's layout: its model_index.json names the pipeline, or it has a transformer/."""
    path = Path(path)
    index = path / "model_index.json"
    if index.exists():
        return read_json(index).get("_class_name") == "StableDiffusion3Pipeline"
    return (path / "transformer").is_dir()


def load_t5_tokenizer(folder: Path) -> T5Tokenizer:
    try:
        return T5Tokenizer.from_dir(folder)
    except Exception as e:  # no tokenizer.json (only spiece.model), an unreadable one, no <pad> or </s>
        raise ModelError(f"{folder}: not a readable T5 tokenizer ({str(e).splitlines()[0] if str(e) else e!r}); it "
                         f"needs tokenizer.json, as the SD3 repos ship") from None


def check_parts(source, configs: dict):
    """The parts fit together before any weights: the latents' channels, the pooled width (both CLIPs' projections
    side by side), the text width (T5's; the CLIPs' states are padded to it, so they must not be wider)."""
    net, clips = configs["transformer"], [configs.get(k) for k in ("text_encoder", "text_encoder_2")]
    problems = []
    if "vae" in configs and configs["vae"].latent_channels != net.in_channels:
        problems.append(f"the VAE's latent_channels ({configs['vae'].latent_channels}) differ from the transformer's "
                        f"in_channels ({net.in_channels})")
    if all(clips) and sum(c.projection_dim or c.width for c in clips) != net.pooled_projection_dim:
        problems.append(f"the CLIPs' projections ({' + '.join(str(c.projection_dim) for c in clips)}) are not the "
                        f"transformer's pooled_projection_dim ({net.pooled_projection_dim})")
    if all(clips) and sum(c.width for c in clips) > net.joint_attention_dim:
        problems.append(f"the CLIPs' widths ({' + '.join(str(c.width) for c in clips)}) exceed the transformer's "
                        f"joint_attention_dim ({net.joint_attention_dim})")
    if configs.get("text_encoder_3") and configs["text_encoder_3"].d_model != net.joint_attention_dim:
        problems.append(f"T5's d_model ({configs['text_encoder_3'].d_model}) is not the transformer's "
                        f"joint_attention_dim ({net.joint_attention_dim})")
    if problems:
        raise ModelError(f"{source}: its parts do not fit together: {problems[0]}")


def load_sd3(path: Path, variant=None, allow_pickle=False, dtype=None, t5: bool = True) -> StableDiffusion:
    index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    entry = index.get("text_encoder_3", ["transformers", "T5EncoderModel"])  # [null, null] or null: saved without T5
    with_t5 = t5 and isinstance(entry, list) and bool(entry) and entry[0] is not None
    for comp in COMPONENTS + (T5_PARTS if with_t5 else ()):
        if not (path / comp).is_dir():
            raise ModelError(f"{path}: missing component folder {comp}/; is the download complete?")
    configs = {"transformer": mmdit_config(read_json(path / "transformer" / "config.json"),
                                           path / "transformer" / "config.json"),
               "vae": vae_config(read_json(path / "vae" / "config.json"), path / "vae" / "config.json")}
    for name in ("text_encoder", "text_encoder_2", *(("text_encoder_3",) if with_t5 else ())):
        f = path / name / "config.json"
        configs[name] = (t5_config if name == "text_encoder_3" else clip_config)(read_json(f), f)
    schedule = flow_config(path / "scheduler")  # every config is read, and the parts checked, before any weights
    check_parts(path, configs)
    third = {}
    if with_t5:
        third = dict(tokenizer_3=load_t5_tokenizer(path / "tokenizer_3"),
                     text_encoder_3=load_t5(path / "text_encoder_3", variant, allow_pickle, dtype))
    return StableDiffusion(
        tokenizer=load_tokenizer(path / "tokenizer"), tokenizer_2=load_tokenizer(path / "tokenizer_2"),
        text_encoder=load_text_encoder(path / "text_encoder", variant, allow_pickle, dtype),
        text_encoder_2=load_text_encoder(path / "text_encoder_2", variant, allow_pickle, dtype),
        transformer=load_transformer(path / "transformer", variant, allow_pickle, dtype),
        vae=load_vae(path / "vae", variant, allow_pickle, dtype), scheduler=schedule, source=str(path),
        family=FAMILIES["sd3"], **third)


# ---------------------------------------------------------------------------------------------
# Writing the layout (the inverse of `load_sd3`): loadable by us and by StableDiffusion3Pipeline.from_pretrained

def t5_config_json(c: t5.T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(c), "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new", "is_gated_act": True, "is_encoder_decoder": False, "pad_token_id": 0,
            "eos_token_id": 1, "tie_word_embeddings": False}


def model_index(model: StableDiffusion) -> dict:
    t5_parts = {"text_encoder_3": ["transformers", "T5EncoderModel"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", model.scheduler.class_name],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None], "image_encoder": [None, None],
            **{f"{kind}{n}": ["transformers", cls] for n in ("", "_2")
               for kind, cls in (("text_encoder", "CLIPTextModelWithProjection"), ("tokenizer", "CLIPTokenizer"))},
            **(t5_parts if model.text_encoder_3 is not None else {k: [None, None] for k in t5_parts})}


def save_sd3(model: StableDiffusion, folder: Path, dtype: torch.dtype | None = None):
    """Write an SD3 diffusers-layout folder; each weights file atomically (in `dtype`, when given)."""
    folder = Path(folder)
    write = {"model_index.json": model_index(model), "scheduler/scheduler_config.json": model.scheduler.to_dict(),
             "transformer/config.json": {"_class_name": "SD3Transformer2DModel", **asdict(model.denoiser.config)},
             "vae/config.json": vae_config_json(model.vae.config)}
    for name, tok, te in model.text_encoders():
        write[f"{name}/config.json"] = clip_config_json(te.config, tok)
    if model.text_encoder_3 is not None:
        write["text_encoder_3/config.json"] = t5_config_json(model.text_encoder_3.config)
    for rel, content in write.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content, indent=2))
    for name, tok, te in model.text_encoders():
        tok.save(folder / tokenizer_name(name))
        save_safetensors(text_encoder_state(te), folder / name / "model.safetensors", dtype=dtype)
    if model.text_encoder_3 is not None:
        model.tokenizer_3.save(folder / "tokenizer_3")
        save_safetensors(model.text_encoder_3.state_dict(), folder / "text_encoder_3" / "model.safetensors",
                         dtype=dtype)
    save_safetensors(model.denoiser.state_dict(), folder / "transformer" / "diffusion_pytorch_model.safetensors",
                     dtype=dtype)
    save_safetensors(model.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", dtype=dtype)
