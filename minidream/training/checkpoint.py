"""Checkpoints: one safetensors file each, the training state's `state_dict` flattened into it (the trainable
weights, the optimizer's tensors, every RNG state; the config, step, optimizer settings, LR schedule and loss scaler
in its metadata), written to a temporary name and renamed, so a crash or Ctrl-C never leaves half a checkpoint;
`--resume` restores it exactly. The layout is the one minidream has always written: older checkpoints resume.
"""
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from minidream.formats.files import give_back_pages, save_safetensors
from minidream.training import TrainError, continue_with
from minidream.training.config import OPTIONS, TrainConfig, flag
from minidream.training.resume_settings import SETTINGS_VERSION, resumed_config, short, stored_config
from minidream.training.distributed import ProcessGroup
from minidream.training.photos import image_files
from minidream.training.state import TrainState


def base_fingerprint(model) -> str:
    """A short hash of the base model: each network's config and a strided sample of each tensor's values. A resume
    given another --model (not the same files moved) is refused with it."""
    import hashlib
    parts = []
    for net in model.networks():
        parts.append(repr(getattr(net, "config", type(net).__name__)))
        state = net.state_dict()
        for name, p in state.items():
            x = p.detach().flatten()
            parts.append(f"{name}:{float(x[::max(1, x.numel() // 64)].double().sum()):.10e}")
        give_back_pages(list(state.values()))  # a read sample maps its neighbours too: a memory-mapped base
        # would be mostly in memory after it, before the run has chosen what to hold (training/holding.py)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, state: dict, processes: int = 1,
                    base: str | None = None):
    """`state`: TrainState.state_dict(). Tensors go into the file, everything else into its metadata (with how many
    processes shared the batch: a resume on another number keeps the run's global batch)."""
    tensors = dict(state["params"])
    scalars = {}
    for idx, st in state["optimizer"]["state"].items():
        for k, v in flat(st):
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    tensors.update({f"rng.{k}": v for k, v in state["rng"].items()})
    ema = state.get("ema")
    if ema is not None:  # the moving average (--ema-decay): its tensors, its counts in the metadata
        tensors.update({f"ema.{k}": v for k, v in ema["shadow"].items()})
    shared = set()  # safetensors refuses tensors that share memory (bitsandbytes' quantization maps do): copy those
    for k, v in tensors.items():
        where = (v.untyped_storage().data_ptr(), v.device)
        tensors[k] = v.clone() if where in shared else v
        shared.add(where)
    meta = {"step": step, "settings_version": SETTINGS_VERSION, "config": asdict(cfg),
            "param_groups": state["optimizer"]["param_groups"], "optim_scalars": scalars,
            "lr_sched": state["lr_schedule"], "scaler": state["scaler"],
            "processes": processes, "base": base,
            "ema": None if ema is None else {"steps": ema["steps"], "updates": ema["updates"]}}
    save_safetensors(tensors, path, metadata={"minidream": json.dumps(meta)})


