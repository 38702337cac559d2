"""Black Forest Labs' Flux.1 single files (`flux1-dev.safetensors`, `flux1-schnell.safetensors`; ComfyUI's
`diffusion_models/`): the transformer alone under the original code's names, bare or under ComfyUI's
`model.diffusion_model.`. Q, K, V are one fused `qkv` per stream; a single block's `linear1` is Q, K, V and the MLP's
input stacked (3 + 4 widths of rows), its `linear2` our proj_out; the output's adaLN holds (shift, scale) where
diffusers holds (scale, shift).

The other parts live in files of their own, as ComfyUI users keep them: `--text-encoders clip_l.safetensors
--text-encoders t5xxl_fp16.safetensors` (transformers' layout) and `--vae ae.safetensors` (the original autoencoder
layout, or diffusers'); or all of them, with the configs and tokenizers, from `--original-config` (a Flux diffusers
folder). The table names every key the file must hold; every key is used or the file is refused; no pickle unless asked.
"""
import json
from dataclasses import replace
from pathlib import Path

import torch

from minidream.formats.configs import vae_config, vae_config_json
from minidream.formats.diffusers_layout import _strip_text_model, load_text_encoder, load_vae
from minidream.formats.files import (ModelError, build, read_json, read_weights, resolve,
                                     save_safetensors)
from minidream.formats.flux_layout import (RELEASED, check_parts, flux_config, flux_model, schedule_of,
                                           transformer_config_json)
from minidream.formats.sd3_layout import load_t5, load_t5_tokenizer, t5_config
from minidream.formats.sd3_layout import t5_config_json, t5_state
from minidream.formats.single_file import (ARCHITECTURE, VAE, _meta, _take, key_table, match_rule, modelspec,
                                          stored_architecture, vae_rows, vocabulary_folder)
from minidream.formats.configs import clip_config, clip_config_json, load_tokenizer
from minidream.models import clip, flux, t5, vae
from minidream.models.flow_matching import PRESETS as FLOW_PRESETS
from minidream.models.flow_matching import FlowConfig
from minidream.models.stable_diffusion import FAMILIES, StableDiffusion

COMFY = "model.diffusion_model."
FAMILY = FAMILIES["flux"]

# our key (a regular expression) -> BFL's, with how the tensor is taken: ("chunk", i, j, n) (row blocks i..j-1 of
# n equal ones of a fused layer), "swap" (BFL's shift, scale halves are diffusers' scale, shift), or None (as is)
_D, _S = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
_EMBEDDERS = {"timestep": "time_in", "guidance": "guidance_in", "text": "vector_in"}
FLUX_RULES = [
    (r"x_embedder\.(\w+)", "img_in.{0}", None),
    (r"context_embedder\.(\w+)", "txt_in.{0}", None),
    (r"time_text_embed\.(timestep|guidance|text)_embedder\.linear_([12])\.(\w+)", "{0}.{1}.{2}", "mlp"),
    (_D + r"norm1\.linear\.(\w+)", "double_blocks.{0}.img_mod.lin.{1}", None),
    (_D + r"norm1_context\.linear\.(\w+)", "double_blocks.{0}.txt_mod.lin.{1}", None),
    (_D + r"attn\.to_([qkv])\.(\w+)", "double_blocks.{0}.img_attn.qkv.{2}", "qkv"),
    (_D + r"attn\.add_([qkv])_proj\.(\w+)", "double_blocks.{0}.txt_attn.qkv.{2}", "qkv"),
    (_D + r"attn\.norm_(q|k)\.weight", "double_blocks.{0}.img_attn.norm.{1}_norm.scale", "qk"),
    (_D + r"attn\.norm_added_(q|k)\.weight", "double_blocks.{0}.txt_attn.norm.{1}_norm.scale", "qk"),
    (_D + r"attn\.to_out\.0\.(\w+)", "double_blocks.{0}.img_attn.proj.{1}", None),
    (_D + r"attn\.to_add_out\.(\w+)", "double_blocks.{0}.txt_attn.proj.{1}", None),
    (_D + r"ff\.net\.(0)\.proj\.(\w+)", "double_blocks.{0}.img_mlp.{1}.{2}", None),
    (_D + r"ff\.net\.(2)\.(\w+)", "double_blocks.{0}.img_mlp.{1}.{2}", None),
    (_D + r"ff_context\.net\.(0)\.proj\.(\w+)", "double_blocks.{0}.txt_mlp.{1}.{2}", None),
    (_D + r"ff_context\.net\.(2)\.(\w+)", "double_blocks.{0}.txt_mlp.{1}.{2}", None),
    (_S + r"attn\.to_([qkv])\.(\w+)", "single_blocks.{0}.linear1.{2}", "linear1"),
    (_S + r"proj_mlp\.(\w+)", "single_blocks.{0}.linear1.{1}", "linear1-mlp"),
    (_S + r"proj_out\.(\w+)", "single_blocks.{0}.linear2.{1}", None),
    (_S + r"attn\.norm_(q|k)\.weight", "single_blocks.{0}.norm.{1}_norm.scale", "qk"),
    (_S + r"norm\.linear\.(\w+)", "single_blocks.{0}.modulation.lin.{1}", None),
    (r"norm_out\.linear\.(\w+)", "final_layer.adaLN_modulation.1.{0}", "swap"),
    (r"proj_out\.(\w+)", "final_layer.linear.{0}", None),
]


