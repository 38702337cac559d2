"""--lora-targets / --text-encoder-targets / --lora-blocks / --conv-rank / --lora-dropout / --dora: what trains,
and that each exported file (diffusers' layout with its PEFT metadata, kohya's with its ss_* fields) loads in
diffusers' load_lora_weights and in `sample --lora` with the image of our own merged model, within 1/255."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minidream.formats import loading
from minidream.formats.lora_files import apply_loras
from minidream.sampling.pipeline import SamplingParams, generate
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)

KW = dict(safety_checker=None, requires_safety_checker=False)
XL_KW = dict(add_watermarker=False)
PROMPT = "a photo of sks dog"
FILES = ("lora/pytorch_lora_weights.safetensors", "lora_kohya.safetensors")


def ours(model, size=16):
    return generate(model, [PROMPT], SamplingParams(steps=4, height=size, width=size), progress=False,
                    generator=torch.Generator().manual_seed(3))


def theirs(pipe, size=16):
    pipe.set_progress_bar_config(disable=True)
    img = pipe(PROMPT, num_inference_steps=4, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    return torch.from_numpy((img * 255).round().astype(np.uint8))


def trained(model_dir, instance_dir, out, *extra):
    """A LoRA run whose adapters move the image: a high learning rate, α != r, both export layouts and the merged
    diffusers folder (our own image of the trained weights)."""
    r = run_cli(*train_args(model_dir, instance_dir, out, "--train", "lora", "--lr", 3e-2, "--lora-alpha", 6,
                            "--save-as", "lora-diffusers", "--save-as", "lora-kohya", "--save-as", "diffusers",
                            *extra))
    assert r.exit_code == 0, r.output
    return out


def check_files_give_our_image(model_dir, out, pipeline, dora=False, kw=KW):
    """Each file in diffusers gives diffusers' image of our merged export; in `sample --lora`, our image of it."""
    want = ours(loading.load(str(out / "model")))
    assert (want.int() - ours(loading.load(str(model_dir))).int()).abs().max() > 0, "training changed nothing"
    want_theirs = theirs(pipeline.from_pretrained(out / "model", **kw))
    for f in FILES:
        if f == FILES[1] and dora:  # diffusers drops a kohya file's dora_scale (it says so): LyCORIS' merge is its
            continue  # reference (tests/test_lycoris.py); `sample --lora` below
        pipe = pipeline.from_pretrained(model_dir, **kw)
        pipe.load_lora_weights(str(out / f))
        assert (theirs(pipe).int() - want_theirs.int()).abs().max() <= 1, f
    for f in FILES:
        base = loading.load(str(model_dir))
        apply_loras(base, [(out / f, 1.0)])  # `sample --lora`
        assert (ours(base).int() - want.int()).abs().max() <= 1, f


CASES = {
    "attn-ff": ["--lora-targets", "attn-ff", "--train-text-encoder", "--text-encoder-targets", "attn-mlp"],
    "all-conv": ["--lora-targets", "all", "--conv-rank", 2, "--conv-alpha", 3, "--lora-blocks",
                 "down.1,mid,up.0,up_blocks.1.resnets.0.conv1"],  # a whole name too
    "dora": ["--lora-targets", "all", "--dora", "--train-text-encoder", "--lora-dropout", 0.1],
    "dora-unet": ["--lora-targets", "attn", "--dora"],
}


