"""The `minidream` command: one function per subcommand, each option declared once. `train`'s options are
TrainConfig's fields (minidream/training/config.py), `sample`'s and `attention-maps`' sampling options SamplingParams'
(sampling/pipeline.py), and every other command's the small dataclasses of minidream/cli_options.py (the loader
options among them are TrainConfig's declarations). minidream/options.py turns a declaration into an option."""
# ruff: noqa: E402 (the imports follow the Ctrl-C handler that covers them)
import signal
import sys

# Ctrl-C while the modules below load (torch takes a second or more): one line, no traceback (nothing is written yet)
signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting; nothing was written"))
import json
import os
from typing import Annotated, Optional

import typer

from minidream.cli_common import (OneLineErrors, adapt, adapter_files, check_sampling, checked, demo_ready,
                                  device_and_backend, fail, load_model, resolved_device, shipped_defaults, text_read,
                                  warn_unknown_tokens, with_run_file, write_samples, writing)
from minidream.cli_options import (Adapters, Bench, Demo, Diff, Eval, Loader, Maps, MovedConfig, Pretrain, Run,
                                   Sample)
from minidream.sampling.pipeline import SamplingParams
from minidream.training import TrainError
from minidream.training.config import TrainConfig, combinations, validate
from minidream.options import declared_values, with_options
from minidream.run_files import RunFile, to_toml

signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is KeyboardInterrupt again (a run saves)

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Stable Diffusion and DreamBooth in plain PyTorch.")
ModelArg = Annotated[str, typer.Argument(help="Model: a diffusers-layout folder, a hub repo id (owner/name), "
                                              "a single-file .safetensors checkpoint, or demo (the shipped toy "
                                              "model).")]


# ---------------------------------------------------------------------------------------------
# The commands

@app.command()
@with_options(Loader, MovedConfig)
def info(model: ModelArg, **options):
    """Load a model and print what it is: version, parameter counts, dtype, prediction type."""
    from minidream.sampling.samplers import default_sampler
    m = load_model(model, *checked(options, Loader))
    typer.echo(f"model      {m.source}")
    typer.echo(f"version    {m.version}")
    typer.echo(f"family     {m.family.title}: conditioned on {m.family.conditioned_on}; no negative prompt = "
               f"{'zeros' if m.force_zeros_for_empty_prompt else 'the empty prompt'}")
    typer.echo(f"prediction {m.scheduler.prediction_type} ({m.scheduler.describe()})")
    try:
        own = default_sampler(m.scheduler)
    except ValueError:
        own = "none of ours (pass --scheduler to sample)"
    typer.echo(f"sampler    {m.scheduler.class_name}: {own}")
    for name, tok, _ in m.text_encoders():
        typer.echo(f"{name.replace('text_encoder', 'tokenizer'):<12} {len(tok)} tokens, pad {tok.pad_token!r}")
    if m.family.t5:
        typer.echo(f"tokenizer_3  {len(m.tokenizer_3)} tokens, {m.max_sequence_length} per prompt" if m.tokenizer_3
                   else "t5         none: zeros in its place (--no-t5, or the model has none)")
    t5 = [("text_encoder_3", m.text_encoder_3)] if m.text_encoder_3 is not None else []
    for name, mod in (*[(n, te) for n, _, te in m.text_encoders()], *t5, (m.family.denoiser, m.denoiser),
                      ("vae", m.vae)):
        p = next(mod.parameters())
        n = sum(x.numel() for x in mod.parameters())
        typer.echo(f"{name:<14} {n / 1e6:9.2f}M params  {str(p.dtype).removeprefix('torch.')}")
    typer.echo(f"resolution {m.native_resolution} px native")


SAMPLE = (Sample, SamplingParams, Run, Adapters, Loader)


