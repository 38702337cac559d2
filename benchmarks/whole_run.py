"""Peak memory of a whole `minidream train` command (loading, class images, the steps, the last checkpoint, the
exports), not only of its step: `python -m benchmarks memory --whole` runs each "ours" recipe of benchmarks/memory.py
as the CLI in a child process, samples its RSS every 0.1 s with the phase its stderr last announced, and takes the
whole command's peak from the kernel (wait4's ru_maxrss).

    python -m benchmarks memory --whole --only "adafactor" --res 256   # -> memory-whole-cpu-sd15-256.json
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the phase a stderr line starts (the CLI's own lines, in the order a run prints them)
PHASES = [("generating", "class images"), ("component", "set-up"), ("training", "steps")]


def cli_flags(mode: str, settings: dict) -> list[str]:
    """A recipe's TrainConfig settings as `minidream train` options."""
    flags = ["--train", mode]
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    return flags


def photos(folder: Path, res: int):
    import torch
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(res, res, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def measure(cmd: list[str], steps: int) -> dict:
    """The command's peak RSS (the kernel's) and the peak sampled in each phase (after the progress line's last
    step: the last checkpoint, the final grid and the exports)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    phase, peaks, tail = ["loading"], {}, []

    def read():
        for line in proc.stderr:
            tail.append(line.rstrip())
            del tail[:-20]
            word = line.strip().split(" ", 1)[0]
            phase[0] = next((name for start, name in PHASES if word == start), phase[0])
            if word == "training" and f" {steps}/{steps} " in line:
                phase[0] = "checkpoint, exports"
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = rss_of(proc.pid)
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
        time.sleep(0.1)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}: exit {proc.returncode}: {tail[-3:]}")
    return {"phase_peak_rss": peaks, "tail": tail[-3:]}


def whole_run(mode: str, settings: dict, folder: str, res: int, steps: int) -> dict:
    """One recipe's whole command, in a child of this process (ru_maxrss of the children is then its own)."""
    import resource
    with tempfile.TemporaryDirectory() as d:
        photos(Path(d) / "photos", res)
        save = ["--save-as", "diffusers"] if mode != "lora" else []
        cmd = [sys.executable, "-m", "minidream", "train", "--model", folder, "--instance-dir", f"{d}/photos",
               "--class-noun", "dog", "--out", f"{d}/run", "--resolution", str(res), "--steps", str(steps),
               "--num-class-images", "1", "--class-steps", "2", "--checkpoint-every", str(steps), *save,
               *cli_flags(mode, settings)]
        t0 = time.perf_counter()
        got = measure(cmd, steps)
        got["peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        got["seconds"] = time.perf_counter() - t0
        got["command"] = " ".join(cmd[1:]).replace(d, "TMP").replace(folder, "MODEL")
        return got


def run(preset: str, res: int, steps: int, recipes: dict, out=None, step_rows: Path | None = None,
        reference: str = "diffusers unet") -> Path:
    """Each recipe's whole command in its own child; written beside the step-only peaks of the same recipes (the
    step file `step_rows`, when it exists) and diffusers' default step's (its row `reference`)."""
    import torch
    from .common import RESULTS, environment
    from .cpu import cpu_name
    from .memory import model_folder
    steps_file = json.loads(step_rows.read_text()) if step_rows and step_rows.exists() else {"results": []}
    step_peak = {r["recipe"]: r["peak_rss"] for r in steps_file["results"]}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model_folder(preset, d)
        for name, (mode, settings) in recipes.items():
            cmd = [sys.executable, "-m", "benchmarks.whole_run", mode, json.dumps(settings), d, str(res), str(steps)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: {r.stderr.strip().splitlines()[-1:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"recipe": name, "mode": mode, "settings": settings, **got,
                         "step_peak_rss": step_peak.get(name), "diffusers_default_step_peak_rss":
                         step_peak.get(reference)})
            print(f"{name}: whole run {got['peak_rss'] / 2 ** 30:.2f} GiB; by phase " + ", ".join(
                f"{k} {v / 2 ** 30:.2f}" for k, v in got["phase_peak_rss"].items()), file=sys.stderr)
    env = environment("cpu")
    env.update(device=f"cpu: {cpu_name()}, {os.cpu_count()} cores", torch_threads=torch.get_num_threads())
    path = Path(out or RESULTS) / f"memory-whole-cpu-{preset}-{res}.json"
    path.write_text(json.dumps({"benchmark": "memory-whole-cpu", **env, "preset": preset, "res": res,
                                "steps": steps, "measure": "peak RSS of the whole `minidream train` command (bytes; "
                                "the kernel's ru_maxrss), and the peak sampled every 0.1 s in each phase its "
                                "stderr announced", "results": rows}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":  # the child: one recipe's whole command
    mode, settings, folder, res, steps = sys.argv[1:]
    print(json.dumps(whole_run(mode, json.loads(settings), folder, int(res), int(steps))))
