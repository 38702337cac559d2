"""The original single-file checkpoint layout (CompVis/Stability `*.ckpt` → `*.safetensors`, what
A1111 and ComfyUI load), mapped to and from our (diffusers) names through one table.

The table is built per config from our own state-dict keys, so every parameter we have maps to
exactly one original key; reading asserts that every original key was used (or is on a short,
named ignore list) and that every shape matches.

    ours                                   original
    down_blocks.1.resnets.0.norm1.weight   model.diffusion_model.input_blocks.4.0.in_layers.0.weight
    encoder.mid_block.attentions.0.to_q    first_stage_model.encoder.mid.attn_1.q   (1x1 conv there)
    encoder.layers.3.self_attn.q_proj      cond_stage_model.model.transformer.resblocks.3.attn.in_proj
                                           (SD 2.x: the first third of the fused projection)
    add_embedding.linear_1                 model.diffusion_model.label_emb.0.0   (SDXL)
    text_encoder_2: text_projection        conditioner.embedders.1.model.text_projection  (SDXL, transposed)
"""
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minidream.formats.configs import (PARSE, check_conditioning, clip_config_json, load_tokenizer, read_configs,
                                       unet_config_json, vae_config_json)
from minidream.formats.files import (ModelError, build, on_meta, read_json, read_metadata, read_weights, resolve,
                                     save_safetensors)
from minidream.models import clip, unet, vae
from minidream.models.stable_diffusion import (FAMILIES, MODELSPEC_PREDICTION, PRESETS, Family, StableDiffusion,
                                              TextEncoderSlot)
from minidream.models.noise_schedule import SchedulerConfig
from minidream.models.tokenizer import CLIPTokenizer
from minidream.sampling.samplers import zero_snr_schedule

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# each family's text encoders, their prefixes and layouts in these files: the rows of stable_diffusion.FAMILIES

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# Keys of the original files that hold nothing we use: EMA copies and the DDPM schedule buffers
# (we rebuild those from the scheduler config), OpenCLIP's projection head and unused last layer.
IGNORED = re.compile(r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus|posterior_|"
                     r"model_ema$|lvlb_weights$|logvar$|v_pred$|ztsnr$|"
                     r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.embeddings\.position_ids$|"
                     r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)$|"
                     r"conditioner\.embedders\.1\.model\.(logit_scale|attn_mask)$)")


