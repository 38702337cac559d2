"""Stability's SD3 / SD3.5 single files (`sd3.5_medium.safetensors`, `sd3_medium_incl_clips_t5xxlfp16.safetensors`):
the MMDiT under the original code's names (`model.diffusion_model.joint_blocks.N.x_block…`, Q/K/V fused as one
`qkv`, the adaLN of the last text stream and of the output in (shift, scale) order), the VAE under
`first_stage_model.`, and the text encoders, when the file has them, under `text_encoders.clip_l|clip_g|t5xxl.`
in transformers' own layout.

Its architecture: `--original-config` (an SD3 diffusers folder or repo: its configs, scheduler and tokenizers — and its
text encoders, for a file without them), else the MMDiT read off the file's shapes and the released models' VAE, CLIPs
and T5 (tokenizers from `--tokenizer`, or the family's hub repo). As for SD: the table names every key the file must
hold, every key is used or the file is refused, no pickle unless asked, one line per problem.
"""
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.formats.configs import clip_config, clip_config_json, load_tokenizer, vae_config, vae_config_json
from minidream.formats.diffusers_layout import load_text_encoder
from minidream.formats.files import (ModelError, build, read_json, read_weights, resolve,
                                    save_safetensors)
from minidream.formats.sd3_layout import (check_parts, flow_config, load_t5, load_t5_tokenizer, mmdit_config,
                                          t5_config, t5_config_json, t5_state)
from minidream.formats.single_file import (ARCHITECTURE, _meta, _take, clip_rows, key_table, match_rule, modelspec,
                                          stored_architecture, vae_rows, vocabulary_folder)
from minidream.models import clip, mmdit, t5, vae
from minidream.models.flow_matching import PRESETS as FLOW_PRESETS
from minidream.models.flow_matching import FlowConfig
from minidream.models.stable_diffusion import FAMILIES, StableDiffusion

DIT = "model.diffusion_model."
T5_PREFIX = "text_encoders.t5xxl.transformer."
FAMILY = FAMILIES["sd3"]

# our MMDiT key (a regular expression) -> the original's, with how the tensor is taken: ("chunk", i) of the fused
# Q/K/V, "swap" (the original's shift, scale halves are diffusers' scale, shift), or None (as is)
_B = r"transformer_blocks\.(\d+)\."
_O = "joint_blocks.{0}."
MMDIT_RULES = [
    (r"pos_embed\.pos_embed", "pos_embed", None),
    (r"pos_embed\.proj\.(\w+)", "x_embedder.proj.{0}", None),
    (r"time_text_embed\.timestep_embedder\.linear_([12])\.(\w+)", "t_embedder.mlp.{0}.{1}", "mlp"),
    (r"time_text_embed\.text_embedder\.linear_([12])\.(\w+)", "y_embedder.mlp.{0}.{1}", "mlp"),
    (r"context_embedder\.(\w+)", "context_embedder.{0}", None),
    (_B + r"attn\.to_([qkv])\.(\w+)", _O + "x_block.attn.qkv.{2}", "qkv"),
    (_B + r"attn\.add_([qkv])_proj\.(\w+)", _O + "context_block.attn.qkv.{2}", "qkv"),
    (_B + r"attn2\.to_([qkv])\.(\w+)", _O + "x_block.attn2.qkv.{2}", "qkv"),
    (_B + r"attn\.to_out\.0\.(\w+)", _O + "x_block.attn.proj.{1}", None),
    (_B + r"attn2\.to_out\.0\.(\w+)", _O + "x_block.attn2.proj.{1}", None),
    (_B + r"attn\.to_add_out\.(\w+)", _O + "context_block.attn.proj.{1}", None),
    (_B + r"attn\.norm_([qk])\.weight", _O + "x_block.attn.ln_{1}.weight", None),
    (_B + r"attn\.norm_added_([qk])\.weight", _O + "context_block.attn.ln_{1}.weight", None),
    (_B + r"attn2\.norm_([qk])\.weight", _O + "x_block.attn2.ln_{1}.weight", None),
    (_B + r"norm1\.linear\.(\w+)", _O + "x_block.adaLN_modulation.1.{1}", None),
    (_B + r"norm1_context\.linear\.(\w+)", _O + "context_block.adaLN_modulation.1.{1}", "last-swap"),
    (_B + r"ff\.net\.0\.proj\.(\w+)", _O + "x_block.mlp.fc1.{1}", None),
    (_B + r"ff\.net\.2\.(\w+)", _O + "x_block.mlp.fc2.{1}", None),
    (_B + r"ff_context\.net\.0\.proj\.(\w+)", _O + "context_block.mlp.fc1.{1}", None),
    (_B + r"ff_context\.net\.2\.(\w+)", _O + "context_block.mlp.fc2.{1}", None),
    (r"proj_out\.(\w+)", "final_layer.linear.{0}", None),
    (r"norm_out\.linear\.(\w+)", "final_layer.adaLN_modulation.1.{0}", "swap"),
]


