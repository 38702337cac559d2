"""DreamBooth (Ruiz et al. 2022, arXiv 2208.12242): bind a rare identifier ("sks") to a subject seen in
3-5 photos, while a class-specific prior-preservation loss keeps the class noun ("dog") from drifting.

The objective (§3.2, eq. 2), in the ε- (or v-) parametrisation SD is trained with:

    E[ w_t ‖ ε̂(z_t, t, c_inst) − ε ‖² ]  +  λ · E[ w_t' ‖ ε̂(z'_t', t', c_class) − ε' ‖² ]

where z are the latents of the subject's photos, z' the latents of images the *base* model generated
from the class prompt, λ = --prior-loss-weight and w_t = 1 (or min-SNR-γ weights). Instance and class
examples run through the denoiser as one batch.

One step, in three files: `Stepper` (here) draws latents and conditioning (batches.py: `LatentSource`,
`TextConditioning`), then `training_step` noises them by the model's forward process and `dreambooth_loss`
weighs the prediction (here); what the denoiser is conditioned on and how latents are noised are the model's
(models/stable_diffusion.py: `encode_text`, `DDPMProcess`).
"""
import sys
from dataclasses import dataclass, replace

import torch

from minidream.models.compile import compile_network, step_begins
from minidream.models.flow_matching import Density, FlowProcess
from minidream.models.noise_schedule import DDPMProcess, TimestepDraw
from minidream.models.quantize import quantize_frozen
from minidream.models.lora import adapters_off
from minidream.models.stable_diffusion import StableDiffusion, encode_text
from minidream.training import distributed
from minidream.training.batches import LatentSource, TextConditioning
from minidream.training.config import TrainConfig
from minidream.training.distributed import ProcessGroup
from minidream.training.fsdp import is_sharded
from minidream.training.fused_backward import fuse_backward
from minidream.training.objective import Objective, cell_loss, draw_noise, example_weights, trained_schedule
from minidream.training.runtime import Runtime, signals_deferred
from minidream.training.state import TrainState
from minidream.training.trainable import MODES, cast_frozen
from minidream.training.validation import has_grid


