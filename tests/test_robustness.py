"""Bad input never ends in a traceback or a silent wrong result: fuzzed configs, safetensors headers and images,
broken LoRA files, NaN at sampling, odd files (FIFO, legacy pickle), locks. (A full disk: test_faults.py.)"""
import json
import os
import random
import shutil
import stat

import pytest
import torch
from typer.testing import CliRunner

from minidream.cli import app
from minidream.formats import configs, loading
from minidream.formats.files import read_json, read_weights
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)

GARBAGE = [None, -1, 0, 7, 3.5, float("nan"), "x", "", [], [0], [1, 2, 3], {}, True, 10 ** 12, -0.5]


def one_line_or_ok(r):
    assert r.exit_code in (0, 2), (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_config_fuzz_gives_one_line_errors(sd1_dir, tmp_path):
    """A seeded mutation loop over every component's config.json: each value replaced by garbage either loads
    (and then samples an image) or is a one-line error that names the file; never a traceback."""
    rng = random.Random(0)
    files = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    outcomes = {0: 0, 2: 0}
    for i in range(48):
        folder = tmp_path / f"m{i}"
        shutil.copytree(sd1_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        for comp in ("unet", "vae", "text_encoder"):
            for w in (sd1_dir / comp).glob("*.safetensors"):
                os.symlink(w, folder / comp / w.name)
        name = files[i % len(files)]
        cfg = json.loads((folder / name).read_text())
        key = rng.choice(sorted(k for k in cfg if not k.startswith("_")))
        cfg[key] = rng.choice(GARBAGE)
        (folder / name).write_text(json.dumps(cfg))
        r = CliRunner().invoke(app, ["sample", "--model", str(folder), "--prompt", "a red star", "--out",
                                     str(tmp_path / f"o{i}"), "--steps", 2, "--no-progress"])
        one_line_or_ok(r)
        if r.exit_code == 2:
            assert str(folder) in r.output or "--height" in r.output, r.output
        outcomes[r.exit_code] += 1
    assert outcomes[2] > 10 and outcomes[0] > 3, outcomes  # the loop exercised both sides
    (tmp_path / "list" / "unet").mkdir(parents=True)
    (tmp_path / "list" / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(loading.ModelError, match="expected a JSON object"):
        configs.unet_config(read_json(tmp_path / "list" / "unet" / "config.json"), "x")


def test_safetensors_header_fuzz(sd1_dir, tmp_path):
    """Bytes flipped in (or cut from) a weights file's header: a one-line ModelError naming the file, or a model
    that still loads strictly (a flip inside a value that stays valid); never another exception."""
    folder = tmp_path / "m"
    shutil.copytree(sd1_dir, folder)
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    src = w.read_bytes()
    n = int.from_bytes(src[:8], "little") + 8
    rng = random.Random(1)
    errors = 0
    for i in range(40):
        data = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(n)] = rng.randrange(256)
        if i % 5 == 0:
            data = data[: rng.randrange(n)]  # truncated
        w.write_bytes(bytes(data))
        try:
            loading.load(str(folder))
        except loading.ModelError as e:
            errors += 1
            assert str(w) in str(e) and "\n" not in str(e)
    assert errors >= 20


def test_image_fuzz_and_16_bit_pngs(tmp_path):
    from PIL import Image
    from minidream.training import TrainError
    from minidream.training.photos import load_images
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(good)
    raw = good.read_bytes()
    rng = random.Random(2)
    d = tmp_path / "fuzz"
    d.mkdir()
    for i in range(20):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (d / f"{i}.png").write_bytes(bytes(data[: rng.randrange(8, len(data) + 1)]))
    try:
        load_images(d, 8)
    except TrainError as e:
        assert "unreadable image(s)" in str(e)
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.new("I;16", (16, 16), 40000).save(deep / "a.png")
    (img,), _ = load_images(deep, 8)
    assert img.getpixel((0, 0)) == (155, 155, 155)  # 40000/65535 of white, not clipped to 255


def _lora_file(path, tensors):
    from safetensors.torch import save_file
    save_file(tensors, path)
    return path


def test_bad_lora_files_are_one_line(sd1_dir, tmp_path):
    bad = {
        "garbage.safetensors": None,
        "no_up.safetensors": {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64)},
        "loha.safetensors": {"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4),
                             "lora_unet_conv_in.hada_w1_b": torch.zeros(4, 4)},
        "conv_shape.safetensors": {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
                                   "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 4, 1, 1)},
        "empty.safetensors": {"something": torch.zeros(1)},
    }
    for name, tensors in bad.items():
        f = tmp_path / name
        if tensors is None:
            f.write_bytes(b"\x00" * 100)
        else:
            _lora_file(f, tensors)
        r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(tmp_path / "o"),
                                     "--steps", 1, "--lora", str(f), "--no-progress"])
        assert r.exit_code == 2 and "Traceback" not in r.output and str(f) in r.output, (name, r.output, r.exception)


