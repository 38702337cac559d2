"""The steps the `minidream` commands (cli.py) share: reading and checking their arguments, loading a model, merging
LoRAs and embeddings, choosing the device and kernel; each problem is one line (`fail`: "error: ...", exit 2),
before anything is written."""
import math
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import typer

from minidream.models.device import DTYPES
from minidream.options import choice, declared_values, first_problem, option_flag, text
from minidream.models.attention import CHOICES as ATTENTION_BACKENDS
from minidream.sampling.pipeline import SamplingParams

SAMPLING = {f.name: f for f in fields(SamplingParams)}
DType = choice("DType", DTYPES)
AttentionBackend = choice("AttentionBackend", ATTENTION_BACKENDS)


def fail(msg: str):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def lora_arg(arg: str, default_scale: float) -> tuple[Path, float]:
    """--lora FILE or FILE:SCALE (a path may hold colons itself: only a number after the last one is a scale)."""
    path, _, scale = arg.rpartition(":")
    try:
        f, w = (Path(path), float(scale)) if path else (Path(arg), default_scale)
    except ValueError:
        f, w = Path(arg), default_scale
    if not f.is_file():
        fail(f"--lora {f}: no such file")
    if not math.isfinite(w):
        fail(f"--lora {arg}: the strength must be a finite number (got {w})")
    return f, w


def sampling_params(sampling: dict, prompt: str) -> SamplingParams:
    """The sampling options, checked as declared (and the prompt: text the tokenizer can read)."""
    params = declared_values(SamplingParams, sampling)
    wrong = first_problem(params) or (("prompt", text(prompt)) if text(prompt) else None)
    if wrong:
        name, what = wrong
        fail(f"{'--prompt' if name == 'prompt' else option_flag(SAMPLING[name])} {what}")
    return params


def check_sampling(params: SamplingParams, m):
    """What the loaded model asks of the sampling options: its image sides, its scheduler, its timesteps."""
    wrong = params.problem(m)
    if wrong:
        name, what = wrong
        fail(f"{option_flag(SAMPLING[name])}: {m.source}: {what}" if name == "sampler"
             else f"{option_flag(SAMPLING[name])} {what}")


def check_seed(seed: int, batches: int = 1):
    if not 0 <= seed <= 2 ** 63 - batches:
        fail(f"--seed must be in [0, 2^63) for every batch (got {seed})")


def embedding_args(files: list[Path], tokens: list[str]) -> list[tuple[Path, str | None]]:
    """--embedding FILE (repeatable), each with the --embedding-token of the same position, if any."""
    for f in files:
        if not str(f).strip():
            fail("--embedding is empty; name a file")
        if not f.is_file():
            fail(f"--embedding {f}: no such file")
    if len(tokens) > len(files):
        fail("--embedding-token: more tokens than --embedding files")
    return list(zip(files, [*tokens, *[None] * (len(files) - len(tokens))]))


@contextmanager
def writing(where: Path):
    """A full or read-only disk while the results are written to `where` (a file or folder): one line naming the
    file (a full disk's error names none: then `where`)."""
    try:
        yield
    except OSError as e:
        fail(f"{e.filename or where}: could not be written ({e.strerror or e})")


def out_folder(out: Path):
    if not str(out).strip():  # "" would mean the current folder
        fail("--out is empty; name a folder")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder")
    if not next(p for p in (out, *out.parents) if p.exists()).is_dir():
        fail(f"--out {out}: cannot create it (it is below a file); choose another folder")


def load_model(model: str, revision=None, variant=None, allow_pickle=False, tokenizer=None, preset=None, config=None,
               dtype=None):
    from minidream.formats.files import ModelError
    from minidream.formats.loading import load
    try:
        return load(model, revision=revision, variant=variant, allow_pickle=allow_pickle, tokenizer=tokenizer,
                    preset=preset, config=config, dtype=dtype)
    except ModelError as e:
        fail(str(e))


def clip_skipped(m, skip: int):
    """The model read at its text encoder's skip-th layer from the end (--clip-skip)."""
    from minidream.models.stable_diffusion import with_clip_skip
    try:
        return with_clip_skip(m, skip)
    except ValueError as e:
        fail(str(e))


def adapt(m, loras: list[tuple[Path, float]], embeddings: list[tuple[Path, str | None]], allow_pickle: bool):
    """Other tools' embeddings added and LoRAs merged into a loaded model."""
    from minidream.formats.embeddings import add_embedding
    from minidream.formats.files import ModelError
    from minidream.formats.lora_files import apply_loras
    try:
        for f, tok in embeddings:
            add_embedding(m, f, tok, allow_pickle)
        apply_loras(m, loras, allow_pickle)
    except (ValueError, ModelError) as e:
        fail(str(e))
    return m


def device_and_backend(device: str | None, attention: AttentionBackend, dtype: DType) -> tuple[str, str]:
    from minidream.models.attention import resolve_backend
    from minidream.models.device import resolve_device
    try:
        dev = resolve_device(device).type
        backend = resolve_backend(attention.value, dev)
    except ValueError as e:
        fail(str(e))
    if dtype == DType.fp16 and dev == "cpu":
        fail("--dtype fp16 needs a GPU; use --dtype bf16 or fp32 on CPU")
    return dev, backend


def write_samples(m, prompt: str, params: SamplingParams, sampler, out: Path, made: bool, seed: int, num_images: int,
                  batch_size: int, progress: bool, settings: dict) -> list[Path]:
    """`sample`'s images, batch k from a CPU generator seeded with seed + k, each PNG with its settings in its text
    (and a grid of several). Ctrl-C keeps what was written (an --out this run `made` and left empty goes)."""
    import torch
    from minidream.image_files import grid, save_png
    from minidream.sampling.pipeline import generate
    images, names = [], []
    try:
        for k, start in enumerate(range(0, num_images, batch_size)):
            n = min(batch_size, num_images - start)
            try:
                imgs = generate(m, [prompt] * n, params, sampler=sampler, progress=progress,
                                generator=torch.Generator("cpu").manual_seed(seed + k))
            except ValueError as e:
                fail(str(e))
            for i, img in enumerate(imgs):
                meta = {"prompt": prompt, "negative_prompt": params.negative_prompt, "seed": seed + k,
                        "index_in_batch": i, **settings}
                png = out / f"{start + i:04d}.png"
                with writing(png):
                    save_png(img, png, meta)
                images.append(img)
                names.append(png)
        if len(images) > 1:
            png = out / "grid.png"
            with writing(png):
                save_png(grid(torch.stack(images)), png, {"prompt": prompt, "seed": seed})
            names.append(png)
    except KeyboardInterrupt:  # what was written stays; an --out this run made and left empty goes
        if made and not any(out.iterdir()):
            out.rmdir()
        fail(f"interrupted; {len(names)} file(s) written to {out}" if names else "interrupted; no image was written")
    return names