def flux_table(our_keys) -> dict[str, tuple[str, object]]:
    """our key -> (BFL's key, how to take it); every key of ours has a row (a missing one is a bug here)."""
    table = {}
    for k in our_keys:
        theirs, groups, how = match_rule(FLUX_RULES, k)
        if how == "mlp":  # linear_1, linear_2 are BFL's in_layer, out_layer
            groups[0], groups[1], how = _EMBEDDERS[groups[0]], ("in_layer", "out_layer")[int(groups[1]) - 1], None
        elif how == "qk":  # norm_q, norm_k are BFL's query_norm, key_norm
            groups[1], how = {"q": "query", "k": "key"}[groups[1]], None
        elif how == "qkv":
            how = ("chunk", "qkv".index(groups[1]), "qkv".index(groups[1]) + 1, 3)
        elif how == "linear1":  # Q, K, V: one width each of linear1's 7 (3 + the MLP's 4)
            how = ("chunk", "qkv".index(groups[1]), "qkv".index(groups[1]) + 1, 7)
        elif how == "linear1-mlp":
            how = ("chunk", 3, 7, 7)
        table[k] = (theirs.format(*groups), how)
    return table


def file_prefix(sd: dict) -> str | None:
    """'' (BFL's own file) or ComfyUI's 'model.diffusion_model.' where the keys are a Flux transformer's; else None."""
    for prefix in ("", COMFY):
        if prefix + "double_blocks.0.img_attn.qkv.weight" in sd:
            return prefix
    return None


def is_flux_file(sd: dict) -> bool:
    return file_prefix(sd) is not None


def flux_from_keys(sd: dict, prefix: str, file: Path) -> flux.FluxConfig:
    """The transformer a file's shapes describe; the rope axes are the released models' (16, 56, 56), which only
    a head of 128 channels takes (another needs --original-config)."""
    def shape(key):
        if prefix + key not in sd:
            raise ModelError(f"{file}: missing key {prefix + key!r}; not a whole Flux.1 transformer (or pass "
                             f"--original-config)")
        return sd[prefix + key].shape
    width, channels = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if head != 128 or width % head:
        raise ModelError(f"{file}: heads of {head} channels; only the released models' (128) have known rope axes: "
                         f"pass --original-config with its diffusers folder")
    count = lambda kind: len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + kind)})  # noqa: E731
    return flux.FluxConfig(in_channels=channels, num_layers=count("double_blocks."),
                           num_single_layers=count("single_blocks."), attention_head_dim=head,
                           num_attention_heads=width // head, joint_attention_dim=shape("txt_in.weight")[1],
                           pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
                           guidance_embeds=prefix + "guidance_in.in_layer.weight" in sd)


PARSE = {"transformer": flux_config, "vae": vae_config, "text_encoder": clip_config, "text_encoder_2": t5_config}


def _configs(sd: dict, prefix: str, file: Path, cdir: Path | None, preset: str | None) -> dict:
    """Each part's config and the schedule: --original-config's folder; else the architecture our exports write in their
    metadata; else the transformer of --preset or of the file's shapes, the released models' other parts."""
    if preset is not None and preset not in flux.PRESETS:
        raise ModelError(f"{file}: a Flux.1 checkpoint; --preset {preset!r} is not one of {', '.join(flux.PRESETS)}")
    stored = None if cdir is not None or preset is not None else stored_architecture(file, lambda d: {
        **{k: f(d[k], file) for k, f in PARSE.items()},
        "scheduler": replace(FlowConfig.from_dict(d["scheduler"]).check(), pipeline_sigmas=True)})
    if stored is not None:
        return stored
    if cdir is None:
        net = flux.PRESETS[preset] if preset else flux_from_keys(sd, prefix, file)
        return {"transformer": net, **RELEASED,
                "scheduler": FLOW_PRESETS["flux-dev" if net.guidance_embeds else "flux-schnell"]}
    missing = [k for k in PARSE if not (cdir / k / "config.json").exists()]
    if missing or not (cdir / "scheduler" / "scheduler_config.json").exists():
        raise ModelError(f"--original-config {cdir}: not a Flux diffusers folder (no {(missing or ['scheduler'])[0]}/"
                         f"{'config.json' if missing else 'scheduler_config.json'})")
    return {**{k: f(read_json(cdir / k / "config.json"), cdir / k / "config.json") for k, f in PARSE.items()},
            "scheduler": schedule_of(cdir / "scheduler")}