@app.command()
@with_options(*SAMPLE, RunFile, model=None, prompt=None, out=None)
def sample(ctx: typer.Context, **options):
    """Text to image: writes one PNG per image (settings in the PNG text) and a grid when several."""
    from minidream.models.attention import set_attention_backend
    from minidream.models.compile import compile_network
    from minidream.models.device import DTYPES
    from minidream.models.flow_matching import FlowConfig
    from minidream.sampling.samplers import default_sampler, zero_snr_schedule
    options, _ = with_run_file(ctx, options, SAMPLE)
    o, params, run, adapters, loader = checked(options, *SAMPLE)
    if options["print_config"]:
        return typer.echo(to_toml(o, params, run, adapters, loader), nl=False)
    loras, embeddings = adapter_files(adapters)
    dev, backend = device_and_backend(run)
    m = text_read(load_model(o.model, loader), o.clip_skip, o.max_sequence_length)
    if o.zero_terminal_snr:
        if isinstance(m.scheduler, FlowConfig):
            fail(f"--zero-terminal-snr: {m.family.title} is a rectified flow, which reaches pure noise already; "
                 f"drop it")
        m.scheduler = zero_snr_schedule(m.scheduler)
    check_sampling(params, m)
    params = params.for_model(m)  # the PNGs say the steps and guidance used
    name = params.sampler or default_sampler(m.scheduler)  # the model's own, by name, for the PNGs
    sampler = params.make_sampler(m.scheduler)  # one sampler for every batch
    adapt(m, loras, embeddings, loader.allow_pickle)
    warn_unknown_tokens(m, o.prompt, params.negative_prompt)
    cut = m.tokenizer.truncated(o.prompt)
    if cut:
        typer.echo(f"warning: the prompt is longer than {m.tokenizer.max_length} tokens; this part was cut: {cut!r}",
                   err=True)
    cut = m.tokenizer_3 and m.tokenizer_3.truncated(o.prompt, m.max_sequence_length)
    if cut:  # SD3's T5 reads more of it (--max-sequence-length), but not all
        typer.echo(f"warning: the prompt is longer than T5's {m.max_sequence_length} tokens; this part was cut "
                   f"there: {cut!r}", err=True)
    m.to(device=dev, dtype=DTYPES[run.dtype])
    set_attention_backend(m.denoiser, backend)
    compile_network(m.denoiser, run.compile)
    made = not o.out.exists()
    try:
        o.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {o.out}: cannot create it ({e.strerror})")
    settings = {"steps": params.steps, "guidance": params.guidance, "true_cfg": params.true_cfg, "scheduler": name,
                "eta": params.eta, "guidance_rescale": params.guidance_rescale,
                "zero_terminal_snr": o.zero_terminal_snr,
                "clip_skip": o.clip_skip, "model": m.source, "dtype": run.dtype,
                "lora": [f"{f}:{w}" for f, w in loras], "embeddings": [str(f) for f, _ in embeddings],
                "software": "minidream"}  # in every PNG's text
    names = write_samples(m, o, params, sampler, made, settings)
    typer.echo(f"wrote {len(names)} file(s) to {o.out}")


@app.command("train")
@with_options(TrainConfig, RunFile, out=None)
def train(
    ctx: typer.Context,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint file to continue from.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out folder that holds another run.")] = False,
    **settings,
):
    """DreamBooth: bind IDENTIFIER to the subject in --instance-dir, with prior preservation."""
    from minidream.training.dreambooth import dreambooth, resumed_run
    # which settings the user named (here or in --config's run file): on --resume only those may override (or
    # conflict with) the checkpoint's
    settings, given = with_run_file(ctx, settings, (TrainConfig,))
    try:
        cfg = declared_values(TrainConfig, settings)
        if settings["print_config"] and resume:  # the resumed run's: the checkpoint's, with what may change
            return typer.echo(to_toml(resumed_run(cfg, resume, given)), nl=False)
        if settings["print_config"]:  # each setting checked alone and against the others (the run's other checks
            validate(cfg, resuming=True)  # need its files: a run file may name them later)
            combinations(cfg)
            return typer.echo(to_toml(cfg), nl=False)
        if not resume:
            cfg, given = shipped_defaults(cfg, given)
        _, written = dreambooth(cfg, resume=resume, overwrite=overwrite, given=given)
    except TrainError as e:
        fail(str(e))
    for w in written:
        typer.echo(f"wrote {w}")


@app.command("demo-pretrain")
@with_options(Pretrain)
def demo_pretrain(**options):
    """Pretrain the embedded demo model of the toy world (CPU: about an hour) and its recogniser."""
    from minidream.demo.pretrain import pretrain
    o, = checked(options, Pretrain)
    if o.reuse and not ((o.reuse / "vae" / "config.json").is_file() and (o.reuse / "recognizer.safetensors").is_file()):
        fail(f"--reuse {o.reuse}: not a demo model folder (it needs vae/ and recognizer.safetensors, as the "
             f"shipped demo model has)")
    typer.echo(json.dumps(pretrain(o.out, o.seed, o.images, o.vae_steps, o.unet_steps, o.batch, o.recognizer_steps,
                                    o.reuse, o.grounding), indent=2))


@app.command()
@with_options(Demo)
def demo(**options):
    """DreamBooth on the embedded toy-world model and a subject it never saw, on CPU in under a minute: before/after
    grids for "a sks toy", "a sks toy on a blue background", "a toy", and a metrics report."""
    from minidream.demo.run import run_demo
    o, = checked(options, Demo)
    demo_ready(o.out, o.overwrite)
    picked = demo_subjects(o.subject, "--subject", several=False)
    try:
        run_demo(o.out, prior=o.prior, seed=o.seed, subject=picked[0], **steps_given(o.steps))
    except TrainError as e:
        fail(str(e))
    except KeyboardInterrupt:  # the demo starts its folder over each time: nothing in it is lost
        fail(f"interrupted; {o.out} holds a partial demo run, which `minidream demo --out {o.out}` starts over")
    typer.echo((o.out / "report.md").read_text())
    typer.echo(f"grids: {o.out / 'before.png'} {o.out / 'after.png'}; "
               f"where the identifier looks: {o.out / 'attention.png'}")


