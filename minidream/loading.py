"""Everything about getting weights from disk (or the Hugging Face hub) into our modules.

Supported: a local folder or hub repo id in the diffusers layout (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), and an original single-file checkpoint
(`v1-5-pruned-emaonly.safetensors`; see `convert.py` for its key table).

Models are built on the `meta` device and take the memory-mapped safetensors tensors as their
parameters (`assign=True`): no random init, no second copy in RAM. Only safetensors load unless
the caller passes allow_pickle=True (then `torch.load(weights_only=True)`, which refuses code).
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields
from typing import get_args, get_origin
from pathlib import Path

import torch
import torch.nn as nn

from minidream import clip, unet, vae
from minidream.choices import PRESETS
from minidream.schedulers import SchedulerConfig
from minidream.schedulers import PRESETS as SCHEDULER_PRESETS
from minidream.tokenizer import CLIPTokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


class ModelError(Exception):
    """A problem with a model on disk, worded for the user (one line, names the path)."""


# ---------------------------------------------------------------------------------------------
# Finding the files

def resolve(model: str, revision: str | None = None, allow_pickle: bool = False, variant: str | None = None) -> Path:
    """A local folder or single file as is; otherwise a hub repo id, fetched (configs, tokenizer and
    the component weights only) into the standard Hugging Face cache. HF_HUB_OFFLINE=1 serves the cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelError(f"{model}: no such file or folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    var = f".{variant}" if variant else ""
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    for comp, stem in WEIGHT_STEMS.items():
        patterns.append(f"{comp}/{stem}{var}.safetensors")
        if allow_pickle:
            patterns.append(f"{comp}/{stem}{var}.bin")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline without a cached copy, unknown repo, gated repo, no network
        raise ModelError(f"{model}: no such local file or folder, and it could not be fetched as a Hugging Face hub "
                         f"repo ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path, "
                         f"or the repo id and your login / network") from None


def weight_file(folder: Path, stem: str, variant: str | None, allow_pickle: bool) -> Path:
    names = [f"{stem}.{variant}.safetensors"] if variant else [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for n in names:
        if (folder / n).exists():
            return folder / n
    pickles = [folder / n.replace(".safetensors", ".bin") for n in names]
    for p in pickles:
        if p.exists():
            if allow_pickle:
                return p
            raise ModelError(f"{p}: pickle checkpoints can run code when loaded and are refused; convert it to "
                             f"safetensors, or pass --allow-pickle if you trust the file")
    raise ModelError(f"{folder}: no weights ({' or '.join(names)}); is the download complete?")


def read_weights(file: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    file = Path(file)
    if not file.is_file():  # a FIFO or device would block the reader forever
        raise ModelError(f"{file}: not a regular file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(file)  # memory-mapped
        except Exception as e:
            raise ModelError(f"{file}: not a readable safetensors file ({e}); it may be truncated: download it again") from None
    if file.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        if not allow_pickle:
            raise ModelError(f"{file}: pickle checkpoints can run code when loaded and are refused; convert it to "
                             f"safetensors, or pass --allow-pickle if you trust the file")
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-1.6, non-zip) pickles cannot be memory-mapped: read them whole
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{file}: could not be read as a weights-only torch checkpoint "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(sd, dict):
            raise ModelError(f"{file}: holds a {type(sd).__name__}, not a dict of tensors")
        return sd.get("state_dict", sd)
    raise ModelError(f"{file}: unknown weights format; expected .safetensors")


def read_json(file: Path) -> dict:
    if not file.exists():
        raise ModelError(f"{file}: missing; is this a diffusers-layout model folder?")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------------------------
# Putting tensors into modules

def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, dtype=None) -> nn.Module:
    """Strict load with errors that name the key, the file and the expected shape; the module is
    expected on `meta` and takes the given tensors as its own (assign=True)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    if missing:
        k = missing[0]
        raise ModelError(f"{source}: missing key {k!r} (expected shape {list(want[k].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [k for k in sd if k not in want]
    if extra:
        raise ModelError(f"{source}: unexpected key {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                         + "; the checkpoint does not match the configured architecture")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelError(f"{source}: key {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def build(cls, cfg, sd, source, dtype=None):
    try:
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as e:  # a config that passed the checks but still describes no buildable model
        raise ModelError(f"{source}: its config does not describe a buildable {cls.__name__} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return load_into(model, sd, source, dtype).eval().requires_grad_(False)


def check_fields(cfg, file: Path):
    """Garbage in a config.json (a string for a size, a negative count, NaN, a wrong-length list) is named
    here, before it reaches torch as a traceback or an all-black image."""
    def ok(v, t):
        if t is bool:
            return isinstance(v, bool)
        if t is int:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0
        if t is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if t is str:
            return isinstance(v, str)
        if get_origin(t) is tuple:
            return isinstance(v, tuple) and len(v) > 0 and all(ok(x, get_args(t)[0]) for x in v)
        return True
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not ok(v, f.type):
            want = {bool: "true or false", int: "a positive integer", float: "a positive finite number", str: "a string"}
            raise ModelError(f"{file}: {f.name}={v!r} is not valid (expected "
                             f"{want.get(f.type, 'a non-empty list of positive values')})")
    return cfg


# ---------------------------------------------------------------------------------------------
# Reading each component's config.json into our frozen dataclasses

def _require(d: dict, file: Path, expected: dict):
    """Fail on any config value that describes an architecture we do not implement."""
    for key, ok in expected.items():
        if key not in d or d[key] is None and None in ok:
            continue
        v = d[key]
        vals = v if isinstance(v, (list, tuple)) else [v]
        if not all(x in ok for x in vals):
            raise ModelError(f"{file}: {key}={v!r} is not a Stable Diffusion 1.x/2.x architecture "
                             f"(supported: {ok}); minidream's presets are {', '.join(PRESETS)}")


def unet_config(d: dict, file: Path) -> unet.UNetConfig:
    _require(d, file, {
        "_class_name": ["UNet2DConditionModel"], "class_embed_type": [None], "addition_embed_type": [None],
        "encoder_hid_dim": [None], "time_cond_proj_dim": [None], "dual_cross_attention": [False],
        "only_cross_attention": [False], "resnet_time_scale_shift": ["default"], "act_fn": ["silu"],
        "time_embedding_type": ["positional"], "mid_block_type": ["UNetMidBlock2DCrossAttn"],
        "center_input_sample": [False], "flip_sin_to_cos": [True], "freq_shift": [0], "conv_in_kernel": [3],
        "conv_out_kernel": [3], "norm_eps": [1e-5], "downsample_padding": [1], "mid_block_scale_factor": [1],
        "transformer_layers_per_block": [1], "num_class_embeds": [None], "attention_type": ["default"],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
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
        cfg = check_fields(unet.UNetConfig(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), channels=ch, attention=attn,
            heads=heads, layers_per_block=lpb, context_dim=d.get("cross_attention_dim", 1280),
            linear_proj=d.get("use_linear_projection", False), groups=d.get("norm_num_groups", 32),
            sample_size=d.get("sample_size") or 64), file)
    except KeyError as e:
        raise ModelError(f"{file}: missing field {e}") from None
    except TypeError as e:  # a number where a list belongs, or the reverse
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    if not len(cfg.channels) == len(cfg.attention) == len(cfg.heads):
        raise ModelError(f"{file}: block_out_channels, down_block_types and attention_head_dim differ in length")
    if any(c % cfg.groups for c in cfg.channels) or any(c % h for c, h in zip(cfg.channels, cfg.heads)):
        raise ModelError(f"{file}: block_out_channels {list(cfg.channels)} must divide by norm_num_groups "
                         f"{cfg.groups} and by the heads {list(cfg.heads)}")
    return cfg


def vae_config(d: dict, file: Path) -> vae.VAEConfig:
    _require(d, file, {
        "_class_name": ["AutoencoderKL"], "act_fn": ["silu"], "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"], "use_quant_conv": [True], "use_post_quant_conv": [True],
        "mid_block_add_attention": [True], "shift_factor": [None, 0.0], "latents_mean": [None], "latents_std": [None],
    })
    if d.get("out_channels", 3) != d.get("in_channels", 3):
        raise ModelError(f"{file}: in_channels != out_channels is not supported")
    try:
        cfg = check_fields(vae.VAEConfig(
            in_channels=d.get("in_channels", 3), latent_channels=d.get("latent_channels", 4),
            channels=tuple(d.get("block_out_channels", (64,))), layers_per_block=d.get("layers_per_block", 1),
            groups=d.get("norm_num_groups", 32), scaling_factor=d.get("scaling_factor", 0.18215),
            sample_size=d.get("sample_size", 32)), file)
    except TypeError as e:
        raise ModelError(f"{file}: a field has the wrong type ({e})") from None
    if any(c % cfg.groups for c in cfg.channels):
        raise ModelError(f"{file}: block_out_channels {list(cfg.channels)} must divide by norm_num_groups {cfg.groups}")
    return cfg


def clip_config(d: dict, file: Path) -> clip.CLIPConfig:
    _require(d, file, {"hidden_act": ["quick_gelu", "gelu"], "architectures": ["CLIPTextModel"],
                       "model_type": ["clip_text_model"]})
    cfg = check_fields(clip.CLIPConfig(
        vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 512), layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8), mlp_width=d.get("intermediate_size", 2048),
        max_positions=d.get("max_position_embeddings", 77), act=d.get("hidden_act", "quick_gelu"),
        eps=d.get("layer_norm_eps", 1e-5)), file)
    if cfg.width % cfg.heads:
        raise ModelError(f"{file}: hidden_size {cfg.width} must divide by num_attention_heads {cfg.heads}")
    return cfg


def preset_of(cfg, presets: dict) -> str:
    """The preset a config equals (ignoring the sample size), or 'custom'."""
    def key(c):
        return {f.name: getattr(c, f.name) for f in fields(c) if f.name != "sample_size"}
    return next((name for name, p in presets.items() if key(p) == key(cfg)), "custom")


# ---------------------------------------------------------------------------------------------
# Whole models

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
    def native_resolution(self) -> int:
        """The image side the model was trained at: the UNet's latent size times the VAE's downsampling."""
        return self.unet.cfg.sample_size * 2 ** (len(self.vae.cfg.channels) - 1)

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self


def _strip_text_model(sd: dict) -> dict:
    # The official SD repos write `text_model.` before every key; transformers 5 does not.
    # `position_ids` is a buffer that older transformers saved; we compute positions instead.
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def load_text_encoder(folder: Path, variant=None, allow_pickle=False, dtype=None) -> clip.CLIPTextModel:
    cfg = clip_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "model", variant, allow_pickle)
    return build(clip.CLIPTextModel, cfg, _strip_text_model(read_weights(f, allow_pickle)), str(f), dtype)


def load_unet(folder: Path, variant=None, allow_pickle=False, dtype=None) -> unet.UNet2DConditionModel:
    cfg = unet_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "diffusion_pytorch_model", variant, allow_pickle)
    return build(unet.UNet2DConditionModel, cfg, read_weights(f, allow_pickle), str(f), dtype)


# Early diffusers VAE checkpoints named the mid-block attention like the original LDM code.
_OLD_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def load_vae(folder: Path, variant=None, allow_pickle=False, dtype=None) -> vae.AutoencoderKL:
    cfg = vae_config(read_json(folder / "config.json"), folder / "config.json")
    f = weight_file(folder, "diffusion_pytorch_model", variant, allow_pickle)
    sd = {}
    for k, v in read_weights(f, allow_pickle).items():
        for old, new in _OLD_VAE_ATTN.items():
            k = k.replace(old, new)
        sd[k] = v
    return build(vae.AutoencoderKL, cfg, sd, str(f), dtype)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    if not (folder / "tokenizer.json").exists():
        for n in ("vocab.json", "merges.txt"):
            if not (folder / n).exists():
                raise ModelError(f"{folder / n}: missing; the tokenizer needs vocab.json and merges.txt (or tokenizer.json)")
    return CLIPTokenizer.from_dir(folder)


def load_scheduler_config(folder: Path) -> SchedulerConfig:
    f = folder / "scheduler_config.json"
    try:
        return SchedulerConfig.from_dict(read_json(f)).check()
    except ValueError as e:
        raise ModelError(f"{f}: {e}") from None


def load(model: str, revision: str | None = None, variant: str | None = None, allow_pickle: bool = False,
         dtype=None, tokenizer: str | None = None, preset: str | None = None, config: str | None = None) -> StableDiffusion:
    """Load a whole model: a diffusers-layout folder / hub repo id, or a single-file checkpoint
    (then `config` names a diffusers folder/repo with its architecture, or `preset` names it and
    `tokenizer` a folder or repo with the vocabulary)."""
    path = resolve(model, revision, allow_pickle, variant)
    if path.is_file():
        from minidream.convert import load_single_file
        return load_single_file(path, allow_pickle=allow_pickle, dtype=dtype, tokenizer=tokenizer, preset=preset,
                                config=config)
    ignored = [f for f, v in (("--preset", preset), ("--config", config), ("--tokenizer", tokenizer)) if v]
    if ignored:  # a folder carries its own configs and tokenizer: say so rather than silently ignore the flag
        one = len(ignored) == 1
        raise ModelError(f"{path}: a model folder has its own configs and tokenizer; {', '.join(ignored)} "
                         f"{'describes' if one else 'describe'} only single-file checkpoints: drop {'it' if one else 'them'}")
    if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
        raise ModelError(f"{path}: not a model folder (no model_index.json, no unet/); expected the diffusers layout "
                         f"or a single .safetensors checkpoint")
    for comp in COMPONENTS:
        if not (path / comp).is_dir():
            raise ModelError(f"{path}: missing component folder {comp}/; is the download complete?")
    return StableDiffusion(
        tokenizer=load_tokenizer(path / "tokenizer"),
        text_encoder=load_text_encoder(path / "text_encoder", variant, allow_pickle, dtype),
        unet=load_unet(path / "unet", variant, allow_pickle, dtype),
        vae=load_vae(path / "vae", variant, allow_pickle, dtype),
        scheduler=load_scheduler_config(path / "scheduler"),
        source=str(path))


def random_model(preset: str, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> StableDiffusion:
    """A model at a preset's architecture with random weights (benchmarks, tests: nothing to download)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    cp = "sd21" if preset.startswith("sd21") else preset
    return StableDiffusion(tokenizer=tokenizer, text_encoder=clip.CLIPTextModel(clip.PRESETS[cp]).eval(),
                           unet=unet.UNet2DConditionModel(unet.PRESETS[preset]).eval(),
                           vae=vae.AutoencoderKL(vae.PRESETS[preset]).eval(),
                           scheduler=SCHEDULER_PRESETS[preset], source=f"random:{preset}")




def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None):
    """Write atomically: a crash mid-write leaves the old file (or none), never half a file."""
    from safetensors.torch import save_file
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like any file the user writes (the writer makes it 0600)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Writing the diffusers layout (the inverse of `load`): loadable by us and by
# diffusers.StableDiffusionPipeline.from_pretrained.

def unet_config_json(c: unet.UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": list(c.heads),
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
            "scaling_factor": c.scaling_factor}


def clip_config_json(c: clip.CLIPConfig, tok: CLIPTokenizer) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": c.width,
            "intermediate_size": c.mlp_width, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size, "hidden_act": c.act,
            "layer_norm_eps": c.eps, "projection_dim": c.width, "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def save_pretrained(model: StableDiffusion, folder: Path):
    """Write a diffusers-layout folder; each weights file atomically."""
    folder = Path(folder)
    for comp in COMPONENTS:
        (folder / comp).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config_json(model.unet.cfg), indent=2))
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config_json(model.vae.cfg), indent=2))
    (folder / "text_encoder" / "config.json").write_text(
        json.dumps(clip_config_json(model.text_encoder.cfg, model.tokenizer), indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", **{f.name: getattr(model.scheduler, f.name) for f in fields(model.scheduler)}}, indent=2))
    model.tokenizer.save(folder / "tokenizer")
    save_safetensors(model.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_safetensors(model.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    # the official SD repos (and transformers 4) keep the `text_model.` prefix; transformers 5 reads both
    save_safetensors({f"text_model.{k}": v for k, v in model.text_encoder.state_dict().items()},
                     folder / "text_encoder" / "model.safetensors")
