"""The `minidream` command: one typed function per subcommand. `train`'s options are TrainConfig's fields, each
declared once in minidream/training/config.py (default, help, check, choices), `sample`'s and `attention-maps`'s
sampling options SamplingParams' (sampling/pipeline.py), and the loader options of every command TrainConfig's
too (minidream/options.py turns a declaration into an option). The other options live in the signatures."""
# ruff: noqa: E402 (the imports follow the Ctrl-C handler that covers them)
import signal
import sys

# Ctrl-C while the modules below load (torch takes a second or more): one line, no traceback (nothing is written yet)
signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting; nothing was written"))
import json
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from minidream.models.compile import COMPILE_HELP, COMPILE_MODES, check_compile, compile_network
from minidream.models.device import DTYPES
from minidream.options import choice, declared_option, declared_values, path_option, with_options
from minidream.sampling.pipeline import SamplingParams
from minidream.training import TrainError
from minidream.training.config import OPTIONS, TrainConfig
from minidream.demo.architecture import GROUNDING
from minidream.cli_common import (AttentionBackend, DType, adapt, check_sampling, check_seed, clip_skipped,
                                     device_and_backend, embedding_args, fail, load_model, lora_arg, out_folder,
                                     sampling_params, write_samples, writing)

signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is KeyboardInterrupt again (a run saves)

CompileMode = choice("CompileMode", COMPILE_MODES)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Stable Diffusion and DreamBooth in plain PyTorch.")


def loader_option(name: str):
    """A loader option of `sample`, `info`, `diff`, `attention-maps`: TrainConfig's field, declared once."""
    return declared_option(OPTIONS[name]).annotation


ModelArg = Annotated[str, typer.Argument(help="Model: a diffusers-layout folder, a hub repo id (owner/name), "
                                              "or a single-file .safetensors checkpoint.")]
Revision, Variant, AllowPickle = loader_option("revision"), loader_option("variant"), loader_option("allow_pickle")
TokenizerOpt, PresetOpt, ConfigOpt = loader_option("tokenizer"), loader_option("preset"), loader_option("config")
LoraOpt = Annotated[Optional[list[str]], typer.Option(help="LoRA file to merge, FILE or FILE:SCALE (diffusers/PEFT "
                                                       "or kohya/LyCORIS LoCon); repeat for several.")]
LoraScaleOpt = Annotated[float, typer.Option(help="Strength of each --lora given without :SCALE.")]
EmbeddingOpt = Annotated[Optional[list[Path]], path_option(help="Textual-inversion embedding (ours, diffusers', "
                                                               "A1111's); repeat for several.")]
ClipSkipOpt = loader_option("clip_skip")
EmbeddingTokenOpt = Annotated[Optional[list[str]], typer.Option(
    help="Token for the --embedding of the same position; default: the name in the file.")]


# ---------------------------------------------------------------------------------------------
# The commands

@app.command()
def info(model: ModelArg, revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
         tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None):
    """Load a model and print what it is: version, parameter counts, dtype, prediction type."""
    from minidream.sampling.samplers import default_sampler
    m = load_model(model, revision, variant, allow_pickle, tokenizer, preset, config)
    typer.echo(f"model      {m.source}")
    typer.echo(f"version    {m.version}")
    typer.echo(f"family     {m.family.title}: conditioned on {m.family.conditioned_on}; no negative prompt = "
               f"{'zeros' if m.force_zeros_for_empty_prompt else 'the empty prompt'}")
    typer.echo(f"prediction {m.scheduler.prediction_type} ({m.scheduler.beta_schedule} betas, "
               f"{m.scheduler.num_train_timesteps} steps, spacing {m.scheduler.timestep_spacing})")
    try:
        own = default_sampler(m.scheduler)
    except ValueError:
        own = "none of ours (pass --scheduler to sample)"
    typer.echo(f"sampler    {m.scheduler.class_name}: {own}")
    for name, tok, _ in m.text_encoders():
        typer.echo(f"{name.replace('text_encoder', 'tokenizer'):<12} {len(tok)} tokens, pad {tok.pad_token!r}")
    for name, mod in (*[(n, te) for n, _, te in m.text_encoders()], ("unet", m.unet), ("vae", m.vae)):
        p = next(mod.parameters())
        n = sum(x.numel() for x in mod.parameters())
        typer.echo(f"{name:<14} {n / 1e6:9.2f}M params  {str(p.dtype).removeprefix('torch.')}")
    typer.echo(f"resolution {m.native_resolution} px native")


