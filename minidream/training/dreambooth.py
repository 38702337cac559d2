"""`minidream train`: a DreamBooth run from its settings to its exports, in one straight sequence:
validate → runtime → load → data → state → restore → loop → export. Each stage lives in its own module (the
package docstring lists them); one training step is step.py.
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from minidream.formats.exports import CHOICES, EXPORTERS
from minidream.formats.files import give_back_pages
from minidream.models.block_swap import swap_blocks
from minidream.models.compile import eager
from minidream.models.flow_matching import FlowProcess
from minidream.models.stable_diffusion import StableDiffusion
from minidream.models.text_memo import TextMemo, remember
from minidream.sampling.pipeline import image_side
from minidream.training import TrainError, distributed, run_folder, runtime
from minidream.training.checkpoint import Checkpointer, Resume, base_fingerprint, per_process_batch, resume_from
from minidream.training.dataset import TrainingData, buckets
from minidream.training.concepts_file import absolute_paths, with_folder_names
from minidream.training.config import OPTIONS, TrainConfig, combinations, flag, validate
from minidream.training.ema import averaged, for_grids
from minidream.training.export import base_for_exports, export as export_trained, load_base
from minidream.training.holding import hold
from minidream.training.loop import loop, phase
from minidream.training.model_card import sample_command, write_card
from minidream.training.objective import DDPM_ONLY, FLOW_ONLY, schedule_problem, trained_schedule
from minidream.training.resume_settings import short
from minidream.training.report import REPORT_TO, curves
from minidream.training.step import family_defaults, prepare
from minidream.training.text_cache import read_cached, write_cached
from minidream.training.trainable import MODES
from minidream.training.validation import grid_rows, has_grid, validation_grid


def dreambooth(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
               given: set[str] | None = None, keep_model: bool = False) -> tuple[StableDiffusion, list[Path]]:
    """Run DreamBooth; returns (the trained model, the files written). Every input is checked before anything is
    written. `given`: the settings the user named (the CLI knows); on resume only those may override the
    checkpoint's resumable settings (None: all of them come from cfg). `keep_model`: the caller samples with the
    returned model (the demo); otherwise the frozen parts no later phase reads are released (step.prepare)."""
    if given is not None and {"steps", "epochs"} <= given:
        raise TrainError("--epochs sets the steps: give --steps or --epochs, not both")
    cfg = with_folder_names(absolute_paths(cfg))  # a kohya-named --instance-dir (`10_sks dog`): repeats, class
    validate(cfg, resuming=bool(resume and resume.strip()))
    with runtime.started(cfg) as rt:  # device, attention, precision; torchrun's processes; SIGTERM as Ctrl-C
        out = Path(cfg.out)
        cfg, start = begin(cfg, out, resume, overwrite, given, rt.group.size, rt.main)  # resuming: the checkpoint's
        if start is not None:
            cfg, rt = resumed_settings(cfg, start, given, rt)
        torch.manual_seed(cfg.seed)
        model = load_base(cfg, dtype=None)  # as stored, memory-mapped: `hold` reads it into the run's form
        base = base_fingerprint(model)
        if start is not None and start.base not in (None, base):  # the checkpoint's base: a moved one is the same
            files = [f"{flag(k)} {short(getattr(cfg, k))}" for k in ("model", "text_encoders", "vae", "original_config")
                     if getattr(cfg, k)]  # the base is all of them (a ComfyUI user's VAE is a file of its own)
            raise TrainError(f"{', '.join(files)}: not the base model this run trained on (its weights or "
                             f"architecture differ); give the run's own files")
        cfg = check_against_model(cfg, model)
        data = TrainingData(cfg, out, model, overwrite and not resume)  # the photos, captions, buckets: checked
        processes = start.processes if start else rt.group.size  # the count the run's --batch-size is for
        cfg = steps_of_epochs(cfg, data, processes, start)
        if start is not None and start.step == cfg.steps:
            run_folder.refuse_finished(out, cfg.steps)
        if rt.main:
            print(f"training on {rt.describe()}", file=sys.stderr)
        with run_folder.opened(out, cfg, rt, overwrite and not resume, start and start.step, processes,
                               rewound=bool(resume) and resume != "latest"):
            return train_and_export(cfg, out, model, data, rt, start, processes, base, keep_model)


def resumed_run(cfg: TrainConfig, resume: str, given: set[str] | None) -> TrainConfig:
    """The settings `--resume` would continue with (the checkpoint's, with the resumable ones given anew), refused
    in one line as the run would refuse them: what `--print-config --resume` prints."""
    cfg = with_folder_names(absolute_paths(cfg))
    validate(cfg, resuming=True)
    cfg, _ = begin(cfg, Path(cfg.out), resume, False, given)
    combinations(cfg)
    return cfg


def resumed_settings(cfg: TrainConfig, start: Resume, given: set[str] | None, rt: runtime.Runtime):
    """The resume rules that need no model: --steps given anew replaces the run's --epochs; the merged settings
    are checked as the command line's are; the run's global batch must divide among these processes; the runtime
    follows the merged settings."""
    if "steps" in (given or ()) and cfg.epochs:
        cfg = replace(cfg, epochs=None)
    combinations(cfg)
    runtime.check_processes(cfg, rt.group, rt.device)
    return cfg, runtime.resumed(rt, cfg)


def steps_of_epochs(cfg: TrainConfig, data: TrainingData, processes: int, start: Resume | None) -> TrainConfig:
    """--epochs E: the steps that make E passes over the photos (x repeats) at the run's global batch; a resumed
    run may not end before its checkpoint."""
    if not cfg.epochs:
        return cfg
    cfg = replace(cfg, steps=data.steps_for(cfg.epochs, cfg.batch_size * processes * cfg.grad_accum))
    if start is not None and cfg.steps < start.step:
        raise TrainError(f"--epochs {cfg.epochs} is {cfg.steps} steps, below the checkpoint's step {start.step}; "
                         f"give more epochs")
    print(f"--epochs {cfg.epochs}: {cfg.steps} steps ({data.epoch_images()} images an epoch)", file=sys.stderr)
    return cfg


def train_and_export(cfg: TrainConfig, out: Path, model: StableDiffusion, data: TrainingData, rt: runtime.Runtime,
                     start: Resume | None, processes: int, base: str,
                     keep_model: bool = False) -> tuple[StableDiffusion, list[Path]]:
    """Class images → the training state (restored when resuming) → the loop → the final grid and the exports."""
    step = start.step if start else 0
    with phase("before training (class images, latents)", out):  # what was made is kept
        if not keep_model and not (cfg.train_text_encoder or cfg.train_token or cfg.train_token_t5 or
                                   cfg.shuffle_tags):  # (shuffled tags: a prompt no list holds, every step)
            hold(model, cfg, rt.precision, rt.main, model.text_networks())  # done with before the denoiser
            encode_prompts_first(model, cfg, data, rt, base)  # is read
        # the rest in the form the run keeps it (training/holding.py), quantized on the device unless its blocks
        # are to stay off it
        hold(model, cfg, rt.precision, rt.main, device=None if cfg.blocks_to_swap else rt.device)
        if cfg.blocks_to_swap:  # the last blocks' frozen weights stay in CPU memory (models/block_swap.py)
            swap_blocks(model.denoiser, cfg.blocks_to_swap, rt.device)
        rt.place(model)
        if cfg.class_images:  # prior-preservation data, made by the base model before any weight changes
            data.make_class_images(model, cfg, rt)
        model.scheduler = trained_schedule(model.scheduler, cfg)  # what the grids sample by from here on
        if rt.main:
            data.write_json(out, cfg)
        batch = per_process_batch(cfg, processes, rt.group.size)
        stepper = prepare(cfg, model, rt, data.pools(), data.prompts(), batch, keep_model)
        if start is not None and start.state is not None:
            stepper.state.load_state_dict(start.state)
    ckpt = Checkpointer(out, cfg, stepper.state, step, rt.group, processes, base)
    step = loop(cfg, out, stepper, ckpt, step)
    with phase("after training (the final grid, the exports)", out, ckpt, step):  # the weights are saved first
        if has_grid(cfg) and (rt.main or cfg.fsdp):  # a sharded UNet samples on every process
            with rt.resident(model), eager(), for_grids(cfg, stepper.state.ema):  # not the compiled step's graph
                validation_grid(model, cfg, out / "samples" / "final.png", write=rt.main)
        trained = stepper.state.trained(keep=rt.main)  # gathered from every process under --fsdp
        average = averaged(stepper.state)
        distributed.report_peak_memory(rt.group, rt.device)
        if not keep_model and not cfg.fsdp:  # the exports need only `trained` and the base files: once the
            ckpt.keep(step)                  # last step's checkpoint is on disk, what training held goes
            stepper.release(model)
        written = []
        if rt.main:
            curves(out)
            model.denoiser.eval()
            written = export(cfg, trained, average)
            written.append(write_card(cfg, model.family, written, out))
            run_folder.finished(out, step, written)
            print(f"draw with it: {sample_command(cfg, written, out, Path.cwd())}", file=sys.stderr)
        distributed.barrier(rt.group)  # the processes end together: none leaves while a peer may still send
        stepper.text.unwrap()
        return model, written


def encode_prompts_first(model: StableDiffusion, cfg: TrainConfig, data: TrainingData, rt: runtime.Runtime,
                         base: str):
    """Frozen text encoders, done with before the denoiser takes the device: every prompt the run will use is
    encoded now and remembered (models/text_memo.py), then the encoders are released. The run's own prompts and the
    captions go as one batch, as the step would encode them (batches.TextConditioning); then what sampling adds:
    the class images' and the grids' prompts and their negative prompts ("": classifier-free guidance's
    unconditional row). With --cache-text-encoder-outputs disk, what OUT/text_cache holds is read instead."""
    base_prompts = list(dict.fromkeys(data.prompts()))
    rows = grid_rows(cfg)
    batches = [base_prompts + [e.prompt for e in data.instance if e.prompt not in base_prompts],
               ([cfg.class_negative_prompt] if cfg.class_images else []) + [p for p, _, _ in rows]
               + [params.negative_prompt or "" for _, params, _ in rows] + [""]]
    every = list(dict.fromkeys(p for b in batches for p in b))
    model.text_memo = memo = TextMemo()
    disk = Path(cfg.out) / "text_cache" if cfg.cache_text_encoder_outputs == "disk" else None
    if disk is not None:
        read_cached(memo, disk, model, base, every, rt.device)
    missing = [p for p in every if p not in memo.rows]
    if missing:
        for te in model.text_networks():
            te.to(rt.device)
        remember(model, batches)
        if disk is not None and rt.main:
            write_cached(memo, disk, model, base, missing)
    for te in model.text_networks():
        give_back_pages([*te.parameters(), *te.buffers()])
        rt.release(te)


def begin(cfg: TrainConfig, out: Path, resume: str | None, overwrite: bool, given: set[str] | None,
          processes: int = 1, main: bool = True) -> tuple[TrainConfig, Resume | None]:
    """The run's settings and, resuming, where it picks up (the checkpoint's); else None."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a folder")
    if not next(p for p in (out, *out.parents) if p.exists()).is_dir():
        raise TrainError(f"--out {out}: cannot write there (it is below a file); choose another folder")
    if out.is_dir() and main:  # (rank 0 takes the lock; the others probing it at once would race it)
        run_folder.refuse_locked(out)
    if resume is not None and not resume.strip():
        raise TrainError("--resume is empty; give latest or a checkpoint file")
    if resume and overwrite:
        raise TrainError("--resume continues a run and --overwrite starts it over: pass one of them")
    if resume:
        return resume_from(cfg, out, resume, given, processes)
    if (out / "run.json").exists() and not overwrite:
        raise TrainError(f"--out {out} holds another run (run.json); pass --resume latest to continue it, "
                         f"--overwrite to start over, or choose another folder")
    return cfg, None


