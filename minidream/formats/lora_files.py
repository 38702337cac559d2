"""Reading LoRA files: ours and others' (diffusers/PEFT, kohya, LyCORIS LoCon/LoHa/LoKr, DoRA in both layouts) are
merged into a loaded model's weights (`apply_loras`), after which sampling runs the plain model. (Ours are written
by lora_export.py.)

Read: W' = W + s·(α/r)·B A for a file at strength s.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, SDXL's `text_encoder_2.`
  likewise), and the older attention-processor names (`attn1.processor.to_q_lora.down.weight`, `.lora.down.`,
  `.lora_linear_layer.down.`); α and r from the file's `lora_adapter_metadata` (PEFT's r, lora_alpha, rank_pattern,
  alpha_pattern, use_rslora) or `<module>.alpha` keys, else α = r.
- kohya / LyCORIS LoCon: `lora_unet_<module>` and `lora_te_<module>` (or `lora_te1_`, SDXL's and SD3's `lora_te2_`,
  SD3's T5 `lora_te3_`) with `.lora_down.weight`, `.lora_up.weight` and `.alpha`; modules named as in diffusers
  (kohya's SD 1.x/2.x networks) or as in the original checkpoint (`input_blocks_4_1_proj_in`; SD3's
  `joint_blocks_0_x_block_attn_qkv`, Flux's `double_blocks_0_img_attn_qkv` and `single_blocks_0_linear1`, one pair
  for several of our modules: kohya_names.py). A convolution's adapter
  (3×3 resnet convs, 1×1 proj_in/out, up/downsamplers) is a down conv (r, in, kh, kw) then a 1×1 up conv (out, r):
  the merged ΔW sums over r and keeps the kernel.
- LyCORIS LoHa (`hada_w1_a/b`, `hada_w2_a/b`, Tucker `hada_t1/t2`) and LoKr (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2`
  or `lokr_w2_a/b`, Tucker `lokr_t2`) under kohya's names, linear and conv: lycoris_files.py, scaled as A1111 and
  ComfyUI scale them.
- XLabs' Flux LoRAs (`double_blocks.0.processor.qkv_lora1.down.weight`, …): read in diffusers' names (`_from_xlabs`).
- DoRA: diffusers' `<module>.lora_magnitude_vector`, kohya/LyCORIS' `<module>.dora_scale` beside any of these
  (lycoris_files.Decomposed).
Anything else in a file (Tucker LoRA's `lora_mid`, ...) is refused by name.
"""
import json
import math
import re
import sys
from pathlib import Path

import torch

from minidream.formats.files import ModelError, name_some, read_metadata, read_weights
from minidream.formats.kohya_names import Part, adapted_modules, kohya_spellings
from minidream.formats.lycoris_files import (KOHYA_COMPONENTS, Decomposed, LowRank, kohya_module, lycoris_delta,
                                             lycoris_modules)

