"""What a model's config.json files say, both ways: each component's config read, checked and turned into our
frozen config dataclasses (`unet_config`, `vae_config`, `clip_config`; `read_configs` for a whole folder), and our
dataclasses written back as diffusers writes them (`*_config_json`). The diffusers layout (diffusers_layout.py) reads
and writes its folders with these; a single-file checkpoint (single_file.py) takes its architecture from them too
(--original-config's folder, or the configs our exports carry in their metadata). Also the tokenizer and scheduler a
folder holds: everything about a model but its weights.
"""
import math
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_origin

from minidream.formats.files import ModelError, read_json
from minidream.models import clip, unet, vae
from minidream.models.noise_schedule import SchedulerConfig
from minidream.models.stable_diffusion import PRESETS
from minidream.models.tokenizer import CLIPTokenizer


def check_fields(config, file: Path):
    """Garbage in a config.json (a string for a size, a negative count, NaN, a wrong-length list) is named
    here, before it reaches torch as a traceback or an all-black image."""
    def ok(v, t):
        if t is bool:
            return isinstance(v, bool)
        if t is int:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0
        if t is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or signed)
        if t is str:
            return isinstance(v, str)
        if get_origin(t) is tuple:
            return isinstance(v, tuple) and len(v) > 0 and all(ok(x, get_args(t)[0]) for x in v)
        return True
    for f in fields(config):
        v = getattr(config, f.name)
        signed = f.metadata.get("signed", False)
        if f.metadata.get("indices"):  # a possibly empty list of indices from 0
            if not (isinstance(v, tuple) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in v)):
                raise ModelError(f"{file}: {f.name}={list(v) if isinstance(v, tuple) else v!r} is not valid "
                                 f"(expected a list of indices, 0 or more)")
            continue
        if not ok(v, f.type):
            want = {bool: "true or false", int: "a positive integer",
                    float: "a finite number" if signed else "a positive finite number",
                    str: "a string"}
            raise ModelError(f"{file}: {f.name}={v!r} is not valid (expected "
                             f"{want.get(f.type, 'a non-empty list of positive values')})")
    return config


# ---------------------------------------------------------------------------------------------
# Reading each component's config.json into our frozen dataclasses

def require(d: dict, file: Path, expected: dict, what: str | None = None):
    """Fail on any config value that describes an architecture we do not implement (`what`: the one expected, e.g.
    "an SD3 MMDiT"; None: an SD 1.x/2.x/XL part)."""
    for key, ok in expected.items():
        if key not in d or d[key] is None and None in ok:
            continue
        v = d[key]
        vals = v if isinstance(v, (list, tuple)) else [v]
        if not all(x in ok for x in vals):
            if what:
                raise ModelError(f"{file}: {key}={v!r} is not {what} (supported: {ok})")
            raise ModelError(f"{file}: {key}={v!r} is not a Stable Diffusion 1.x/2.x/XL architecture "
                             f"(supported: {ok}); minidream's presets are {', '.join(PRESETS)}")


