"""What fine-tuning changed, tensor by tensor: ‖W_tuned − W_base‖ / ‖W_base‖ for every tensor of the denoiser, the
text encoders and the VAE (exactly 0 when a tensor is bit-identical), grouped by component, block and layer type
(a UNet's self- vs cross-attention and their Q/K/V/out, feed-forward, proj in/out, the resnets' 3x3 convs, time
projections and shortcuts, up/downsamplers, norm; an MMDiT's image and text streams' Q/K/V/out, MLPs and
modulations; embedding rows: each a --lora-targets choice's own group).

DreamBooth's claim that fine-tuning "changes almost every layer" and the folklore that the cross-attention
K/V carry the identifier can both be read off `minidream diff BASE TUNED`.
"""
import json
import math
import re
from pathlib import Path

import torch

from minidream import plots
from minidream.formats.files import write_text
from minidream.image_files import save_image
from minidream.models.new_token import make_plain

UNET_TYPES = ("self Q", "self K", "self V", "self out", "cross Q", "cross K", "cross V", "cross out",
              "feed-forward", "proj in/out", "norm", "resnet conv", "time proj", "shortcut", "resample", "in/out")
TEXT_TYPES = ("self Q", "self K", "self V", "self out", "mlp", "norm", "token rows", "positions")
# the MMDiT's (SD3, Flux): each stream's share of the joint attention, MMDiT-X's image-only attn2, each stream's MLP,
# Flux's single blocks (Q/K/V over [text; image], the parallel MLP, the joined output), the adaLN modulations (norm1,
# norm1_context, norm, norm_out), the qk-norms, and the embedders and output around the blocks
MMDIT_TYPES = ("image Q", "image K", "image V", "image out", "text Q", "text K", "text V", "text out", "attn2",
               "image mlp", "text mlp", "single Q", "single K", "single V", "single mlp", "single out", "modulation",
               "qk-norm", "in/out")
_SINGLE = {"attn.to_q": "single Q", "attn.to_k": "single K", "attn.to_v": "single V", "proj_mlp": "single mlp",
           "proj_out": "single out"}
_MMDIT_ATTN = {"to_q": "image Q", "to_k": "image K", "to_v": "image V", "to_out": "image out", "add_q_proj": "text Q",
               "add_k_proj": "text K", "add_v_proj": "text V", "to_add_out": "text out"}


def mmdit_layer_type(name: str) -> str:
    m = re.match(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)\.", name)
    if m:
        return _SINGLE[m[1]]
    m = re.search(r"\.attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)\.", name)
    if m:
        return _MMDIT_ATTN[m[1]]
    for pattern, kind in ((r"\.attn2\.(to_|add)", "attn2"), (r"\.ff_context\.", "text mlp"), (r"\.ff\.", "image mlp"),
                          (r"norm1(_context)?\.linear|norm_out\.linear|\.norm\.linear", "modulation"),
                          (r"\.norm_", "qk-norm")):
        if re.search(pattern, name):
            return kind
    return "in/out"  # pos_embed, time_text_embed, context_embedder, proj_out


def layer_type(component: str, name: str) -> str:
    """The kind of layer a tensor belongs to, from its (diffusers / transformers) key."""
    if component == "transformer":
        return mmdit_layer_type(name)
    m = re.search(r"(attn1|attn2|self_attn)\.(to_q|to_k|to_v|to_out|q_proj|k_proj|v_proj|out_proj)", name)
    if m:
        kind = "cross" if m[1] == "attn2" else "self"
        letter = {"to_q": "Q", "q_proj": "Q", "to_k": "K", "k_proj": "K", "to_v": "V", "v_proj": "V"}
        return f"{kind} {letter.get(m[2], 'out')}"
    if component.startswith("text_encoder"):
        return ("token rows" if "token_embedding" in name else "positions" if "position_embedding" in name
                else "mlp" if ".mlp." in name else "norm")
    if component == "vae":
        return "vae"
    for pattern, kind in ((r"\.ff\.", "feed-forward"), (r"proj_in|proj_out", "proj in/out"), (r"norm", "norm"),
                          (r"resnets\.\d+\.conv[12]\.", "resnet conv"), (r"time_emb_proj", "time proj"),
                          (r"conv_shortcut", "shortcut"), (r"samplers\.", "resample")):
        if re.search(pattern, name):
            return kind
    return "in/out"  # conv_in, time_embedding, conv_out


