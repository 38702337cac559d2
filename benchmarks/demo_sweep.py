"""DreamBooth settings of the demo, over subjects and seeds (`python -m benchmarks.demo_sweep --name N --set
field=value ... --seeds 0-5`): each run is `minidream.demo.run.run_demo` with the prior, demo_config's values of the
SWEPT fields replaced as --set names them, measured as the demo measures (subject fidelity over the eval's 80 instance
samples, PRES and DIV over 32 class samples) plus the identifier's localisation. Adds (or extends) the entry
`name` of benchmarks/results/demo-seeds-cpu.json's MODEL settings (the demo model it ran on: "model_34", the one
of #34, whose subjects were attribute combinations; "model_54", whose subjects have a shape or pattern of their own),
with the command that made it and the resulting values of the fields a sweep tunes (SWEPT), so an entry still reads
right after demo_config changes."""
import argparse
import fcntl
import json
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from minidream.demo import world
from minidream.demo.run import demo_config, run_demo
from minidream.formats.files import write_text

RESULTS = Path("benchmarks/results/demo-seeds-cpu.json")
SWEPT = ("steps", "lr", "text_encoder_lr", "lr_schedule", "warmup_steps", "flip")
MODEL = "model_54"


def parse_changes(pairs: list[str]) -> dict:
    """--set field=value pairs, field one of SWEPT (what an entry records, so all it ran with): a number or
    true/false as JSON reads it, else text."""
    changes = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in SWEPT or not text:
            raise SystemExit(f"--set {pair!r}: expected field=value with field one of {', '.join(SWEPT)}")
        try:
            changes[key] = json.loads(text)
        except ValueError:
            changes[key] = text
    return changes


def swept_values(changes: dict) -> dict:
    """What the runs trained with: demo_config's values of the SWEPT fields, with `changes` applied."""
    cfg = replace(demo_config(Path(".")), **changes)
    return {k: getattr(cfg, k) for k in SWEPT}


def seeds_of(text: str) -> list[int]:
    """'0-5', '0,2,4' or both: '0-2,4'."""
    seeds = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected seeds such as 0-5 or 0,2,4") from None
    if not seeds:
        raise SystemExit(f"--seeds {text!r}: no seeds")
    return seeds


def check_name(results: Path, name: str, changes: dict, record: dict | None = None):
    """An entry of that name (in `record`, else in the file) must have trained with the same settings: checked
    before any run, and again as each run is added."""
    record = record if record is not None else json.loads(results.read_text())
    entry = record.get(MODEL, {"settings": {}})["settings"].get(name)
    if entry is not None and entry["settings"] != swept_values(changes):
        raise SystemExit(f"{name!r} is already in {results} with other settings: {entry['settings']}")


def record_run(results: Path, name: str, changes: dict, subject: str, seed: int, row: dict):
    """Adds one run to the entry `name`, under a lock: sweeps of other seeds may run at once (on 2 cores, two
    one-thread processes finish more runs an hour than one two-thread process)."""
    with open(Path(tempfile.gettempdir()) / "minidream-demo-sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(results.read_text())
        check_name(results, name, changes, record)
        model = record.setdefault(MODEL, {"what": "the demo model pretrained for #54 (minidream/demo/weights)",
                                          "settings": {}})
        entry = model["settings"].setdefault(name, {"settings": swept_values(changes), "runs": {}})
        entry.setdefault("commands", [])
        command = "python -m benchmarks.demo_sweep " + " ".join(sys.argv[1:])
        if command not in entry["commands"]:
            entry["commands"].append(command)
        entry["device"] = f"{platform.machine()} CPU, torch {torch.__version__}"
        entry["runs"].setdefault(subject, {})[str(seed)] = row
        write_text(results, json.dumps(record, indent=1))
        return entry


def main(name: str, changes: dict, seeds: list[int], subjects: list[dict], results: Path = RESULTS):
    check_name(results, name, changes)
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects:
            for s in seeds:
                m = run_demo(Path(tmp) / f"{world.subject_name(subject)}-{s}", prior=True, seed=s, grids=False,
                             localise=True, subject=subject, changes=changes)
                row = {"subject_fidelity": round(m["subject_fidelity"], 4), "PRES": round(m["PRES"], 4),
                       "DIV": round(m["DIV"], 4), "loc": round(m["attention_localisation"], 3),
                       "wall_time_s": m["wall_time_s"], "threads": torch.get_num_threads()}
                entry = record_run(results, name, changes, world.subject_name(subject), s, row)
                print(f"{name} {world.subject_name(subject)} seed {s}: {row}", flush=True)
    every = [r for rs in entry["runs"].values() for r in rs.values()]
    for key in ("subject_fidelity", "loc"):
        vals = [r[key] for r in every]
        print(f"{name}: {key} mean {sum(vals) / len(vals):.3f}, least {min(vals):.3f} over {len(vals)} runs")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--seeds", default="0-5")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--subjects", default="all", help="all, or numbers or names as `minidream eval` takes them")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        picked = world.pick_subjects(a.subjects)
    except ValueError as e:
        raise SystemExit(f"--subjects {a.subjects!r}: {e}") from None
    main(a.name, parse_changes(a.set), seeds_of(a.seeds), picked)
