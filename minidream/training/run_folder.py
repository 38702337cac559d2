"""The run folder (--out): one run per folder (a lock), `--overwrite` removing exactly what a run writes (derived
from where each thing is written: the exports' table, the report, the checkpoints), a killed run's unfinished
files dropped and its later metrics cut back on resume, and run.json written.
"""
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from minidream.formats import exports
from minidream.formats.files import write_text
from minidream.training import TrainError, report
from minidream.training.config import TrainConfig
from minidream.training.distributed import barrier
from minidream.training.runtime import Runtime


def run_outputs() -> list[str]:
    """What a run writes into --out: --overwrite removes exactly these before it starts again."""
    return ["run.json", "data.json", "finished.json", "checkpoints", "snapshots", "samples", "class_images", "ema",
            "README.md", *report.OUTPUTS,
            *[r.output for r in report.REPORT_TO.values() if r], *exports.outputs()]


def lock_run(out: Path):
    """One run per --out: a second one would interleave checkpoints and metrics."""
    import fcntl
    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise TrainError(f"--out {out} is in use by another minidream run (it holds {out / '.lock'}); wait for it "
                         f"or choose another folder") from None
    return f


def refuse_locked(out: Path):
    """A folder another run holds is named as that first, before what its files say (another run, a finished
    one): whatever else is true of it, it is not this run's to take now."""
    if (out / ".lock").is_file():
        with suppress(OSError):
            lock_run(out).close()


def finished(out: Path, step: int, written: list[Path]):
    """OUT/finished.json, written last: the run's exports of `step` are all on disk."""
    write_text(out / "finished.json", json.dumps({"step": step, "files": [str(p) for p in written]}, indent=1))


def refuse_finished(out: Path, steps: int):
    """--resume of a run already at its last step: training on needs a larger --steps. One whose exports were not
    all written (stopped after the last checkpoint) writes them."""
    try:
        done = json.loads((out / "finished.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return
    if done == steps:
        raise TrainError(f"--out {out}: already at step {steps}, with its exports written (finished.json); pass "
                         f"--steps M > {steps} to train on, or --overwrite to start over")


def clear_run(out: Path, cfg: TrainConfig):
    """--overwrite: remove what an earlier run wrote into --out (and only that); a --class-dir elsewhere stays."""
    for name in run_outputs():
        p = out / name
        if name == "class_images" and cfg.class_dir and Path(cfg.class_dir).resolve() != p.resolve():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


OURS = re.compile(r"\.(.+)\.tmp\d+(old)?")  # .NAME.tmpPID (a write under way), .NAME.tmpPIDold (swapped out)
SAFETENSORS = re.compile(r"\.tmp[A-Za-z0-9_]{6,}")  # safetensors' own temporary file


def remove_unfinished(out: Path):
    """What a killed write left in the run's own files and folders: our `.NAME.tmpPID` files and folders
    (checkpoint, export, image) and safetensors' `.tmpXXXXXX`. An export swapped out (`.NAME.tmpPIDold`) whose new
    one never arrived is put back."""
    mine = [out / name for name in run_outputs() if "/" not in name]
    places = [out, *(p for p in mine if p.is_dir() and not p.is_symlink())]
    found = {x for place in places for x in (place.rglob(".*") if place != out else place.glob(".*"))}
    for stale in sorted(found, key=lambda p: len(p.parts)):
        ours = OURS.fullmatch(stale.name)
        if not (ours or SAFETENSORS.fullmatch(stale.name)) or not (stale.exists() or stale.is_symlink()):
            continue
        whole = stale.with_name(ours[1]) if ours else None
        if ours and ours[2] and not (whole.exists() or whole.is_symlink()):
            os.replace(stale, whole)  # killed between the two renames of a swap: the previous export is kept
        elif stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


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


STEP = re.compile(r"step-(\d+)(?:\.safetensors)?")  # a checkpoint's file or a snapshot's folder


def set_aside_later(out: Path, step: int):
    """Resumed from an earlier checkpoint: the later checkpoints and snapshots belong to the line of steps being
    replaced: `--resume latest` must not pick them, nor --keep-snapshots count them. They are moved to
    OUT/checkpoints/abandoned/ and OUT/snapshots/abandoned/, not deleted."""
    for folder, what in (("checkpoints", "checkpoint"), ("snapshots", "snapshot")):
        later = [p for p in (out / folder).glob("step-*") if (m := STEP.fullmatch(p.name)) and int(m[1]) > step]
        if not later:
            continue
        aside = out / folder / "abandoned"
        aside.mkdir(exist_ok=True)
        for p in later:
            if p.is_dir() and (aside / p.name).is_dir():  # a snapshot of that step abandoned before: the newer stays
                shutil.rmtree(aside / p.name)
            os.replace(p, aside / p.name)
        print(f"resumed at step {step}: {len(later)} later {what}(s) moved to {aside}", file=sys.stderr)


def unwritable(out: Path, e: OSError) -> TrainError:
    return TrainError(f"--out {out}: cannot write there ({e.strerror}); choose another folder or free space")


def open_run(out: Path, cfg: TrainConfig, start_over: bool, resumed_step: int | None, processes: int = 1,
             rewound: bool = False):
    """Take --out for this process (lock), clear it when starting over, drop a killed run's unfinished
    files and later metrics, and write run.json; `rewound` (--resume FILE): set the later checkpoints and snapshots
    aside. (After --resume latest a later snapshot is of the same line of steps, rewritten when it comes again.)
    Returns the lock; closing it frees the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_run(out)
    except OSError as e:
        raise unwritable(out, e) from None
    try:
        if start_over:  # start over: nothing of the old run may be resumed, pruned or reused
            clear_run(out, cfg)
        remove_unfinished(out)
        if resumed_step is not None:
            truncate_metrics(out / "metrics.jsonl", resumed_step)
            (out / "finished.json").unlink(missing_ok=True)  # written again once this run's exports are all out
        if resumed_step is not None and rewound:
            set_aside_later(out, resumed_step)
        write_text(out / "run.json", json.dumps({**asdict(cfg), "processes": processes}, indent=2))
    except OSError as e:
        lock.close()
        raise unwritable(out, e) from None
    return lock


@contextmanager
def opened(out: Path, cfg: TrainConfig, rt: Runtime, start_over: bool, resumed_step: int | None,
           processes: int = 1, rewound: bool = False):
    """--out taken by this run for as long as it lasts (rank 0 opens it; the others start once it is cleared and
    run.json written)."""
    lock = open_run(out, cfg, start_over, resumed_step, processes, rewound) if rt.main else None
    barrier(rt.group)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()