def mmdit_table(config: mmdit.MMDiTConfig, our_keys) -> dict[str, tuple[str, object]]:
    """our key -> (the original key, how to take it); every key of ours has a row (a missing one is a bug here)."""
    table = {}
    for k in our_keys:
        theirs, groups, how = match_rule(MMDIT_RULES, k)
        if how == "mlp":  # linear_1, linear_2 are the original's mlp.0, mlp.2 (mlp.1 is the SiLU)
            groups[0], how = str(2 * int(groups[0]) - 2), None
        if how == "qkv":
            how = ("chunk", "qkv".index(groups[1]))
        if how == "last-swap":
            how = "swap" if int(groups[0]) == config.num_layers - 1 else None
        table[k] = (DIT + theirs.format(*groups), how)
    return table


def is_sd3_file(sd: dict) -> bool:
    return DIT + "joint_blocks.0.x_block.attn.qkv.weight" in sd


def encoder_rows(slot, config: clip.CLIPConfig):
    """A CLIP stored by transformers under the slot's prefix; its projection beside `text_model.`."""
    return [*clip_rows(config, slot.original, False),
            ("text_projection.", slot.original.removesuffix("text_model.") + "text_projection.", {})]


def mmdit_from_keys(sd: dict, file: Path) -> mmdit.MMDiTConfig:
    """The MMDiT a file's shapes describe: the head width is the qk-norm's (without one, 64 as in every released
    model), the native size 128 latents (as in every released one)."""
    def shape(key):
        if DIT + key not in sd:
            raise ModelError(f"{file}: missing key {DIT + key!r}; not a whole SD3 MMDiT (or pass --original-config)")
        return sd[DIT + key].shape
    width, joint = shape("context_embedder.weight")
    patch, channels = shape("x_embedder.proj.weight")[-1], shape("x_embedder.proj.weight")[1]
    blocks = {int(m[1]) for k in sd for m in [re.match(re.escape(DIT) + r"joint_blocks\.(\d+)\.", k)] if m}
    dual = sorted({int(m[1]) for k in sd
                   for m in [re.match(re.escape(DIT) + r"joint_blocks\.(\d+)\.x_block\.attn2\.", k)] if m})
    table = shape("pos_embed")[1]
    ln_q = DIT + "joint_blocks.0.x_block.attn.ln_q.weight"
    head = sd[ln_q].shape[0] if ln_q in sd else 64
    if math.isqrt(table) ** 2 != table or width % head:
        raise ModelError(f"{file}: its pos_embed ({table} rows) or width ({width}, heads of {head}) is not an SD3 "
                         f"MMDiT's; pass --original-config with its diffusers folder")
    return mmdit.MMDiTConfig(
        patch_size=patch, in_channels=channels, out_channels=shape("final_layer.linear.weight")[0] // patch ** 2,
        num_layers=max(blocks) + 1, num_attention_heads=width // head, attention_head_dim=head,
        joint_attention_dim=joint,
        caption_projection_dim=width, pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
        pos_embed_max_size=math.isqrt(table), dual_attention_layers=tuple(dual),
        qk_norm="rms_norm" if any(".ln_q." in k for k in sd) else None)