def dreambooth_loss(pred, target, n_instance: int, prior_weight: float, weights=None, mask=None, loss=torch.square):
    """mse(instance) + λ·mse(prior) over a batch whose first n_instance rows are the subject's (`loss`: each
    latent cell's loss of prediction - target, squared unless the run asks otherwise: objective.cell_loss).
    `mask` (B, 1, h, w): each latent cell's weight (masked loss: the share of its pixels that show the subject);
    an example's error is then averaged over its mask (an all-zero mask: no loss, no gradient).
    Returns (loss, instance part, prior part)."""
    err = loss(pred.float() - target.float())
    if mask is None:
        per_example = err.mean(dim=(1, 2, 3))
    else:
        m = mask.to(err.dtype).expand_as(err)
        per_example = (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    if weights is not None:
        per_example = per_example * weights
    inst = per_example[:n_instance].mean()
    prior = per_example[n_instance:].mean() if len(per_example) > n_instance else torch.zeros_like(inst)
    return inst + prior_weight * prior, inst, prior


def training_step(denoiser, process: DDPMProcess, latents, cond: dict, n_instance: int, prior_weight: float,
                  g: torch.Generator, objective: Objective = Objective(), group: ProcessGroup = ProcessGroup(),
                  mask: torch.Tensor | None = None, prior=None):
    """Noise the latents at random timesteps, predict, and return the DreamBooth loss parts, as the run's
    `objective` (its TrainConfig) asks (objective.py). `cond`: the denoiser's conditioning (batches.TextConditioning),
    one row per latent. `prior`: the class rows' target when it is the model's own (--prior-source model): a
    function of their noised latents and timesteps. Under torchrun the noise and timesteps are drawn for the global
    batch and this process keeps its rows (distributed.py)."""
    # draws happen where the generator lives: the trainer's is on the CPU (the same numbers on any device,
    # bit-exact resume), the benchmark's on the GPU (no copy per step)
    B, dev = latents.shape[0], g.device
    rows = group.batch_rows(n_instance, B - n_instance)

    def mine(x):  # this process's rows of a draw for the global batch
        return (x if rows is None else x[rows.to(x.device)]).to(latents.device)
    total = B * group.size
    noise = mine(draw_noise(objective, (total, *latents.shape[1:]), g))
    t = mine(process.draw_timesteps(total, g, dev, latents.shape[-2:]))
    fed = noise  # input perturbation (Ning et al. 2023): the latent noised by ε + γ·ξ, the target made of ε alone
    if objective.input_perturbation:
        fed = noise + objective.input_perturbation * mine(torch.randn((total, *latents.shape[1:]), generator=g,
                                                                      device=dev))
    noisy = process.add_noise(latents, fed, t)
    pred = process.output(denoiser(noisy, t, **cond), noisy, t)
    target = process.target(latents, noise, t)
    if prior is not None:  # the base model's prediction for the class prompt on these latents (kohya's DOP)
        target = torch.cat([target[:n_instance], prior(noisy[n_instance:], t[n_instance:])])
    return dreambooth_loss(pred, target, n_instance, prior_weight, example_weights(process, t, objective), mask,
                           cell_loss(process, t, objective))


def family_defaults(cfg: TrainConfig, family) -> TrainConfig:
    """What the run leaves to the model's family, filled in: the flow objective of its diffusers script, its LoRA
    targets (stored so in run.json)."""
    adapters = (("lora_targets", family.default_lora_targets),) if MODES[cfg.mode].adapters else ()
    wanted = (*family.flow_training, *adapters)
    return replace(cfg, **{k: v for k, v in wanted if getattr(cfg, k) is None})


def training_process(model: StableDiffusion, cfg: TrainConfig) -> DDPMProcess | FlowProcess:
    """The model's forward process as the run trains it: a rectified-flow model's with the run's σ density."""
    if model.family.forward_process is FlowProcess:
        cfg = family_defaults(cfg, model.family)
        return FlowProcess(model.scheduler, Density(cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std,
                                                    cfg.mode_scale, cfg.precondition_outputs, cfg.timestep_sampling,
                                                    cfg.sigmoid_scale, cfg.discrete_flow_shift))
    draw = TimestepDraw(cfg.timestep_sampling, cfg.min_timestep, cfg.max_timestep, cfg.logit_mean, cfg.logit_std,
                        cfg.sigmoid_scale)
    return DDPMProcess(trained_schedule(model.scheduler, cfg), draw)


def apply_gradients(opt, scaler, params: list, max_grad_norm: float) -> torch.Tensor | None:
    """Clip (the true gradients: unscaled first under fp16) and step; returns the gradient norm, on the device."""
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return grad_norm


@dataclass
class Stepper:
    """One optimizer step of a run (--grad-accum micro-batches), with everything it uses. Built by `prepare`;
    called by the loop, and by the CPU benchmark, which so times exactly the trainer's step."""
    cfg: TrainConfig
    state: TrainState
    batches: LatentSource
    text: TextConditioning
    runtime: Runtime
    batch_size: int | None = None  # instance images per step on this process (None: --batch-size)
    compiled: str = "off"  # how the UNet runs: the --compile mode this run can have (compiled_mode)

    def __post_init__(self):
        self.process = training_process(self.state.model, self.cfg)
        self.rng_at_start, self.done, self.deferred = None, True, False
        self.fused = fuse_backward(self.state.optimizer, self.cfg.max_grad_norm) if self.cfg.fused_backward else None

    def release(self, model: StableDiffusion):
        """What only training needed, given back before the exports read a fresh base: the optimizer's state, the
        gradients and the model's weights (the trained values live on in the tensors `TrainState.trained` gave).
        Called once the last checkpoint is on disk: nothing can be saved from the state after this."""
        self.state.optimizer.state.clear()
        for p in self.state.trainable.params():
            p.grad = None
        for net in model.networks():
            self.runtime.release(net)
        swap = getattr(model.denoiser, "block_swap", None)
        if swap is not None:  # (--blocks-to-swap) its blocks' weights, kept in CPU memory
            swap.release()

    def raise_deferred(self):
        """A Ctrl-C or SIGTERM that came during the last update, now that the step is counted."""
        if self.deferred:
            self.deferred = False
            raise KeyboardInterrupt

    def rewind(self):
        """After a step stopped half-way (Ctrl-C, SIGTERM, a lost process): put the data generator back to where
        the step began, so a checkpoint of the last finished step resumes exactly. The weights and the
        optimizer change only in the step's last calls."""
        if not self.done and self.rng_at_start is not None:
            self.state.generator.set_state(self.rng_at_start)
            self.done = True

    def __call__(self, step: int) -> dict:
        """Step `step` + 1; returns its metrics line, whose losses stay on the device: reading them would wait for
        the accelerator every step (the loop reads them at log and checkpoint time: loop.Unsynced)."""
        cfg, state, rt = self.cfg, self.state, self.runtime
        self.rng_at_start, self.done = state.generator.get_state(), False
        n_inst = self.batch_size or cfg.batch_size
        n_class = n_inst if cfg.prior else 0
        state.optimizer.zero_grad(set_to_none=True)
        parts = torch.zeros(3, device=rt.device)  # the loss, its instance part, its prior part
        for _ in range(cfg.grad_accum):
            latents, prompts, sizes, mask = self.batches.draw_step(n_inst, n_class)  # instance rows, then class
            if cfg.lora_dropout:  # dropout draws from torch's global generator: seed it from the run's, per process
                g = state.generator
                torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)) + rt.group.rank)
            step_begins(self.compiled)
            cond = {**self.text(step, prompts), **sizes}
            with rt.autocast():
                prior = self.model_prior(cond, prompts, n_inst) if cfg.prior and cfg.prior_source == "model" else None
                loss, li, lp = training_step(state.model.denoiser, self.process, latents, cond, n_inst,
                                             cfg.prior_loss_weight, state.generator, cfg, rt.group, mask, prior)
            parts += torch.stack([loss, li, lp]).detach().float() / cfg.grad_accum
            loss = loss / cfg.grad_accum
            if self.fused:  # backward is the update (--fused-backward, which takes no --grad-accum)
                self.update(loss.backward)
            else:
                (state.scaler.scale(loss) if state.scaler else loss).backward()
        if self.fused:
            grad_norm = self.fused.grad_norm()
        else:
            params = state.trainable.params()
            distributed.average_gradients([p for p in params if not is_sharded(p)], rt.group)  # FSDP: its own
            grad_norm = self.update(lambda: apply_gradients(state.optimizer, state.scaler, params, cfg.max_grad_norm))
        full = getattr(grad_norm, "full_tensor", None)  # a sharded UNet's norm (a DTensor) as a plain tensor
        return {"step": step + 1, "parts": parts, "lr": state.lr_schedule.get_last_lr()[0],
                "grad_norm": full() if full else grad_norm}

    def model_prior(self, cond: dict, prompts: list[str], n: int):
        """--prior-source model: the class rows' target, a function of their noised latents and timesteps: what the
        base model predicts for them (every adapter off; their conditioning too, where a text encoder trains)."""
        model, process = self.state.model, self.process
        rows = {k: v[n:] for k, v in cond.items()}
        if not self.text.frozen:
            with torch.no_grad(), adapters_off(*model.text_networks()):
                rows.update(encode_text(model, prompts[n:]))

        def target(noisy, t):
            with torch.no_grad(), adapters_off(model.denoiser):
                return process.output(model.denoiser(noisy, t, **rows), noisy, t)
        return target

    def update(self, apply):
        """The step's update (`apply`) and the LR schedule's, whole or not at all: a Ctrl-C or SIGTERM that comes
        during it waits until the step is counted (raise_deferred)."""
        with signals_deferred() as came:
            out = apply()
            self.state.lr_schedule.step()
            if self.state.ema is not None:  # (--ema-decay) the moving average takes the new weights in
                self.state.ema.step()
            self.done = True
        self.deferred = bool(came)
        return out