# the components a diffusers LoRA file adapts (its keys' first part)
COMPONENTS = r"(unet|transformer|text_encoder|text_encoder_2)"
# the text encoder's attention projections under the old attention-processor names
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _diffusers_pairs(sd: dict, file) -> tuple[dict, dict, dict, set]:
    """{(component, module): [down, up]}, {(component, module): α}, {(component, module): DoRA magnitude} and the
    keys used, for diffusers/PEFT key names."""
    pairs, alphas, magnitudes, used = {}, {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(rf"{COMPONENTS}\.(.+)\.(alpha|lora_magnitude_vector(\.weight)?)", k)
        if m:
            key = (m[1], m[2].replace(".processor.", ".").removeprefix("text_model."))
            if m[3] == "alpha":
                alphas[key] = _alpha(v, k, file)
            else:
                magnitudes[key] = v.float()
            used.add(k)
            continue
        n = k.replace(".processor.", ".")
        n = re.sub(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.", lambda g: f".{g[1]}.lora.{g[2]}.", n)
        m = re.fullmatch(rf"{COMPONENTS}\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up|"
                         r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight", n)
        if not m:
            continue
        comp, name = m[1], m[2].removeprefix("text_model.")
        if comp.startswith("text_encoder"):  # the processor names use to_q.. for CLIP's q_proj..
            name = re.sub(r"self_attn\.(to_q|to_k|to_v|to_out)$", lambda g: "self_attn." + _TE_PROJ[g[1]], name)
        elif name.endswith(".to_out"):
            name += ".0"
        side = 0 if m[3] in ("lora_A", "lora.down", "lora_linear_layer.down") else 1
        pairs.setdefault((comp, name), [None, None])[side] = v
        used.add(k)
    return pairs, alphas, magnitudes, used


def _alpha(v: torch.Tensor, key: str, file) -> float:
    if v.numel() != 1 or not math.isfinite(float(v.reshape(-1)[0])):
        raise ModelError(f"{file}: {key} is not one finite number (shape {list(v.shape)})")
    return float(v.reshape(-1)[0])


def _kohya_pairs(sd: dict, file) -> tuple[dict, dict, dict, set]:
    pairs, alphas, magnitudes, used = {}, {}, {}, set()
    for k, v in sd.items():
        m = re.fullmatch(rf"lora_({'|'.join(KOHYA_COMPONENTS)})_(.+)\.(lora_down\.weight|lora_up\.weight|alpha|"
                         r"dora_scale)", k)
        if not m:
            continue
        comp, name = kohya_module(m[1], m[2])
        if m[3] == "alpha":
            alphas[(comp, name)] = _alpha(v, k, file)
        elif m[3] == "dora_scale":
            magnitudes[(comp, name)] = v.float()
        else:
            pairs.setdefault((comp, name), [None, None])[0 if m[3].startswith("lora_down") else 1] = v
        used.add(k)
    return pairs, alphas, magnitudes, used


def _peft_alpha(meta: dict, comp: str, name: str, rank: int) -> float | None:
    """α/r of a module as given by the `lora_adapter_metadata` that diffusers writes (PEFT LoraConfig fields,
    prefixed by component), or None when the file has none."""
    config = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(comp + ".")}
    if not config:
        return None

    def pick(key: str, default):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise TypeError(f"{key} is not an object")
        for p, val in patterns.items():  # a text encoder's module is named with or without text_model.
            if any(re.fullmatch(rf"(.*\.)?{p}", n) for n in (name, f"text_model.{name}")):
                return val
        return default
    r = pick("rank_pattern", config.get("r", rank))
    alpha = pick("alpha_pattern", config.get("lora_alpha", r))
    if not r > 0:
        raise ValueError(f"r is {r}")
    return alpha / (r ** 0.5 if config.get("use_rslora") else r)


def checked_values(sd: dict, alphas: dict, file) -> dict:
    """Factors in floating point (a quantized file is refused in one line); α = 0, which would add nothing, read as
    α = r as kohya, LyCORIS and A1111 read it (said once). Returns the α that count."""
    quantized = [k for k, v in sd.items() if not v.is_floating_point() and not k.endswith(".alpha")]
    if quantized:
        raise ModelError(f"{file}: {name_some(quantized)} hold {sd[quantized[0]].dtype} values, not floating point "
                         f"(a quantized LoRA); save it in fp16, bf16 or fp32")
    zero = [key for key, a in alphas.items() if a == 0]
    if zero:
        print(f"warning: {file}: alpha 0 on {len(zero)} module(s), read as alpha = rank (as kohya, LyCORIS and "
              f"A1111 read it)", file=sys.stderr)
    return {key: a for key, a in alphas.items() if a != 0}


# XLabs' Flux LoRAs (x-flux): per block a fused Q/K/V pair and an output pair, `…_lora1` the image stream's and
# `…_lora2` the text's (the single blocks': one of each), at scale 1
XLABS = re.compile(r"(diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)\.(down|up)"
                   r"\.weight")
XLABS_MODULES = {("double", "qkv", "1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
                 ("double", "qkv", "2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 ("double", "proj", "1"): ("attn.to_out.0",), ("double", "proj", "2"): ("attn.to_add_out",),
                 ("single", "qkv", ""): ("attn.to_q", "attn.to_k", "attn.to_v"), ("single", "proj", ""): ("proj_out",)}


def _from_xlabs(sd: dict, file) -> dict:
    """An XLabs file in diffusers' names, as diffusers reads it: a fused pair's up split in equal row blocks, one per
    module, each over the same down (exact: the blocks of up·down are the modules' changes)."""
    out = {}
    for k, v in sd.items():
        m = XLABS.fullmatch(k)
        modules = XLABS_MODULES.get((m[2], m[4], m[5])) if m else None
        if modules is None:
            raise ModelError(f"{file}: {k}: not a key of XLabs' Flux LoRA layout (nor of another this loader knows)")
        block = "transformer_blocks" if m[2] == "double" else "single_transformer_blocks"
        parts = [v] * len(modules) if m[6] == "down" else v.chunk(len(modules))
        for module, part in zip(modules, parts):
            side = "lora_A" if m[6] == "down" else "lora_B"
            out[f"transformer.{block}.{m[3]}.{module}.{side}.weight"] = part
    return out


def lora_factors(file: Path, allow_pickle: bool = False) -> dict[tuple[str, str], object]:
    """(component, module name as the file spells it) -> its Delta (lycoris_files.py: LowRank, Hadamard, Kronecker):
    ΔW formed only once the module is known to fit (a crafted pair could ask for terabytes)."""
    sd = read_weights(Path(file), allow_pickle)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{file}: not a LoRA file (expected a flat dict of tensors)")
    if any(XLABS.fullmatch(k) for k in sd):
        sd = _from_xlabs(sd, file)
    kohya = any(k.startswith("lora_") for k in sd)
    pairs, alphas, magnitudes, used = (_kohya_pairs if kohya else _diffusers_pairs)(sd, file)
    lycoris, more = lycoris_modules(sd) if kohya else ({}, set())
    unknown = set(sd) - used - more
    if unknown:
        kind = " (LyCORIS Tucker LoRA)" if any("lora_mid" in k for k in unknown) else ""
        raise ModelError(f"{file}: keys this LoRA loader does not know{kind}: {name_some(unknown)}")
    alphas = checked_values(sd, alphas, file)
    if not pairs and not lycoris:
        raise ModelError(f"{file}: no LoRA weights found (expected diffusers `unet.*.lora_A.weight` or kohya "
                         f"`lora_unet_*` keys)")
    out = {}
    for (comp, name), parts in lycoris.items():
        if (comp, name) in pairs:
            raise ModelError(f"{file}: {comp} module {name} has both LoRA and LyCORIS factors")
        delta = lycoris_delta(parts, alphas.get((comp, name)))
        if isinstance(delta, str):
            raise ModelError(f"{file}: {comp} module {name} {delta}")
        out[(comp, name)] = delta
    try:
        meta = json.loads(read_metadata(file).get("lora_adapter_metadata", "{}") or "{}")
    except ValueError as e:
        raise ModelError(f"{file}: its lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{file}: its lora_adapter_metadata is not a JSON object")
    for (comp, name), (down, up) in pairs.items():
        if down is None or up is None:
            raise ModelError(f"{file}: {comp} module {name} has only one of its two LoRA matrices; "
                             f"the file is incomplete")
        r = down.shape[0] if down.ndim else 0
        if r < 1 or down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != r or \
                up.shape[2:] not in ((), (1, 1)):
            raise ModelError(f"{file}: {comp} module {name}: down {list(down.shape)} and up {list(up.shape)} "
                             f"are not a LoRA pair")
        try:
            scale = _peft_alpha(meta, comp, name, r) if not kohya else None
            scale = float(alphas.get((comp, name), r) / r if scale is None else scale)
        except (TypeError, ValueError, ZeroDivisionError, re.error) as e:
            raise ModelError(f"{file}: its lora_adapter_metadata for {comp} is not usable ({e})") from None
        if not math.isfinite(scale):
            raise ModelError(f"{file}: {comp} module {name}: its scale α/r is {scale}")
        out[(comp, name)] = LowRank(up.flatten(1).float(), down.flatten(1).float(), scale)
    for key, m in magnitudes.items():
        if key not in out:
            raise ModelError(f"{file}: {key[0]} module {key[1]} has a DoRA magnitude but no LoRA factors")
        if not m.numel() or not bool(torch.isfinite(m).all()):
            raise ModelError(f"{file}: {key[0]} module {key[1]}: its DoRA magnitude is empty or not finite")
        out[key] = Decomposed(out[key], m, peft=not kohya)
    return out


def _module_index(model, nets: dict) -> dict[str, dict[str, list]]:
    """Per component, every spelling of a module name a LoRA file may use -> [(our module, its Part)]: dotted and
    kohya's underscores; a kohya file's denoiser (`lora_unet_`) also by the original checkpoint's names
    (kohya_names.py: one of SD3's fused modules is several of ours)."""
    index = {comp: {s: [(n, Part(n))] for n in adapted_modules(net) for s in (n, n.replace(".", "_"))}
             for comp, net in nets.items()}
    index["denoiser"] = kohya_spellings(model)
    return index


def apply_loras(model, loras: list[tuple[Path, float]], allow_pickle: bool = False):
    """Merge each (file, strength) into the denoiser and text encoder weights: W += s·ΔW, in order."""
    t5 = {"text_encoder_3": model.text_encoder_3} if model.text_encoder_3 is not None else {}  # kohya's lora_te3_
    nets = {**model.components(), **t5}
    index = _module_index(model, nets)
    for file, s in loras:
        resolved = []
        for (comp, name), delta in lora_factors(file, allow_pickle).items():  # every module fits, first
            for w, d in _targets(model, nets, index, file, comp, name, delta):
                resolved.append((w, d))
                # a bound on every |ΔW| entry from the factors alone: a file that would overflow the weights (or
                # holds inf/NaN) is refused before any module changes
                bound = abs(s) * d.bound()
                if not bound < torch.finfo(w.dtype).max / 2:
                    shown = model.family.denoiser if comp == "denoiser" else comp
                    raise ModelError(f"{file}: LoRA module {shown}:{name} at strength {s} would make the weights "
                                     f"overflow or not numbers (its factors reach {bound:.3g})")
        with torch.no_grad():
            for w, delta in resolved:
                w += delta.at(w, s).to(w.dtype)  # ΔW at the file's own scale (α/r), then the strength
    return model


def _targets(model, nets: dict, index: dict, file, comp: str, name: str, delta) -> list[tuple[torch.Tensor, object]]:
    """The weights a file's module changes, each with its share of the change; one line for what does not fit."""
    family = model.family
    if comp == "text_encoder_2" and comp not in nets:
        raise ModelError(f"{file}: it adapts a second text encoder ({comp}: an SDXL LoRA); this model has one")
    if comp == "unet" and family.denoiser == "transformer":
        raise ModelError(f"{file}: it adapts a UNet: a LoRA for SD 1.x/2.x/XL, not for {family.title}")
    if comp not in index:
        if comp == "text_encoder_3" and family.t5:
            raise ModelError(f"{file}: it adapts T5 (lora_te3_), which this model was loaded without (--no-t5); "
                             f"load it with its T5")
        raise ModelError(f"{file}: it adapts a {comp}, which this {family.title} model does not have: it is a LoRA "
                         f"for another model family")
    shown = family.denoiser if comp == "denoiser" else comp
    net = model.denoiser if comp == "denoiser" else nets[comp]
    found = index[comp].get(name) or index[comp].get(name.replace(".", "_")) or []
    shares = [(net.get_submodule(ours).weight, part.of(delta)) for ours, part in found]
    for _, share in shares:
        if isinstance(share, str):
            raise ModelError(f"{file}: LoRA module {shown}:{name} {share}")
    if not shares or any(share is None or not share.fits(w) for w, share in shares):
        w = shares[0][0] if shares else None
        rows = found[0][1].original_rows(w.shape[0]) if shares else 0
        shape = f" ({delta.describe()} vs weight {[rows, *w.shape[1:]]})" if w is not None else ""
        raise ModelError(f"{file}: LoRA module {shown}:{name} does not match this model{shape}")
    return shares