PARSE = {"transformer": mmdit_config, "vae": vae_config, "text_encoder": clip_config, "text_encoder_2": clip_config,
         "text_encoder_3": t5_config}


def _configs(sd: dict, file: Path, cdir: Path | None, preset: str | None) -> dict:
    """Each component's config: --original-config's files; else the architecture our exports write in their metadata;
    else the MMDiT of --preset or of the file's shapes, and the released models' other parts."""
    if preset is not None and preset not in mmdit.PRESETS:
        raise ModelError(f"{file}: an SD3 checkpoint; --preset {preset!r} is not one of {', '.join(mmdit.PRESETS)}")
    stored = None if cdir is not None or preset is not None else stored_architecture(file, lambda d: {
        **{k: f(d[k], file) for k, f in PARSE.items() if k in d or k == "transformer"},
        "vae": vae_config(d["vae"], file), "scheduler": FlowConfig.from_dict(d["scheduler"]).check()})
    if stored is not None:
        return stored
    if cdir is None:
        return {"transformer": mmdit.PRESETS[preset] if preset else mmdit_from_keys(sd, file),
                "vae": vae.PRESETS["sd3"],
                "text_encoder": clip.PRESETS["sd3"], "text_encoder_2": clip.PRESETS["sdxl-2"],
                "text_encoder_3": t5.PRESETS["t5-v1_1-xxl"], "scheduler": FLOW_PRESETS["sd3"]}
    out = {k: f(read_json(cdir / k / "config.json"), cdir / k / "config.json") for k, f in PARSE.items()
           if (cdir / k / "config.json").exists()}
    missing = [k for k in ("transformer", "vae", "text_encoder", "text_encoder_2") if k not in out]
    if missing or not (cdir / "scheduler" / "scheduler_config.json").exists():
        raise ModelError(f"--original-config {cdir}: not an SD3 diffusers folder (no {(missing or ['scheduler'])[0]}/"
                         f"{'config.json' if missing else 'scheduler_config.json'})")
    return {**out, "scheduler": flow_config(cdir / "scheduler")}


def _tokenizers(cdir: Path | None, tokenizer: str | None, file: Path) -> dict:
    folder = vocabulary_folder(cdir, tokenizer, file, FAMILY, "tokenizer/, tokenizer_2/, tokenizer_3/")
    return {"tokenizer": load_tokenizer(folder / "tokenizer"), "tokenizer_2": load_tokenizer(folder / "tokenizer_2"),
            "tokenizer_3": load_t5_tokenizer(folder / "tokenizer_3") if (folder / "tokenizer_3").is_dir() else None}


def _encoder(sd, name, cfgs, cdir, file, used, dtype, what):
    """A CLIP from the file when it holds one, else from --original-config's folder."""
    slot = next(s for s in FAMILY.encoders if s.name == name)
    if slot.original + "embeddings.token_embedding.weight" in sd:
        projection = slot.original.removesuffix("text_model.") + "text_projection.weight"
        width = cfgs[name].width
        if projection not in sd and cfgs[name].projection_dim == width:  # some of Stability's files leave CLIP-L's
            sd = {**sd, projection: torch.eye(width)}                    # out: it is the identity (as diffusers)
        shapes = {k: v.shape for k, v in _meta(clip.CLIPTextModel, cfgs[name]).state_dict().items()}
        weights = _take(sd, key_table(encoder_rows(slot, cfgs[name]), shapes), shapes, used, file, what)
        return build(clip.CLIPTextModel, cfgs[name], weights, str(file), dtype)
    if cdir is not None and (cdir / name).is_dir():
        return load_text_encoder(cdir / name, dtype=dtype)
    raise ModelError(f"{file}: holds no {slot.token_key} text encoder ({slot.original}…); give its file with "
                     f"--text-encoders (ComfyUI's {slot.token_key}), or --original-config with an SD3 diffusers folder "
                     f"that has {name}/")