def unet_config(d: dict, file: Path) -> unet.UNetConfig:
    require(d, file, {
        "_class_name": ["UNet2DConditionModel"], "class_embed_type": [None], "addition_embed_type": [None, "text_time"],
        "encoder_hid_dim": [None], "time_cond_proj_dim": [None], "dual_cross_attention": [False],
        "only_cross_attention": [False], "resnet_time_scale_shift": ["default"], "act_fn": ["silu"],
        "time_embedding_type": ["positional"], "mid_block_type": ["UNetMidBlock2DCrossAttn"],
        "center_input_sample": [False], "flip_sin_to_cos": [True], "freq_shift": [0], "conv_in_kernel": [3],
        "conv_out_kernel": [3], "norm_eps": [1e-5], "downsample_padding": [1], "mid_block_scale_factor": [1],
        "reverse_transformer_layers_per_block": [None], "num_class_embeds": [None], "attention_type": ["default"],
        "class_embeddings_concat": [False], "time_embedding_act_fn": [None], "timestep_post_act": [None],
        "resnet_skip_time_act": [False], "resnet_out_scale_factor": [1.0], "cross_attention_norm": [None],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    })
    try:
        ch = tuple(d["block_out_channels"])
        n = len(ch)
        attn = tuple(t == "CrossAttnDownBlock2D" for t in d["down_block_types"])
        if tuple(t == "CrossAttnUpBlock2D" for t in d["up_block_types"]) != attn[::-1]:
            raise ModelError(f"{file}: up_block_types do not mirror down_block_types; not an SD UNet")
        # diffusers' "attention_head_dim" holds the number of heads in SD configs (a known misnomer);
        # "num_attention_heads", when set, says the same thing under the right name.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
        lpb = d.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            raise ModelError(f"{file}: per-stage layers_per_block is not supported")
        depth = d.get("transformer_layers_per_block", 1)  # SDXL: one number per stage
        depth = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * n
        if any(isinstance(x, (list, tuple)) for x in depth):
            raise ModelError(f"{file}: transformer_layers_per_block per layer (a list of lists) is not supported")
        sizes = d.get("addition_embed_type") == "text_time"  # SDXL's micro-conditioning
        config = check_fields(unet.UNetConfig(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), channels=ch, attention=attn,
            heads=heads, layers_per_block=lpb, context_dim=d.get("cross_attention_dim", 1280),
            linear_proj=d.get("use_linear_projection", False), groups=d.get("norm_num_groups", 32),
            sample_size=d.get("sample_size") or 64, depth=None if set(depth) == {1} else depth,
            add_time_dim=d["addition_time_embed_dim"] if sizes else None,
            add_in_dim=d["projection_class_embeddings_input_dim"] if sizes else None), file)
    except KeyError as e:
        raise ModelError(f"{file}: missing field {e}") from None
    except TypeError as e:  # a number where a list belongs, or the reverse
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    if not len(config.channels) == len(config.attention) == len(config.heads) == len(depth):
        raise ModelError(f"{file}: block_out_channels, down_block_types, attention_head_dim and "
                         f"transformer_layers_per_block differ in length")
    if sizes and not all(isinstance(v, int) and v > 0 for v in (config.add_time_dim, config.add_in_dim)):
        raise ModelError(f"{file}: addition_time_embed_dim and projection_class_embeddings_input_dim must be positive "
                         f"integers (got {config.add_time_dim!r}, {config.add_in_dim!r})")
    if any(c % config.groups for c in config.channels) or any(c % h for c, h in zip(config.channels, config.heads)):
        raise ModelError(f"{file}: block_out_channels {list(config.channels)} must divide by norm_num_groups "
                         f"{config.groups} and by the heads {list(config.heads)}")
    return config


def vae_config(d: dict, file: Path) -> vae.VAEConfig:
    require(d, file, {
        "_class_name": ["AutoencoderKL"], "act_fn": ["silu"], "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"], "mid_block_add_attention": [True], "latents_mean": [None],
        "latents_std": [None],
        "force_upcast": [True, False],
    })
    if d.get("out_channels", 3) != d.get("in_channels", 3):
        raise ModelError(f"{file}: in_channels != out_channels is not supported")
    try:
        config = check_fields(vae.VAEConfig(
            in_channels=d.get("in_channels", 3), latent_channels=d.get("latent_channels", 4),
            channels=tuple(d.get("block_out_channels", (64,))), layers_per_block=d.get("layers_per_block", 1),
            groups=d.get("norm_num_groups", 32), scaling_factor=d.get("scaling_factor", 0.18215),
            sample_size=d.get("sample_size", 32), force_upcast=d.get("force_upcast", True),
            shift_factor=d.get("shift_factor") or 0.0, use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True)), file)
    except TypeError as e:
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    if any(c % config.groups for c in config.channels):
        raise ModelError(f"{file}: block_out_channels {list(config.channels)} must divide by norm_num_groups "
                         f"{config.groups}")
    return config


def clip_config(d: dict, file: Path) -> clip.CLIPConfig:
    require(d, file, {"hidden_act": ["quick_gelu", "gelu"], "model_type": ["clip_text_model"],
                       "architectures": ["CLIPTextModel", "CLIPTextModelWithProjection"]})
    projected = d.get("architectures") == ["CLIPTextModelWithProjection"]  # SDXL's second encoder
    config = check_fields(clip.CLIPConfig(
        vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 512), layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8), mlp_width=d.get("intermediate_size", 2048),
        max_positions=d.get("max_position_embeddings", 77), act=d.get("hidden_act", "quick_gelu"),
        eps=d.get("layer_norm_eps", 1e-5), projection_dim=d.get("projection_dim", 512) if projected else None,
        eos_token_id=d.get("eos_token_id") or 49407), file)
    if config.width % config.heads:
        raise ModelError(f"{file}: hidden_size {config.width} must divide by num_attention_heads {config.heads}")
    return config


# the reader of each component's config.json
PARSE = {"unet": unet_config, "vae": vae_config, "text_encoder": clip_config, "text_encoder_2": clip_config}


# ---------------------------------------------------------------------------------------------
# A folder's configs, tokenizer and scheduler