def _separate(files: tuple[str, ...], allow_pickle: bool) -> dict[str, tuple[str, dict]]:
    """--text-encoders' files told apart by their keys: {"text_encoder" (CLIP-L) | "text_encoder_2" (T5): (file,
    weights)}."""
    out = {}
    for f in files:
        if not Path(f).is_file():
            raise ModelError(f"--text-encoders {f}: {'not a file' if Path(f).exists() else 'no such file'}")
        part = read_weights(Path(f), allow_pickle)
        if any(k.startswith("encoder.block.") for k in part):
            name, weights = "text_encoder_2", t5_state(dict(part))
        elif {"text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"} & set(part):
            # a clip_l file made for SD3 also holds CLIP-L's projection, which Flux (reading the pooled state)
            # never uses
            name, weights = "text_encoder", _strip_text_model(part)
            weights.pop("text_projection.weight", None)
        else:
            raise ModelError(f"--text-encoders {f}: not a CLIP-L or T5 text encoder in transformers' layout "
                             f"(ComfyUI's clip_l, t5xxl files)")
        if name in out:
            raise ModelError(f"--text-encoders {f}: a {'T5' if name == 'text_encoder_2' else 'CLIP'} is already "
                             f"given ({out[name][0]}); give each text encoder once")
        out[name] = (f, weights)
    return out


def _encoders(files, cfgs: dict, cdir: Path | None, file: Path, allow_pickle: bool, dtype) -> dict:
    """CLIP-L and T5 from --text-encoders' files, else from --original-config's folder."""
    given, out = _separate(files, allow_pickle), {}
    for name, cls, ours in (("text_encoder", clip.CLIPTextModel, "text_encoder"),
                            ("text_encoder_2", t5.T5EncoderModel, "text_encoder_3")):
        if name in given:
            out[ours] = build(cls, cfgs[name], given[name][1], f"--text-encoders {given[name][0]}", dtype)
        elif cdir is not None and (cdir / name).is_dir():
            load = load_text_encoder if name == "text_encoder" else load_t5
            out[ours] = load(cdir / name, allow_pickle=allow_pickle, dtype=dtype)
        else:
            kind = "CLIP-L (ComfyUI's clip_l.safetensors)" if name == "text_encoder" else "T5 (t5xxl_fp16.safetensors)"
            raise ModelError(f"{file}: a Flux transformer alone; give its {kind} with --text-encoders, or "
                             f"--original-config with a Flux diffusers folder")
    return out


def _vae(vae_file: str | None, config: vae.VAEConfig, cdir: Path | None, file: Path, allow_pickle: bool, dtype):
    """The VAE from --vae (BFL's ae.safetensors, the original autoencoder layout; or diffusers'), else
    --original-config's."""
    if vae_file is None:
        if cdir is not None and (cdir / "vae").is_dir():
            return load_vae(cdir / "vae", allow_pickle=allow_pickle, dtype=dtype)
        raise ModelError(f"{file}: a Flux transformer alone; give its VAE with --vae (ae.safetensors), or "
                         f"--original-config with a Flux diffusers folder")
    if not Path(vae_file).is_file():
        raise ModelError(f"--vae {vae_file}: {'not a file' if Path(vae_file).exists() else 'no such file'}")
    sd = read_weights(Path(vae_file), allow_pickle)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:  # diffusers' names
        return build(vae.AutoencoderKL, config, sd, f"--vae {vae_file}", dtype)
    sd, used = {VAE + k.removeprefix(VAE): v for k, v in sd.items()}, set()
    shapes = {k: v.shape for k, v in _meta(vae.AutoencoderKL, config).state_dict().items()}
    try:
        weights = _take(sd, key_table(vae_rows(config), shapes), shapes, used, f"--vae {vae_file}",
                        "a Flux autoencoder (ae.safetensors)")
    except ModelError as e:  # keys named as ae.safetensors names them (the table's prefix is the SD single file's)
        raise ModelError(str(e).replace(f"'{VAE}", "'")) from None
    unused = [k for k in sd if k not in used]
    if unused:
        raise ModelError(f"--vae {vae_file}: unexpected key {unused[0].removeprefix(VAE)!r}; is it Flux's "
                         f"autoencoder (16 latent channels)?")
    return build(vae.AutoencoderKL, config, weights, f"--vae {vae_file}", dtype)


