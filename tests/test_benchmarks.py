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
    assert all("median_ms" in r["ours"] and "median_ms" in r["diffusers"] for r in step["results"])
    unet = json.loads((tmp_path / "unet-tiny-smoke.json").read_text())
    assert all(r["flops"] > 0 for r in unet["results"])


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


def test_cpu_step_benchmark_runs_both_trainers_in_child_processes(tmp_path):
    """The CPU mode times the trainer's own step against diffusers', each side in its own process (tiny config)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--preset", "tiny", "--res", "16", "--rounds", "2",
                        "--mode", "lora", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "step-cpu-tiny-16.json").read_text())
    assert data["device"].startswith("cpu") and data["torch"]
    (row,) = data["results"]
    assert row["mode"] == "lora" and len(row["speedup_per_round"]) == 2
    for side in ("ours", "diffusers"):
        assert len(row[side]["per_round_s"]) == 2
        assert row[side]["peak_rss_bytes"] > row[side]["rss_before_first_step_bytes"] > 0


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
