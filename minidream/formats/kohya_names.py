"""The denoiser's module names in kohya-layout LoRA files (`lora_unet_<module with underscores>`), for reading and
writing them: kohya's SD 1.x/2.x networks spell diffusers' names; its SDXL networks the original checkpoint's
(`input_blocks_4_1_proj_in`); its SD3 network (sd-scripts' networks/lora_sd3.py, which ComfyUI reads) the original
MMDiT's (`joint_blocks_0_x_block_attn_qkv`), its Flux network BFL's (`double_blocks_0_img_attn_qkv`,
`single_blocks_0_linear1`). There one module may be several of ours: Q, K and V are one fused `qkv` layer (Flux's
`linear1` is Q, K, V and the MLP's input), and the last text block's and the output's adaLN modulations hold
(shift, scale) where diffusers holds (scale, shift). A `Part` says which rows of the original module's weight change
are one of our modules'.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from minidream.formats.flux_single_file import flux_table
from minidream.formats.lycoris_files import Decomposed, LowRank
from minidream.formats.sd3_single_file import DIT, mmdit_table
from minidream.formats.single_file import unet_original_name
from minidream.models.lora import LoRA, row_norm


@dataclass(frozen=True)
class Part:
    original: str  # the original module, dotted, without the checkpoint's prefix
    # (i, j, n): ours is row blocks i..j-1 of n equal ones (SD3's fused Q/K/V: (0, 1, 3)…; Flux's linear1, Q, K, V
    # and the MLP's input: (0, 1, 7) … (3, 7, 7))
    chunk: tuple[int, int, int] | None = None
    swap: bool = False  # ours holds the original's two row halves in the other order

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Our rows of a tensor laid out by the original's output rows (None: they do not split so)."""
        if self.chunk:
            i, j, n = self.chunk
            if x.shape[0] % n:
                return None
            x = torch.cat(x.chunk(n)[i:j])
        if self.swap:
            if x.shape[0] % 2:
                return None
            x = torch.cat(x.chunk(2)[::-1])
        return x

    def original_rows(self, rows: int) -> int:
        """The original module's rows, given ours."""
        i, j, n = self.chunk or (0, 1, 1)
        return rows * n // (j - i)

    def to_original(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ours (a whole fused module's, in order) in the original's order: a swap is its own inverse."""
        return torch.cat(x.chunk(2)[::-1]) if self.swap else x

    def of(self, delta):
        """Our share of the original module's change: a Delta, or why it cannot be split, or None (no fit)."""
        if not (self.chunk or self.swap):
            return delta
        if isinstance(delta, LowRank):
            up = self.rows(delta.up)
            return None if up is None else LowRank(up, delta.down, delta.scale)
        if isinstance(delta, Decomposed) and isinstance(delta.inner, LowRank) and \
                delta.magnitude.shape[0] == delta.inner.up.shape[0]:  # DoRA's norm per output row: rows split
            inner, m = self.of(delta.inner), self.rows(delta.magnitude)
            return None if inner is None or m is None else Decomposed(inner, m, delta.peft)
        return (f"is {delta.describe()} on a module that is several of ours ({self.original}); minidream splits "
                f"only LoRA pairs and output-axis DoRA there")


def adapted_modules(net: nn.Module) -> list[str]:
    """The modules a LoRA file may adapt: every linear layer and convolution (one with an adapter of ours: the
    adapted module, not its parts)."""
    names, inside = [], ()
    for n, m in net.named_modules():
        if n.startswith(inside):
            continue
        if isinstance(m, LoRA):
            inside = (n + ".",)
        if isinstance(m, (LoRA, nn.Linear, nn.Conv2d)):
            names.append(n)
    return names


def original_parts(model) -> dict[str, Part]:
    """Our denoiser's module -> where it is in the original checkpoint (kohya's SDXL, SD3 and Flux files name it so)."""
    names = adapted_modules(model.denoiser)
    if model.family.denoiser == "unet":
        return {n: Part(unet_original_name(model.denoiser.config, n)) for n in names}
    keys = [n + ".weight" for n in names]
    table = flux_table(keys) if model.family.name == "flux" else mmdit_table(model.denoiser.config, keys)
    parts = {}
    for key, (theirs, how) in table.items():
        original = theirs.removeprefix(DIT).removesuffix(".weight")
        chunk = None
        if isinstance(how, tuple):  # ("chunk", i): SD3's thirds; ("chunk", i, j, n)
            chunk = (how[1], how[1] + 1, 3) if len(how) == 2 else how[1:]
        parts[key.removesuffix(".weight")] = Part(original, chunk, how == "swap")
    return parts


def kohya_spellings(model) -> dict[str, list[tuple[str, Part]]]:
    """The denoiser's: every spelling of a module name a kohya file may use -> [(our module, its Part)]: the
    original's with underscores (a fused module: several of ours), and ours, dotted or with underscores."""
    index = {}
    for ours, part in original_parts(model).items():
        theirs = part.original.replace(".", "_")
        index.setdefault(theirs, []).append((ours, part))
        for spelling in {ours, ours.replace(".", "_")} - {theirs}:
            index[spelling] = [(ours, Part(ours))]
    return index


def kohya_denoiser_pairs(model) -> dict[str, dict[str, torch.Tensor]]:
    """The denoiser's adapters as kohya's files hold them: module name (underscores) -> lora_down, lora_up, alpha,
    and dora_scale (per output row, LyCORIS' wd_on_out). Several of ours that are one original module (SD3's
    Q, K, V) are one pair: the downs stacked, the ups block-diagonal in the original's row order, each up
    carrying its own α/r over the pair's (α = that scale × the stacked rank), which is exact; a row block without
    an adapter is zero; where some have DoRA, the others' magnitudes are their rows' norms (of W, or W + ΔW), which
    DoRA leaves as they are."""
    original = model.family.kohya_unet_names == "original"
    parts = original_parts(model) if original else {n: Part(n) for n in adapted_modules(model.denoiser)}
    groups = {}
    for name, part in parts.items():
        groups.setdefault(part.original, []).append((model.denoiser.get_submodule(name), part))
    out = {}
    for name, members in groups.items():
        members.sort(key=lambda member: member[1].chunk or (0, 1, 1))  # Q, K, V (, the MLP's input)
        adapted = [(m, part) for m, part in members if isinstance(m, LoRA)]
        if adapted:
            out[name.replace(".", "_")] = _pair(members, adapted)
    return out


def _pair(members: list, adapted: list) -> dict[str, torch.Tensor]:
    scale = adapted[0][0].scale
    dora = any(m.magnitude is not None for m, _ in adapted)
    ups, downs, norms = [], [], []
    for m, part in members:  # in the original's row order: Q, K, V
        base = m.base if isinstance(m, LoRA) else m
        up = m.lora_up.weight.detach().float().flatten(1) * (m.scale / scale) if isinstance(m, LoRA) else None
        ups.append((up, base.out_features if isinstance(base, nn.Linear) else base.out_channels))
        if isinstance(m, LoRA):
            downs.append(m.lora_down.weight.detach().float())
        if dora:  # DoRA's m where it has one; else the norms of the rows as they are (W + ΔW), which DoRA leaves
            # unchanged (without DoRA no base weight is read: the export of a quantized or memory-mapped base)
            norms.append(m.magnitude.detach().float() if isinstance(m, LoRA) and m.magnitude is not None
                         else row_norm((m.merged() if isinstance(m, LoRA) else base.weight).detach().float()))
    rank = sum(d.shape[0] for d in downs)
    blocks, col = [], 0
    for up, rows in ups:
        block = torch.zeros(rows, rank)
        if up is not None:
            block[:, col:col + up.shape[1]], col = up, col + up.shape[1]
        blocks.append(block)
    lora_up = members[0][1].to_original(torch.cat(blocks))
    first = adapted[0][0]
    pair = {"lora_down": torch.cat(downs), "lora_up": lora_up.view(-1, rank, *[1] * (first.lora_up.weight.dim() - 2)),
            "alpha": torch.tensor(float(scale * rank))}
    if dora:
        magnitude = members[0][1].to_original(torch.cat(norms))
        pair["dora_scale"] = magnitude.view(-1, *[1] * (first.lora_up.weight.dim() - 1))
    return pair
