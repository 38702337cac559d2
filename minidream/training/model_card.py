"""The model card of a run's exports: OUT/README.md, which the Hugging Face Hub and the model sites show on the
page of an uploaded run folder. Its YAML header is what the Hub reads (base_model, the pipeline and library, tags,
the trigger prompt, the final grid as the widget's picture); its text says what each exported file is, how to
draw with it, and the settings that differ from the defaults (the whole run is OUT/run.json).
"""
from dataclasses import fields
from pathlib import Path

from minidream.formats.files import write_text

# what the Hub calls each family, as a tag
FAMILY_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl",
               "sd3": "sd3", "flux": "flux"}


def write_card(cfg, family, written: list[Path], out: Path) -> Path:
    """OUT/README.md for the exports `written` (paths under OUT) of the run `cfg` on a model of `family`."""
    instance = cfg.prompts[0]
    grid = out / "samples" / "final.png"
    tags = ["text-to-image", "diffusers", "dreambooth", "minidream", FAMILY_TAGS.get(family.name, family.name)]
    if cfg.mode in ("lora",):
        tags.append("lora")
    hub_id = "/" in cfg.model and not Path(cfg.model).exists() and not cfg.model.startswith((".", "/", "~"))
    head = ["---", *([f"base_model: {_yaml(cfg.model)}"] if hub_id else []), "library_name: diffusers",
            "pipeline_tag: text-to-image", "tags:", *[f"- {t}" for t in tags], f"instance_prompt: {_yaml(instance)}"]
    if grid.is_file():
        head += ["widget:", f"- text: {_yaml((cfg.validation_prompts or (instance,))[0])}", "  output:",
                 "    url: samples/final.png"]
    lines = [*head, "---", "", f"# {out.name}: DreamBooth on {family.title}", "",
             f"DreamBooth (Ruiz et al. 2022) with minidream, from `{cfg.model}`: the subject is bound to "
             f"**`{cfg.token or cfg.identifier}`**; prompt it as `{instance}`.", "", "## Files", ""]
    lines += [f"- `{p.relative_to(out)}`" for p in written if p.is_relative_to(out)]
    lines += ["", "## Use", "", "```", sample_command(cfg, written, out, out), "```", "", "## Settings", "",
              "| option | value |", "|---|---|", *_settings(cfg)]
    if grid.is_file():
        lines += ["", "## Validation images", "", "![the final validation grid](samples/final.png)"]
    file = out / "README.md"
    write_text(file, "\n".join(lines) + "\n")
    return file


def sample_command(cfg, written: list[Path], out: Path, here: Path) -> str:
    """The `minidream sample` command that draws the subject with the run's exports `written`, its paths relative
    to `here` (the card's: the run folder; the end of `train`: the current folder) where they are below it."""
    schedule = " --zero-terminal-snr" if cfg.zero_terminal_snr and not (out / "model").is_dir() else ""
    return f"minidream sample {usage(written, out, cfg.model, here)}{schedule} --prompt {_shell(cfg.prompts[0])} " \
        f"--out {_shell(str(_named(out / 'samples', here)))}"


def _named(p: Path, here: Path) -> Path:
    p, here = Path(p).absolute(), Path(here).absolute()
    return p.relative_to(here) if p.is_relative_to(here) else p


def usage(written: list[Path], out: Path, base: str, here: Path) -> str:
    """`sample`'s options that draw with the exports: the whole model where one was written, else the base with
    one of the LoRA files (they hold the same weights) and the learned token."""
    raw = [p for p in written if not p.is_relative_to(out / "ema")]  # (the moving average's are under ema/)
    names = {p.name: _shell(str(_named(p, here))) for p in raw}
    whole = names.get("model") or names.get("model.safetensors")  # the diffusers folder, or the single file
    if whole:
        return f"--model {whole}"
    options = [f"--model {_shell(base)}"]
    lora = names.get("pytorch_lora_weights.safetensors") or names.get("lora_kohya.safetensors")
    if lora:
        options.append(f"--lora {lora}")
    if "learned_embeds.safetensors" in names:
        options.append(f"--embedding {names['learned_embeds.safetensors']}")
    return " ".join(options)


def _settings(cfg) -> list[str]:
    """A table row for each setting the run gave other than its default (the paths of the run's own files left
    out: they are the trainer's machine's)."""
    rows = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default and f.name not in ("out", "instance_dir", "class_dir", "concepts", "mask_dir"):
            rows.append(f"| `{f.name}` | `{str(value).replace('|', '¦')}` |")
    return rows


def _yaml(text: str) -> str:
    """A YAML scalar: double-quoted, as JSON writes a string."""
    import json
    return json.dumps(str(text), ensure_ascii=False)


def _shell(text: str) -> str:
    import shlex
    return shlex.quote(text)
