"""The `minidream` command: one typed function per subcommand; defaults live in the signatures."""
import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from minidream import choices
from minidream.training.config import DEFAULTS as D
from minidream.training.config import FIELDS, MODE_DEFAULTS, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stable Diffusion and DreamBooth in plain PyTorch.")


def choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice built from one of minidream.choices' tuples (the one place each list is written)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Scheduler = choice("Scheduler", choices.SAMPLERS)
DType = choice("DType", choices.DTYPES)
AttentionBackend = choice("AttentionBackend", choices.ATTENTION_BACKENDS)
TrainMode = choice("TrainMode", choices.TRAIN_MODES)
Precision = choice("Precision", choices.MIXED_PRECISIONS)
LRSchedule = choice("LRSchedule", choices.LR_SCHEDULES)
ClassPrecision = choice("ClassPrecision", choices.CLASS_PRECISIONS)
SaveAs = choice("SaveAs", choices.EXPORTS)
ReportTo = choice("ReportTo", choices.REPORT_TO)


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
    return f, w


def out_folder(out: Path):
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder")


def adapt(m, loras: list[tuple[Path, float]], embeddings: list[tuple[Path, str | None]], allow_pickle: bool):
    """Other tools' embeddings added and LoRAs merged into a loaded model."""
    from minidream.formats.adapters import add_embedding, apply_loras
    from minidream.formats.loading import ModelError
    try:
        for f, tok in embeddings:
            add_embedding(m, f, tok, allow_pickle)
        apply_loras(m, loras, allow_pickle)
    except (ValueError, ModelError) as e:
        fail(str(e))
    return m


def device_and_backend(device: str | None, attention, dtype) -> tuple[str, str]:
    from minidream.models.attention import resolve_backend
    from minidream.models.stable_diffusion import resolve_device
    try:
        dev = resolve_device(device).type
        backend = resolve_backend(attention.value, dev)
    except ValueError as e:
        fail(str(e))
    if dtype != DType.fp32 and dev == "cpu":
        fail(f"--dtype {dtype.value} needs a GPU; use --dtype fp32 on CPU")
    return dev, backend


def concepts_arg(path: Path | None) -> tuple:
    """--concepts FILE.json, read and checked (the entries are stored in the run's config)."""
    from minidream.training.concepts import read_concepts_file
    from minidream.training.config import TrainError
    try:
        return read_concepts_file(path) if path is not None else ()
    except TrainError as e:
        fail(str(e))


def embedding_args(files: list[Path], tokens: list[str]) -> list[tuple[Path, str | None]]:
    """--embedding FILE (repeatable), each with the --embedding-token of the same position, if any."""
    for f in files:
        if not f.is_file():
            fail(f"--embedding {f}: no such file")
    if len(tokens) > len(files):
        fail("--embedding-token: more tokens than --embedding files")
    return list(zip(files, [*tokens, *[None] * (len(files) - len(tokens))]))


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
                                                       f"({', '.join(choices.PRESETS)}); inferred when omitted.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(help="LoRA file to merge, FILE or FILE:SCALE (diffusers/PEFT or "
                                                       "kohya/LyCORIS LoCon); repeat for several.")]
EmbeddingOpt = Annotated[Optional[list[Path]], typer.Option(help="Textual-inversion embedding (ours, diffusers', "
                                                               "A1111's); repeat for several.")]