def block(component: str, name: str) -> str:
    """Where in the network: UNet stage (down 0 … mid … up n), MMDiT block, text-encoder layer, VAE part."""
    if component == "transformer":
        m = re.match(r"(single_)?transformer_blocks\.(\d+)\.", name)  # Flux: double blocks, then single ones
        if m:
            return f"{'single' if m[1] else 'block'} {int(m[2]):02d}"
        return "out" if name.startswith(("norm_out", "proj_out")) else "in"
    if component == "unet":
        m = re.match(r"(down|up)_blocks\.(\d+)", name)
        return f"{m[1]} {m[2]}" if m else "mid" if name.startswith("mid_block") else \
            "in" if name.startswith(("conv_in", "time_embedding")) else "out"
    if component.startswith("text_encoder"):
        m = re.search(r"layers\.(\d+)\.", name)
        return f"layer {int(m[1]):02d}" if m else "embeddings" if "embeddings" in name else "final norm"
    return name.split(".")[0]


def _tensors(model) -> dict[str, torch.Tensor]:
    make_plain(model)  # a TokenEmbedding (a learned token) as one plain table
    nets = [(model.family.denoiser, model.denoiser), *[(name, te) for name, _, te in model.text_encoders()],
            ("vae", model.vae)]
    return {f"{comp}.{k}": v for comp, net in nets for k, v in net.state_dict().items()}


def diff(base, tuned) -> dict:
    """{"tensors": {name: {...}}, "groups": {...}} between two loaded models of the same architecture."""
    a, b = _tensors(base), _tensors(tuned)
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise ValueError(f"the two models differ in architecture (e.g. {missing[0]}); diff needs the same layout")
    tensors, groups = {}, {}
    for name in a:
        comp, key = name.split(".", 1)
        wa, wb = a[name].double(), b[name].double()
        row = {"component": comp, "block": block(comp, key), "type": layer_type(comp, key), "shape": list(wb.shape)}
        if wa.shape != wb.shape:  # a grown token table: compare the rows both have, count the new ones
            if wa.ndim != 2 or wa.shape[1] != wb.shape[1] or wa.shape[0] > wb.shape[0]:
                raise ValueError(f"{name}: {list(wa.shape)} vs {list(wb.shape)}; diff needs the same layout")
            row["new_rows"] = wb.shape[0] - wa.shape[0]
            wb = wb[: wa.shape[0]]
        d2, n2 = (wb - wa).pow(2).sum().item(), wa.pow(2).sum().item()
        same = torch.equal(a[name][: wb.shape[0]], b[name][: wb.shape[0]])
        row["rel_change"] = 0.0 if same else math.sqrt(d2 / max(n2, 1e-30))
        if wa.ndim == 2 and "embedding" in key:
            row["rows_changed"] = int((wb != wa).any(1).sum())
        tensors[name] = row
        for kind, *keys in (("by_component", comp), ("by_type", comp, row["type"]), ("by_block", comp, row["block"]),
                            ("by_block_type", comp, row["block"], row["type"])):
            g = groups.setdefault(kind, {})
            for k in keys[:-1]:
                g = g.setdefault(k, {})
            s = g.setdefault(keys[-1], {"d2": 0.0, "n2": 0.0, "tensors": 0, "changed": 0})
            s["d2"] += d2
            s["n2"] += n2
            s["tensors"] += 1
            s["changed"] += row["rel_change"] > 0

    def finish(g):  # a group's change: ‖ΔW‖ / ‖W‖ over all its tensors together
        if "d2" in g:
            g["rel_change"] = math.sqrt(g.pop("d2") / max(g.pop("n2"), 1e-30)) if g["changed"] else 0.0
        else:
            for sub in g.values():
                finish(sub)
    finish(groups)
    return {"tensors": tensors, "groups": groups}