def _t5(sd, cfgs, cdir, file, used, dtype, wanted: bool):
    """T5 from the file when it holds it, else from --original-config's folder; None with --no-t5 (its keys then
    unread)."""
    mine = {k.removeprefix(T5_PREFIX): v for k, v in sd.items() if k.startswith(T5_PREFIX)}
    used |= {T5_PREFIX + k for k in mine}
    if not wanted:
        return None
    if mine:
        config = cfgs.get("text_encoder_3") or t5.PRESETS["t5-v1_1-xxl"]  # the one SD3 ships
        return build(t5.T5EncoderModel, config, t5_state(mine), str(file), dtype)
    if cdir is not None and (cdir / "text_encoder_3").is_dir():
        return load_t5(cdir / "text_encoder_3", dtype=dtype)
    raise ModelError(f"{file}: holds no T5 text encoder ({T5_PREFIX}…); give its file with --text-encoders (ComfyUI's "
                     f"t5xxl), or --original-config with an SD3 diffusers folder that has text_encoder_3/, or --no-t5 "
                     f"to run without it")


def with_separate_encoders(sd: dict, files: tuple[str, ...], file: Path, cfgs: dict, allow_pickle: bool = False,
                           t5_wanted: bool = True) -> tuple[dict, dict]:
    """ComfyUI keeps SD3's text encoders as files of their own (clip_l.safetensors, clip_g.safetensors,
    t5xxl_fp16.safetensors), each in transformers' layout: each is told apart by its keys and width, then read as if
    the single file held it (under its `text_encoders.` prefix), by the same tables. Returns the weights and each
    added prefix's file (to name it in an error)."""
    sd, by_width, origins = dict(sd), {cfgs[slot.name].width: slot for slot in FAMILY.encoders}, {}
    for f in files:
        if not Path(f).is_file():
            raise ModelError(f"--text-encoders {f}: {'not a file' if Path(f).exists() else 'no such file'}")
        part = read_weights(Path(f), allow_pickle)
        token = part.get("text_model.embeddings.token_embedding.weight")
        if any(k.startswith("encoder.block.") for k in part):
            prefix, kind = T5_PREFIX, "T5 (t5xxl)"
        elif token is not None and token.dim() == 2 and token.shape[1] in by_width:  # CLIP-L: 768, CLIP-G: 1280
            slot = by_width[token.shape[1]]
            prefix, kind = slot.original.removesuffix("text_model."), f"CLIP ({slot.token_key})"
        else:
            raise ModelError(f"--text-encoders {f}: not a CLIP-L, CLIP-G or T5 text encoder in transformers' layout "
                             f"(ComfyUI's clip_l, clip_g, t5xxl files)")
        if prefix == T5_PREFIX and not t5_wanted:
            raise ModelError(f"--text-encoders {f}: a T5 file, which --no-t5 leaves unread; drop one of the two")
        if any(k.startswith(prefix) for k in sd):
            raise ModelError(f"--text-encoders {f}: a {kind} is already given (in {file} or another file); give "
                             f"each text encoder once")
        sd.update({prefix + k: v for k, v in part.items() if not k.endswith("position_ids")})
        origins[prefix] = f
    return sd, origins