# the settings each sampling run of the trainer is made of (TrainConfig.class_sampling, .validation_sampling)
CLASS_SAMPLING = {"steps": "class_steps", "guidance": "class_guidance", "sampler": "class_scheduler",
                  "negative_prompt": "class_negative_prompt", "height": "resolution", "width": "resolution"}
VALIDATION_SAMPLING = {"steps": "validation_steps", "sampler": "validation_scheduler", "height": "resolution",
                       "width": "resolution", "guidance_rescale": "validation_guidance_rescale"}


def validate_resolution(value: int, factor: int):
    """Once the model is known: the resolution is a multiple of its whole downsampling factor."""
    wrong = image_side(value, factor)
    if wrong:
        raise TrainError(f"--resolution {wrong}")


def check_position_table(cfg: TrainConfig, model: StableDiffusion):
    """An MMDiT's position table bounds the image sides it trains on: --resolution, and the widest aspect bucket."""
    if model.max_side is None:
        return
    shapes = buckets(cfg.resolution, model.downsampling, cfg.max_aspect) if cfg.aspect_buckets else []
    largest = max([cfg.resolution, *(max(s) for s in shapes)])
    if largest > model.max_side:
        by = f" (its widest --aspect-buckets shape has a side of {largest} px)" if largest > cfg.resolution else ""
        raise TrainError(f"--resolution {cfg.resolution}{by}: this model's position table reaches {model.max_side} "
                         f"px a side; give a lower --resolution{' or --max-aspect' if by else ''}")