def flat(entries: dict, prefix: str = ""):
    """An optimizer's per-parameter state as (key, value) pairs; a nested dict (bitsandbytes keeps its quantization
    maps in one) as "outer/inner" keys."""
    for k, v in entries.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def put(entries: dict, key: str, value):
    """The inverse of `flat`, one entry at a time."""
    *outer, last = key.split("/")
    for k in outer:
        entries = entries.setdefault(k, {})
    entries[last] = value


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the file's metadata, its TrainState state dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["minidream"])
        tensors = load_file(path)
        optimizer = {"state": {}, "param_groups": meta["param_groups"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                put(optimizer["state"].setdefault(int(idx), {}), key, v)
        for k, v in meta["optim_scalars"].items():
            idx, key = k.split(".", 1)
            put(optimizer["state"].setdefault(int(idx), {}), key, v)
        state = {"params": {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng.", "ema."))},
                 "optimizer": optimizer, "lr_schedule": meta["lr_sched"], "scaler": meta.get("scaler"),
                 "rng": {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")},
                 "ema": None if not meta.get("ema") else {
                     **meta["ema"], "shadow": {k.removeprefix("ema."): v for k, v in tensors.items()
                                               if k.startswith("ema.")}}}
        return meta, state
    except Exception as e:
        raise TrainError(f"{path}: not a readable minidream checkpoint ({e})") from None


def per_process_batch(cfg: TrainConfig, was: int, now: int) -> int:
    """A run resumed on another number of processes keeps its global batch (--batch-size is per process, for the
    run's first number of processes: the run's settings keep that), so it continues the same computation
    (distributed.py); a number that does not divide that batch is refused."""
    if was == now:
        return cfg.batch_size
    batch = cfg.batch_size * was
    if batch % now:
        raise TrainError(f"--resume: the run trained {was} process(es) x --batch-size {cfg.batch_size} (a batch of "
                         f"{batch}); resume it on a number of processes that divides {batch}")
    print(f"resuming on {now} process(es): --batch-size {batch // now} each keeps the run's batch of {batch}",
          file=sys.stderr)
    return batch // now


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.safetensors"))


class Checkpointer:
    """Writes step-N checkpoints into OUT/checkpoints, keeps the last --keep-last, and remembers the last
    good one (named in every error that stops the run)."""

    def __init__(self, out: Path, cfg: TrainConfig, state: TrainState, step: int, group: ProcessGroup,
                 processes: int = 1, base: str | None = None):
        self.out, self.cfg, self.state, self.group, self.processes = out, cfg, state, group, processes
        self.base = base  # the base model's fingerprint, kept in every checkpoint
        self.last_good = step

    def path(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:06d}.safetensors"

    def kept(self) -> str:
        """What a run stopped now keeps, for its last line."""
        if self.last_good and not self.group.main:
            return f"its last checkpoint: step {self.last_good}"
        if self.last_good and self.path(self.last_good).is_file():
            return f"the last good checkpoint is kept (step {self.last_good})"
        return "no checkpoint was written yet (--resume latest starts again from step 0)"

    def keep(self, step: int) -> Path:
        """A checkpoint of `step`: the one already written, or a new one."""
        if self.group.main and self.last_good == step and self.path(step).is_file():
            return self.path(step)
        return self.save(step)

    def save(self, step: int) -> Path:
        """Rank 0 writes (every process holds the same state, and the draws are global: a checkpoint resumes
        on any number of processes)."""
        path = self.path(step)
        if not self.group.main:
            if self.cfg.fsdp:  # its part of the gather
                self.state.state_dict(keep=False)
            self.last_good = step
            return path
        try:
            save_checkpoint(path, step, self.cfg, self.state.state_dict(), self.processes, self.base)
        except OSError as e:
            raise TrainError(f"{path}: could not be written ({e.strerror}); {self.kept()}; free space, then "
                             f"{continue_with(self.out)}") from None
        for old in checkpoints(self.out)[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            old.unlink()
        self.last_good = step
        return path


def same_run(out: Path, stored: TrainConfig, source: Path):
    """--resume FILE into a folder that holds a run: the file must be a checkpoint of that run (the settings a
    resume cannot change agree), or its checkpoints, metrics and exports would mix with another's."""
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return  # no run here (or an unreadable one, which the run's own checks name)
    mine = json.loads(json.dumps(asdict(stored)))
    fixed = [n for n, f in OPTIONS.items() if not f.metadata["resumable"] and n in run and run[n] != mine.get(n)]
    if fixed:
        raise TrainError(f"--resume {source}: a checkpoint of another run than the one in --out {out} (its "
                         f"{flag(fixed[0])} is {short(mine.get(fixed[0]))}, this run's {short(run[fixed[0]])}); "
                         f"resume it in its own --out, or in a new folder")


@dataclass(frozen=True)
class Resume:
    """Where a resumed run picks up."""
    step: int  # the checkpoint's step (0: a run stopped before its first checkpoint starts again)
    state: dict | None  # its training state (None before the first checkpoint)
    processes: int  # the number of processes its --batch-size is for
    base: str | None  # its base model's fingerprint (None in checkpoints older than the fingerprint)


def resume_from(cfg: TrainConfig, out: Path, resume: str, given: set[str] | None,
                processes: int = 1) -> tuple[TrainConfig, Resume]:
    """--resume latest|FILE: the checkpoint's settings (with the resumable ones the user gave) and where it picks
    up. A run stopped before its first checkpoint (run.json, no checkpoint) starts again from step 0 with its own
    settings, keeping what it made (its class images)."""
    found = checkpoints(out) if resume == "latest" else []
    if resume == "latest" and not found:
        if not (out / "run.json").is_file():
            raise TrainError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
        try:
            run = json.loads((out / "run.json").read_text())
            meta, state = {"config": run, "step": 0, "processes": run.get("processes")}, None
        except (OSError, ValueError) as e:
            raise TrainError(f"{out / 'run.json'}: not readable ({e}); start over with --overwrite") from None
        source, what = out / "run.json", ("no checkpoint (none written yet, or --checkpoint-every 0): starting "
                                          "again from step 0 with the settings of")
    else:
        source = found[-1] if found else Path(resume)
        if not source.is_file():
            raise TrainError(f"--resume {resume}: no such checkpoint file")
        try:
            meta, state = read_checkpoint(source)
        except TrainError as e:
            if len(found) < 2:
                raise
            raise TrainError(f"{e}; the one before it is whole: --resume {found[-2]}") from None
        what = "resuming from"
    if resume != "latest":
        same_run(out, stored_config(meta, source), source)
    cfg = resumed_config(cfg, stored_config(meta, source), given)
    if given is not None and "class_dir" not in given and cfg.class_dir and \
            not Path(cfg.class_dir).resolve().is_relative_to(out.resolve()):
        # a stored class folder outside --out is only read: a crafted checkpoint must not make us write there
        have = len(image_files(Path(cfg.class_dir))) if Path(cfg.class_dir).is_dir() else 0
        if cfg.class_images and have < cfg.num_class_images:
            raise TrainError(f"--class-dir {cfg.class_dir} (from the checkpoint) holds {have} of "
                             f"{cfg.num_class_images} class images; pass --class-dir to say where to make them")
    if cfg.fsdp and processes == 1 and "fsdp" not in (given or set()):
        print("resuming on one process: without --fsdp (the checkpoint holds the full tensors)", file=sys.stderr)
        cfg = replace(cfg, fsdp=False)
    was = meta.get("processes") or processes
    if not (isinstance(was, int) and was >= 1):
        raise TrainError(f"{source}: processes {was!r} is not a count of processes")
    per_process_batch(cfg, was, processes)  # checked before anything is written
    if cfg.steps < meta["step"]:
        raise TrainError(f"--steps {cfg.steps} is below the checkpoint's step {meta['step']}; give at least "
                         f"{meta['step']} (a larger --steps trains on)")
    print(f"{what} {source} at step {meta['step']}", file=sys.stderr)
    return cfg, Resume(meta["step"], state, was, meta.get("base"))
