"""DreamBooth (Ruiz et al. 2022, arXiv 2208.12242): bind a rare identifier ("sks") to a subject seen in
3-5 photos, while a class-specific prior-preservation loss keeps the class noun ("dog") from drifting.

The objective (§3.2, eq. 2), in the ε- (or v-) parametrisation SD is trained with:

    E[ w_t ‖ ε̂(z_t, t, c_inst) − ε ‖² ]  +  λ · E[ w_t' ‖ ε̂(z'_t', t', c_class) − ε' ‖² ]

where z are the latents of the subject's photos, z' the latents of images the *base* model generated
from the class prompt, λ = --prior-loss-weight and w_t = 1 (or min-SNR-γ weights). Instance and class
examples run through the UNet as one batch.

One step, in three files: `Stepper` (here) draws latents and conditioning (data.py: `LatentSource`,
`TextConditioning`, which calls model.py's `encode_text`), then `training_step` → `dreambooth_loss` (here);
`loop` repeats it, logging and checkpointing. `train` checks every input and
sets the run up; what trains is trainable.py, checkpoints checkpoint.py, exports export.py.
"""
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minidream.models.attention import resolve_backend, set_attention_backend
from minidream.training.checkpoint import Checkpointer, open_run, restore, resume_from
from minidream.training.config import TrainConfig, TrainError, validate, validate_resolution
from minidream.training.distributed import World
from minidream.training import distributed
from minidream.training import concepts
from minidream.training.data import HALF, LatentSource, TextConditioning, check_class_dir, check_prompts, make_class_images
from minidream.training.export import export
from minidream.formats.loading import load
from minidream.models.stable_diffusion import StableDiffusion, resolve_device
from minidream.sampling.pipeline import generate, grid, save_png
from minidream.progress import Progress
from minidream.training.report import Log, curves, summary_writer
from minidream.sampling.samplers import make_sampler
from minidream.sampling.schedulers import NoiseSchedule
from minidream.training.trainable import cast_frozen, make_optimizer, print_summary, select_trainable


# ---------------------------------------------------------------------------------------------
# The loss and one step

def dreambooth_loss(pred, target, n_instance: int, prior_weight: float, weights=None):
    """mse(instance) + λ·mse(prior) over a batch whose first n_instance rows are the subject's.
    Returns (loss, instance part, prior part)."""
    per_example = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights
    inst = per_example[:n_instance].mean()
    prior = per_example[n_instance:].mean() if len(per_example) > n_instance else torch.zeros_like(inst)
    return inst + prior_weight * prior, inst, prior


def min_snr_weights(schedule: NoiseSchedule, t, gamma: float):
    """Min-SNR-γ (Hang et al. 2023, eq. 7-8): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v."""
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if schedule.cfg.prediction_type == "epsilon" else clipped / (snr + 1)


def training_step(unet, schedule: NoiseSchedule, latents, cond: dict, n_instance: int, prior_weight: float,
                  g: torch.Generator, snr_gamma: float | None = None, noise_offset: float = 0.0, world: World = World()):
    """Noise the latents at random timesteps, predict, and return the DreamBooth loss parts.
    `cond`: the UNet's conditioning (model.encode_text), one row per latent. Under torchrun the noise and
    timesteps are drawn for the global batch and this process keeps its rows (distributed.py)."""
    # draws happen where the generator lives: the trainer's is on the CPU (the same numbers on any device,
    # bit-exact resume), the benchmark's on the GPU (no copy per step)
    B, C, dev = latents.shape[0], latents.shape[1], g.device
    rows = world.batch_rows(n_instance, B - n_instance)

    def mine(x):  # this process's rows of a draw for the global batch
        return (x if rows is None else x[rows.to(x.device)]).to(latents.device)
    total = B * world.size
    noise = mine(torch.randn((total, *latents.shape[1:]), generator=g, device=dev))
    if noise_offset:  # (Guttenberg 2023) lets the model shift mean brightness
        noise = noise + noise_offset * mine(torch.randn((total, C, 1, 1), generator=g, device=dev))
    t = mine(torch.randint(0, schedule.cfg.num_train_timesteps, (total,), generator=g, device=dev))
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, **cond)
    weights = min_snr_weights(schedule, t, snr_gamma) if snr_gamma else None
    return dreambooth_loss(pred, schedule.target(latents, noise, t), n_instance, prior_weight, weights)


def apply_gradients(opt, scaler, params: list, max_grad_norm: float) -> float | None:
    """Clip (the true gradients: unscaled first under fp16) and step; returns the gradient norm."""
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item() if max_grad_norm else None
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return grad_norm


