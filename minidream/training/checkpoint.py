"""A run's folder and its checkpoints. One safetensors file per checkpoint (the trainable weights, the
optimizer's moments, the LR schedule, every RNG state; the config and step in its metadata), written to a
temporary name and renamed, so a crash or Ctrl-C never leaves half a checkpoint; `--resume` restores it
exactly. One run per folder (a lock), and `--overwrite` removes only what a run writes.
"""
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.training.config import TrainConfig, TrainError, resumed_config, stored_config
from minidream.training.data import image_files
from minidream.training.distributed import World
from minidream.formats.files import save_safetensors

# What a run writes into --out: --overwrite removes exactly these before it starts again.
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "checkpoints", "samples", "class_images", "model", "model.safetensors",
               "lora", "lora_kohya.safetensors", "learned_embeds.safetensors")


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, groups, opt, sched, scaler, g: torch.Generator):
    tensors = {name: p.detach() for params in groups.values() for name, p in params}
    state = opt.state_dict()
    scalars = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = g.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"step": step, "config": asdict(cfg), "param_groups": state["param_groups"], "optim_scalars": scalars,
            "lr_sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}
    save_safetensors(tensors, path, metadata={"minidream": json.dumps(meta)})


def read_checkpoint(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["minidream"])
        return meta, load_file(path)
    except Exception as e:
        raise TrainError(f"{path}: not a readable minidream checkpoint ({e})") from None


def restore(meta, tensors, groups, opt, sched, scaler, g) -> int:
    """Put a checkpoint's weights, optimizer, schedule and RNG states back; returns its step."""
    try:
        _restore(meta, tensors, groups, opt, sched, scaler, g)
    except TrainError:
        raise
    except Exception as e:  # a crafted or damaged checkpoint: name it, do not crash in torch
        raise TrainError(f"the checkpoint's optimizer, schedule or RNG state is not usable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); resume from another checkpoint") from None
    return meta["step"]


def _restore(meta, tensors, groups, opt, sched, scaler, g):
    with torch.no_grad():
        for params in groups.values():
            for name, p in params:
                if name not in tensors:
                    raise TrainError(f"checkpoint has no tensor {name!r}; it was made with other --train settings")
                p.copy_(tensors[name])
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state["state"].setdefault(int(idx), {})[key] = v
    for k, v in meta["optim_scalars"].items():
        idx, key = k.split(".", 1)
        state["state"].setdefault(int(idx), {})[key] = v
    opt.load_state_dict(state)
    for pg in opt.param_groups:  # torch takes any values here; a crafted file would fail mid-step instead
        nums = [pg[k] for k in ("lr", "initial_lr", "weight_decay", "eps") if k in pg] + list(pg["betas"])
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in nums):
            raise ValueError(f"optimizer hyperparameters {nums} are not finite non-negative numbers")
        for p in pg["params"]:
            if any(torch.is_tensor(v) and v.ndim and v.shape != p.shape for v in opt.state[p].values()):
                raise ValueError("optimizer moments do not match the parameters' shapes")
    sched.load_state_dict(meta["lr_sched"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    g.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.safetensors"))


class Checkpointer:
    """Writes step-N checkpoints into OUT/checkpoints, keeps the last --keep-last, and remembers the last
    good one (named in every error that stops the run)."""

    def __init__(self, out: Path, cfg: TrainConfig, groups, opt, sched, scaler, g: torch.Generator, step: int,
                 world: World = World()):
        self.out, self.cfg, self.state, self.world = out, cfg, (groups, opt, sched, scaler, g), world
        self.last_good = step

    def save(self, step: int) -> Path:
        """Rank 0 writes (every process holds the same state, and the draws are global: a checkpoint resumes
        on any number of processes)."""
        path = self.out / "checkpoints" / f"step-{step:06d}.safetensors"
        if not self.world.main:
            self.last_good = step
            return path
        try:
            save_checkpoint(path, step, self.cfg, *self.state)
        except OSError as e:
            raise TrainError(f"{path}: could not be written ({e.strerror}); the last good checkpoint is kept "
                             f"(step {self.last_good}); free space and --resume latest") from None
        for old in checkpoints(self.out)[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            old.unlink()
        self.last_good = step
        return path


def resume_from(cfg: TrainConfig, out: Path, resume: str, given: set[str] | None):
    """--resume latest|FILE: the checkpoint's settings (with the resumable ones the user gave) and its contents."""
    found = checkpoints(out) if resume == "latest" else []
    if resume == "latest" and not found:
        raise TrainError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
    ck = found[-1] if found else Path(resume)
    if not ck.is_file():
        raise TrainError(f"--resume {resume}: no such checkpoint file")
    meta, tensors = read_checkpoint(ck)
    cfg = resumed_config(cfg, stored_config(meta, ck), given)
    if given is not None and "class_dir" not in given and cfg.class_dir and \
            not Path(cfg.class_dir).resolve().is_relative_to(out.resolve()):
        # a stored class folder outside --out is only read: a crafted checkpoint must not make us write there
        have = len(image_files(Path(cfg.class_dir))) if Path(cfg.class_dir).is_dir() else 0
        if cfg.prior and have < cfg.num_class_images:
            raise TrainError(f"--class-dir {cfg.class_dir} (from the checkpoint) holds {have} of "
                             f"{cfg.num_class_images} class images; pass --class-dir to say where to make them")
    print(f"resuming from {ck} at step {meta['step']}", file=sys.stderr)
    return cfg, (meta, tensors)


def lock_run(out: Path):
    """One run per --out: a second one would interleave checkpoints and metrics."""
    import fcntl
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise TrainError(f"--out {out} is in use by another minidream run; wait for it or choose another folder") from None
    return f


def clear_run(out: Path, cfg: TrainConfig):
    """--overwrite: remove what an earlier run wrote into --out (and only that); a --class-dir elsewhere stays."""
    import shutil
    for name in RUN_OUTPUTS:
        p = out / name
        if name == "class_images" and cfg.class_dir and Path(cfg.class_dir).resolve() != p.resolve():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def truncate_metrics(path: Path, step: int):
    """A resumed run logs from its checkpoint's step on: drop the killed run's later (or half-written) lines."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def open_run(out: Path, cfg: TrainConfig, start_over: bool, resumed_step: int | None):
    """Take --out for this process (lock), clear it when starting over, drop a killed run's unfinished
    files and later metrics, and write run.json. Returns the lock; closing it frees the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_run(out)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror}); choose another folder or free space") from None
    try:
        if start_over:  # start over: nothing of the old run may be resumed, pruned or reused
            clear_run(out, cfg)
        for stale in out.rglob(".*.tmp*"):  # a killed write's unfinished file (checkpoint, export, image)
            stale.unlink()
        if resumed_step is not None:
            truncate_metrics(out / "metrics.jsonl", resumed_step)
        (out / "run.json").write_text(json.dumps(asdict(cfg), indent=2))
    except OSError as e:
        lock.close()
        raise TrainError(f"--out {out}: cannot write there ({e.strerror}); choose another folder or free space") from None
    return lock