def test_nan_at_sampling_is_an_error_not_a_black_image(sd1_dir, tmp_path):
    m = loading.load(str(sd1_dir))
    name = next(n for n, mod in m.unet.named_modules() if n.endswith("attn2.to_q"))
    f = _lora_file(tmp_path / "nan.safetensors", {f"unet.{name}.lora_A.weight": torch.full((2, 64), float("nan")),
                                                  f"unet.{name}.lora_B.weight": torch.ones(64, 2)})
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(out), "--steps", 2,
                                 "--lora", str(f), "--no-progress"])  # refused as it is merged
    assert r.exit_code == 2 and str(f) in r.output and "not numbers" in r.output, r.output
    # a guidance scale sure to overflow is refused before sampling
    r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(out), "--steps", 2,
                                 "--guidance", 1e38, "--no-progress"])
    assert r.exit_code == 2 and "--guidance must be in [0, 1000]" in r.output, r.output
    # a model whose output overflows (its last convolution scaled to 1e38): finite weights, latents that are not
    import shutil
    from safetensors.torch import load_file, save_file
    big = tmp_path / "big"
    shutil.copytree(sd1_dir, big)
    weights = big / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["conv_out.weight"] = sd["conv_out.weight"] * 1e38
    save_file(sd, weights)
    r = CliRunner().invoke(app, ["sample", "--model", str(big), "--prompt", "a", "--out", str(out), "--steps", 2,
                                 "--no-progress"])
    assert r.exit_code == 2 and "NaN/inf latents" in r.output, r.output
    assert not list(out.glob("*.png"))


def test_odd_weight_files(sd1_dir, tmp_path):
    # a FIFO where the weights should be is refused at once (reading it would block forever)
    folder = tmp_path / "fifo"
    shutil.copytree(sd1_dir, folder)
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    w.unlink()
    os.mkfifo(w)
    with pytest.raises(loading.ModelError, match="not a regular file"):
        loading.load(str(folder))
    # a legacy (non-zip) pickle loads with --allow-pickle, weights only
    sd = {"w": torch.arange(4.0)}
    f = tmp_path / "legacy.bin"
    torch.save(sd, f, _use_new_zipfile_serialization=False)
    assert torch.equal(read_weights(f, allow_pickle=True)["w"], sd["w"])
    # an unknown relative path with a slash is named as both: no folder, no hub repo
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(loading.ModelError, match="no such local file or folder"):
            loading.load("nosuch/folder")
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_exports_follow_the_umask(sd1_dir, instance_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--no-prior"))
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    for f in (out / "model" / "unet" / "diffusion_pytorch_model.safetensors", out / "model" / "unet" / "config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_train_refuses_an_identifier_past_the_token_limit(sd1_dir, instance_dir, tmp_path):
    long = "a photo of " + "very " * 80 + "sks dog"
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "o", "--instance-prompt", long, "--no-prior"))
    assert r.exit_code == 2 and "past the text encoder's" in r.output, r.output
    assert not (tmp_path / "o" / "run.json").exists()
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "o2", "--instance-prompt", "sks dog " + "very " * 80,
                            "--no-prior", "--steps", 1))
    assert r.exit_code == 0 and "this part is cut" in r.output, r.output


def test_one_run_per_out_folder(sd1_dir, instance_dir, tmp_path):
    from minidream.training.run_folder import lock_run
    out = tmp_path / "run"
    out.mkdir()
    held = lock_run(out)
    try:
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1))
        assert r.exit_code == 2 and "in use by another minidream run" in r.output, r.output
    finally:
        held.close()


def test_an_out_folder_that_cannot_be_made_is_one_line(sd1_dir, instance_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # --out below a file: mkdir fails as it would on a read-only disk (root ignores modes)
    r = run_cli(*train_args(sd1_dir, instance_dir, blocker / "run", "--steps", 1, "--no-prior"))
    assert r.exit_code == 2 and "cannot write there" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(blocker / "o"),
                                 "--steps", 1, "--no-progress"])
    assert r.exit_code == 2 and "cannot create it" in r.output, r.output


def test_sample_device_and_backend_errors_are_one_line(sd1_dir, tmp_path):
    import torch
    cases = [(["--device", "banana"], "is not a device")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "no CUDA GPU is available"), (["--attention", "triton"], "needs a CUDA GPU")]
    for extra, needle in cases:
        env = {"TRITON_INTERPRET": "0"} if "triton" in extra else {}
        r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(tmp_path / "o"),
                                     "--steps", 1, "--no-progress", *extra], env=env)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (extra, r.output)


def test_single_file_options_on_a_folder_are_refused_not_ignored(sd1_dir, instance_dir, tmp_path):
    for flag in ("--preset", "--original-config", "--tokenizer"):
        r = CliRunner().invoke(app, ["sample", "--model", str(sd1_dir), "--prompt", "a", "--out", str(tmp_path / "o"),
                                     "--steps", 1, "--no-progress", flag, "sd15"])
        assert r.exit_code == 2 and f"{flag} describes only single-file checkpoints" in r.output, r.output
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--preset", "sd15"))
    assert r.exit_code == 2 and "describes only single-file" in r.output and not out.exists(), r.output


def test_a_class_dir_that_is_a_file_fails_before_anything_is_written(sd1_dir, instance_dir, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--class-dir", f))
    assert r.exit_code == 2 and "--class-dir" in r.output and "is a file or below one" in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (("--ema-device", "gpu"), "'gpu' is not one of 'same', 'cpu'"),
    (("--quantize-base", "int4"), "'int4' is not one of"),
    (("--steps", "abc"), "Invalid value for '--steps'"),
    (("--ema-every", "1e30"), "Invalid value for '--ema-every'"),
    (("--no-such-option", "1"), "No such option: --no-such-option"),
    (("--quantize-base",), "requires an argument"),
    (("--steps", "99999999999999999999"), "--steps must be at most"),
])
def test_values_that_do_not_parse_are_one_line(tmp_path, args, needle):
    """A value that is not of the option's type or choices is the one `error:` line every bad value is, not Click's
    usage block; nothing is written."""
    r = run_cli("train", "--model", "m", "--instance-dir", tmp_path, "--class-noun", "dog", "--out", tmp_path / "o",
                *args)
    one_line_or_ok(r)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "o").exists()