@dataclass
class Stepper:
    """One optimizer step of a run (--grad-accum micro-batches), with everything it uses. Built by `prepare`;
    called by `loop`, and by the CPU benchmark, which so times exactly the trainer's step."""
    cfg: TrainConfig
    model: StableDiffusion
    batches: LatentSource
    text: TextConditioning
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    params: list
    g: torch.Generator
    half: torch.dtype | None
    world: World = World()

    def __post_init__(self):
        self.schedule = NoiseSchedule(self.model.scheduler)
        self.rng_at_start, self.done = None, True

    def rewind(self):
        """After a step stopped half-way (Ctrl-C, SIGTERM, a lost process): put the data generator back to where
        the step began, so a checkpoint of the last finished step resumes exactly. The weights and the
        optimizer change only in the step's last calls."""
        if not self.done and self.rng_at_start is not None:
            self.g.set_state(self.rng_at_start)
            self.done = True

    def __call__(self, step: int, last_good: int = 0) -> dict:
        """Step `step` + 1; returns its metrics line."""
        self.rng_at_start, self.done = self.g.get_state(), False
        cfg, device = self.cfg, self.batches.device
        n_inst, n_class = cfg.batch_size, cfg.batch_size if cfg.prior else 0
        self.opt.zero_grad(set_to_none=True)
        tot = inst = prior = 0.0
        for _ in range(cfg.grad_accum):
            latents, prompts, sizes = self.batches.draw_step(n_inst, n_class)  # instance rows, then their class partners
            with torch.autocast(device.type, dtype=self.half, enabled=self.half is not None):
                loss, li, lp = training_step(self.model.unet, self.schedule, latents, {**self.text(step, prompts), **sizes},
                                             n_inst, cfg.prior_loss_weight, self.g, cfg.snr_gamma, cfg.noise_offset,
                                             self.world)
            parts = distributed.mean([loss.item(), li.item(), lp.item()], self.world, device)  # as one process logs
            if not math.isfinite(parts[0]):  # every process sees the same value, so all stop together
                raise TrainError(f"loss is {parts[0]} at step {step + 1}; stopped, the last good checkpoint is "
                                 f"kept (step {last_good}). Try a lower --lr or --mixed-precision no")
            loss = loss / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            tot, inst, prior = tot + parts[0] / cfg.grad_accum, inst + parts[1] / cfg.grad_accum, prior + parts[2] / cfg.grad_accum
        distributed.average_gradients(self.params, self.world)
        grad_norm = apply_gradients(self.opt, self.scaler, self.params, cfg.max_grad_norm)
        self.sched.step()
        self.done = True
        return {"step": step + 1, "loss": tot, "loss_instance": inst, "loss_prior": prior,
                "lr": self.sched.get_last_lr()[0], "grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------------
# The loop

def loop(cfg: TrainConfig, out: Path, stepper: Stepper, ckpt: Checkpointer, step: int) -> int:
    """Optimizer steps from `step` to cfg.steps; each logs a metrics line and may checkpoint and validate.
    Ctrl-C saves a checkpoint; a non-finite loss stops with the last good one kept."""
    main = stepper.world.main  # under torchrun only rank 0 logs, checkpoints and validates
    bar = Progress(cfg.steps, "training", start=step, enabled=main)
    log = Log(out, cfg.report_to, main)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            line = stepper(step, ckpt.last_good)
            step += 1
            bar.update(loss=line["loss"], inst=line["loss_instance"], prior=line["loss_prior"])
            log.step({**line, "step_s": time.perf_counter() - t0})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                ckpt.save(step)
            if main and cfg.validation_prompts and cfg.validation_every and step % cfg.validation_every == 0:
                png = out / "samples" / f"step-{step:06d}.png"
                validation_grid(stepper.model, cfg, png)
                log.image("validation", png, step)
    except (KeyboardInterrupt, distributed.LostProcess) as e:  # Ctrl-C, SIGTERM, or another process lost
        bar.close()
        stepper.rewind()
        saved = ckpt.save(step)
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"another process stopped or did not answer ({e})"
        raise TrainError(f"{why} at step {step}; saved {saved}; continue with --resume latest") from None
    finally:
        log.close()
    bar.close()
    return step


# ---------------------------------------------------------------------------------------------
# Setting the run up

def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False, given: set[str] | None = None):
    """Run DreamBooth; returns (the trained model, the files written). Every input is checked before
    anything is written. `given`: the settings the user named (the CLI knows); on resume only those may
    override the checkpoint's resumable settings (None: all of RESUMABLE_CHANGES come from cfg)."""
    validate(cfg)
    device, backend, half = runtime(cfg)
    try:
        world, device = distributed.init(device)  # torchrun: join the other processes (one process: nothing)
    except ValueError as e:
        raise TrainError(str(e)) from None
    # SIGTERM (torchrun stopping the other processes, a batch scheduler's preemption) is handled as Ctrl-C is:
    # a checkpoint of the last finished step, then a one-line error
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        return _train(cfg, resume, overwrite, given, device, backend, half, world)
    except TrainError as e:
        distributed.speak(world)
        raise TrainError(f"rank {world.rank}: {e}" if world.size > 1 else str(e)) from None
    except distributed.LostProcess as e:  # another process died or timed out before the loop
        distributed.speak(world)
        raise TrainError(f"rank {world.rank}: another process stopped or did not answer ({e}); "
                         f"the last good checkpoint is kept: --resume latest") from None
    finally:
        distributed.close(world)
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _train(cfg: TrainConfig, resume, overwrite, given, device, backend, half, world: World):
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a folder")
    start = None
    if resume:
        cfg, start = resume_from(cfg, out, resume, given)
    elif (out / "run.json").exists() and not overwrite:
        raise TrainError(f"--out {out} holds another run (run.json); pass --resume latest to continue it, "
                         f"--overwrite to start over, or choose another folder")
    torch.manual_seed(cfg.seed)
    model = load_base(cfg)
    if cfg.resolution is None:  # the model's own size (768 for SD 2.x 768-v), stored in run.json for resume
        cfg = replace(cfg, resolution=model.native_resolution)
        print(f"--resolution {cfg.resolution} (the model's native resolution)", file=sys.stderr)
    validate_resolution(cfg.resolution, model.downsampling)
    check_samplers(model, cfg)
    if cfg.report_to == "tensorboard":
        summary_writer()  # a missing package fails here, before any work
    data = Data(cfg, out, model)
    if world.main:
        lock = open_run(out, cfg, start_over=overwrite and not resume, resumed_step=start[0]["step"] if start else None)
    distributed.barrier(world)  # the others start once --out is cleared and run.json written
    try:
        return run(cfg, out, model, device, backend, half, data, start, world)
    finally:
        if world.main:
            lock.close()