@app.command()
@with_options(Diff, Adapters, Loader, MovedConfig)
def diff(base: ModelArg, tuned: ModelArg, **options):
    """What fine-tuning changed: ‖W_tuned − W_base‖/‖W_base‖ of every tensor, by component, block and layer type
    (--lora/--embedding are applied to TUNED: `diff BASE BASE --lora L` shows what a LoRA changes)."""
    import torch
    from minidream.inspect import weight_diff
    o, adapters, loader = checked(options, Diff, Adapters, Loader)
    loras, embeddings = adapter_files(adapters)
    a = load_model(base, loader, dtype=torch.float32)
    b = adapt(load_model(tuned, loader, dtype=torch.float32), loras, embeddings, loader.allow_pickle)
    try:
        d = weight_diff.diff(a, b)
    except ValueError as e:
        fail(f"{base} vs {tuned}: {e}")
    with writing(o.out):
        files = weight_diff.write(d, o.out, {"base": base, "tuned": tuned, "lora": list(adapters.lora),
                                             "embedding": list(adapters.embedding)})
    typer.echo(weight_diff.markdown(d).split("\n\n")[0])
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command("attention-maps")
@with_options(Maps, SamplingParams, Adapters, Loader, MovedConfig, steps=20)
def attention_maps(**options):
    """Where each prompt token looks: cross-attention probabilities averaged over heads, layers and steps."""
    from minidream.inspect import attention_maps as am
    o, params, adapters, loader = checked(options, Maps, SamplingParams, Adapters, Loader)
    m = adapt(load_model(o.model, loader), *adapter_files(adapters), loader.allow_pickle)
    check_sampling(params, m)
    params = params.for_model(m)  # the metadata says the guidance used
    try:
        images, maps = am.attention_maps(m, [o.prompt], params, o.seed)
    except ValueError as e:
        fail(str(e))
    meta = {"model": o.model, "prompt": o.prompt, "seed": o.seed, "steps": params.steps, "guidance": params.guidance,
            "scheduler": params.sampler, "negative_prompt": params.negative_prompt, "eta": params.eta}
    with writing(o.out):
        files = am.write_maps(images[0], maps[0], am.token_positions(m.tokenizer, o.prompt), o.out, meta)
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command()
@with_options(Bench)
def bench(**options):
    """Benchmark this machine: attention kernels, the DreamBooth step (eager, --compile, CUDA graphs), the UNet
    (MFU), sampling and the VAE, against diffusers where it is installed; tables here, JSON in --out."""
    from minidream.benchmarks.bench import SECTIONS, result_path, run
    o, = checked(options, Bench)
    dev = resolved_device(o.device)
    path = result_path(o.out, dev)
    if path.is_dir():
        fail(f"{path} is a folder; move it, or give another --out")
    made = not o.out.exists()
    try:
        o.out.mkdir(parents=True, exist_ok=True)
        if not os.access(o.out, os.W_OK):
            fail(f"--out {o.out}: not writable; give another folder")
        with writing(path):
            failed = run(o.quick, dev, path, list(o.only) or None)
    except KeyboardInterrupt:
        if path.exists():
            fail(f"interrupted; the sections measured so far are in {path}")
        if made and not any(o.out.iterdir()):
            o.out.rmdir()
        fail("interrupted before any section finished; nothing was written")
    except OSError as e:
        fail(f"--out {o.out}: cannot create it ({e.strerror})")
    if failed and len(failed) == len(o.only or SECTIONS):
        fail(f"every section failed on this machine: {failed[0]}; the errors are in {path}")
    typer.echo(f"wrote {path}" + (f" (failed: {'; '.join(failed)})" if failed else ""))


@app.command("eval")
@with_options(Eval)
def evaluate(**options):
    """DreamBooth's claims, measured on the demo world: subject and prompt fidelity, PRES and DIV, and where the
    identifier looks, for the base model and for DreamBooth with and without prior preservation, over held-out
    subjects and seeds (--subjects all: 3 subjects x 2 runs x the seeds, about 6 minutes on 2 CPU cores)."""
    from minidream.demo.run import run_eval
    o, = checked(options, Eval)
    picked = demo_subjects(o.subjects, "--subjects")
    try:
        table = run_eval(o.out, tuple(map(int, o.seeds.split(","))), subjects=picked, recipe=o.recipe,
                         **steps_given(o.steps))
    except TrainError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted; the runs finished so far are in {o.out}, and `minidream eval --out {o.out}` starts over")
    typer.echo(table["table"])


def demo_subjects(text: str, flag: str, several: bool = True) -> tuple[dict, ...]:
    from minidream.demo.world import pick_subjects
    try:
        return pick_subjects(text, several)
    except ValueError as e:
        fail(f"{flag}: {e}")


def steps_given(steps: int | None) -> dict:
    """--steps for the demo's runs, when given (else the demo's own)."""
    return {} if steps is None else {"steps": steps}


def main():
    app()


if __name__ == "__main__":
    main()