@pytest.mark.parametrize("case", CASES)
def test_lora_variants_load_in_diffusers_with_our_image(sd1_dir, instance_dir, tmp_path, case):
    from diffusers import StableDiffusionPipeline
    out = trained(sd1_dir, instance_dir, tmp_path / "run", *CASES[case])
    check_files_give_our_image(sd1_dir, out, StableDiffusionPipeline, dora="--dora" in CASES[case])
    sd = load_file(out / FILES[0])
    meta = json.loads(safe_open(out / FILES[0], "pt").metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == meta["unet.r"] == 4  # α/r = 6/4 folded into B: scale 1 in any tool
    kohya_meta = safe_open(out / FILES[1], "pt").metadata()
    assert kohya_meta["ss_network_dim"] == "4" and kohya_meta["ss_network_alpha"] == "6"
    assert kohya_meta["ss_base_model_version"] == "sd_v1" and kohya_meta["ss_steps"] == "3"
    modules = {k.split(".lora_")[0].removeprefix("unet.") for k in sd if k.startswith("unet.")}
    if case == "attn-ff":
        assert any(m.endswith("ff.net.2") for m in modules) and any(m.endswith("proj_in") for m in modules)
        assert any(k.endswith("mlp.fc1.lora_A.weight") for k in sd)
        assert not any("resnets" in m for m in modules)
    if case == "all-conv":  # only the stages asked for; the 3x3 convolutions at their own rank
        assert modules and all(m.startswith(("down_blocks.1.", "mid_block.", "up_blocks.0.")) for m in modules
                               if m != "up_blocks.1.resnets.0.conv1")
        assert "up_blocks.1.resnets.0.conv1" in modules
        assert sd["unet.mid_block.resnets.0.conv1.lora_A.weight"].shape[:2] == (2, 64)
        assert meta["unet.rank_pattern"]["mid_block.resnets.0.conv1"] == 2
        assert json.loads(kohya_meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3"}
        from minidream.inspect.weight_diff import diff  # `minidream diff` groups what LoCon changed
        d = diff(loading.load(str(sd1_dir)), loading.load(str(out / "model")))["groups"]
        assert all(d["by_type"]["unet"][t]["changed"] > 0 for t in ("resnet conv", "time proj", "resample"))
        assert d["by_block"]["unet"]["down 0"]["changed"] == 0 and d["by_block"]["unet"]["mid"]["changed"] > 0
    if case == "dora":
        assert meta["unet.use_dora"] and any(k.endswith("lora_magnitude_vector") for k in sd)
        assert any(k.endswith("dora_scale") for k in load_file(out / FILES[1]))
    if "--dora" in CASES[case]:  # at strength 0.5 diffusers' adapter weight scales ΔW inside DoRA's norm, as we do
        pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **KW)
        pipe.load_lora_weights(str(out / FILES[0]), adapter_name="d")
        pipe.set_adapters(["d"], adapter_weights=[0.5])
        base = loading.load(str(sd1_dir))
        apply_loras(base, [(out / FILES[0], 0.5)])
        half, full = ours(base), ours(loading.load(str(out / "model")))
        assert (half.int() - full.int()).abs().max() > 0
        assert (theirs(pipe).int() - half.int()).abs().max() <= 1


@pytest.mark.parametrize("dora", [False, True])
def test_sdxl_wide_targets_load_in_diffusers(xl_dir, instance_dir, tmp_path, dora):
    """The kohya file under the original checkpoint's names (resnets' in_layers/out_layers/emb_layers/skip_connection,
    samplers' op/conv) as kohya's SDXL networks write them."""
    from diffusers import StableDiffusionXLPipeline
    out = trained(xl_dir, instance_dir, tmp_path / "run", "--lora-targets", "all", "--train-text-encoder",
                  "--text-encoder-targets", "attn-mlp", "--lora-blocks", "down.0,down.1,up.0",
                  *(["--dora"] if dora else []))
    check_files_give_our_image(xl_dir, out, StableDiffusionXLPipeline, dora=dora, kw=XL_KW)
    kohya = load_file(out / FILES[1])
    for part in ("_0_in_layers_2.", "_0_emb_layers_1.", "_0_skip_connection.", "_0_op.", "_2_conv."):
        assert any(k.startswith("lora_unet_") and part in k for k in kohya), part
    kohya = load_file(out / FILES[1])
    assert any(k.startswith("lora_unet_input_blocks_") and "_in_layers_2" in k for k in kohya)  # original names
    assert any(k.startswith("lora_te2_") for k in kohya)


def test_wide_dora_with_dropout_resumes_bit_exact(sd1_dir, instance_dir, tmp_path):
    """Dropout draws come from the run's generator (seeded per step): a run stopped at step 2 and resumed to 4 ends
    with the tensors of one that ran 4 steps; and dropout does draw (a run without it differs)."""
    extra = ["--train", "lora", "--lora-targets", "all", "--dora", "--lora-dropout", 0.3, "--train-text-encoder",
             "--text-encoder-targets", "attn-mlp", "--save-as", "lora-diffusers", "--steps", 4]
    full, cut, plain = tmp_path / "full", tmp_path / "cut", tmp_path / "plain"
    assert run_cli(*train_args(sd1_dir, instance_dir, full, *extra)).exit_code == 0
    r = run_cli(*train_args(sd1_dir, instance_dir, cut, *extra[:-1], 2))
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--out", cut, "--resume", "latest", "--steps", 4, "--lora-dropout", 0.2)
    assert r.exit_code == 2 and "--lora-dropout cannot change in a resumed run" in r.output, r.output
    r = run_cli("train", "--out", cut, "--resume", "latest", "--steps", 4, "--dora", "--lora-targets", "all")
    assert r.exit_code == 0, r.output  # the run's own values, given again
    no_dropout = [a for a in extra if a not in ("--lora-dropout", 0.3)]
    assert run_cli(*train_args(sd1_dir, instance_dir, plain, *no_dropout)).exit_code == 0
    a, b, c = (load_file(d / FILES[0]) for d in (full, cut, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("extra,needle", [
    (["--dora"], "--dora shapes LoRA adapters: it needs --train lora"),
    (["--train", "lora", "--text-encoder-targets", "attn-mlp"], "--text-encoder-targets needs --train-text-encoder"),
    (["--train", "lora", "--conv-rank", 2], "they need --lora-targets all"),
    (["--train", "lora", "--lora-blocks", "down.7"], "--lora-blocks down.7: no --lora-targets attn module"),
    (["--train", "lora", "--lora-blocks", "down.0,,mid"], "give stages as down.N, mid, up.N"),
    (["--train", "lora", "--lora-dropout", 1], "--lora-dropout must be in [0, 1)"),
    (["--train", "lora", "--lora-targets", "everything"], "'everything' is not one of 'attn', 'attn-ff', 'all'"),
    (["--train", "lora", "--lora-targets", "all", "--conv-rank", 100000], "--conv-rank must be at most 1024"),
    (["--train", "lora", "--lora-rank", 5000], "--lora-rank must be at most 1024"),
])
def test_bad_lora_options_are_one_line_before_anything_is_written(sd1_dir, instance_dir, tmp_path, extra, needle):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *extra))
    assert r.exit_code != 0 and needle in r.output, r.output
    assert "Traceback" not in r.output and not (out / "run.json").exists()


def test_kohya_metadata_of_a_captioned_run(sd1_dir, instance_dir, tmp_path):
    """The ss_* fields model sites and A1111 show: the run's steps, rates, resolution, times, the photo folder and
    its caption tags counted as kohya counts them (comma-separated, per folder)."""
    import shutil
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    for i, png in enumerate(sorted(photos.glob("*.png"))):
        png.with_suffix(".txt").write_text("a photo of sks dog, red collar" + (", grass" if i % 2 else ""))
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, photos, out, "--train", "lora", "--caption-ext", ".txt", "--lora-dropout", 0.1,
                            "--save-as", "lora-kohya", "--text-encoder-lr", 1e-4, "--train-text-encoder"))
    assert r.exit_code == 0, r.output
    meta = safe_open(out / FILES[1], "pt").metadata()
    assert json.loads(meta["ss_tag_frequency"]) == {"photos": {"a photo of sks dog": 4, "red collar": 4, "grass": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"photos": {"n_repeats": 1, "img_count": 4}}
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_resolution"]) == ("3", "3", "(16, 16)")
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.001", "0.0001")
    assert json.loads(meta["ss_network_args"]) == {"lora_dropout": "0.1"}
    assert int(meta["ss_training_started_at"]) <= int(meta["ss_training_finished_at"])
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_num_reg_images"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "16x16"
