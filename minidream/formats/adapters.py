"""What other tools trained, applied to a loaded model: LoRA files merged into the weights, textual-inversion
embeddings added to the vocabulary. Each is a function that transforms a loaded StableDiffusion; sampling then
runs the plain model, so nothing here touches the model files.

LoRA (Hu et al. 2021): W' = W + s·(α/r)·B A for a file at strength s. Formats read:
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, SDXL's `text_encoder_2.`
  likewise), and the older
  attention-processor names (`attn1.processor.to_q_lora.down.weight`, `.lora.down.`, `.lora_linear_layer.down.`);
  α and r from the file's `lora_adapter_metadata` (PEFT's r, lora_alpha, rank_pattern, alpha_pattern, use_rslora)
  or `<module>.alpha` keys, else α = r.
- kohya / LyCORIS LoCon: `lora_unet_<module>` and `lora_te_<module>` (or `lora_te1_`, SDXL's `lora_te2_`) with `.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; modules named as in diffusers (kohya's SD 1.x/2.x networks) or as in the original
  UNet (`input_blocks_4_1_proj_in`). A convolution's adapter (3×3 resnet convs, 1×1 proj_in/out, up/downsamplers)
  is a down conv (r, in, kh, kw) then a 1×1 up conv (out, r): the merged ΔW sums over r and keeps the kernel.
Anything else in a file (DoRA's dora_scale, LyCORIS LoHa/LoKr, Tucker `lora_mid`) is refused by name.
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from minidream.formats.files import ModelError, read_metadata, read_weights
from minidream.formats.single_file import unet_original_name

# the text encoder's attention projections under the old attention-processor names
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _some(keys, n=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _diffusers_pairs(sd: dict, file) -> tuple[dict, dict, set]:
    """{(component, module): [down, up]}, {(component, module): α} and the keys used, for diffusers/PEFT
    key names."""
    pairs, alphas, used = {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.alpha", k)
        if m:
            alphas[(m[1], m[2].replace(".processor.", ".").removeprefix("text_model."))] = float(v)
            used.add(k)
            continue
        n = k.replace(".processor.", ".")
        n = re.sub(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.", lambda g: f".{g[1]}.lora.{g[2]}.", n)
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up|"
                         r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight", n)
        if not m:
            continue
        comp, name = m[1], m[2].removeprefix("text_model.")
        if comp != "unet":  # the processor names use to_q.. for CLIP's q_proj..
            name = re.sub(r"self_attn\.(to_q|to_k|to_v|to_out)$", lambda g: "self_attn." + _TE_PROJ[g[1]], name)
        elif name.endswith(".to_out"):
            name += ".0"
        side = 0 if m[3] in ("lora_A", "lora.down", "lora_linear_layer.down") else 1
        pairs.setdefault((comp, name), [None, None])[side] = v
        used.add(k)
    return pairs, alphas, used


def _kohya_pairs(sd: dict, file) -> tuple[dict, dict, set]:
    pairs, alphas, used = {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(r"lora_(unet|te|te1|te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", k)
        if not m:
            continue
        comp = {"unet": "unet", "te2": "text_encoder_2"}.get(m[1], "text_encoder")
        name = m[2].removeprefix("text_model_") if comp != "unet" else m[2]
        if m[3] == "alpha":
            alphas[(comp, name)] = float(v)
        else:
            pairs.setdefault((comp, name), [None, None])[0 if m[3].startswith("lora_down") else 1] = v
        used.add(k)
    return pairs, alphas, used


def _peft_alpha(meta: dict, comp: str, name: str, rank: int) -> float | None:
    """α/r of a module as given by the `lora_adapter_metadata` that diffusers writes (PEFT LoraConfig fields,
    prefixed by component), or None when the file has none."""
    cfg = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(comp + ".")}
    if not cfg:
        return None
    if cfg.get("use_dora"):
        raise ModelError("DoRA adapters (use_dora) are not supported")

    def pick(patterns: dict, default):
        for p, val in (patterns or {}).items():
            if re.fullmatch(rf"(.*\.)?{p}", name):
                return val
        return default
    r = pick(cfg.get("rank_pattern"), cfg.get("r", rank))
    alpha = pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def lora_deltas(file: Path, allow_pickle: bool = False) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module name as the file spells it) -> (α/r)·up·down, shaped (out, in·kh·kw)."""
    sd = read_weights(Path(file), allow_pickle)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{file}: not a LoRA file (expected a flat dict of tensors)")
    kohya = any(k.startswith("lora_") for k in sd)
    pairs, alphas, used = (_kohya_pairs if kohya else _diffusers_pairs)(sd, file)
    unknown = set(sd) - used
    if unknown:
        kind = " (DoRA)" if any("dora_scale" in k for k in unknown) else \
            " (LyCORIS LoHa/LoKr/Tucker)" if any(re.search(r"hada_|lokr_|lora_mid", k) for k in unknown) else ""
        raise ModelError(f"{file}: keys this LoRA loader does not know{kind}: {_some(unknown)}")
    if not pairs:
        raise ModelError(f"{file}: no LoRA weights found (expected diffusers `unet.*.lora_A.weight` or kohya "
                         f"`lora_unet_*` keys)")
    meta = json.loads(read_metadata(file).get("lora_adapter_metadata", "{}") or "{}")
    out = {}
    for (comp, name), (down, up) in pairs.items():
        if down is None or up is None:
            raise ModelError(f"{file}: {comp} module {name} has only one of its two LoRA matrices; "
                             f"the file is incomplete")
        r = down.shape[0]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != r or up.shape[2:] not in ((), (1, 1)):
            raise ModelError(f"{file}: {comp} module {name}: down {list(down.shape)} and up {list(up.shape)} "
                             f"are not a LoRA pair")
        scale = _peft_alpha(meta, comp, name, r) if not kohya else None
        if scale is None:
            scale = alphas.get((comp, name), r) / r
        out[(comp, name)] = (up.flatten(1).float() @ down.flatten(1).float()) * scale
    return out


