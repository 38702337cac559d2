"""The `minidream` command: one typed function per subcommand; defaults live in the signatures."""
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stable Diffusion and DreamBooth in plain PyTorch.")


class Scheduler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class AttentionBackend(str, Enum):
    auto = "auto"
    sdpa = "sdpa"
    math = "math"
    triton = "triton"


def fail(msg: str):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def torch_dtype(d: DType):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[d.value]


ModelArg = Annotated[str, typer.Argument(help="Model: a diffusers-layout folder, a hub repo id (owner/name), "
                                              "or a single-file .safetensors checkpoint.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) to fetch.")]
Variant = Annotated[Optional[str], typer.Option(help="Weights variant to load, e.g. fp16.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Also load .bin/.ckpt pickle files "
                                                                  "(weights only). Only for files you trust.")]
TokenizerOpt = Annotated[Optional[str], typer.Option(help="For single-file checkpoints: folder or hub repo "
                                                          "with the tokenizer (default: the official one).")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="For single-file checkpoints: a diffusers-layout "
                                                                  "folder or repo id whose configs and tokenizer describe it.")]
PresetOpt = Annotated[Optional[str], typer.Option(help="For single-file checkpoints: architecture "
                                                       "(sd15, sd21, sd21-base, tiny); inferred when omitted.")]


def load_model(model: str, revision=None, variant=None, allow_pickle=False, tokenizer=None, preset=None, config=None,
               dtype=None):
    from minidream.loading import ModelError, load
    try:
        return load(model, revision=revision, variant=variant, allow_pickle=allow_pickle, tokenizer=tokenizer,
                    preset=preset, config=config, dtype=dtype)
    except ModelError as e:
        fail(str(e))


@app.command()
def info(model: ModelArg, revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
         tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None):
    """Load a model and print what it is: version, parameter counts, dtype, prediction type."""
    m = load_model(model, revision, variant, allow_pickle, tokenizer, preset, config)
    typer.echo(f"model      {m.source}")
    typer.echo(f"version    {m.version}")
    typer.echo(f"prediction {m.scheduler.prediction_type} ({m.scheduler.beta_schedule} betas, "
               f"{m.scheduler.num_train_timesteps} steps, spacing {m.scheduler.timestep_spacing})")
    typer.echo(f"tokenizer  {len(m.tokenizer)} tokens, pad {m.tokenizer.pad_token!r}")
    for name, mod in (("text_encoder", m.text_encoder), ("unet", m.unet), ("vae", m.vae)):
        p = next(mod.parameters())
        n = sum(x.numel() for x in mod.parameters())
        typer.echo(f"{name:<12} {n / 1e6:9.2f}M params  {str(p.dtype).removeprefix('torch.')}")
    typer.echo(f"resolution {m.unet.cfg.sample_size * 2 ** (len(m.vae.cfg.channels) - 1)} px native")


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Model folder, hub repo id or single-file checkpoint.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="Output folder for the PNGs.")],
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (the unconditional branch of CFG).")] = "",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale; <= 1 turns CFG off.")] = 7.5,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the CPU generator that draws the starting noise; "
                                           "batch k uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="How many images.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 1,
    height: Annotated[Optional[int], typer.Option(help="Image height in pixels (multiple of 8); default: the model's.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width in pixels (multiple of 8); default: the model's.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype (fp16/bf16 need a GPU).")] = DType.fp32,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when available.")] = None,
    attention: Annotated[AttentionBackend, typer.Option(help="Attention kernel.")] = AttentionBackend.auto,
    lora: Annotated[Optional[Path], typer.Option(help="LoRA weights (.safetensors) to apply.")] = None,
    lora_scale: Annotated[float, typer.Option(help="Strength of the LoRA.")] = 1.0,
    revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
    tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Text to image: writes one PNG per image (settings in the PNG text) and a grid when several."""
    import torch
    from minidream.attention import resolve_backend, set_attention_backend
    from minidream.pipeline import generate, grid, save_png
    from minidream.schedulers import make_sampler

    if steps < 1:
        fail(f"--steps must be at least 1 (got {steps})")
    if num_images < 1 or batch_size < 1:
        fail("--num-images and --batch-size must be at least 1")
    if (height and height % 8) or (width and width % 8):
        fail(f"--height/--width must be multiples of 8 (got {height}x{width})")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder")
    if lora is not None and not lora.is_file():
        fail(f"--lora {lora}: no such file")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype != DType.fp32 and dev == "cpu":
        fail(f"--dtype {dtype.value} needs a GPU; use --dtype fp32 on CPU")
    m = load_model(model, revision, variant, allow_pickle, tokenizer, preset, config)
    try:
        make_sampler(scheduler.value, m.scheduler, eta)
    except ValueError as e:
        fail(str(e))
    cut = m.tokenizer.truncated(prompt)
    if cut:
        typer.echo(f"warning: the prompt is longer than {m.tokenizer.max_length} tokens; this part was cut: {cut!r}", err=True)
    if lora is not None:
        from minidream.lora import load_lora
        try:
            load_lora(m, lora, scale=lora_scale)
        except ValueError as e:
            fail(str(e))
    m.to(device=dev, dtype=torch_dtype(dtype))
    set_attention_backend(m.unet, resolve_backend(attention.value, dev))
    out.mkdir(parents=True, exist_ok=True)
    images, names = [], []
    for k, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        g = torch.Generator("cpu").manual_seed(seed + k)
        imgs = generate(m, [prompt] * n, negative_prompt, steps, guidance, scheduler.value, eta, height, width,
                        generator=g, progress=progress)
        for i, img in enumerate(imgs):
            meta = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed + k, "index_in_batch": i,
                    "steps": steps, "guidance": guidance, "scheduler": scheduler.value, "eta": eta,
                    "model": m.source, "dtype": dtype.value, "lora": str(lora) if lora else "",
                    "software": "minidream"}
            name = out / f"{start + i:04d}.png"
            save_png(img, name, meta)
            images.append(img)
            names.append(name)
    if len(images) > 1:
        save_png(grid(torch.stack(images)), out / "grid.png", {"prompt": prompt, "seed": seed})
        names.append(out / "grid.png")
    typer.echo(f"wrote {len(names)} file(s) to {out}")


def main():
    app()


if __name__ == "__main__":
    main()