def load_tokenizer(folder: Path) -> CLIPTokenizer:
    if not (folder / "tokenizer.json").exists():
        for n in ("vocab.json", "merges.txt"):
            if not (folder / n).exists():
                raise ModelError(f"{folder / n}: missing; the tokenizer needs vocab.json and merges.txt "
                                 f"(or tokenizer.json)")
    return CLIPTokenizer.from_dir(folder)


def load_scheduler_config(folder: Path) -> SchedulerConfig:
    f = folder / "scheduler_config.json"
    try:
        return SchedulerConfig.from_dict(read_json(f)).check()
    except ValueError as e:
        raise ModelError(f"{f}: {e}") from None


def read_configs(folder: Path) -> tuple[dict, SchedulerConfig]:
    """The architecture a diffusers folder describes, without its weights (for a single-file checkpoint's
    --original-config): the configs by component (unet, vae, text_encoder and, with two encoders, text_encoder_2)."""
    files = {k: folder / k / "config.json" for k in PARSE}
    cfgs = {k: PARSE[k](read_json(f), f) for k, f in files.items() if k != "text_encoder_2" or f.exists()}
    check_conditioning(folder, cfgs["unet"], cfgs["text_encoder"], cfgs.get("text_encoder_2"))
    return cfgs, load_scheduler_config(folder / "scheduler")


def check_conditioning(path: Path, u: unet.UNetConfig, te: clip.CLIPConfig, te2: clip.CLIPConfig | None):
    """The UNet's conditioning fits the text encoders: context width, SDXL's second encoder and pooled width."""
    if u.add_time_dim is None:
        widths, pooled = te.width, None
    elif te2 is None:
        raise ModelError(f"{path}: an SDXL UNet (addition_embed_type text_time) needs text_encoder_2/; is the "
                         f"download complete? (the SDXL refiner, with one text encoder, is not supported)")
    elif not te2.projection_dim:
        raise ModelError(f"{path}: text_encoder_2/ is not a CLIPTextModelWithProjection; SDXL reads its pooled output")
    else:
        widths, pooled = te.width + te2.width, u.add_in_dim - 6 * u.add_time_dim
    if widths != u.context_dim:
        raise ModelError(f"{path}: the text encoder width {widths} does not match the UNet's cross_attention_dim "
                         f"{u.context_dim}")
    if pooled is not None and pooled != te2.projection_dim:
        raise ModelError(f"{path}: the UNet's projection_class_embeddings_input_dim {u.add_in_dim} is not "
                         f"text_encoder_2's projection_dim {te2.projection_dim} + 6 x addition_time_embed_dim "
                         f"{u.add_time_dim}")


# ---------------------------------------------------------------------------------------------
# Our dataclasses as the config.json files diffusers writes (and reads)

def unet_config_json(c: unet.UNetConfig) -> dict:
    extra = {"transformer_layers_per_block": list(c.depth or [1] * len(c.channels))}
    if c.add_time_dim:
        extra.update(addition_embed_type="text_time", addition_time_embed_dim=c.add_time_dim,
                  projection_class_embeddings_input_dim=c.add_in_dim)
    return {**extra, "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": list(c.heads),
            "block_out_channels": list(c.channels), "center_input_sample": False, "cross_attention_dim": c.context_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in c.attention[::-1]],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": c.in_channels,
            "layers_per_block": c.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
            "norm_num_groups": c.groups, "out_channels": c.out_channels, "sample_size": c.sample_size,
            "use_linear_projection": c.linear_proj}


def vae_config_json(c: vae.VAEConfig) -> dict:
    n = len(c.channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(c.channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "in_channels": c.in_channels, "out_channels": c.in_channels, "latent_channels": c.latent_channels,
            "layers_per_block": c.layers_per_block, "norm_num_groups": c.groups, "sample_size": c.sample_size,
            "scaling_factor": c.scaling_factor, "force_upcast": c.force_upcast,
            **({"shift_factor": c.shift_factor} if c.shift_factor else {}),
            **({} if c.use_quant_conv else {"use_quant_conv": False}),
            **({} if c.use_post_quant_conv else {"use_post_quant_conv": False})}


def clip_config_json(c: clip.CLIPConfig, tok: CLIPTokenizer) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if c.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", "hidden_size": c.width,
            "intermediate_size": c.mlp_width, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size, "hidden_act": c.act,
            "layer_norm_eps": c.eps, "projection_dim": c.projection_dim or c.width, "bos_token_id": tok.bos_id,
            # where the pooled state is read: the config's own value for a projected (SDXL) encoder
            "eos_token_id": c.eos_token_id if c.projection_dim else tok.eos_id, "pad_token_id": tok.pad_id}