def _module_index(nets: dict) -> dict[str, dict[str, str]]:
    """Per component, every spelling of a module name a LoRA file may use -> our module name: dotted, kohya's
    underscores, and (UNet) the original checkpoint's input_blocks/middle_block/output_blocks names."""
    index = {}
    for comp, net in nets.items():
        names = [n for n, mod in net.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
        index[comp] = {s: n for n in names for s in (n, n.replace(".", "_"))}
    for n in list(index["unet"].values()):
        index["unet"].setdefault(unet_original_name(nets["unet"].cfg, n).replace(".", "_"), n)
    return index


def apply_loras(model, loras: list[tuple[Path, float]], allow_pickle: bool = False):
    """Merge each (file, strength) into the UNet and text encoder weights: W += s·ΔW, in order."""
    nets = {"unet": model.unet, **{name: te for name, _, te in model.text_encoders()}}
    index = _module_index(nets)
    for file, s in loras:
        deltas = lora_deltas(file, allow_pickle)
        resolved = []
        for (comp, name), d in deltas.items():  # check every module before changing any weight
            if comp not in nets:
                raise ModelError(f"{file}: it adapts a second text encoder ({comp}: an SDXL LoRA); this model has one")
            ours = index[comp].get(name) or index[comp].get(name.replace(".", "_"))
            w = nets[comp].get_submodule(ours).weight if ours else None
            if w is None or w.shape[0] != d.shape[0] or w.numel() != d.numel():
                shape = f" (LoRA {list(d.shape)} vs weight {list(w.shape)})" if w is not None else ""
                raise ModelError(f"{file}: LoRA module {comp}:{name} does not match this model{shape}")
            resolved.append((w, d.reshape(w.shape)))
        with torch.no_grad():
            for w, d in resolved:
                w += (s * d).to(w.dtype)
    return model


def read_embedding(file: Path, allow_pickle: bool = False) -> tuple[str | None, list[torch.Tensor]]:
    """(the token the file names, or None; vectors (n, dim) per text encoder) from a textual-inversion file: ours
    and diffusers' ({token: vector(s)}), A1111's .pt (`string_to_param` {"*": vectors}, `name`) and .safetensors
    (`emb_params`), and SDXL's two-encoder files ({"clip_l": .., "clip_g": ..}, the token in our metadata)."""
    sd = read_weights(Path(file), allow_pickle)
    if set(sd) == {"clip_l", "clip_g"}:
        token, vecs = read_metadata(Path(file)).get("token") if Path(file).suffix == ".safetensors" else None, \
            [sd["clip_l"], sd["clip_g"]]
    elif len(sd) == 1:
        token, vec = next(iter(sd.items()))
        token, vecs = None if token == "emb_params" else token, [vec]
    elif isinstance(sd.get("string_to_param"), dict) and "*" in sd["string_to_param"]:
        token, vecs = sd.get("name"), [sd["string_to_param"]["*"]]
    else:
        raise ModelError(f"{file}: not a textual-inversion embedding (expected one {{token: tensor}} entry, "
                         f"A1111's string_to_param, emb_params or SDXL's clip_l + clip_g); it has {_some(map(str, sd))}")
    if not all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.numel() for v in vecs):
        raise ModelError(f"{file}: the embedding is not a vector or a (vectors, width) matrix")
    vecs = [v.reshape(-1, v.shape[-1]) for v in vecs]
    if len({len(v) for v in vecs}) > 1:
        raise ModelError(f"{file}: clip_l and clip_g hold different numbers of vectors")
    return (token if isinstance(token, str) else None), vecs


def add_embedding(model, file: Path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
    """Add the file's vectors as new tokens, as diffusers' load_textual_inversion does: one token, or for n
    vectors `token`, `token_1`, … `token_{n-1}`, which a prompt's `token` expands to (SDXL: in both encoders).
    Returns the tokens."""
    named, vecs = read_embedding(file, allow_pickle)
    token = token or named or Path(file).stem
    encoders = model.text_encoders()
    if len(vecs) != len(encoders):
        raise ModelError(f"{file}: an embedding for {'SDXL (clip_l + clip_g)' if len(vecs) == 2 else 'one text encoder'}"
                         f", but this model has {len(encoders)} text encoder(s)")
    n = len(vecs[0])
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    for (_, tok, te), vec in zip(encoders, vecs):
        if vec.shape[1] != te.embeddings.token_embedding.weight.shape[1]:
            raise ModelError(f"{file}: embedding width {vec.shape[1]} does not match this text encoder's "
                             f"{te.embeddings.token_embedding.weight.shape[1]} (an embedding for another model family?)")
        for t in tokens:
            if t in tok.vocab or t in tok.added:
                raise ModelError(f"{file}: token {t!r} is already in the vocabulary; name another with --embedding-token")
    for (_, tok, te), vec in zip(encoders, vecs):
        ids = [tok.add_token(t) for t in tokens]
        tok.expand[ids[0]] = ids
        emb = te.embeddings.token_embedding
        grown = nn.Embedding(emb.num_embeddings + n, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            grown.weight[: emb.num_embeddings] = emb.weight
            grown.weight[emb.num_embeddings:] = vec.to(emb.weight)
        grown.requires_grad_(emb.weight.requires_grad)
        te.embeddings.token_embedding = grown
        te.cfg = replace(te.cfg, vocab_size=grown.num_embeddings)
    return tokens
