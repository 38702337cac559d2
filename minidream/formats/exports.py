"""The formats a trained model is exported in, one table (`--save-as` offers its rows): a diffusers folder, an
original-layout single file, LoRA files (diffusers and kohya) and the learned token (textual inversion). A row
carries what it writes into the run folder (what `--overwrite` removes is derived from the rows), whether it needs
a plain model (adapters merged into the weights, a learned token a normal row) and its help.

The model given to `export` is used up: it is made plain on the way. The trainer passes a fresh fp32 copy of the
base model with the trained tensors written in (training/export.py), never the model that trained.
"""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minidream.formats.diffusers_layout import save_pretrained
from minidream.formats.embeddings import save_learned_tokens
from minidream.formats.lora_export import save_lora_diffusers, save_lora_kohya
from minidream.formats.flux_layout import save_flux
from minidream.formats.flux_single_file import save_flux_single_file
from minidream.formats.sd3_layout import save_sd3
from minidream.formats.sd3_single_file import save_sd3_single_file
from minidream.formats.single_file import save_single_file
from minidream.models import lora, new_token
from minidream.models.stable_diffusion import StableDiffusion


def save_folder(model: StableDiffusion, path: Path, dtype: torch.dtype | None = None):
    """The diffusers layout of the model's family: SD3's and Flux's (their own components), else SD's."""
    {"sd3": save_sd3, "flux": save_flux}.get(model.family.name, save_pretrained)(model, path, dtype)


def save_file(model: StableDiffusion, path: Path, dtype: torch.dtype | None = None):
    """The family's original single-file layout: Stability's SD3 one, BFL's Flux transformer, else SD's (LDM's)."""
    writer = {"sd3": save_sd3_single_file, "flux": save_flux_single_file}.get(model.family.name, save_single_file)
    writer(model, path, dtype)


@dataclass(frozen=True)
class Exporter:
    save: Callable[[StableDiffusion, Path, torch.dtype | None], None]  # writes the model to the path (in a dtype)
    output: str  # the path it writes, in the run folder
    plain: bool  # it needs a plain model: adapters merged into their weights, a learned token a normal row
    help: str
    adapters: bool = False  # it writes LoRA adapters, so it needs --train lora; `save` also takes the run's facts
    automatic: Callable[[StableDiffusion], bool] | None = None  # written unasked whenever this holds
    base_vocabulary: bool = False  # a learned token stays out (it is in learned_embeds.safetensors): the base's table
    families: tuple[str, ...] | None = None  # the model families it writes (None: all)

    def writes(self, family: str) -> bool:
        return self.families is None or family in self.families


EXPORTERS = {
    "learned-token": Exporter(save_learned_tokens, "learned_embeds.safetensors", False,
                              "the learned token (textual inversion), written whenever one trained",
                              automatic=lambda m: bool(new_token.learned_tokens(m))),
    "diffusers": Exporter(save_folder, "model", True, "a folder that the family's diffusers pipeline loads"),
    "single-file": Exporter(save_file, "model.safetensors", True,
                            "the original single-file layout (A1111, ComfyUI; a learned token goes to "
                            "learned_embeds.safetensors, as they expect; Flux: BFL's transformer file)",
                            base_vocabulary=True),
    "lora-diffusers": Exporter(save_lora_diffusers, "lora/pytorch_lora_weights.safetensors", False,
                               "LoRA for diffusers' load_lora_weights (--train lora)", adapters=True),
    "lora-kohya": Exporter(save_lora_kohya, "lora_kohya.safetensors", False,
                           "LoRA in kohya's layout, for A1111 and ComfyUI (--train lora)", adapters=True),
}
CHOICES = tuple(name for name, row in EXPORTERS.items() if row.automatic is None)  # what --save-as offers


def outputs() -> list[str]:
    """What the exports write into a run folder: the first part of each row's path."""
    return [Path(row.output).parts[0] for row in EXPORTERS.values()]


def make_plain(model: StableDiffusion):
    """Merge LoRA adapters into their (fp32 base) weights and make a learned token a normal embedding row."""
    for net in model.components().values():
        lora.merge_lora(net)
    new_token.make_plain(model)


def export(model: StableDiffusion, formats: tuple[str, ...], out: Path, dtype: torch.dtype | None = None,
           info: dict[str, str] | None = None) -> list[Path]:
    """Write the formats asked for, and those that are written unasked (a learned token); returns the paths.
    `dtype`: the precision of every floating-point tensor written (--save-precision); None: the model's own.
    `info`: the training run's facts, as the adapter files' metadata (kohya's ss_* fields)."""
    rows = [(name, row) for name, row in EXPORTERS.items()
            if name in formats or (row.automatic is not None and row.automatic(model))]
    written = []
    vocabulary = new_token.base_rows(model)
    # the adapter files before merging; a file with the base's token table last
    for _, row in sorted(rows, key=lambda r: (r[1].plain, r[1].base_vocabulary)):
        if row.plain:
            make_plain(model)
        if row.base_vocabulary:
            new_token.cut_to(model, vocabulary)
        path = out / row.output
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            row.save(model, tmp, dtype, **({"info": info} if row.adapters else {}))
            swap_in(tmp, path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp)
        written.append(path)
    return written


def swap_in(new: Path, path: Path):
    """`new` becomes `path` at once: a re-export killed midway leaves the previous export whole (or the new one),
    never a folder mixing the two. (Stale `.*.tmp*` leftovers are removed when a run opens its folder.)"""
    if not path.is_dir():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.tmp{os.getpid()}old")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)