def prepare(cfg: TrainConfig, model: StableDiffusion, rt: Runtime, pools: list[list],
            prompts: list[str] | None = None, batch_size: int | None = None, keep_model: bool = False) -> Stepper:
    """What trains (selected, the rest frozen and maybe in half precision), the optimizer and the data, on a model
    already on the run's device: the step, ready to call. `keep_model`: the caller samples with the model after the
    run; otherwise a frozen part that no later phase reads (no validation grid or loss) is released."""
    cfg = family_defaults(cfg, model.family)  # (the CLI's run has them already: dreambooth.family_options)
    state = TrainState.create(cfg, model, rt.device, rt.group.size)
    if cfg.quantize_base:  # the frozen linears in fewer bits (what the load did not quantize: training/holding.py)
        before, after = quantize_frozen(networks_in_step(model, state.trainable), cfg.quantize_base)
        if rt.main and before:
            print(f"--quantize-base {cfg.quantize_base}: the frozen linear weights the step runs, "
                  f"{before / 2 ** 20:,.1f} MiB as loaded -> {after / 2 ** 20:,.1f} MiB", file=sys.stderr)
    if rt.precision is not None:  # frozen weights in half precision; what trains keeps its exact fp32 values
        cast_frozen(model, rt.precision)
    model.denoiser.set_gradient_checkpointing(cfg.gradient_checkpointing)
    model.denoiser.train()
    compiled = compiled_mode(cfg, rt)
    compile_network(model.denoiser, compiled)
    for _, _, te in model.text_encoders():
        te.train(bool(state.trainable.text_encoder))
    own = [p for k, p in enumerate(prompts or cfg.prompts) if k % 2] if cfg.prior_source == "model" else None
    batches = LatentSource(model, cfg, pools, rt.device, state.generator, rt.group, own)  # (own: the class prompts)
    text = TextConditioning(model, cfg, state.trainable, prompts or list(cfg.prompts),
                            [e.prompt for pool in pools for e in pool])
    # what the step no longer needs leaves the accelerator (validation grids bring it back: Runtime.resident), or
    # is released when nothing after the step reads it (the frozen CLIPs alone are SD3.5's largest part after T5)
    later = keep_model or has_grid(cfg) or bool(cfg.validation_every)
    away = rt.offload if later else rt.release
    if text.frozen and not cfg.shuffle_tags:  # (shuffled tags are new prompts: the encoders stay)
        text.encode_all()
        for te in model.text_networks():
            away(te)
    elif model.text_encoder_3 is not None and not text.t5_learns and not cfg.shuffle_tags:
        # the CLIPs train, T5 not: its states now, then T5 leaves the accelerator (a grid's new prompt brings it
        # back: resident)
        text.encode_t5()
        rt.offload(model.text_encoder_3)
    if cfg.cache_latents:
        away(model.vae)
    return Stepper(cfg, state, batches, text, rt, batch_size, compiled)


