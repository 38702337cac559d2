"""The training loop, and how any part of a run stops without losing work.

`loop` repeats the step to --steps, each giving a metrics line, and maybe checkpoints and draws a validation grid.
The lines' losses stay on the device until a log step (--log-every) or a step whose weights are kept or sampled
(`Unsynced`): the accelerator runs ahead of the host in between, as nanoGPT's loop does.

Whatever stops a run — Ctrl-C, SIGTERM (runtime.py makes it a Ctrl-C), another process lost, a full disk — ends it
with one line that says what was kept and how to continue (`--resume latest`): in the loop a checkpoint of the last
finished step is saved first; before the loop (class images, latents) what was made is kept and a run without a
checkpoint resumes from step 0; after it (the final grid, the exports) the trained weights are saved first.
A non-finite loss stops the run at the first step that had one, with the last good checkpoint kept: the losses
are read before any checkpoint, snapshot or grid, so none holds weights that a non-finite loss updated.
"""
import math
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from minidream.models.compile import eager
from minidream.progress import Progress
from minidream.training import TrainError, continue_with, distributed
from minidream.training.checkpoint import Checkpointer
from minidream.training.config import TrainConfig
from minidream.training.export import snapshot
from minidream.training.report import Log
from minidream.training.runtime import signals_deferred
from minidream.training.step import Stepper, dreambooth_loss
from minidream.training.ema import averaged, for_grids
from minidream.training.validation import HeldOutLoss, grid_rows, has_grid, validation_grid

STOPS = (KeyboardInterrupt, distributed.LostProcess, OSError)  # what ends a run that can be continued


def why(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, distributed.LostProcess):
        return f"another process stopped or did not answer ({e})"
    return f"{e.filename or 'a file'}: {e.strerror or e}"  # a full or read-only disk, a failing one


def saved(ckpt: Checkpointer, step: int) -> str:
    """A checkpoint of `step`, written unless there is one (rank 0 writes; the others say what it last wrote, if it
    is still there to save this step too)."""
    if not ckpt.group.main:
        return f"rank 0 writes the checkpoints ({ckpt.kept()})"
    if ckpt.cfg.fsdp and ckpt.last_good != step:  # a checkpoint gathers from every process, which may be gone
        return f"--fsdp cannot gather a checkpoint now, {ckpt.kept()}"
    try:
        with signals_deferred() as came:  # a second Ctrl-C while it is written waits for it (it is the run's work)
            path = ckpt.keep(step)
    except TrainError:
        return f"no checkpoint could be written either, {ckpt.kept()}"
    return f"saved {path}" + (" (finished before the second stop signal)" if came else "")


@contextmanager
def phase(what: str, out: Path, ckpt: Checkpointer | None = None, step: int = 0):
    """A part of a run outside the loop (`what`: "while making the class images", ...), stopped as the loop is."""
    try:
        with distributed.peers_watched():
            yield
    except STOPS as e:
        kept = saved(ckpt, step) if ckpt is not None else "what was made is kept"
        raise TrainError(f"{why(e)} {what}; {kept}; {continue_with(out)}") from None


def validation(cfg: TrainConfig, out: Path, stepper: Stepper, step: int, log: Log, held: HeldOutLoss | None,
               bar: Progress):
    """The grid of `step` (with validation rows) and the validation loss (every --validation-every steps): on the
    process that writes, or on every process with a sharded UNet (--fsdp), which samples on all together."""
    main = stepper.runtime.main
    if not (main or cfg.fsdp):
        return
    bar.write(f"validation at step {step}: " + ", ".join(
        ([f"a grid of {len(grid_rows(cfg))} row(s) x {cfg.validation_images}"] if has_grid(cfg) else []) +
        (["the loss on fixed triples"] if held is not None else [])))
    with stepper.runtime.resident(stepper.state.model) as model, eager():  # a compiled UNet's graph is the step's
        if has_grid(cfg):
            png = out / "samples" / f"step-{step:06d}.png"
            with for_grids(cfg, stepper.state.ema):  # (--validation-ema) the moving average's weights
                validation_grid(model, cfg, png, write=main)
            log.image("validation", png, step)
        if held is not None:
            log.step({"step": step, **held(model, stepper.runtime.autocast)}, group="validation")


def snapshot_at(cfg: TrainConfig, stepper: Stepper, step: int, bar: Progress):
    """The snapshot of `step`, when --save-every asks for one there (not at the last step: the final export)."""
    main = stepper.runtime.main
    if cfg.save_every and step and step % cfg.save_every == 0 and step < cfg.steps and (main or cfg.fsdp):
        trained = stepper.state.trained(keep=main)  # gathered from every process under --fsdp
        if main:
            bar.write(f"snapshot of step {step}: {snapshot(cfg, trained, step, averaged(stepper.state))}")