def unet_rows(config: unet.UNetConfig):
    """(our prefix, original prefix, renames inside the module) for every UNet module."""
    lpb, n = config.layers_per_block, len(config.channels)
    rows = [("conv_in.", "input_blocks.0.0.", {}), ("time_embedding.linear_1.", "time_embed.0.", {}),
            ("time_embedding.linear_2.", "time_embed.2.", {}), ("conv_norm_out.", "out.0.", {}),
            ("conv_out.", "out.2.", {}),
            ("mid_block.resnets.0.", "middle_block.0.", RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
            ("mid_block.resnets.1.", "middle_block.2.", RESNET),
            ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {})]
    for i in range(n):
        for j in range(lpb):  # input_blocks counts every resnet(+transformer) and every downsampler
            b = 1 + i * (lpb + 1) + j
            rows += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{b}.0.", RESNET),
                     (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{b}.1.", {})]
        rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.", {}))
        for j in range(lpb + 1):
            b = i * (lpb + 1) + j
            rows += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{b}.0.", RESNET),
                     (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{b}.1.", {})]
        # the upsampler sits after the resnet (and the transformer, where the stage has one)
        slot = 2 if config.attention[n - 1 - i] else 1
        rows.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.", {}))
    return [(a, UNET + b, r) for a, b, r in rows]


def unet_original_name(config: unet.UNetConfig, name: str) -> str:
    """Our UNet module name -> the original checkpoint's, without `model.diffusion_model.` (LoRA files of
    kohya's SDXL networks use these: down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in)."""
    dotted = name + "."
    for ours, orig, renames in sorted(unet_rows(config), key=lambda row: -len(row[0])):  # longest prefix first
        if dotted.startswith(ours):
            rest = dotted[len(ours):]
            rest = next((renames[k] + rest[len(k):] for k in renames if rest.startswith(k + ".")), rest)
            return (orig.removeprefix(UNET) + rest).rstrip(".")
    return name


def vae_rows(config: vae.VAEConfig):
    n = len(config.channels)
    rows = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                 (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                 (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                 (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                 (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTN)]
    for i in range(n):
        for j in range(config.layers_per_block):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        # the original decoder numbers its stages from the bottom (lowest resolution = highest index)
        for j in range(config.layers_per_block + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET))
        rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", {}))
    return [(a, VAE + b, r) for a, b, r in rows]


def clip_rows(config: clip.CLIPConfig, prefix: str, openclip: bool):
    if not openclip:  # transformers' own names under a prefix
        return [("", prefix, {})]
    rows = [("embeddings.token_embedding.", prefix + "token_embedding.", {}),
            ("final_layer_norm.", prefix + "ln_final.", {})]
    rows += [(f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}.", OPENCLIP_LAYER)
             for i in range(config.layers)]
    return rows


def key_table(rows, our_keys, openclip: str | None = None) -> dict[str, tuple[str, object]]:
    """our key -> (original key, how): how is None (copy), "conv1x1", "transpose" or ("chunk", i) of the fused
    in_proj. `openclip`: the prefix of an OpenCLIP text tower, whose few bare tensors are named here."""
    table = {}
    for k in our_keys:
        if openclip and k == "embeddings.position_embedding.weight":
            table[k] = (openclip + "positional_embedding", None)  # a bare parameter in OpenCLIP
            continue
        if openclip and k == "text_projection.weight":  # OpenCLIP computes x @ P: P is our weight transposed
            table[k] = (openclip + "text_projection", "transpose")
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if openclip and m:
            table[k] = (f"{openclip}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", ("chunk", "qkv".index(m[2])))
            continue
        matching = [r for r in rows if k.startswith(r[0])]
        ours, theirs, renames = max(matching, key=lambda r: len(r[0]), default=(None,) * 3)  # the longest prefix
        if ours is None:
            raise AssertionError(f"no single-file mapping for {k}")  # a bug in the table, not in the user's file
        rest = k[len(ours):]
        for a, b in renames.items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
                break
        how = "conv1x1" if renames is VAE_ATTN and rest.endswith("weight") and not rest.startswith("norm.") else None
        table[k] = (theirs + rest, how)
    return table


def match_rule(rules, key: str) -> tuple[str, list, object]:
    """(their key's template, the groups, how to take it) of the first row of a layout's rules, (our key's pattern,
    their key, how), whose pattern matches `key` in full; a key of ours without a row is a bug in the rules."""
    for pattern, theirs, how in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return theirs, list(m.groups()), how
    raise AssertionError(f"no single-file mapping for {key}")


def vocabulary_folder(cdir: Path | None, tokenizer: str | None, file: Path, fam: Family, folders: str) -> Path:
    """Where a single file's tokenizers are: --original-config's folder, else --tokenizer's, else the family's hub repo
    (`folders`: the subfolders it must have, for the one-line error)."""
    if cdir is not None:
        return cdir
    try:
        return resolve(tokenizer or fam.tokenizer_repo, weights=False)
    except ModelError as e:
        raise ModelError(f"{file}: a single file holds no tokenizer, and the official one ({fam.tokenizer_repo}) is "
                         f"not here and could not be fetched; pass --original-config (a {fam.title} diffusers folder) "
                         f"or --tokenizer FOLDER (one with {folders})") from e


def _take(sd, table, want_shapes, used, file, what: str = ""):
    out = {}
    for k, (orig, how) in table.items():
        if orig not in sd:
            raise ModelError(f"{file}: missing key {orig!r} (for {k}, expected shape {list(want_shapes[k])}); "
                             f"is it {what}?")
        t = sd[orig]
        if isinstance(how, tuple):  # ("chunk", i): the i-th third; ("chunk", i, j, n): blocks i..j-1 of n
            i, j, n = (how[1], how[1] + 1, 3) if len(how) == 2 else how[1:]
            t = torch.cat(t.chunk(n, dim=0)[i:j])
        elif how == "conv1x1" and t.ndim == 4:
            t = t[:, :, 0, 0]
        elif how == "transpose":
            t = t.T
        elif how == "swap":  # (shift, scale) halves -> (scale, shift): SD3's adaLN-continuous order
            t = torch.cat(t.chunk(2, dim=0)[::-1])
        if tuple(t.shape) != tuple(want_shapes[k]):
            raise ModelError(f"{file}: key {orig!r} has shape {list(t.shape)}, expected {list(want_shapes[k])} "
                             f"(for {k}); is it {what}?")
        out[k] = t
        used.add(orig)
    return out


def _meta(cls, config):
    with on_meta():
        return cls(config)


# SD 2.x-base (512 px, ε-prediction) and SD 2.x (768 px, v-prediction) have identical tensors: only the
# file's metadata (the "modelspec" keys that Stability's and our exports write) can tell them apart.
def sd2_preset(file: Path) -> str:
    meta = read_metadata(file)
    variants = FAMILIES["sd2"].variants
    by_name = {v.modelspec: v.preset for v in variants}
    by_prediction = {spelling: v.preset for v in variants
                     for spelling in (v.prediction, MODELSPEC_PREDICTION[v.prediction])}  # "v" or "v_prediction"
    preset = (by_name.get(meta.get("modelspec.architecture", ""))
              or by_prediction.get(meta.get("modelspec.prediction_type", "")))
    if preset is None:
        raise ModelError(f"{file}: an SD 2.x checkpoint, which may be 2.x-base (512 px, epsilon) or 2.x-v (768 px, "
                         f"v-prediction) with the same tensors, and its metadata does not say which; pass --preset "
                         f"sd21-base or --preset sd21 (or --original-config with its diffusers folder)")
    return preset


def family(sd: dict, file: Path) -> Family:
    """The family whose text encoders the file holds (their token tables are where every full checkpoint has them)."""
    for fam in FAMILIES.values():
        if all(token_table_key(slot) in sd for slot in fam.encoders):
            return fam
    raise ModelError(f"{file}: no text encoder keys (cond_stage_model.*, conditioner.embedders.*); not a full "
                     f"SD 1.x/2.x/XL single-file checkpoint")


def token_table_key(slot: TextEncoderSlot) -> str:
    return slot.original + ("token_embedding.weight" if slot.openclip else "embeddings.token_embedding.weight")


def tokenizers(folder: Path, encoders: int) -> dict:
    """The tokenizer(s) in a folder: its tokenizer/ (and tokenizer_2/) subfolders, or the folder itself. SDXL's
    second tokenizer, when the folder has none, is the first one padding with "!", as the official repo ships."""
    tok = load_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
    if encoders == 1:
        return {"tokenizer": tok}
    if (folder / "tokenizer_2").is_dir():
        return {"tokenizer": tok, "tokenizer_2": load_tokenizer(folder / "tokenizer_2")}
    return {"tokenizer": tok, "tokenizer_2": CLIPTokenizer(tok.vocab, tok.merges, "!", tok.max_length, tok.added)}


def vocabulary(file: Path, tokenizer: str | None, fam: Family) -> Path:
    """Where a single file's vocabulary comes from: --tokenizer, else the family's official hub repo (a single file
    has none of its own); not found, the error says so and names --tokenizer."""
    try:
        return resolve(tokenizer or fam.tokenizer_repo, weights=False)
    except ModelError as e:
        if tokenizer:
            raise
        raise ModelError(f"{file}: a single file holds no tokenizer, and the official one ({fam.tokenizer_repo}) "
                         f"is not here and could not be fetched; pass --tokenizer FOLDER (a tokenizer folder or "
                         f"the base model's)") from e


@dataclass(frozen=True)
class Architecture:
    """What a single file does not hold: its components' configs, its scheduler, its vocabulary's folder."""
    configs: dict
    scheduler: SchedulerConfig
    force_zeros: bool
    tokenizer_dir: Path
    what: str  # where it came from, for an error about the file's keys


def architecture_of(file: Path, fam: Family, tokenizer: str | None, preset: str | None,
                    config: str | None) -> Architecture:
    """The first of: --original-config (a diffusers-layout folder or repo id: its configs, scheduler and tokenizer); the
    architecture our exports write into their metadata; --preset, or the preset the family's keys imply."""
    if config is not None:
        cdir = resolve(config, weights=False)
        cfgs, scheduler = read_configs(cdir)
        if ("text_encoder_2" in cfgs) != (len(fam.encoders) == 2):
            raise ModelError(f"{file}: an {fam.title} checkpoint, but --original-config {config} describes "
                             f"{'an SDXL' if 'text_encoder_2' in cfgs else 'an SD 1.x/2.x'} model")
        index = read_json(cdir / "model_index.json") if (cdir / "model_index.json").exists() else {}
        return Architecture(cfgs, scheduler, index.get("force_zeros_for_empty_prompt", True), cdir,
                            f"the architecture in {config}")
    if preset is None and ARCHITECTURE in read_metadata(file):  # our own export says what it is
        cfgs, scheduler, force_zeros = architecture(file, read_metadata(file)[ARCHITECTURE])
        return Architecture(cfgs, scheduler, force_zeros, vocabulary(file, tokenizer, fam),
                            "the architecture in its metadata (pass --original-config to override it)")
    preset = preset or fam.single_file_preset or sd2_preset(file)
    if preset not in PRESETS:
        raise ModelError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfgs = {"unet": p.unet, "vae": p.vae, "text_encoder": p.text_encoder,
            **({"text_encoder_2": p.text_encoder_2} if p.text_encoder_2 else {})}
    return Architecture(cfgs, p.scheduler, True, vocabulary(file, tokenizer, fam),
                        f"a {preset} checkpoint (pass --preset or --original-config)")


def load_single_file(file: Path, allow_pickle=False, dtype=None, tokenizer: str | None = None,
                     preset: str | None = None, config: str | None = None, sd: dict | None = None) -> StableDiffusion:
    """A single-file checkpoint as one StableDiffusion: its family from its keys, its architecture from
    `architecture_of`, then every component's weights taken from the file by the key tables, strictly.
    `sd`: the file's tensors, when the caller has read them."""
    sd = read_weights(file, allow_pickle) if sd is None else sd
    fam = family(sd, file)
    arch = architecture_of(file, fam, tokenizer, preset, config)
    cfgs, used, parts = arch.configs, set(), {}
    texts = [(s.name, clip.CLIPTextModel, clip_rows(cfgs[s.name], s.original, s.openclip),
              s.original if s.openclip else None) for s in fam.encoders if s.name in cfgs]
    for name, cls, rows, openclip in [("unet", unet.UNet2DConditionModel, unet_rows(cfgs["unet"]), None),
                                      ("vae", vae.AutoencoderKL, vae_rows(cfgs["vae"]), None), *texts]:
        shapes = {k: v.shape for k, v in _meta(cls, cfgs[name]).state_dict().items()}
        weights = _take(sd, key_table(rows, shapes, openclip), shapes, used, file, arch.what)
        parts[name] = build(cls, cfgs[name], weights, str(file), dtype)
    for s in fam.encoders:
        if s.unused_last_layer:  # the layer after the one the family reads is stored, and unused
            used |= {k for k in sd if k.startswith(f"{s.original}transformer.resblocks.{cfgs[s.name].layers}.")}
    unused = [k for k in sd if k not in used and not IGNORED.match(k)]
    if unused:
        raise ModelError(f"{file}: unexpected key {unused[0]!r}" + (f" and {len(unused) - 1} more" if len(unused) > 1
                                                                     else "") + f"; is it {arch.what}?")
    model = StableDiffusion(**tokenizers(arch.tokenizer_dir, len(fam.encoders)), **parts, scheduler=marked(arch, sd),
                            source=str(file), force_zeros_for_empty_prompt=arch.force_zeros and fam.zero_negative,
                            family=fam)
    te2 = model.text_encoder_2 and model.text_encoder_2.config
    check_conditioning(file, model.denoiser.config, model.text_encoder.config, te2)
    return model


# Empty tensors that kohya's exports and the v-prediction SDXL fine-tunes (NoobAI-XL, ...) carry, which ComfyUI and
# Forge read: the model predicts v; its schedule is rescaled to zero terminal SNR (Lin et al. 2024)
V_PRED, ZTSNR = "v_pred", "ztsnr"


def marked(arch: Architecture, sd: dict) -> SchedulerConfig:
    """The file's schedule: the architecture's, as the file's markers state it."""
    schedule = arch.scheduler
    if V_PRED in sd:
        schedule = replace(schedule, prediction_type="v_prediction")
    return zero_snr_schedule(schedule) if ZTSNR in sd else schedule


def markers(model: StableDiffusion) -> dict[str, torch.Tensor]:
    return {**({V_PRED: torch.tensor([])} if model.scheduler.prediction_type == "v_prediction" else {}),
            **({ZTSNR: torch.tensor([])} if model.scheduler.rescale_betas_zero_snr else {})}


def to_single_file(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our state dicts in the original layout (the inverse of load_single_file's table)."""
    out: dict[str, torch.Tensor] = {}
    chunks: dict[str, list] = {}
    encoders = {name: te for name, _, te in model.text_encoders()}
    texts = [(encoders[s.name], clip_rows(encoders[s.name].config, s.original, s.openclip),
              s.original if s.openclip else None) for s in model.family.encoders]
    for m, rows, openclip in [(model.denoiser, unet_rows(model.denoiser.config), None),
                              (model.vae, vae_rows(model.vae.config), None), *texts]:
        sd = m.state_dict()
        for k, (orig, how) in key_table(rows, sd, openclip).items():
            t = sd[k].detach()
            if isinstance(how, tuple):
                chunks.setdefault(orig, [None] * 3)[how[1]] = t
            else:
                out[orig] = t[:, :, None, None] if how == "conv1x1" else t.T if how == "transpose" else t
    for orig, parts in chunks.items():
        out[orig] = torch.cat(parts, dim=0)
    return {**{k: v.contiguous() for k, v in out.items()}, **markers(model)}


def modelspec(model: StableDiffusion) -> dict[str, str]:
    """The metadata that lets a reader (us, ComfyUI, A1111) tell the family and the prediction type; the
    architecture's name only for a model of the official architecture (a tiny or custom one would mislead)."""
    side = model.native_resolution
    meta = {"modelspec.sai_model_spec": "1.0.0", **model.modelspec, "modelspec.resolution": f"{side}x{side}"}
    if model.variant is None or model.version != model.variant.preset:
        del meta["modelspec.architecture"]
    return meta


# our exports' metadata key holding the whole architecture: the components' diffusers configs and the scheduler's
ARCHITECTURE = "minidream.architecture"


def stored_architecture(file: Path, parse) -> dict | None:
    """`parse` of the architecture our exports write into a single file's metadata (None where it has none): the
    SD3 and Flux files' configs. Metadata that does not parse is one line naming the file."""
    stored = read_metadata(file).get(ARCHITECTURE)
    if not stored:
        return None
    try:
        return parse(json.loads(stored))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{file}: its {ARCHITECTURE} metadata is not usable ({type(e).__name__}: {e}); pass "
                         f"--original-config or --preset") from None


def architecture_json(model: StableDiffusion) -> str:
    """What a diffusers folder's configs say, in one JSON string: a file that carries it loads without
    --original-config."""
    d = {"unet": unet_config_json(model.denoiser.config), "vae": vae_config_json(model.vae.config),
         **{name: clip_config_json(te.config, tok) for name, tok, te in model.text_encoders()},
         "scheduler": model.scheduler.to_dict(), "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt}
    return json.dumps(d)


def architecture(file: Path, text: str) -> tuple[dict, SchedulerConfig, bool]:
    """(the component configs, the scheduler config, force_zeros) from an ARCHITECTURE metadata entry."""
    try:
        d = json.loads(text)
        cfgs = {k: f(d[k], file) for k, f in PARSE.items() if k in d}
        return cfgs, SchedulerConfig.from_dict(d["scheduler"]).check(), bool(d.get("force_zeros_for_empty_prompt"))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{file}: its {ARCHITECTURE} metadata is not usable ({type(e).__name__}: {e}); pass "
                         f"--original-config or --preset") from None


def save_single_file(model: StableDiffusion, file: Path, dtype: torch.dtype | None = None):
    meta = {**modelspec(model), ARCHITECTURE: architecture_json(model)}
    save_safetensors(to_single_file(model), Path(file), metadata=meta, dtype=dtype)