def check_block_swap(cfg: TrainConfig, model: StableDiffusion):
    """--blocks-to-swap N: a transformer's blocks (SD3's, Flux's), at most as many as it has."""
    if not cfg.blocks_to_swap:
        return
    if model.family.name not in ("sd3", "flux"):
        raise TrainError(f"--blocks-to-swap: {model.family.title}'s UNet is not swapped block by block; it is for "
                         f"SD3 and Flux (drop it)")
    n = len(model.denoiser.blocks())
    if cfg.blocks_to_swap > n:
        raise TrainError(f"--blocks-to-swap {cfg.blocks_to_swap}: this transformer has {n} blocks; give at most {n}")


def check_against_model(cfg: TrainConfig, model: StableDiffusion) -> TrainConfig:
    """The settings that need the model: the resolution (by default the model's own, stored in run.json for
    resume), the samplers, the identifier; and a missing --report-to package, before any work."""
    if cfg.resolution is None:  # the model's own size (768 for SD 2.x 768-v)
        cfg = replace(cfg, resolution=model.native_resolution)
        print(f"--resolution {cfg.resolution} (the model's native resolution)", file=sys.stderr)
    validate_resolution(cfg.resolution, model.downsampling)
    check_position_table(cfg, model)
    check_block_swap(cfg, model)
    cfg = family_options(cfg, model)
    trained = trained_schedule(model.scheduler, cfg)  # the class images are the base's; the grids: the trained one
    for params, used, names, schedule in (
            (cfg.class_sampling, cfg.class_images, CLASS_SAMPLING, model.scheduler),
            (cfg.validation_sampling, cfg.validation_prompts, VALIDATION_SAMPLING, trained)):
        wrong = params.problem(model, schedule) if used else None  # its own scheduler may be one we lack; its steps
        if wrong:
            raise TrainError(f"{flag(names[wrong[0]])}: {wrong[1]}")
    for k, (_, params, _) in enumerate(grid_rows(cfg)[len(cfg.validation_prompts):]):
        wrong = params.problem(model, trained)  # a row's own size, steps
        if wrong:
            raise TrainError(f"--validation-file: entry {k}: {wrong[0]} {wrong[1]}")
    if REPORT_TO[cfg.report_to]:
        REPORT_TO[cfg.report_to].check()
    if MODES[cfg.mode].adapters:  # --lora-blocks names stages of this UNet
        cfg.adapters.denoiser_modules(model.denoiser, model.family.lora_targets)
    if cfg.dora and "lora-kohya" in cfg.save_as:
        print("warning: --dora: lora_kohya.safetensors holds DoRA as LyCORIS writes it (dora_scale per output "
              "channel), which LyCORIS and `minidream sample` merge exactly; A1111 reads only per-input DoRA and "
              "ComfyUI approximates this one: for them export the merged model (--save-as single-file)",
              file=sys.stderr)
    # Identifier check (§4.1): a rare token carries little prior meaning, so it is cheap to rebind.
    pieces = len(model.tokenizer.encode(cfg.identifier))
    if not cfg.train_token and pieces != 1:
        print(f"warning: --identifier {cfg.identifier!r} is {pieces} tokens for this model's tokenizer; DreamBooth "
              f"binds best to a rare word that is a single token (or learn a new one: --train-token)", file=sys.stderr)
    return cfg


