"""--clip-skip N, numbered as A1111 and kohya number it (1 = the last layer, 2 = the penultimate, each through the
final LayerNorm): the same image as diffusers' StableDiffusionPipeline(clip_skip=N-1). Its own clip_skip path
fails under transformers 5, so the reference conditioning is built from the text encoder's hidden states exactly
as the pipeline builds it (hidden_states[-(clip_skip + 1)], then final_layer_norm)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def diffusers_image(folder, prompt: str, skip: int, steps: int, seed: int, guidance: float = 7.5, size: int = 32):
    from diffusers import StableDiffusionPipeline
    from tests.test_samplers import reference
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = reference("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def embeds(text: str):  # diffusers' encode_prompt with clip_skip = skip - 1
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
            te = pipe.text_encoder  # transformers 5 holds the layer norm itself (4: under .text_model)
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            return norm(states[-skip])
    out = pipe(prompt_embeds=embeds(prompt), negative_prompt_embeds=embeds(""), num_inference_steps=steps,
               guidance_scale=guidance, height=size, width=size, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed)).images
    return torch.from_numpy((out[0] * 255).round().astype(np.uint8))


def sample_cli(folder, out, *extra):
    return subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(folder), "--prompt", "a red toy",
                           "--steps", "4", "--seed", "3", "--height", "32", "--width", "32", "--scheduler", "ddim",
                           "--out", str(out), "--no-progress", *map(str, extra)], capture_output=True, text=True)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip_2_is_diffusers_clip_skip_1(sd1_dir, sd2_dir, family, tmp_path):
    folder = sd1_dir if family == "sd1" else sd2_dir
    r = sample_cli(folder, tmp_path / "o", "--clip-skip", 2)
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "o" / "0000.png")
    assert im.text["clip_skip"] == "2"
    got = torch.from_numpy(np.array(im))
    want = diffusers_image(folder, "a red toy", skip=2, steps=4, seed=3)
    assert got.float().std() > 5
    assert (got.int() - want.int()).abs().max() <= 1
    # and skip 1 (the default) differs: the layer read changed the image
    r = sample_cli(folder, tmp_path / "p")
    assert r.returncode == 0, r.stderr
    plain = torch.from_numpy(np.array(Image.open(tmp_path / "p" / "0000.png")))
    assert (plain.int() - got.int()).abs().max() > 1


@pytest.mark.parametrize("extra,needle", [
    (["--clip-skip", 0], "--clip-skip must be at least 1"),
    (["--clip-skip", 3], "--clip-skip 3: the text encoder has 2 layers"),
])
def test_bad_clip_skip_is_one_line(sd1_dir, tmp_path, extra, needle):
    r = sample_cli(sd1_dir, tmp_path / "o", *extra)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_sdxl_refuses_clip_skip(xl_dir, tmp_path):
    r = sample_cli(xl_dir, tmp_path / "o", "--clip-skip", 2)
    assert r.returncode == 2 and "penultimate" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_conditions_on_the_skipped_layer(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """The run's first loss changes with --clip-skip (the text conditioning is read there), run.json records it,
    and a value the text encoder cannot take stops before anything is written."""
    losses = {}
    for skip in (1, 2):
        out = tmp_path / f"skip{skip}"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--no-prior", "--clip-skip", skip))
        assert r.exit_code == 0, r.output
        assert json.loads((out / "run.json").read_text())["clip_skip"] == skip
        losses[skip] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses[1] != losses[2]
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "bad", "--clip-skip", 5))
    assert r.exit_code == 2 and "--clip-skip 5" in r.output and not (tmp_path / "bad").exists(), r.output
