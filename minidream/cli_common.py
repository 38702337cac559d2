"""The steps the `minidream` commands (cli.py) share: reading and checking their arguments, loading a model, merging
LoRAs and embeddings, choosing the device and kernel; each problem is one line (`fail`: "error: ...", exit 2),
before anything is written."""
import math
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import typer
from typer.core import TyperGroup

from minidream.cli_options import Adapters, Loader, Run, Sample
from minidream.options import declared_values, first_problem, option_flag
from minidream.sampling.pipeline import SamplingParams

SAMPLING = {f.name: f for f in fields(SamplingParams)}


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


def checked(options: dict, *classes) -> tuple:
    """The command line's values as instances of `classes` (cli_options.py), each checked by its declarations (and
    its `problem()`, what its options ask of each other): the first problem is one line naming the option."""
    made = []
    if options.get("config") is not None and "print_config" not in options:  # (with run files: with_run_file)
        options = moved_config(options)
    for cls in classes:
        obj = declared_values(cls, options)
        wrong = obj.problem() if hasattr(obj, "problem") else first_problem(obj)
        if wrong:
            name, what = wrong
            fail(f"{option_flag(next(f for f in fields(cls) if f.name == name))} {what}")
        made.append(obj)
    return tuple(made)


def with_run_file(ctx: typer.Context, options: dict, classes) -> tuple[dict, set[str]]:
    """The command line's options merged with --config's run file (the command line wins; run_files.py), or the old
    --config (a single file's architecture) read as --original-config; then each option that has no default must
    be in one of them. Also the options the user gave, in either."""
    from minidream.run_files import RunFileError, is_run_file, merged
    given = {p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"}
    value = options.get("config")
    if value is not None and not str(value).strip():
        fail("--config is empty; name a run file (TOML)")
    if value is not None and not is_run_file(value) and Path(value).exists() and not Path(value).is_dir():
        fail(f"--config {value}: not a run file (a .toml file, or a run's run.json)")
    if value is not None and not is_run_file(value):
        options, given = moved_config(options), given | {"original_config"}
    elif value is not None:
        try:
            options, given = merged(options, given, value, classes)
        except RunFileError as e:
            fail(str(e))
    for cls in classes:
        needed = next((f for f in fields(cls) if f.default is MISSING and options.get(f.name) is None), None)
        if needed is not None:
            fail(f"{option_flag(needed)} is needed (on the command line or in a --config run file)")
    return options, given


def moved_config(options: dict) -> dict:
    """--config FOLDER, as before it was --original-config (a single file's architecture): read as that, with a note."""
    from minidream.run_files import is_run_file
    value = options["config"]
    if options.get("original_config") is not None:
        fail(f"--config {value} and --original-config: --config is the old name of --original-config; give that "
             f"alone")
    if is_run_file(value):
        fail(f"--config {value}: run files are read by train and sample; this command's --config is the old name of "
             f"--original-config (a single file's architecture: a folder or repo id)")
    typer.echo(f"note: --config {value}: read as --original-config (a single file's architecture), its name now; "
               f"--config of train and sample takes a run file", err=True)
    return {**options, "original_config": value}


def check_sampling(params: SamplingParams, m):
    """What the loaded model asks of the sampling options: its image sides, its scheduler, its timesteps."""
    wrong = params.problem(m)
    if wrong:
        name, what = wrong
        fail(f"{option_flag(SAMPLING[name])}: {m.source}: {what}" if name == "sampler"
             else f"{option_flag(SAMPLING[name])} {what}")


def embedding_args(names: tuple[str, ...], tokens: tuple[str, ...]) -> list[tuple[Path, str | None]]:
    """--embedding FILE (repeatable), each with the --embedding-token of the same position, if any."""
    if any(not name.strip() for name in names):
        fail("--embedding is empty; name a file")
    files = [Path(f) for f in names]
    for f in files:
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


def load_model(model: str, loader: Loader, dtype=None):
    from minidream.formats.files import ModelError
    from minidream.formats.loading import load
    try:
        options = asdict(loader)
        return load(model, dtype=dtype, config=options.pop("original_config"), **options)
    except ModelError as e:
        fail(str(e))


def text_read(m, skip: int, length: int | None = None):
    """The model read at its text encoder's skip-th layer from the end (--clip-skip) and, SD3, with `length` T5
    tokens (--max-sequence-length)."""
    from minidream.models.stable_diffusion import with_clip_skip, with_t5_length
    try:
        return with_t5_length(with_clip_skip(m, skip), length)
    except ValueError as e:
        fail(str(e))


def adapter_files(a: Adapters) -> tuple[list[tuple[Path, float]], list[tuple[Path, str | None]]]:
    """(--lora files with their strengths, --embedding files with their tokens), each file checked to exist."""
    return [lora_arg(x, a.lora_scale) for x in a.lora], embedding_args(a.embedding, a.embedding_token)


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


def resolved_device(device: str | None) -> str:
    """--device as a device here: cuda when available, else cpu."""
    from minidream.models.device import resolve_device
    try:
        return resolve_device(device).type
    except ValueError as e:
        fail(str(e))


def device_and_backend(run: Run) -> tuple[str, str]:
    """The device and the attention kernel the --device, --attention, --dtype and --compile options ask for."""
    from minidream.models.attention import resolve_backend
    from minidream.models.compile import check_compile
    dev = resolved_device(run.device)
    try:
        backend = resolve_backend(run.attention, dev)
    except ValueError as e:
        fail(str(e))
    if run.dtype == "fp16" and dev == "cpu":
        fail("--dtype fp16 needs a GPU; use --dtype bf16 or fp32 on CPU")
    wrong = check_compile(run.compile, dev)
    if wrong:
        fail(f"--compile {wrong}")
    return dev, backend


def write_samples(m, o: Sample, params: SamplingParams, sampler, made: bool, settings: dict) -> list[Path]:
    """`sample`'s images, batch k from a CPU generator seeded with seed + k, each PNG with its settings in its text
    (and a grid of several). Ctrl-C keeps what was written (an --out this run `made` and left empty goes)."""
    import torch
    from minidream.image_files import save_png
    from minidream.plots import labelled_grid
    from minidream.sampling.pipeline import generate
    images, names = [], []
    try:
        for k, start in enumerate(range(0, o.num_images, o.batch_size)):
            n = min(o.batch_size, o.num_images - start)
            try:
                imgs = generate(m, [o.prompt] * n, params, sampler=sampler, progress=o.progress,
                                generator=torch.Generator("cpu").manual_seed(o.seed + k))
            except ValueError as e:
                fail(str(e))
            for i, img in enumerate(imgs):
                meta = {"prompt": o.prompt, "negative_prompt": params.negative_prompt, "seed": o.seed + k,
                        "index_in_batch": i, **settings}
                png = o.out / f"{start + i:04d}.png"
                with writing(png):
                    save_png(img, png, meta)
                images.append(img)
                names.append(png)
        if len(images) > 1:
            png = o.out / "grid.png"
            with writing(png):
                rows = [("", torch.stack(images[i:i + 4])) for i in range(0, len(images), 4)]
                picture, layout = labelled_grid(rows, o.prompt, label_width=0)
                save_png(picture, png, {"prompt": o.prompt, "seed": o.seed, "layout": layout})
            names.append(png)
    except KeyboardInterrupt:  # what was written stays; an --out this run made and left empty goes
        if made and not any(o.out.iterdir()):
            o.out.rmdir()
        fail(f"interrupted; {len(names)} file(s) written to {o.out}" if names else "interrupted; no image was written")
    return names


def shipped_defaults(cfg, given: set[str] | None):
    """`train --model demo`: the demo model's own settings (demo/run.py's TRAIN_DEFAULTS; a LoRA's lrs from its
    LoRA recipe) for each one not given, said in one line; TrainConfig's defaults are SD's. (A folder named demo
    here is that folder, not the shipped model.)"""
    from dataclasses import replace
    if cfg.model != "demo" or Path("demo").exists():
        return cfg, given
    from minidream.demo.run import LORA, TRAIN_DEFAULTS
    from minidream.training.config import OPTIONS
    own = {**TRAIN_DEFAULTS, **({"lr": LORA["lr"], "text_encoder_lr": LORA["text_encoder_lr"]}
                                if cfg.mode == "lora" else {})}
    if cfg.mode not in ("unet", "lora"):  # the demo's lrs are for these two
        own = {k: v for k, v in own.items() if k not in ("lr", "text_encoder_lr")}
    if cfg.class_noun:  # the world's captions say "a red star", never "a photo of"
        own.update(instance_prompt=f"a {cfg.token or cfg.identifier} {cfg.class_noun}",
                   class_prompt=f"a {cfg.class_noun}")
    given = set(given or ())
    skip = given | ({"steps"} if "epochs" in given else set())
    taken = {k: v for k, v in own.items() if k not in skip}
    if taken:
        said = ", ".join(option_flag(OPTIONS[k]) + ("" if v is True else f" {v}") for k, v in taken.items())
        typer.echo(f"--model demo: the demo model's own settings for those not given: {said}", err=True)
    return replace(cfg, **taken), given


def warn_unknown_tokens(model, *prompts: str):
    """A `<token>` in a prompt that is not a token of the model (no --embedding or LoRA file added it) is read as
    the letters it is made of: a likely mistake (a missing --embedding, a misspelt token), said once per token."""
    import re
    known = {**model.tokenizer.vocab, **model.tokenizer.added}
    unknown = [t for t in dict.fromkeys(re.findall(r"<[^<>\s]+>", " ".join(p or "" for p in prompts)))
               if t not in known]
    if unknown:
        typer.echo(f"warning: {', '.join(unknown)}: not a token of this model (no --embedding or model file adds "
                   f"{'it' if len(unknown) == 1 else 'them'}); read as plain text", err=True)


def demo_ready(out: Path, overwrite: bool):
    """`minidream demo`: the shipped model is there, and --out holds no finished demo unless --overwrite."""
    from minidream.demo.architecture import DEMO_DIR
    if not (DEMO_DIR / "model_index.json").exists():
        fail(f"{DEMO_DIR}: the demo model is missing (it ships with minidream); reinstall, or rebuild it with "
             f"`minidream demo-pretrain --out {DEMO_DIR}`")
    if (out / "report.json").exists() and not overwrite:
        fail(f"--out {out} holds a finished demo (report.json); pass --overwrite to run it again there, or choose "
             f"another --out")


class OneLineErrors(TyperGroup):
    """Click's own errors (a value that does not parse as the option's type or choices, an unknown option) in the
    one `error:` line of every other bad input, not its usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        import sys
        # click's classes, found from typer's public one: typer vendors click in its newer versions
        usage_error = typer.BadParameter.__bases__[0]
        click_exception = usage_error.__bases__[0]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except usage_error as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help is the answer
                e.show()
                sys.exit(e.exit_code)
            said = e.format_message().replace("Value error, ", "").replace("\n", " ")
            where = f" (`{e.ctx.command_path} --help` lists the options)" if e.ctx is not None else ""
            typer.echo(f"error: {said}{where}", err=True)
            sys.exit(e.exit_code)
        except click_exception as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
