"""Checkpoints: one safetensors file each, the training state's `state_dict` flattened into it (the trainable
weights, the optimizer's tensors, every RNG state; the config, step, optimizer settings, LR schedule and loss scaler
in its metadata), written to a temporary name and renamed, so a crash or Ctrl-C never leaves half a checkpoint;
`--resume` restores it exactly. The layout is the one minidream has always written: older checkpoints resume.
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from minidream.formats.files import save_safetensors
from minidream.training import TrainError
from minidream.training.config import TrainConfig, resumed_config, stored_config
from minidream.training.distributed import ProcessGroup
from minidream.training.photos import image_files
from minidream.training.state import TrainState


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, state: dict):
    """`state`: TrainState.state_dict(). Tensors go into the file, everything else into its metadata."""
    tensors = dict(state["params"])
    scalars = {}
    for idx, st in state["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    tensors.update({f"rng.{k}": v for k, v in state["rng"].items()})
    meta = {"step": step, "config": asdict(cfg), "param_groups": state["optimizer"]["param_groups"],
            "optim_scalars": scalars, "lr_sched": state["lr_schedule"], "scaler": state["scaler"]}
    save_safetensors(tensors, path, metadata={"minidream": json.dumps(meta)})


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
                optimizer["state"].setdefault(int(idx), {})[key] = v
        for k, v in meta["optim_scalars"].items():
            idx, key = k.split(".", 1)
            optimizer["state"].setdefault(int(idx), {})[key] = v
        state = {"params": {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))},
                 "optimizer": optimizer, "lr_schedule": meta["lr_sched"], "scaler": meta.get("scaler"),
                 "rng": {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}}
        return meta, state
    except Exception as e:
        raise TrainError(f"{path}: not a readable minidream checkpoint ({e})") from None


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.safetensors"))


class Checkpointer:
    """Writes step-N checkpoints into OUT/checkpoints, keeps the last --keep-last, and remembers the last
    good one (named in every error that stops the run)."""

    def __init__(self, out: Path, cfg: TrainConfig, state: TrainState, step: int, group: ProcessGroup):
        self.out, self.cfg, self.state, self.group = out, cfg, state, group
        self.last_good = step

    def save(self, step: int) -> Path:
        """Rank 0 writes (every process holds the same state, and the draws are global: a checkpoint resumes
        on any number of processes)."""
        path = self.out / "checkpoints" / f"step-{step:06d}.safetensors"
        if not self.group.main:
            self.last_good = step
            return path
        try:
            save_checkpoint(path, step, self.cfg, self.state.state_dict())
        except OSError as e:
            raise TrainError(f"{path}: could not be written ({e.strerror}); the last good checkpoint is kept "
                             f"(step {self.last_good}); free space and --resume latest") from None
        for old in checkpoints(self.out)[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            old.unlink()
        self.last_good = step
        return path


def resume_from(cfg: TrainConfig, out: Path, resume: str, given: set[str] | None) -> tuple[TrainConfig, int, dict]:
    """--resume latest|FILE: the checkpoint's settings (with the resumable ones the user gave), its step and its
    training state."""
    found = checkpoints(out) if resume == "latest" else []
    if resume == "latest" and not found:
        raise TrainError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
    ck = found[-1] if found else Path(resume)
    if not ck.is_file():
        raise TrainError(f"--resume {resume}: no such checkpoint file")
    meta, state = read_checkpoint(ck)
    cfg = resumed_config(cfg, stored_config(meta, ck), given)
    if given is not None and "class_dir" not in given and cfg.class_dir and \
            not Path(cfg.class_dir).resolve().is_relative_to(out.resolve()):
        # a stored class folder outside --out is only read: a crafted checkpoint must not make us write there
        have = len(image_files(Path(cfg.class_dir))) if Path(cfg.class_dir).is_dir() else 0
        if cfg.prior and have < cfg.num_class_images:
            raise TrainError(f"--class-dir {cfg.class_dir} (from the checkpoint) holds {have} of "
                             f"{cfg.num_class_images} class images; pass --class-dir to say where to make them")
    print(f"resuming from {ck} at step {meta['step']}", file=sys.stderr)
    return cfg, meta["step"], state