def runtime(cfg: TrainConfig):
    """The device, the attention kernel and the autocast dtype (None: fp32) the run uses."""
    try:
        device = resolve_device(cfg.device)
        backend = resolve_backend(cfg.attention, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    for what, precision in (("--mixed-precision", cfg.mixed_precision), ("--class-precision", cfg.class_precision)):
        if precision == "fp16" and device.type != "cuda":
            raise TrainError(f"{what} fp16 needs a GPU; use bf16 or {'no' if what == '--mixed-precision' else 'fp32'} on CPU")
    if device.type == "cuda":  # TF32 tensor cores for fp32 matmuls/convs: ~10 bits of mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    return device, backend, HALF[cfg.mixed_precision]


class Data:
    """The run's concepts, its instance examples (captions, buckets) and, once made, its class examples."""

    def __init__(self, cfg: TrainConfig, out: Path, model: StableDiffusion):
        self.concepts = concepts.concepts(cfg, out)
        self.shapes = concepts.buckets(cfg.resolution, model.downsampling, cfg.max_aspect) if cfg.aspect_buckets \
            else [(cfg.resolution, cfg.resolution)]
        self.instance = concepts.instance_examples(self.concepts, cfg, self.shapes)
        check_prompts(model, cfg, self.concepts)
        for c in self.concepts if cfg.prior else []:
            check_class_dir(c.class_dir)
        self.klass = []

    def prompts(self) -> list[str]:
        """Each concept's instance and class prompt: what the text encoder always sees together."""
        return [p for c in self.concepts for p in (c.instance_prompt, c.class_prompt)]

    def make_class_images(self, model, cfg: TrainConfig, device, world: World):
        for k, c in enumerate(self.concepts):
            sizes = [e.bucket for e in self.instance if e.concept == k] if cfg.aspect_buckets else None
            make_class_images(model, cfg, c, device, world, k, sizes)
        self.klass = concepts.class_examples(self.concepts, cfg, self.shapes)
        concepts.check_buckets(self.instance, self.klass)


def run(cfg: TrainConfig, out: Path, model: StableDiffusion, device, backend, half, data: Data, start,
        world: World = World()) -> tuple[StableDiffusion, list[Path]]:
    """The run itself, once every setting is checked and --out is this process's: class images, what
    trains, the optimizer (restored on resume), the loop, the exports."""
    model.to(device)
    set_attention_backend(model.unet, backend)
    set_attention_backend(model.vae, backend)
    # Identifier check (§4.1): a rare token carries little prior meaning, so it is cheap to rebind.
    if not cfg.train_token and len(model.tokenizer.encode(cfg.identifier)) != 1:
        print(f"warning: --identifier {cfg.identifier!r} is {len(model.tokenizer.encode(cfg.identifier))} tokens, "
              f"not one rare token; DreamBooth binds best to a single rare token such as 'sks'", file=sys.stderr)
    if cfg.prior:  # prior-preservation data, made by the base model before any weight changes
        data.make_class_images(model, cfg, device, world)
    if world.main:
        concepts.write_data_json(out, data.instance, data.klass, data.shapes)

    stepper, groups = prepare(cfg, model, device, half, [data.instance, data.klass], world, data.prompts())
    step = restore(*start, groups, stepper.opt, stepper.sched, stepper.scaler, stepper.g) if start else 0
    ckpt = Checkpointer(out, cfg, groups, stepper.opt, stepper.sched, stepper.scaler, stepper.g, step, world)
    step = loop(cfg, out, stepper, ckpt, step)
    if not world.main:
        return model, []

    if cfg.validation_prompts:
        validation_grid(model, cfg, out / "samples" / "final.png")
    curves(out)
    model.unet.eval()
    trained = {name: p.detach() for ps in groups.values() for name, p in ps}
    try:
        return model, export(load_base(cfg), trained, cfg, out)
    except OSError as e:  # disk full, read-only: keep the trained weights resumable, then say how to export again
        try:
            kept = f"the trained weights are in {ckpt.save(step)}; free space and --resume latest to export"
        except TrainError:
            kept = "no checkpoint could be written either"
        raise TrainError(f"export to {out} failed ({e.strerror}); {kept}") from None


def prepare(cfg: TrainConfig, model: StableDiffusion, device, half, pools: list[list], world: World = World(),
            prompts: list[str] | None = None) -> tuple[Stepper, dict]:
    """What trains (selected, the rest frozen and maybe in half precision), the optimizer and the data, on a
    model already on `device`. Returns the step and the trainable parameters by group."""
    groups = select_trainable(model, cfg.train, cfg.lora_rank, cfg.lora_alpha, cfg.train_text_encoder,
                              f"<{cfg.identifier}>" if cfg.train_token else None, cfg.init_word)
    print_summary(groups, model)
    if half is not None:  # frozen weights in half precision; what trains keeps its exact fp32 values
        cast_frozen(model, half)
    model.unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
    model.unet.train()
    for _, _, te in model.text_encoders():
        te.train(bool(groups["text_encoder"]))
    opt, sched, scaler = make_optimizer(cfg, groups, device)
    g = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop: data, noise, timesteps
    batches = LatentSource(model, cfg, pools, device, g, world)
    params = [p for ps in groups.values() for _, p in ps]
    text = TextConditioning(model, cfg, groups, prompts or list(cfg.prompts))
    return Stepper(cfg, model, batches, text, opt, sched, scaler, params, g, half, world), groups


def load_base(cfg: TrainConfig) -> StableDiffusion:
    """The base model in fp32 (master weights, whatever the file stores), with the run's loader options."""
    try:
        return load(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                    dtype=torch.float32, tokenizer=cfg.tokenizer, preset=cfg.preset, config=cfg.config)
    except Exception as e:
        raise TrainError(str(e)) from None


def check_samplers(model: StableDiffusion, cfg: TrainConfig):
    """The class-image and validation samplers exist for this model (its own scheduler may be one we lack)."""
    for flag, name, used in (("--class-scheduler", cfg.class_scheduler, cfg.prior),
                             ("--validation-scheduler", cfg.validation_scheduler, cfg.validation_prompts)):
        try:
            if used:
                make_sampler(name, model.scheduler)
        except ValueError as e:
            raise TrainError(f"{flag}: {e}") from None


@torch.no_grad()
def validation_grid(model: StableDiffusion, cfg: TrainConfig, path: Path):
    """One row per validation prompt, one column per fixed seed: comparable across steps."""
    was_training = model.unet.training
    model.unet.eval()
    rows = []
    autocast = next(model.unet.parameters()).dtype != torch.float32
    dev = next(model.unet.parameters()).device
    with torch.autocast(dev.type, dtype=next(model.unet.parameters()).dtype, enabled=autocast):
        for p in cfg.validation_prompts:
            rows.append(generate(model, [p] * cfg.validation_images, steps=cfg.validation_steps,
                                 scheduler=cfg.validation_scheduler,
                                 generator=torch.Generator("cpu").manual_seed(cfg.seed), progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(torch.cat(rows), cols=cfg.validation_images), path, {"prompts": list(cfg.validation_prompts)})
    model.unet.train(was_training)