def load_model(model: str, revision=None, variant=None, allow_pickle=False, tokenizer=None, preset=None, config=None,
               dtype=None):
    from minidream.formats.loading import ModelError, load
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
    from minidream.sampling.samplers import default_sampler
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
    if m.xl:
        typer.echo(f"conditioning  SDXL: both encoders' penultimate states + pooled text + size ids; no negative prompt"
                   f" = {'zeros' if m.force_zeros_for_empty_prompt else 'the empty prompt'}")
    typer.echo(f"resolution {m.native_resolution} px native")


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Model folder, hub repo id or single-file checkpoint.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="Output folder for the PNGs.")],
    negative_prompt: Annotated[Optional[str], typer.Option(help="Negative prompt (the unconditional branch of CFG); "
                                                    "default none: the empty prompt, for SDXL zeros (as diffusers).")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale; <= 1 turns CFG off.")] = 7.5,
    scheduler: Annotated[Optional[Scheduler], typer.Option(help="Sampler; default: the model's own scheduler "
                                                                "(scheduler_config.json's class).")] = None,
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
    lora: LoraOpt = None,
    lora_scale: Annotated[float, typer.Option(help="Strength of each --lora given without :SCALE.")] = 1.0,
    embedding: EmbeddingOpt = None,
    embedding_token: Annotated[Optional[list[str]], typer.Option(help="Token for the --embedding of the same position; "
                                                                    "default: the name in the file.")] = None,
    revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
    tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Text to image: writes one PNG per image (settings in the PNG text) and a grid when several."""
    import torch
    from minidream.models.attention import set_attention_backend
    from minidream.sampling.pipeline import generate, grid, save_png
    from minidream.sampling.samplers import default_sampler, make_sampler

    if num_images < 1 or batch_size < 1:
        fail("--num-images and --batch-size must be at least 1")
    if (height is not None and (height < 8 or height % 8)) or (width is not None and (width < 8 or width % 8)):
        fail(f"--height/--width must be positive multiples of 8 (got {height}x{width})")
    if seed < 0 or seed + (num_images - 1) // batch_size >= 2 ** 63:
        fail(f"--seed must be in [0, 2^63) for every batch (got {seed})")
    out_folder(out)
    loras = [lora_arg(a, lora_scale) for a in lora or []]
    embeddings = embedding_args(embedding or [], embedding_token or [])
    dev, backend = device_and_backend(device, attention, dtype)
    m = load_model(model, revision, variant, allow_pickle, tokenizer, preset, config)
    try:
        sampler = scheduler.value if scheduler else default_sampler(m.scheduler)
        make_sampler(sampler, m.scheduler, eta)
    except ValueError as e:
        fail(f"--scheduler: {m.source}: {e}")
    adapt(m, loras, embeddings, allow_pickle)
    cut = m.tokenizer.truncated(prompt)
    if cut:
        typer.echo(f"warning: the prompt is longer than {m.tokenizer.max_length} tokens; this part was cut: {cut!r}", err=True)
    m.to(device=dev, dtype=torch_dtype(dtype))
    set_attention_backend(m.unet, backend)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create it ({e.strerror})")
    images, names = [], []
    for k, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        g = torch.Generator("cpu").manual_seed(seed + k)
        try:
            imgs = generate(m, [prompt] * n, negative_prompt, steps, guidance, sampler, eta, height, width,
                            generator=g, progress=progress)
        except ValueError as e:
            fail(str(e))
        for i, img in enumerate(imgs):
            meta = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed + k, "index_in_batch": i,
                    "steps": steps, "guidance": guidance, "scheduler": sampler, "eta": eta,
                    "model": m.source, "dtype": dtype.value, "lora": [f"{f}:{w}" for f, w in loras],
                    "embeddings": [str(f) for f, _ in embeddings], "software": "minidream"}
            name = out / f"{start + i:04d}.png"
            try:
                save_png(img, name, meta)
            except OSError as e:
                fail(f"{name}: could not be written ({e.strerror})")
            images.append(img)
            names.append(name)
    if len(images) > 1:
        save_png(grid(torch.stack(images)), out / "grid.png", {"prompt": prompt, "seed": seed})
        names.append(out / "grid.png")
    typer.echo(f"wrote {len(names)} file(s) to {out}")


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Base model: folder, hub repo id or single-file checkpoint.")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics, samples, exports.")],
    instance_dir: Annotated[Optional[Path], typer.Option(help="Folder with 3-20 photos of the subject (jpg/png/webp).")] = None,
    class_noun: Annotated[Optional[str], typer.Option(help="The subject's class, e.g. dog.")] = None,
    concepts: Annotated[Optional[Path], typer.Option(help="JSON list of concepts (instead of --instance-dir/--class-noun): "
                                                          "{instance_dir, instance_prompt | identifier + class_noun, "
                                                          "class_prompt, class_dir, num_class_images}.")] = None,
    caption_ext: Annotated[Optional[str], typer.Option(help="A caption file beside an image (IMAGE.EXT, e.g. .txt) "
                                                            "is that image's prompt.")] = D["caption_ext"],
    aspect_buckets: Annotated[bool, typer.Option(help="Aspect-ratio buckets of about --resolution² pixels instead of "
                                                      "square crops.")] = D["aspect_buckets"],
    max_aspect: Annotated[float, typer.Option(help="Largest bucket aspect ratio.")] = D["max_aspect"],
    identifier: Annotated[str, typer.Option(help="Rare token bound to the subject.")] = D["identifier"],
    instance_prompt: Annotated[Optional[str], typer.Option(help="Default: 'a photo of IDENTIFIER CLASS'.")] = D["instance_prompt"],
    class_prompt: Annotated[Optional[str], typer.Option(help="Default: 'a photo of CLASS'.")] = D["class_prompt"],
    class_dir: Annotated[Optional[Path], typer.Option(help="Class images (generated here if too few). Default: OUT/class_images.")] = D["class_dir"],
    prior: Annotated[bool, typer.Option("--prior/--no-prior", help="Class-specific prior-preservation loss.")] = D["prior"],
    num_class_images: Annotated[int, typer.Option(help="Class images to have (generated by the base model).")] = D["num_class_images"],
    prior_loss_weight: Annotated[float, typer.Option(help="λ, weight of the prior-preservation loss.")] = D["prior_loss_weight"],
    class_steps: Annotated[int, typer.Option(help="Sampling steps for class images.")] = D["class_steps"],
    class_guidance: Annotated[float, typer.Option(help="CFG scale for class images.")] = D["class_guidance"],
    class_batch_size: Annotated[int, typer.Option(help="Class images per sampling batch.")] = D["class_batch_size"],
    class_precision: Annotated[ClassPrecision, typer.Option(help="Precision of class-image sampling (autocast); "
                                                                 "auto: fp16 on CUDA, fp32 on CPU.")] = ClassPrecision(D["class_precision"]),
    class_negative_prompt: Annotated[str, typer.Option(help="Negative prompt for the class images.")] = D["class_negative_prompt"],
    class_scheduler: Annotated[Optional[Scheduler], typer.Option(help="Sampler for class images; default: the model's own.")] = D["class_scheduler"],
    resolution: Annotated[Optional[int], typer.Option(help="Training resolution in pixels; default: the model's "
                                                           "native one (512 for SD 1.x/2.x-base, 768 for 2.x-v).")] = D["resolution"],
    center_crop: Annotated[bool, typer.Option("--center-crop/--random-crop", help="Crop mode.")] = D["center_crop"],
    flip: Annotated[float, typer.Option(help="Probability of a horizontal flip.")] = D["flip"],
    train: Annotated[TrainMode, typer.Option(help="unet: whole UNet; attention: Q/K/V/out of every attention "
                                                  "layer; lora: LoRA adapters on those.")] = TrainMode(D["train"]),
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = D["lora_rank"],
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha/r).")] = D["lora_alpha"],
    train_text_encoder: Annotated[bool, typer.Option(help="Also train the text encoder (LoRA with --train lora).")] = D["train_text_encoder"],
    train_token: Annotated[bool, typer.Option(help="Learn a new token embedding <IDENTIFIER>, initialised from the class noun.")] = D["train_token"],
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Default per mode: " + ", ".join(
        f"{m} {d['lr']:g}" for m, d in MODE_DEFAULTS.items()) + ".")] = D["lr"],
    text_encoder_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the text encoder (default: --lr).")] = D["text_encoder_lr"],
    text_encoder_steps: Annotated[int, typer.Option(help="Stop training the text encoder after this many steps (0: never).")] = D["text_encoder_steps"],
    token_lr: Annotated[float, typer.Option(help="Learning rate of the new token embedding.")] = D["token_lr"],
    lr_schedule: Annotated[LRSchedule, typer.Option(help="After warmup.")] = LRSchedule(D["lr_schedule"]),
    lr_power: Annotated[float, typer.Option(help="Power of the polynomial schedule.")] = D["lr_power"],
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = D["warmup_steps"],
    adam_beta1: Annotated[float, typer.Option(help="AdamW beta1.")] = D["adam_beta1"],
    adam_beta2: Annotated[float, typer.Option(help="AdamW beta2.")] = D["adam_beta2"],
    adam_epsilon: Annotated[float, typer.Option(help="AdamW epsilon.")] = D["adam_epsilon"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not applied to a new token).")] = D["weight_decay"],
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: no clipping).")] = D["max_grad_norm"],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = D["steps"],
    batch_size: Annotated[int, typer.Option(help="Instance images per step (plus as many class images).")] = D["batch_size"],
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation micro-steps.")] = D["grad_accum"],
    mixed_precision: Annotated[Precision, typer.Option(help="Autocast dtype (fp16 needs a GPU); frozen weights run in "
                                                           "it, trained ones keep fp32 masters.")] = Precision(D["mixed_precision"]),
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help="On CUDA, TF32 tensor cores for fp32 matmuls and convolutions.")] = D["tf32"],
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations per block in backward.")] = D["gradient_checkpointing"],
    cache_latents: Annotated[bool, typer.Option(help="Encode the images with the VAE once.")] = D["cache_latents"],
    snr_gamma: Annotated[Optional[float], typer.Option(help="Min-SNR-gamma loss weighting (e.g. 5).")] = D["snr_gamma"],
    noise_offset: Annotated[float, typer.Option(help="Noise offset (e.g. 0.05).")] = D["noise_offset"],
    seed: Annotated[int, typer.Option(help="Seed of every random draw.")] = D["seed"],
    validation_prompts: Annotated[Optional[list[str]], typer.Option("--validation-prompt", help="Prompt for validation grids (repeatable).")] = None,
    validation_every: Annotated[int, typer.Option(help="Steps between validation grids (0: only at the end).")] = D["validation_every"],
    validation_images: Annotated[int, typer.Option(help="Images per validation prompt (fixed seeds).")] = D["validation_images"],
    validation_steps: Annotated[int, typer.Option(help="Sampling steps for validation images.")] = D["validation_steps"],
    validation_scheduler: Annotated[Optional[Scheduler], typer.Option(help="Sampler for validation grids; default: the model's own.")] = D["validation_scheduler"],
    report_to: Annotated[ReportTo, typer.Option(help="Also log to TensorBoard (OUT/tensorboard; pip install "
                                                     "'minidream[tensorboard]'). OUT/curves.png is always drawn.")] = ReportTo(D["report_to"]),
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: none).")] = D["checkpoint_every"],
    keep_last: Annotated[int, typer.Option(help="Checkpoints to keep (0: all).")] = D["keep_last"],
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint file to continue from.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out folder that holds another run.")] = False,
    save_as: Annotated[Optional[list[SaveAs]], typer.Option(help="Export formats (repeatable). Default: diffusers; "
                                                                  "with --train lora: lora-diffusers and lora-kohya.")] = None,
    attention: Annotated[AttentionBackend, typer.Option(help="Attention kernel.")] = AttentionBackend(D["attention"]),
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when available.")] = D["device"],
    revision: Revision = None, variant: Variant = None, allow_pickle: AllowPickle = False,
    tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None,
):
    """DreamBooth: bind IDENTIFIER to the subject in --instance-dir, with prior preservation."""
    params = dict(locals())
    from minidream.training.dreambooth import TrainError, train as run
    # which settings the user named: on --resume only those may override (or conflict with) the checkpoint's
    given = {p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"}  # click's enum, or typer's copy
    values = {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
              for k, v in params.items() if k in FIELDS}
    values.update(validation_prompts=tuple(validation_prompts or ()), save_as=tuple(s.value for s in save_as or ()),
                  instance_dir=str(instance_dir) if instance_dir else None, concepts=concepts_arg(concepts))
    try:
        _, written = run(TrainConfig(**values), resume=resume, overwrite=overwrite, given=given)
    except TrainError as e:
        fail(str(e))
    for w in written:
        typer.echo(f"wrote {w}")


@app.command("demo-pretrain")
def demo_pretrain(
    out: Annotated[Path, typer.Option(help="Where the demo model is written (diffusers layout).")] = Path("weights/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the world, the initialisation and every draw.")] = 0,
    images: Annotated[int, typer.Option(help="Rendered pretraining images.")] = 20000,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps (batch 32).")] = 2500,
    unet_steps: Annotated[int, typer.Option(help="UNet + text encoder steps.")] = 4000,
    batch: Annotated[int, typer.Option(help="UNet batch size.")] = 64,
    recognizer_steps: Annotated[int, typer.Option(help="Recogniser training steps (batch 128).")] = 1000,
    reuse: Annotated[Optional[Path], typer.Option(help="A demo model folder whose VAE and recogniser are kept.")] = None,
):
    """Pretrain the embedded demo model of the toy world (CPU: about an hour) and its recogniser."""
    from minidream.demo.run import pretrain
    if reuse and not ((reuse / "vae" / "config.json").is_file() and (reuse / "recognizer.safetensors").is_file()):
        fail(f"--reuse {reuse}: not a demo model folder (it needs vae/ and recognizer.safetensors, as weights/demo has)")
    typer.echo(json.dumps(pretrain(out, seed, images, vae_steps, unet_steps, batch, recognizer_steps, reuse), indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    steps: Annotated[Optional[int], typer.Option(help="DreamBooth steps (default: the demo's, 50).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    prior: Annotated[bool, typer.Option("--prior/--no-prior", help="Prior-preservation loss.")] = True,
):
    """DreamBooth on the embedded toy-world model and subject, on CPU in under a minute: before/after
    grids for "a sks toy", "a sks toy on a blue background", "a toy", and a metrics report."""
    from minidream.demo.run import DEMO_DIR, run_demo
    if not (DEMO_DIR / "model_index.json").exists():
        fail(f"{DEMO_DIR}: the demo model is missing (it ships with minidream); reinstall, or rebuild it with "
             f"`minidream demo-pretrain --out {DEMO_DIR}`")
    run_demo(out, prior=prior, seed=seed, **({"steps": steps} if steps else {}))
    typer.echo((out / "report.md").read_text())
    typer.echo(f"grids: {out / 'before.png'} {out / 'after.png'}")


@app.command()
def diff(base: ModelArg, tuned: ModelArg,
         out: Annotated[Path, typer.Option(help="Folder for diff.json, diff.md and diff.png.")],
         lora: LoraOpt = None, embedding: EmbeddingOpt = None, allow_pickle: AllowPickle = False,
         tokenizer: TokenizerOpt = None, preset: PresetOpt = None, config: ConfigOpt = None):
    """What fine-tuning changed: ‖W_tuned − W_base‖/‖W_base‖ of every tensor, by component, block and layer type
    (--lora/--embedding are applied to TUNED: `diff BASE BASE --lora L` shows what a LoRA changes)."""
    import torch
    from minidream.inspect import weight_diff
    out_folder(out)
    a = load_model(base, None, None, allow_pickle, tokenizer, preset, config, dtype=torch.float32)
    b = adapt(load_model(tuned, None, None, allow_pickle, tokenizer, preset, config, dtype=torch.float32),
              [lora_arg(x, 1.0) for x in lora or []], embedding_args(embedding or [], []), allow_pickle)
    try:
        d = weight_diff.diff(a, b)
    except ValueError as e:
        fail(f"{base} vs {tuned}: {e}")
    files = weight_diff.write(d, out, {"base": base, "tuned": tuned, "lora": lora or [], "embedding": [str(e) for e in embedding or []]})
    typer.echo(weight_diff.markdown(d).split("\n\n")[0])
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command("attention-maps")
def attention_maps(model: Annotated[str, typer.Option(help="Model folder, hub repo id or single-file checkpoint.")],
                   prompt: Annotated[str, typer.Option(help="Text prompt.")],
                   out: Annotated[Path, typer.Option(help="Folder for maps.png, maps.json and maps/.")],
                   seed: int = 0, steps: int = 20, guidance: float = 7.5,
                   scheduler: Annotated[Optional[Scheduler], typer.Option(help="Sampler; default: the model's own.")] = None,
                   height: Optional[int] = None, width: Optional[int] = None, lora: LoraOpt = None,
                   embedding: EmbeddingOpt = None, allow_pickle: AllowPickle = False, tokenizer: TokenizerOpt = None,
                   preset: PresetOpt = None, config: ConfigOpt = None):
    """Where each prompt token looks: cross-attention probabilities averaged over heads, layers and steps."""
    from minidream.inspect import attention_maps as am
    out_folder(out)
    m = adapt(load_model(model, None, None, allow_pickle, tokenizer, preset, config),
              [lora_arg(x, 1.0) for x in lora or []], embedding_args(embedding or [], []), allow_pickle)
    try:
        images, maps = am.attention_maps(m, [prompt], steps, guidance, scheduler.value if scheduler else None, seed,
                                         height, width)
    except ValueError as e:
        fail(str(e))
    files = am.write_maps(images[0], maps[0], am.token_positions(m.tokenizer, prompt), out,
                          {"model": model, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance})
    typer.echo(f"wrote {', '.join(map(str, files))}")


@app.command("eval")
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for the two runs and the table.")] = Path("runs/eval"),
    steps: Annotated[Optional[int], typer.Option(help="DreamBooth steps per run (default: the demo's, 50).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; each DreamBooth run once per seed.")] = "0,1,2",
):
    """DreamBooth's claims, measured on the demo world: subject and prompt fidelity, PRES and DIV, and where the
    identifier looks, for the base model and for DreamBooth with and without prior preservation, over seeds."""
    from minidream.demo.run import run_eval
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", seeds):
        fail(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2")
    typer.echo(run_eval(out, tuple(map(int, seeds.split(","))), **({"steps": steps} if steps else {}))["table"])


def main():
    app()


if __name__ == "__main__":
    main()