def markdown(d: dict) -> str:
    lines = ["| component | layer type | tensors changed | relative change ‖ΔW‖/‖W‖ |", "|---|---|---|---|"]
    for comp, kinds in d["groups"]["by_type"].items():
        for kind, s in kinds.items():
            lines.append(f"| {comp} | {kind} | {s['changed']}/{s['tensors']} | {s['rel_change']:.2e} |")
    lines += ["", "| component | block | tensors changed | relative change |", "|---|---|---|---|"]
    for comp, blocks in d["groups"]["by_block"].items():
        for blk, s in blocks.items():
            lines.append(f"| {comp} | {blk} | {s['changed']}/{s['tensors']} | {s['rel_change']:.2e} |")
    rows = {k: v for k, v in d["tensors"].items() if "new_rows" in v or "rows_changed" in v}
    if rows:
        lines += ["", "| embedding table | rows changed | new rows |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('rows_changed', 0)} | {v.get('new_rows', 0)} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def picture(d: dict):
    """The denoiser by depth × layer type, then the text encoders by layer × type, as heat strips."""
    by = d["groups"]["by_block_type"]
    cells = {c: {(blk, kind): s["rel_change"] for blk, kinds in by.get(c, {}).items() for kind, s in kinds.items()}
             for c in ("unet", "transformer", "text_encoder", "text_encoder_2")}
    order = {c: list(by.get(c, {})) for c in cells}

    def depth(b):  # in, down 0.., mid, up 0.., out
        m = re.match(r"(down|up) (\d+)", b)
        return (0, 0) if b == "in" else (1, int(m[2])) if m and m[1] == "down" else (2, 0) if b == "mid" \
            else (3, int(m[2])) if m else (4, 0)
    vals = [v for c in cells.values() for v in c.values() if v > 0]  # the colour scale: whole decades around the data
    lo, hi = (10 ** math.floor(math.log10(min(vals))), 10 ** math.ceil(math.log10(max(vals)))) if vals else (1e-6, 1.0)
    hi = max(hi, lo * 10)
    if order["transformer"]:  # in, block 00.., (Flux: single 00..,) out; the layer types this MMDiT has
        rows = sorted(order["transformer"], key=lambda b: (b != "in", b == "out", b))
        types = [t for t in MMDIT_TYPES if any(kind == t for _, kind in cells["transformer"])]
        strips = [plots.heat_strip(cells["transformer"], rows, types, "MMDiT: block x layer type", lo, hi)]
    else:
        rows = sorted(order["unet"], key=depth)
        strips = [plots.heat_strip(cells["unet"], rows, list(UNET_TYPES), "UNet: stage x layer type", lo, hi)]
    for c in ("text_encoder", "text_encoder_2"):
        text_rows = sorted(order[c], key=lambda b: (b != "embeddings", b == "final norm", b))
        if text_rows:
            title = f"{c.replace('_', ' ')}: layer x type"
            strips.append(plots.heat_strip(cells[c], text_rows, list(TEXT_TYPES), title, lo, hi))
    return plots.stack(strips)


def write(d: dict, out: Path, meta: dict) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "diff.json", json.dumps({**meta, **d}, indent=1))
    write_text(out / "diff.md", f"# {meta.get('tuned')} vs {meta.get('base')}\n\n" + markdown(d))
    save_image(picture(d), out / "diff.png")
    return [out / "diff.json", out / "diff.md", out / "diff.png"]
