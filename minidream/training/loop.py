"""The training loop: the step repeated to --steps, each logging a metrics line and maybe checkpointing and drawing
a validation grid. Ctrl-C (or SIGTERM, or a lost process) saves a checkpoint of the last finished step; a
non-finite loss stops with the last good one kept."""
import time
from pathlib import Path

from minidream.progress import Progress
from minidream.training import TrainError, distributed
from minidream.training.checkpoint import Checkpointer
from minidream.training.config import TrainConfig
from minidream.training.report import Log
from minidream.training.step import Stepper
from minidream.training.validation import validation_grid


def loop(cfg: TrainConfig, out: Path, stepper: Stepper, ckpt: Checkpointer, step: int) -> int:
    """Optimizer steps from `step` to cfg.steps; returns the last step done."""
    main = stepper.runtime.main  # under torchrun only rank 0 logs, checkpoints and validates
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
                validation_grid(stepper.state.model, cfg, png)
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