def networks_in_step(model: StableDiffusion, trainable) -> list[torch.nn.Module]:
    """What the step runs: the denoiser; the CLIPs while they or a new token train; T5 while the token's T5 row
    trains. Frozen text is encoded once before the steps, by the encoders as loaded (--quantize-base spares them)."""
    nets = [model.denoiser]
    if trainable.text_encoder or trainable.token:
        nets += [te for _, _, te in model.text_encoders()]
    if trainable.t5_row:
        nets.append(model.text_encoder_3)
    return nets


def compiled_mode(cfg: TrainConfig, rt: Runtime) -> str:
    """--compile as this run can have it: what a compiled graph cannot hold says so once and runs as it can."""
    def say(why: str):
        if rt.main:
            print(f"note: --compile {cfg.compile}: {why}", file=sys.stderr)
    if cfg.compile != "off" and cfg.prior_source == "model":
        say("the prior's target is the model's own prediction with the adapters off, a second graph each step; the "
            "UNet runs eager")
        return "off"
    if cfg.compile != "off" and cfg.fsdp:
        say("the sharded UNet (--fsdp) gathers its blocks in hooks that are not traced yet; it runs eager")
        return "off"
    if cfg.compile != "off" and cfg.blocks_to_swap:
        say("the swapped blocks (--blocks-to-swap) change their weights between calls, which a compiled graph "
            "does not follow; the transformer runs eager")
        return "off"
    if cfg.compile != "off" and cfg.fused_backward:  # the memory the user asked for comes first
        say("a compiled backward hands over every gradient at once, which is what --fused-backward avoids; the "
            "UNet runs eager")
        return "off"
    if cfg.compile == "graphs" and cfg.grad_accum > 1:
        say("a CUDA graph cannot hold gradients summed between replays (--grad-accum); the UNet runs compiled "
            "without CUDA graphs (--compile on)")
        return "on"
    return cfg.compile