@app.command()
@with_options(SamplingParams)
def sample(
    model: Annotated[str, typer.Option(help="Model folder, hub repo id or single-file checkpoint.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, path_option(help="Output folder for the PNGs.")],
    seed: Annotated[int, typer.Option(help="Seed of the CPU generator that draws the starting noise; "
                                           "batch k uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="How many images.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 1,
    dtype: Annotated[DType, typer.Option(help="Compute dtype (fp16 needs a GPU).")] = DType.fp32,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when available.")] = None,
    attention: Annotated[AttentionBackend, typer.Option(help="Attention kernel.")] = AttentionBackend.auto,
    compile: Annotated[CompileMode, typer.Option(help=f"Compile the UNet: {COMPILE_HELP}.")] = CompileMode.off,
    lora: LoraOpt = None, lora_scale: LoraScaleOpt = 1.0,
    embedding: EmbeddingOpt = None, embedding_token: EmbeddingTokenOpt = None,
    revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
    tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    clip_skip: ClipSkipOpt = 1,
    **sampling,
):
    """Text to image: writes one PNG per image (settings in the PNG text) and a grid when several."""
    from minidream.models.attention import set_attention_backend
    from minidream.sampling.samplers import default_sampler

    params = sampling_params(sampling, prompt)
    if not (1 <= num_images <= 100_000 and batch_size >= 1):
        fail("--num-images must be in [1, 100000] and --batch-size at least 1")
    check_seed(seed, (num_images - 1) // batch_size + 1)
    out_folder(out)
    loras = [lora_arg(a, lora_scale) for a in lora or []]
    embeddings = embedding_args(embedding or [], embedding_token or [])
    dev, backend = device_and_backend(device, attention, dtype)
    if check_compile(compile.value, dev):
        fail(f"--compile {check_compile(compile.value, dev)}")
    m = clip_skipped(load_model(model, revision, variant, allow_pickle, tokenizer, preset, config), clip_skip)
    check_sampling(params, m)
    name = params.sampler or default_sampler(m.scheduler)  # the model's own, by name, for the PNGs
    sampler = params.make_sampler(m.scheduler)  # one sampler for every batch
    adapt(m, loras, embeddings, allow_pickle)
    cut = m.tokenizer.truncated(prompt)
    if cut:
        typer.echo(f"warning: the prompt is longer than {m.tokenizer.max_length} tokens; this part was cut: {cut!r}",
                   err=True)
    m.to(device=dev, dtype=DTYPES[dtype.value])
    set_attention_backend(m.unet, backend)
    compile_network(m.unet, compile.value)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create it ({e.strerror})")
    settings = {"steps": params.steps, "guidance": params.guidance, "scheduler": name, "eta": params.eta,
                "clip_skip": clip_skip, "model": m.source, "dtype": dtype.value,
                "lora": [f"{f}:{w}" for f, w in loras], "embeddings": [str(f) for f, _ in embeddings],
                "software": "minidream"}  # in every PNG's text
    names = write_samples(m, prompt, params, sampler, out, made, seed, num_images, batch_size, progress, settings)
    typer.echo(f"wrote {len(names)} file(s) to {out}")


@app.command("train")
@with_options(TrainConfig)
def train(
    ctx: typer.Context,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint file to continue from.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out folder that holds another run.")] = False,
    **settings,
):
    """DreamBooth: bind IDENTIFIER to the subject in --instance-dir, with prior preservation."""
    from minidream.training.dreambooth import dreambooth
    # which settings the user named: on --resume only those may override (or conflict with) the checkpoint's
    given = {p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"}
    try:
        _, written = dreambooth(declared_values(TrainConfig, settings), resume=resume, overwrite=overwrite,
                                given=given)
    except TrainError as e:
        fail(str(e))
    for w in written:
        typer.echo(f"wrote {w}")


@app.command("demo-pretrain")
def demo_pretrain(
    out: Annotated[Path, path_option(help="Where the demo model is written (diffusers layout).")] = Path(
        "minidream/demo/weights"),
    seed: Annotated[int, typer.Option(help="Seed of the world, the initialisation and every draw.")] = 0,
    images: Annotated[int, typer.Option(help="Rendered pretraining images.")] = 20000,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps (batch 32).")] = 2500,
    unet_steps: Annotated[int, typer.Option(help="UNet + text encoder steps.")] = 4000,
    batch: Annotated[int, typer.Option(help="UNet batch size.")] = 64,
    recognizer_steps: Annotated[int, typer.Option(help="Recogniser training steps (batch 128).")] = 1000,
    reuse: Annotated[Optional[Path], path_option(help="A demo model folder whose VAE and recogniser are "
                                                       "kept.")] = None,
    grounding: Annotated[float, typer.Option(help="Weight of the cross-attention term that asks the words "
                                                  "naming a toy to look at it (demo/grounding.py); 0: none.")] = (
        GROUNDING),
):
    """Pretrain the embedded demo model of the toy world (CPU: about an hour) and its recogniser."""
    from minidream.demo.pretrain import pretrain
    out_folder(out)
    for name, v in (("--images", images), ("--vae-steps", vae_steps), ("--unet-steps", unet_steps),
                    ("--batch", batch), ("--recognizer-steps", recognizer_steps)):
        if v < 1:
            fail(f"{name} must be at least 1 (got {v})")
    if not 0 <= grounding <= 100:  # also NaN
        fail(f"--grounding must be a number from 0 to 100 (got {grounding})")
    if reuse is not None and not str(reuse).strip():
        fail("--reuse is empty; name a demo model folder")
    if reuse and not ((reuse / "vae" / "config.json").is_file() and (reuse / "recognizer.safetensors").is_file()):
        fail(f"--reuse {reuse}: not a demo model folder (it needs vae/ and recognizer.safetensors, as the "
             f"shipped demo model has)")
    typer.echo(json.dumps(pretrain(out, seed, images, vae_steps, unet_steps, batch, recognizer_steps, reuse,
                                    grounding), indent=2))


@app.command()
def demo(
    out: Annotated[Path, path_option(help="Run folder.")] = Path("runs/demo"),
    steps: Annotated[Optional[int], typer.Option(help="DreamBooth steps (default: the demo's, 175).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    prior: Annotated[bool, typer.Option("--prior/--no-prior", help="Prior-preservation loss.")] = True,
    subject: Annotated[str, typer.Option(help="Which held-out subject: 1 (the demo's), 2, 3 or its name, e.g. "
                                              "green-dotted-heart.")] = "1",
):
    """DreamBooth on the embedded toy-world model and a subject it never saw, on CPU in under a minute: before/after
    grids for "a sks toy", "a sks toy on a blue background", "a toy", and a metrics report."""
    from minidream.demo.architecture import DEMO_DIR
    from minidream.demo.run import run_demo
    if not (DEMO_DIR / "model_index.json").exists():
        fail(f"{DEMO_DIR}: the demo model is missing (it ships with minidream); reinstall, or rebuild it with "
             f"`minidream demo-pretrain --out {DEMO_DIR}`")
    picked = demo_subjects(subject, "--subject", several=False)
    check_demo_run(out, steps, [seed], "--seed")
    try:
        run_demo(out, prior=prior, seed=seed, subject=picked[0], **({"steps": steps} if steps is not None else {}))
    except TrainError as e:
        fail(str(e))
    except KeyboardInterrupt:  # the demo starts its folder over each time: nothing in it is lost
        fail(f"interrupted; {out} holds a partial demo run, which `minidream demo --out {out}` starts over")
    typer.echo((out / "report.md").read_text())
    typer.echo(f"grids: {out / 'before.png'} {out / 'after.png'}; "
               f"where the identifier looks: {out / 'attention.png'}")


@app.command()
def diff(base: ModelArg, tuned: ModelArg,
         out: Annotated[Path, path_option(help="Folder for diff.json, diff.md and diff.png.")],
         lora: LoraOpt = None, lora_scale: LoraScaleOpt = 1.0, embedding: EmbeddingOpt = None,
         embedding_token: EmbeddingTokenOpt = None, allow_pickle: AllowPickle = False,
         tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None):
    """What fine-tuning changed: ‖W_tuned − W_base‖/‖W_base‖ of every tensor, by component, block and layer type
    (--lora/--embedding are applied to TUNED: `diff BASE BASE --lora L` shows what a LoRA changes)."""
    import torch
    from minidream.inspect import weight_diff
    out_folder(out)
    a = load_model(base, None, None, allow_pickle, tokenizer, preset, config, dtype=torch.float32)
    loras = [lora_arg(x, lora_scale) for x in lora or []]
    embeddings = embedding_args(embedding or [], embedding_token or [])
    b = adapt(load_model(tuned, None, None, allow_pickle, tokenizer, preset, config, dtype=torch.float32), loras,
              embeddings, allow_pickle)
    try:
        d = weight_diff.diff(a, b)
    except ValueError as e:
        fail(f"{base} vs {tuned}: {e}")
    with writing(out):
        files = weight_diff.write(d, out, {"base": base, "tuned": tuned, "lora": lora or [],
                                           "embedding": [str(e) for e in embedding or []]})
    typer.echo(weight_diff.markdown(d).split("\n\n")[0])
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command("attention-maps")
@with_options(SamplingParams, steps=20)
def attention_maps(model: Annotated[str, typer.Option(help="Model folder, hub repo id or single-file checkpoint.")],
                   prompt: Annotated[str, typer.Option(help="Text prompt.")],
                   out: Annotated[Path, path_option(help="Folder for maps.png, maps.json and maps/.")],
                   seed: Annotated[int, typer.Option(help="Seed of the starting noise.")] = 0,
                   lora: LoraOpt = None, lora_scale: LoraScaleOpt = 1.0, embedding: EmbeddingOpt = None,
                   embedding_token: EmbeddingTokenOpt = None, allow_pickle: AllowPickle = False,
                   tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None, **sampling):
    """Where each prompt token looks: cross-attention probabilities averaged over heads, layers and steps."""
    from minidream.inspect import attention_maps as am
    params = sampling_params(sampling, prompt)
    check_seed(seed)
    out_folder(out)
    loras = [lora_arg(x, lora_scale) for x in lora or []]
    embeddings = embedding_args(embedding or [], embedding_token or [])
    m = adapt(load_model(model, None, None, allow_pickle, tokenizer, preset, config), loras, embeddings, allow_pickle)
    check_sampling(params, m)
    try:
        images, maps = am.attention_maps(m, [prompt], params, seed)
    except ValueError as e:
        fail(str(e))
    meta = {"model": model, "prompt": prompt, "seed": seed, "steps": params.steps, "guidance": params.guidance,
            "scheduler": params.sampler, "negative_prompt": params.negative_prompt, "eta": params.eta}
    with writing(out):
        files = am.write_maps(images[0], maps[0], am.token_positions(m.tokenizer, prompt), out, meta)
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="About a minute: three attention shapes, the LoRA step eager, fewer "
                                             "batches and sampling steps (on a CPU the tiny architecture).")] = False,
    out: Annotated[Path, path_option(help="Folder for the JSON (bench-<device>.json).")] = Path("minidream-bench"),
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when available.")] = None,
    only: Annotated[Optional[list[str]], typer.Option(help="A section to run (repeatable): attention, step, unet, "
                                                           "sampling, vae; default: all.")] = None,
):
    """Benchmark this machine: attention kernels, the DreamBooth step (eager, --compile, CUDA graphs), the UNet
    (MFU), sampling and the VAE, against diffusers where it is installed; tables here, JSON in --out."""
    from minidream.benchmarks.bench import SECTIONS, result_path, run
    from minidream.models.device import resolve_device
    unknown = [s for s in only or [] if s not in SECTIONS]
    if unknown:
        fail(f"--only {unknown[0]!r} is not one of {', '.join(SECTIONS)}")
    if device is not None and not device.strip():
        fail("--device is empty; give cuda, cuda:N or cpu (or leave it out: cuda when available)")
    try:
        dev = resolve_device(device).type
    except ValueError as e:
        fail(str(e))
    out_folder(out)
    path = result_path(out, dev)
    if path.is_dir():
        fail(f"{path} is a folder; move it, or give another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            fail(f"--out {out}: not writable; give another folder")
        with writing(path):
            failed = run(quick, dev, path, only)
    except KeyboardInterrupt:
        if path.exists():
            fail(f"interrupted; the sections measured so far are in {path}")
        if made and not any(out.iterdir()):
            out.rmdir()
        fail("interrupted before any section finished; nothing was written")
    except OSError as e:
        fail(f"--out {out}: cannot create it ({e.strerror})")
    if failed and len(failed) == len(only or SECTIONS):
        fail(f"every section failed on this machine: {failed[0]}; the errors are in {path}")
    typer.echo(f"wrote {path}" + (f" (failed: {'; '.join(failed)})" if failed else ""))


@app.command("eval")
def evaluate(
    out: Annotated[Path, path_option(help="Folder for the runs and the table.")] = Path("runs/eval"),
    steps: Annotated[Optional[int], typer.Option(help="DreamBooth steps per run (default: the demo's, 175).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; each DreamBooth run once per seed.")] = "0,1,2",
    subjects: Annotated[str, typer.Option(help="Held-out subjects: all, or comma-separated numbers or names "
                                               "(1 = the demo's yellow-striped-star).")] = "1",
):
    """DreamBooth's claims, measured on the demo world: subject and prompt fidelity, PRES and DIV, and where the
    identifier looks, for the base model and for DreamBooth with and without prior preservation, over held-out
    subjects and seeds (--subjects all: 3 subjects x 2 runs x the seeds, about 6 minutes on 2 CPU cores)."""
    from minidream.demo.run import run_eval
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", seeds):
        fail(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2")
    picked = demo_subjects(subjects, "--subjects")
    check_demo_run(out, steps, list(map(int, seeds.split(","))), "--seeds")
    try:
        table = run_eval(out, tuple(map(int, seeds.split(","))), subjects=picked,
                         **({"steps": steps} if steps is not None else {}))
    except TrainError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted; the runs finished so far are in {out}, and `minidream eval --out {out}` starts over")
    typer.echo(table["table"])


def demo_subjects(text: str, flag: str, several: bool = True) -> tuple[dict, ...]:
    from minidream.demo.world import pick_subjects
    try:
        return pick_subjects(text, several)
    except ValueError as e:
        fail(f"{flag}: {e}")


def check_demo_run(out: Path, steps: int | None, seeds: list[int], seed_flag: str):
    """The demo's and eval's own options, before any work."""
    out_folder(out)
    if steps is not None and not 1 <= steps <= 100_000:
        fail(f"--steps must be in [1, 100000] (got {steps})")
    bad = [s for s in seeds if not 0 <= s < 2 ** 63]
    if bad:
        fail(f"{seed_flag} must be in [0, 2^63) (got {bad[0]})")


def main():
    app()


if __name__ == "__main__":
    main()
