"""`load()`: any model a user names, from disk or the Hugging Face hub, as one StableDiffusion.

A local folder or hub repo id in the diffusers layout goes to `diffusers_layout.py` (SD3's to `sd3_layout.py`,
Flux's to `flux_layout.py`);
an original single-file checkpoint (`v1-5-pruned-emaonly.safetensors`) to `single_file.py`, whose architecture comes
from `config` (a diffusers folder or repo), else `preset` (inferred from the keys when omitted), and
whose vocabulary from `tokenizer`. File finding and reading live in `files.py`.
"""
from minidream.formats.diffusers_layout import load_pretrained
from minidream.formats.flux_layout import is_flux, load_flux
from minidream.formats.flux_single_file import is_flux_file, load_flux_single_file
from minidream.formats.sd3_layout import is_sd3, load_sd3
from minidream.formats.files import ModelError, read_weights, resolve
from minidream.formats.sd3_single_file import is_sd3_file, load_sd3_single_file
from minidream.models.stable_diffusion import StableDiffusion
from minidream.formats.single_file import load_single_file

__all__ = ["ModelError", "load"]


def load(model: str, revision: str | None = None, variant: str | None = None, allow_pickle: bool = False,
         dtype=None, tokenizer: str | None = None, preset: str | None = None,
         config: str | None = None, t5: bool = True, text_encoders: tuple[str, ...] = (),
         vae: str | None = None) -> StableDiffusion:
    """Load a whole model (weights in `dtype`, or as stored); every problem is a one-line ModelError. `t5=False`: an SD3
    model without its T5 encoder (not even read). `text_encoders`: an SD3 or Flux single file's, as separate files;
    `vae`: a Flux single file's."""
    path = resolve(model, revision, allow_pickle, variant, t5=t5)
    sd = read_weights(path, allow_pickle) if path.is_file() else None  # memory-mapped: read once
    flux_file = sd is not None and is_flux_file(sd)
    if not t5 and (is_flux(path) or flux_file):
        raise ModelError(f"--no-t5: {path} is a Flux model, whose text is read by T5 only; drop the flag")
    if vae and not flux_file:
        raise ModelError(f"--vae: {path} is not a Flux transformer file in Black Forest Labs' layout "
                         f"(double_blocks.N.…); only those take their VAE as a separate file")
    if flux_file:
        return load_flux_single_file(path, sd, dtype, tokenizer, config, preset, text_encoders, vae, allow_pickle)
    if not t5 and not (is_sd3(path) if sd is None else is_sd3_file(sd)):
        raise ModelError(f"--no-t5: {path} is not an SD3 model; only SD3 has a T5 text encoder (drop the flag)")
    if text_encoders and not (sd is not None and is_sd3_file(sd)):
        raise ModelError(f"--text-encoders: {path} is not an SD3 or Flux single file; only those take their text "
                         f"encoders as separate files (drop the flag)")
    if sd is not None:
        if is_sd3_file(sd):
            return load_sd3_single_file(path, sd, dtype, tokenizer, config, preset, t5, text_encoders, allow_pickle)
        return load_single_file(path, allow_pickle=allow_pickle, dtype=dtype, tokenizer=tokenizer, preset=preset,
                                config=config, sd=sd)
    ignored = [f for f, v in (("--preset", preset), ("--original-config", config), ("--tokenizer", tokenizer)) if v]
    if ignored:  # a folder carries its own configs and tokenizer: say so rather than silently ignore the flag
        one = len(ignored) == 1
        raise ModelError(f"{path}: a model folder has its own configs and tokenizer; {', '.join(ignored)} "
                         f"{'describes' if one else 'describe'} only single-file checkpoints: "
                         f"drop {'it' if one else 'them'}")
    if is_flux(path):
        return load_flux(path, variant, allow_pickle, dtype)
    if is_sd3(path):
        return load_sd3(path, variant, allow_pickle, dtype, t5)
    return load_pretrained(path, variant, allow_pickle, dtype)
