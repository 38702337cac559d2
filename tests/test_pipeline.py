"""End to end: same seed, prompt, scheduler and steps give the same pixels as diffusers' pipeline."""
import subprocess
import sys

from dataclasses import replace

import pytest
import torch

from minidream.formats import loading
from minidream.sampling.pipeline import SamplingParams, generate
from minidream.sampling.samplers import SAMPLERS


def reference_images(folder, prompt, scheduler, guidance, steps, seed, n=1, negative=None, eta=0.0, size=32,
                     rescale=0.0):
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from tests.test_samplers import reference
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = reference(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extra = {"eta": eta} if scheduler == "ddim" else {}
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, height=size,
               width=size, num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", guidance_rescale=rescale, **extra).images
    return torch.from_numpy((out * 255).round().astype(np.uint8))


CASES = [  # (family, scheduler, guidance, eta): every sampler on an ε (SD 1) and a v (SD 2) model, strong guidance
    ("sd1", "ddim", 1.0, 0.0), ("sd1", "ddpm", 1.0, 0.0), ("sd1", "ddim", 5.0, 0.5), ("sd1", "euler-a", 1.0, 0.0),
    ("sd1", "dpmpp-2m-sde-karras", 1.0, 0.0),
] + [("sd1", s, 7.5, 0.0) for s in SAMPLERS] + [("sd2", s, 7.5 if s == "ddim" else 4.0, 0.0) for s in SAMPLERS]


@pytest.mark.parametrize("family,scheduler,guidance,eta", CASES)
def test_same_seed_same_image_as_diffusers(sd1_dir, sd2_dir, family, scheduler, guidance, eta):
    folder = sd1_dir if family == "sd1" else sd2_dir
    want = reference_images(folder, "a red striped star", scheduler, guidance, steps=8, seed=42, n=2, eta=eta,
                            negative="a blue toy" if guidance == 5.0 else None)
    m = loading.load(str(folder))
    assert m.scheduler.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    params = SamplingParams(steps=8, guidance=guidance, sampler=scheduler, eta=eta, height=32, width=32,
                            negative_prompt="a blue toy" if guidance == 5.0 else None)
    got = generate(m, ["a red striped star"] * 2, params, generator=torch.Generator("cpu").manual_seed(42),
                   progress=False)
    assert got.shape == want.shape == (2, 32, 32, 3)
    assert got.float().std() > 5  # the images are not blank, so equality means something
    assert (got.int() - want.int()).abs().max().item() <= 1


def zero_snr_copy(folder, tmp_path, **options):
    """The model with its schedule rescaled to zero terminal SNR, sampled from t = T (Lin et al. 2024)."""
    import json
    import shutil
    out = tmp_path / "zsnr"
    shutil.copytree(folder, out)
    f = out / "scheduler" / "scheduler_config.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps({**d, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **options}))
    return out


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpmpp-2m", "unipc"])
def test_zero_terminal_snr_model_with_guidance_rescale_as_diffusers(sd2_dir, tmp_path, scheduler):
    """A v-prediction model on a zero-terminal-SNR schedule, with guidance_rescale 0.7: the same pixels."""
    folder = zero_snr_copy(sd2_dir, tmp_path)
    want = reference_images(folder, "a red striped star", scheduler, 6.0, steps=8, seed=3, n=2, rescale=0.7)
    m = loading.load(str(folder))
    assert m.scheduler.rescale_betas_zero_snr
    params = SamplingParams(steps=8, guidance=6.0, sampler=scheduler, height=32, width=32, guidance_rescale=0.7)
    assert params.problem(m) is None
    got = generate(m, ["a red striped star"] * 2, params, generator=torch.Generator("cpu").manual_seed(3),
                   progress=False)
    plain = generate(m, ["a red striped star"] * 2, replace(params, guidance_rescale=0.0),
                     generator=torch.Generator("cpu").manual_seed(3), progress=False)
    assert got.float().std() > 5 and (got.int() - plain.int()).abs().max() > 2  # the rescale changes the image
    assert (got.int() - want.int()).abs().max().item() <= 1


def test_guidance_rescale_is_refused_where_it_does_nothing(sd2_dir):
    m = loading.load(str(sd2_dir))
    assert SamplingParams(guidance=1.0, guidance_rescale=0.7).problem(m)[0] == "guidance_rescale"
    assert SamplingParams(guidance_rescale=1.5).problem(m)[0] == "guidance_rescale"
    assert SamplingParams(guidance_rescale=0.7).problem(m) is None


def test_cli_sample_writes_pngs_with_metadata(sd1_dir, tmp_path):
    from PIL import Image
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "a red toy",
                        "--steps", "3", "--num-images", "3", "--batch-size", "2", "--seed", "7", "--height", "32",
                        "--width", "32", "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    im = Image.open(out / "0002.png")
    assert im.size == (32, 32) and im.text["prompt"] == "a red toy" and im.text["seed"] == "8"
    # the first batch is the diffusers image for seed 7
    want = reference_images(sd1_dir, "a red toy", "ddim", 7.5, steps=3, seed=7, n=2)
    import numpy as np
    got = torch.from_numpy(np.array(Image.open(out / "0001.png")))
    assert (got.int() - want[1].int()).abs().max() <= 1


def test_default_sampler_is_the_models_own(sd1_dir, tmp_path):
    """A model shipped with SD 1.5's scheduler file (PNDM, no timestep_spacing key) samples, without --scheduler,
    as diffusers' pipeline does with the scheduler it loads; `info` names it."""
    import json
    import shutil
    import numpy as np
    from PIL import Image
    from diffusers import StableDiffusionPipeline
    from tests.test_samplers import SD
    d = tmp_path / "model"
    shutil.copytree(sd1_dir, d)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD))
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red toy", num_inference_steps=5, height=32, width=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(3)).images[0]
    want = torch.from_numpy((img * 255).round().astype(np.uint8))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(d), "--prompt", "a red toy",
                        "--steps", "5", "--seed", "3", "--height", "32", "--width", "32", "--out", str(out),
                        "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    im = Image.open(out / "0000.png")
    assert im.text["scheduler"] == "pndm"
    assert (torch.from_numpy(np.array(im)).int() - want.int()).abs().max() <= 1
    r = subprocess.run([sys.executable, "-m", "minidream", "info", str(d)], capture_output=True, text=True)
    assert "PNDMScheduler: pndm" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--scheduler", "euler_x"], "euler_x"),
    (["--steps", "0"], "--steps"),
    (["--height", "30"], "--height must be a positive multiple of 8"),
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a GPU"),
])
def test_cli_sample_bad_input_is_one_line(sd1_dir, tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "x",
                        "--out", str(tmp_path / "o"), *args], capture_output=True, text=True)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_cli_sample_refuses_a_file_as_output(sd1_dir, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "x",
                        "--out", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


def test_cli_sample_warns_about_cut_prompt(sd1_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "red " * 90,
                        "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "o"),
                        "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "longer than 77 tokens" in r.stderr and "red red" in r.stderr


def test_sample_zero_terminal_snr_rescales_the_models_schedule(sd2_dir, tmp_path):
    """`sample --zero-terminal-snr` (for a LoRA trained so on this base) draws what the model whose scheduler config
    says so draws; refused on a flow model."""
    from PIL import Image
    from tests.test_train import run_cli
    folder = zero_snr_copy(sd2_dir, tmp_path)
    args = ["--prompt", "a red star", "--steps", 3, "--height", 32, "--width", 32, "--seed", 2]
    assert run_cli("sample", "--model", sd2_dir, "--zero-terminal-snr", "--out", tmp_path / "a", *args).exit_code == 0
    assert run_cli("sample", "--model", folder, "--out", tmp_path / "b", *args).exit_code == 0
    a, b = (Image.open(next((tmp_path / d).glob("*.png"))) for d in "ab")
    assert list(a.getdata()) == list(b.getdata())