def _tokenizers(cdir: Path | None, tokenizer: str | None, file: Path) -> dict:
    folder = vocabulary_folder(cdir, tokenizer, file, FAMILY, "tokenizer/ and tokenizer_2/")
    return {"tokenizer": load_tokenizer(folder / "tokenizer"), "tokenizer_3": load_t5_tokenizer(folder / "tokenizer_2")}


def load_flux_single_file(file: Path, sd: dict, dtype=None, tokenizer: str | None = None, config: str | None = None,
                          preset: str | None = None, text_encoders: tuple[str, ...] = (), vae_file: str | None = None,
                          allow_pickle: bool = False) -> StableDiffusion:
    """A BFL transformer file as one model: configs (`_configs`), the transformer by the key table, the text
    encoders and VAE from their own files or --original-config's folder; every key used, strictly."""
    prefix = file_prefix(sd)
    cdir = resolve(config, weights=not (text_encoders and vae_file)) if config else None
    what = f"the architecture in {config}" if config else "a Flux.1 transformer (pass --original-config for another)"
    cfgs = _configs(sd, prefix, file, cdir, preset)
    check_parts(file, cfgs)
    shapes = {k: v.shape for k, v in _meta(flux.FluxTransformer2DModel, cfgs["transformer"]).state_dict().items()}
    bundled = [k for k in sd if k.startswith(("text_encoders.", "vae.", "first_stage_model.", "cond_stage_model."))]
    if bundled:  # ComfyUI's all-in-one checkpoints
        raise ModelError(f"{file}: it holds text encoders or a VAE beside the transformer ({bundled[0]!r}, …); "
                         f"minidream reads Flux's transformer file alone: give the others with --text-encoders and "
                         f"--vae, or --original-config")
    mine, used = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}, set()
    weights = _take(mine, flux_table(shapes), shapes, used, file, what)
    unused = [prefix + k for k in mine if k not in used] + [k for k in sd if not k.startswith(prefix)]
    if unused:
        raise ModelError(f"{file}: unexpected key {unused[0]!r}" + (
            f" and {len(unused) - 1} more" if len(unused) > 1 else "") + f"; is it {what}?")
    parts = {"transformer": build(flux.FluxTransformer2DModel, cfgs["transformer"], weights, str(file), dtype),
             **_encoders(text_encoders, cfgs, cdir, file, allow_pickle, dtype),
             "vae": _vae(vae_file, cfgs["vae"], cdir, file, allow_pickle, dtype),
             **_tokenizers(cdir, tokenizer, file)}
    return flux_model(parts, cfgs["scheduler"], str(file))


# ---------------------------------------------------------------------------------------------
# Writing BFL's file (the inverse of the table), with the architecture for a reader without --original-config

def bfl_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer's state dict under BFL's names: fused layers joined in their row order."""
    out, blocks = {}, {}
    for k, (theirs, how) in flux_table(sd).items():
        if isinstance(how, tuple):
            blocks.setdefault(theirs, []).append((how[1], sd[k]))
        elif how == "swap":
            out[theirs] = torch.cat(sd[k].chunk(2, dim=0)[::-1])
        else:
            out[theirs] = sd[k]
    out.update({k: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for k, parts in blocks.items()})
    return out


def architecture_json(model: StableDiffusion) -> str:
    """Every part's diffusers config and the schedule, in one JSON string: the file loads without --original-config (the
    text encoders and VAE still come from their own files)."""
    return json.dumps({"transformer": transformer_config_json(model.denoiser.config),
                       "vae": vae_config_json(model.vae.config), "scheduler": model.scheduler.to_dict(),
                       "text_encoder": clip_config_json(model.text_encoder.config, model.tokenizer),
                       "text_encoder_2": t5_config_json(model.text_encoder_3.config)})


def save_flux_single_file(model: StableDiffusion, file: Path, dtype: torch.dtype | None = None):
    meta = {**modelspec(model), ARCHITECTURE: architecture_json(model)}
    save_safetensors(bfl_state(model.denoiser.state_dict()), Path(file), metadata=meta, dtype=dtype)