def family_options(cfg: TrainConfig, model: StableDiffusion) -> TrainConfig:
    """The settings that apply to some model families only: refused by name on the others; the exports the family
    has no writer for dropped from the mode's default formats (refused when asked for)."""
    flow = model.family.forward_process is FlowProcess
    if cfg.guidance_scale is not None and not model.guidance_embedded:
        schnell = " [schnell]" if model.family.distilled_guidance else ""
        raise TrainError(f"--guidance-scale: {model.family.title}{schnell} takes no guidance scale; it is for "
                         f"Flux.1 [dev] (drop it)")
    for name in DDPM_ONLY if flow else FLOW_ONLY:
        if getattr(cfg, name) != OPTIONS[name].default:
            others = "DDPM models (SD 1.x/2.x/XL)" if flow else "rectified-flow models (SD3, Flux)"
            raise TrainError(f"{flag(name)}: {model.family.title} is trained by "
                             f"{'rectified flow' if flow else 'DDPM'}; it applies to {others} (drop it)")
    wrong = schedule_problem(cfg, flow, model.scheduler.num_train_timesteps)
    if wrong:
        raise TrainError(f"{flag(wrong[0])} {wrong[1]}")
    if cfg.train_token_t5 and model.text_encoder_3 is None:
        raise TrainError(f"--train-token-t5: this {model.family.title} model has no T5 text encoder (it is for SD3 and "
                         f"Flux with their T5; drop it)")
    cfg = family_defaults(cfg, model.family)
    if model.family.t5 and cfg.max_sequence_length is None:  # the variant's (Flux [dev] 512), stored as it ran
        cfg = replace(cfg, max_sequence_length=model.max_sequence_length)
    if "single-file" in cfg.save_as and cfg.train_text_encoder and not model.family.text_in_single_file:
        if set(cfg.save_as) <= {"single-file", "learned-token"}:
            raise TrainError(f"--save-as single-file: {model.family.title}'s single file holds the transformer alone, "
                             f"so the trained text encoder would be written nowhere; add --save-as diffusers (or a "
                             f"LoRA format)")
        print(f"warning: {model.family.title}'s single file holds the transformer alone: the trained text encoder is "
              f"in the other exports only", file=sys.stderr)
    unwritable = [f for f in cfg.save_as if not EXPORTERS[f].writes(model.family.name)]
    if unwritable and cfg.save_as == MODES[cfg.mode].save_as:
        print(f"note: {model.family.title}: {', '.join(unwritable)} not written (minidream has no writer for "
              f"this family yet)", file=sys.stderr)
        cfg = replace(cfg, save_as=tuple(f for f in cfg.save_as if f not in unwritable))
    elif unwritable:
        choices = [f for f, row in EXPORTERS.items() if f in CHOICES and row.writes(model.family.name)]
        raise TrainError(f"--save-as {unwritable[0]}: minidream cannot write {model.family.title} models in this "
                         f"format yet; choose from {', '.join(choices)}")
    return cfg


def export(cfg: TrainConfig, trained: dict[str, torch.Tensor],
           average: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """The exports, from a fresh base with the trained tensors written in; with --ema-decay the moving average's
    too, in the same formats under OUT/ema/."""
    written = export_trained(base_for_exports(cfg), trained, cfg, Path(cfg.out))
    if average is not None:
        written += export_trained(base_for_exports(cfg), average, cfg, Path(cfg.out) / "ema")
    return written
