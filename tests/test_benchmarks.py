"""The benchmark entry point runs end to end in --smoke mode (tiny config, CPU). No timing is asserted:
these numbers mean nothing; this only keeps the scripts alive."""
import json
import subprocess
import sys

import pytest


def test_benchmarks_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["attention-smoke.json", "levers-tiny-smoke.json", "sampling-tiny-smoke.json",
                     "step-tiny-smoke.json", "unet-tiny-smoke.json", "vae-tiny-smoke.json"]
    step = json.loads((tmp_path / "step-tiny-smoke.json").read_text())
    assert step["device"].startswith("cpu") and step["torch"] and step["command"]
    modes = {(r["mode"], r["cached_latents"]) for r in step["results"]}
    assert modes == {(m, c) for m in ("unet", "attention", "lora") for c in (True, False)}
    # the trainer's own step and diffusers' script step, eager (--smoke compiles nothing), in interleaved rounds
    assert all(list(r["variants"]) == ["ours", "diffusers"] and len(r["variants"]["ours"]["per_round_ms"]) == 2
               for r in step["results"])
    unet = json.loads((tmp_path / "unet-tiny-smoke.json").read_text())
    assert all(r["flops"] > 0 for r in unet["results"])


@pytest.mark.slow  # 15 s (the SD benchmark's smoke test runs in the fast suite)
def test_sdxl_benchmarks_smoke(tmp_path):
    """`--preset sdxl` (what the GPU session runs at 1024 px) at the tiny-xl size: both sides conditioned as SDXL."""
    r = subprocess.run([sys.executable, "-m", "benchmarks", "sd", "--smoke", "--preset", "sdxl", "--only",
                        "step,unet,sampling", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sampling-tiny-xl-smoke.json", "step-tiny-xl-smoke.json",
                                                          "unet-tiny-xl-smoke.json"]
    sampling = json.loads((tmp_path / "sampling-tiny-xl-smoke.json").read_text())
    assert all("median_ms" in r["ours"] and "median_ms" in r["diffusers"] for r in sampling["results"])


def test_report_renders_the_committed_results():
    """The README's tables come from benchmarks/results/*.json through this script; it must read every file there."""
    r = subprocess.run([sys.executable, "-m", "benchmarks", "report"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kernel compile check" in r.stdout and "| sd1-self-4096-d40 | fwd |" in r.stdout


@pytest.mark.parametrize("extra", [pytest.param(["--no-compile"], id="eager"),
                                   pytest.param([], id="compiled", marks=pytest.mark.slow)])  # Inductor: minutes
def test_cpu_step_benchmark_runs_both_trainers_in_child_processes(tmp_path, extra):
    """The CPU mode times the trainer's own step (eager and --compile on) against diffusers', each side in its own
    process (tiny config)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--preset", "tiny", "--res", "16", "--rounds", "2",
                        "--mode", "lora", "--out", str(tmp_path), *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "step-cpu-tiny-16.json").read_text())
    assert data["device"].startswith("cpu") and data["torch"]
    (row,) = data["results"]
    assert row["mode"] == "lora" and len(row["speedup_per_round"]) == 2
    sides = ("ours", "diffusers") + (() if extra else ("ours --compile on",))
    for side in sides:
        assert len(row[side]["per_round_s"]) == 2
        assert row[side]["peak_rss_bytes"] > row[side]["rss_before_first_step_bytes"] > 0
    assert ("speedup_compiled" in row) == (not extra)


def test_minidream_bench_quick_runs_from_anywhere(tmp_path):
    """`minidream bench --quick` from a folder outside the checkout (the installed package): every section's table
    on the terminal, one JSON beside; diffusers' rows where it is installed."""
    r = subprocess.run([sys.executable, "-m", "minidream", "bench", "--quick", "--device", "cpu", "--out", "b"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (tmp_path / "b").glob("bench-*.json")
    doc = json.loads(path.read_text())
    assert doc["pass"] == "quick" and doc["device"].startswith("cpu") and doc["torch"]
    assert list(doc["sections"]) == ["attention", "step", "unet", "sampling", "vae"]
    assert all("error" not in rows[0] for rows in doc["sections"].values()), doc["sections"]
    assert set(doc["sections"]["step"][0]["variants"]) == {"ours", "diffusers"}
    assert "| lora, cached | ours |" in r.stdout and "[5/5] vae" in r.stderr


def test_minidream_bench_without_diffusers_runs_ours_alone(tmp_path):
    blocked = ("import sys; sys.modules['diffusers'] = None; sys.argv = ['minidream', 'bench', '--quick', '--device', "
               "'cpu', '--only', 'step', '--only', 'vae', '--out', 'b']; from minidream.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("diffusers/transformers/peft are not installed: ours alone") == 1
    doc = json.loads(next((tmp_path / "b").glob("bench-*.json")).read_text())
    assert list(doc["sections"]) == ["step", "vae"]
    assert list(doc["sections"]["step"][0]["variants"]) == ["ours"]
    assert "diffusers" not in doc["sections"]["vae"][0]


@pytest.mark.parametrize("args, needle", [(["--only", "warp"], "--only 'warp' is not one of"),
                                          (["--out", "f"], "--out f is a file"),
                                          (["--device", "tpu"], "tpu"), (["--device", ""], "--device is empty"),
                                          (["--out", "taken"], "is a folder; move it")])
def test_minidream_bench_bad_options_are_one_line(tmp_path, monkeypatch, args, needle):
    (tmp_path / "f").write_text("")
    from benchmarks.bench import result_path
    result_path(tmp_path / "taken", "cpu").mkdir(parents=True)  # the JSON's own name taken by a folder
    from typer.testing import CliRunner
    from minidream.cli import app
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["bench", "--quick", *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "taken"]  # nothing written


@pytest.mark.slow  # 84 s on 2 cores for a smoke run (it measures nothing); the suite keeps its time budget
def test_memory_benchmark_runs_every_recipe_in_its_own_process(tmp_path):
    """Every recipe, ours and diffusers', on the tiny config (keeps the code alive; measures nothing)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--preset", "tiny", "--res", "16", "--steps", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "memory-cpu-tiny-16.json").read_text())
    from benchmarks.memory import RECIPES
    assert [x["recipe"] for x in data["results"]] == list(RECIPES)
    assert all(x["peak_rss"] > x["rss_before_first_step"] > 0 for x in data["results"])


@pytest.mark.slow  # ~1 min of child processes; the SD recipes above keep the shared code alive in the suite
def test_memory_benchmark_drives_diffusers_sdxl_lora_script(tmp_path):
    """SDXL's reference rows: train_dreambooth_lora_sdxl.py's step (benchmarks/diffusers_sdxl.py); its whole-UNet
    rows are skipped (diffusers has no such script)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--preset", "tiny-xl", "--res", "16", "--steps", "1",
                        "--only", "diffusers", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "memory-cpu-tiny-xl-16.json").read_text())
    assert [x["recipe"] for x in data["results"]] == ["diffusers lora", "diffusers lora, --gradient_checkpointing"]
    assert "skipped (diffusers' SDXL DreamBooth script trains LoRA only)" in r.stderr


def test_minidream_bench_ctrl_c_keeps_what_was_measured(tmp_path):
    """A real SIGINT part-way: one line that says what is in --out, and that is so (a whole JSON, or no folder)."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "minidream", "bench", "--quick", "--device", "cpu", "--out", "b"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:  # inside the third section: the first two are in the JSON
        seen.append(line)
        if line.startswith("[3/5]"):
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    err = "".join(seen) + err
    assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "the sections measured so far are in" in err
    doc = json.loads(next((tmp_path / "b").glob("bench-*.json")).read_text())
    assert list(doc["sections"])[:2] == ["attention", "step"]
    assert all("error" not in rows[0] for rows in doc["sections"].values())


def test_demo_sweep_records_what_each_run_trained_with(tmp_path):
    """benchmarks/demo_sweep's bookkeeping, no training: --set takes only the fields an entry records, seeds parse
    as ranges and lists, an entry keeps the values its runs trained with, and a name reused with other settings is
    refused before any run."""
    from benchmarks import demo_sweep as sweep
    assert sweep.seeds_of("0-2,5") == [0, 1, 2, 5] and sweep.seeds_of("3") == [3]
    for bad in ("x", "", "1,,2"):
        with pytest.raises(SystemExit, match="--seeds"):
            sweep.seeds_of(bad)
    assert sweep.parse_changes(["steps=200", "lr_schedule=cosine", "lr=1e-4"]) == \
        {"steps": 200, "lr_schedule": "cosine", "lr": 1e-4}
    for bad in (["seed=3"], ["batch_size=8"], ["steps="], ["steps"]):
        with pytest.raises(SystemExit, match="--set"):
            sweep.parse_changes(bad)
    results = tmp_path / "seeds.json"
    results.write_text(json.dumps({"model_34": {"settings": {}}}))
    entry = sweep.record_run(results, "n", {"steps": 200}, "s", 0, {"subject_fidelity": 1.0})
    assert entry["settings"] == {**sweep.swept_values({}), "steps": 200} and entry["runs"] == {"s": {"0": {
        "subject_fidelity": 1.0}}}
    sweep.check_name(results, "n", {"steps": 200})
    with pytest.raises(SystemExit, match="other settings"):
        sweep.check_name(results, "n", {"steps": 100})