def load_sd3_single_file(file: Path, sd: dict, dtype=None, tokenizer: str | None = None, config: str | None = None,
                         preset: str | None = None, t5_wanted: bool = True, text_encoders: tuple[str, ...] = (),
                         allow_pickle: bool = False) -> StableDiffusion:
    """An SD3 single file as one StableDiffusion: configs (`_configs`), the MMDiT and VAE by the key tables, the
    text encoders from the file, the separate files (ComfyUI's) or --original-config's folder; every key used,
    strictly."""
    encoders_inside = text_encoders or FAMILY.encoders[0].original + "embeddings.token_embedding.weight" in sd
    cdir = resolve(config, weights=not encoders_inside) if config else None  # its weights: only to take encoders
    what = f"the architecture in {config}" if config else "an SD3 checkpoint (pass --original-config for another)"
    cfgs, used = _configs(sd, file, cdir, preset), set()
    sd, origins = with_separate_encoders(sd, text_encoders, file, cfgs, allow_pickle, t5_wanted)
    check_parts(file, cfgs)
    parts = {}
    for name, cls, table in (("transformer", mmdit.SD3Transformer2DModel, mmdit_table),
                             ("vae", vae.AutoencoderKL, lambda c, keys: key_table(vae_rows(c), keys))):
        shapes = {k: v.shape for k, v in _meta(cls, cfgs[name]).state_dict().items()}
        parts[name] = build(cls, cfgs[name], _take(sd, table(cfgs[name], shapes), shapes, used, file, what),
                            str(file), dtype)
    for name in ("text_encoder", "text_encoder_2"):
        parts[name] = _encoder(sd, name, cfgs, cdir, file, used, dtype, what)
    text_encoder_3 = _t5(sd, cfgs, cdir, file, used, dtype, t5_wanted)
    unused = [k for k in sd if k not in used]
    if unused:
        prefix = next((p for p in origins if unused[0].startswith(p)), "")  # a key of a --text-encoders file
        source = f"--text-encoders {origins[prefix]}" if prefix else file
        raise ModelError(f"{source}: unexpected key {unused[0].removeprefix(prefix)!r}" + (
            f" and {len(unused) - 1} more" if len(unused) > 1 else "") + f"; is it {what}?")
    toks = _tokenizers(cdir, tokenizer, file)
    if text_encoder_3 is not None and toks["tokenizer_3"] is None:
        raise ModelError(f"{file}: T5 needs its tokenizer (tokenizer_3/); pass --original-config or --tokenizer with "
                         f"one")
    return StableDiffusion(**{**toks, "tokenizer_3": toks["tokenizer_3"] if text_encoder_3 is not None else None},
                           **parts, text_encoder_3=text_encoder_3, scheduler=cfgs["scheduler"], source=str(file),
                           family=FAMILY)


def to_sd3_single_file(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our state dicts in Stability's layout (the inverse of the tables): the MMDiT, the VAE, both CLIPs and T5."""
    out, chunks = {}, {}
    encoders = {name: te for name, _, te in model.text_encoders()}
    parts = [(model.denoiser, mmdit_table(model.denoiser.config, model.denoiser.state_dict())),
             (model.vae, key_table(vae_rows(model.vae.config), model.vae.state_dict()))]
    parts += [(encoders[s.name], key_table(encoder_rows(s, encoders[s.name].config), encoders[s.name].state_dict()))
              for s in FAMILY.encoders]
    for net, table in parts:
        for k, v in net.state_dict().items():
            theirs, how = table[k]
            if isinstance(how, tuple):
                chunks.setdefault(theirs, [None] * 3)[how[1]] = v
            elif how == "swap":
                out[theirs] = torch.cat(v.chunk(2, dim=0)[::-1])
            elif how == "conv1x1" and v.ndim == 2:
                out[theirs] = v[:, :, None, None]
            else:
                out[theirs] = v
    out.update({k: torch.cat(parts_, dim=0) for k, parts_ in chunks.items()})
    if model.text_encoder_3 is not None:
        out.update({T5_PREFIX + k: v for k, v in model.text_encoder_3.state_dict().items()})
    return out


def architecture_json(model: StableDiffusion) -> str:
    """What an SD3 folder's configs say, in one JSON string: a file that carries it loads without --original-config."""
    d = {"transformer": {"_class_name": "SD3Transformer2DModel", **asdict(model.denoiser.config)},
         "vae": vae_config_json(model.vae.config), "scheduler": model.scheduler.to_dict(),
         **{name: clip_config_json(te.config, tok) for name, tok, te in model.text_encoders()}}
    if model.text_encoder_3 is not None:
        d["text_encoder_3"] = t5_config_json(model.text_encoder_3.config)
    return json.dumps(d)


def save_sd3_single_file(model: StableDiffusion, file: Path, dtype: torch.dtype | None = None):
    meta = {**modelspec(model), ARCHITECTURE: architecture_json(model)}
    save_safetensors(to_sd3_single_file(model), Path(file), metadata=meta, dtype=dtype)