class Unsynced:
    """The metrics lines of the steps since the losses were last read back from the device: `read` waits for them,
    averages them over the processes (what one process would have logged), writes them and stops the run at the
    first non-finite loss. A line's step_s is the wall time from its step's start to the next's (or to the read)."""

    def __init__(self, group: distributed.ProcessGroup, log: Log, bar: Progress):
        self.group, self.log, self.bar, self.lines = group, log, bar, []

    def add(self, line: dict, began: float):
        self.lines.append({**line, "began": began})

    def read(self, kept: str, alone: bool = False):
        """`alone`: without the other processes (a run that stops may have lost one, and the others are not at
        this call): this process's own losses, each line marked so; a non-finite gradient norm then stops the run
        too (another process's non-finite loss reached these weights through the averaged gradients). The lines
        are kept until their values are in hand (a stop during the wait reads them again); those before the first
        non-finite step are written, and the run stops there."""
        if not self.lines:
            return

        def row(x):  # loss, instance part, prior part, gradient norm
            norm = x["grad_norm"] if x["grad_norm"] is not None else torch.zeros(())
            return torch.cat([x["parts"], norm.reshape(1).to(x["parts"])])
        values = torch.stack([row(x) for x in self.lines]).double()
        values = (values if alone else distributed.mean(values, self.group)).tolist()  # the wait for the device
        bad = next((k for k, (loss, _, _, norm) in enumerate(values)
                    if not math.isfinite(loss) or alone and not math.isfinite(norm)), len(values))
        ends = [x["began"] for x in self.lines[1:]] + [time.perf_counter()]
        lines, self.lines = self.lines[:bad], self.lines[bad:]  # the good steps' lines are written
        mark = {"this_process_only": True} if alone and self.group.size > 1 else {}
        for x, (loss, inst, prior, norm), end in zip(lines, values, ends):
            self.log.step({"step": x["step"], "loss": loss, "loss_instance": inst, "loss_prior": prior,
                           "lr": x["lr"], "grad_norm": None if x["grad_norm"] is None else norm,
                           "step_s": end - x["began"], **mark})
            self.bar.stats.update(loss=loss, inst=inst, prior=prior)  # shown at the bar's next update
        if self.lines:  # all processes see the same mean, so all stop together
            loss, norm = values[bad][0], values[bad][3]
            what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
            raise TrainError(f"{what} at step {self.lines[0]['step']}; stopped, {kept}. "
                             "Try a lower --lr or --mixed-precision no")


def syncs_at(cfg: TrainConfig, step: int) -> bool:
    """Where the losses are read: every --log-every steps, and before the weights are kept or sampled (a checkpoint,
    a snapshot, a validation grid or loss) and at the last step."""
    every = (cfg.log_every, cfg.checkpoint_every, cfg.save_every, cfg.validation_every)
    return step == cfg.steps or any(n and step % n == 0 for n in every)


def loop(cfg: TrainConfig, out: Path, stepper: Stepper, ckpt: Checkpointer, step: int) -> int:
    """Optimizer steps from `step` to cfg.steps; returns the last step done."""
    main = stepper.runtime.main  # under torchrun only rank 0 logs, checkpoints and validates
    bar = Progress(cfg.steps, "training", start=step, enabled=main)
    held = HeldOutLoss(stepper.batches.pools, cfg.seed, dreambooth_loss,
                       process=stepper.process) if cfg.validation_every else None
    log = unsynced = None
    try:
        with distributed.peers_watched():  # a process lost inside FSDP's hooks stops as any other
            log = Log(out, cfg.report_to, main)
            unsynced = Unsynced(stepper.runtime.group, log, bar)
            if step == 0 and (cfg.validation_every or has_grid(cfg)):  # the base model, beside the later grids
                validation(cfg, out, stepper, 0, log, held, bar)
            if not (out / "snapshots" / f"step-{step:06d}").exists():  # a stop while it was written: write it now
                snapshot_at(cfg, stepper, step, bar)
            while step < cfg.steps:
                began = time.perf_counter()
                unsynced.add(stepper(step), began)
                step += 1
                if syncs_at(cfg, step):
                    unsynced.read(ckpt.kept())
                bar.update()
                stepper.raise_deferred()  # a Ctrl-C that came during the update ends the run here, after step `step`
                if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    ckpt.save(step)  # always the last step: a larger --steps extends a finished run
                snapshot_at(cfg, stepper, step, bar)
                if cfg.validation_every and step % cfg.validation_every == 0:
                    validation(cfg, out, stepper, step, log, held, bar)
    except STOPS as e:
        bar.close()
        stepper.rewind()
        if unsynced is not None:  # a non-finite loss among the unread steps stops the run as such, unsaved
            with suppress(OSError), signals_deferred():  # a line that does not fit was reported where it failed
                unsynced.read(ckpt.kept(), alone=True)
        raise TrainError(f"{why(e)} at step {step}; {saved(ckpt, step)}; {continue_with(out)}") from None
    finally:
        if log is not None:
            log.close()
    bar.close()
    return step
