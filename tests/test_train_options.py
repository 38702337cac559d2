"""Training options and precision: bf16 never rounds what it does not train, the optimizer knobs reach the
optimizer, the LR schedules follow diffusers', the loader options work for `train`, and the SD 2.x single-file
ambiguity (2.x-base vs 2.x-v) is refused rather than guessed."""
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidream.formats import loading
from minidream.training.config import TrainConfig
from minidream.training.optim import lr_lambdas
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["minidream"])


def test_bf16_attention_run_exports_every_frozen_tensor_bit_identical(sd1_dir, instance_dir, tmp_path):
    """--mixed-precision bf16 runs the frozen weights in bf16, but the diffusers folder and the single file
    hold them exactly as the base model has them; only the attention projections change."""
    from minidream.formats.single_file import to_single_file
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--mixed-precision", "bf16",
                            "--device", "cpu", "--save-as", "diffusers", "--save-as", "single-file"))
    assert r.exit_code == 0, r.output
    base, tuned = loading.load(str(sd1_dir)), loading.load(str(out / "model"))
    changed = 0
    for part in ("unet", "text_encoder", "vae"):
        b, t = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        for k in b:
            trains = part == "unet" and (".attn1." in k or ".attn2." in k) and k.endswith(
                ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"))
            if trains:
                changed += not torch.equal(b[k], t[k])
            else:
                assert t[k].dtype == torch.float32 and torch.equal(b[k], t[k]), f"{part}.{k} differs from the base"
    assert changed > 0
    single, want = load_file(out / "model.safetensors"), to_single_file(tuned)
    assert single.keys() == want.keys() and all(torch.equal(single[k], want[k]) for k in want)


def test_cast_frozen_keeps_trainable_values_exact(sd1_dir):
    from minidream.training.trainable import cast_frozen, select_trainable
    base = loading.load(str(sd1_dir), dtype=torch.float32)
    model = loading.load(str(sd1_dir), dtype=torch.float32)
    trainable = select_trainable(model, "attention")
    cast_frozen(model, torch.bfloat16)
    ref = dict(base.unet.named_parameters())
    trained = [(n.removeprefix("unet."), p) for n, p in trainable.denoiser]
    assert trained and all(p.dtype == torch.float32 and torch.equal(p, ref[n]) for n, p in trained)
    frozen = [p for p in model.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_optimizer_knobs_reach_the_optimizer(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--train-text-encoder",
                            "--adam-beta1", 0.8, "--adam-beta2", 0.95, "--adam-epsilon", 1e-6, "--weight-decay", 0.3,
                            "--text-encoder-lr", 7e-4, "--checkpoint-every", 3))
    assert r.exit_code == 0, r.output
    groups = checkpoint_meta(out / "checkpoints" / "step-000003.safetensors")["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 7e-4]
    for g in groups:
        assert g["betas"] == [0.8, 0.95] and g["eps"] == 1e-6 and g["weight_decay"] == 0.3
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["grad_norm"] > 0 for x in lines)


def test_max_grad_norm_clips(sd1_dir, instance_dir, tmp_path):
    """AdamW is invariant to the gradient's scale except through epsilon: clipped to 1e-12, the gradient is
    far below epsilon and the weights hardly move; unclipped (0) they move by about the learning rate."""
    moved = {}
    for clip in (0, 1e-12):
        out = tmp_path / f"clip{clip}"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--weight-decay", 0,
                                "--max-grad-norm", clip, "--steps", 2, "--save-as", "diffusers"))
        assert r.exit_code == 0, r.output
        b, t = loading.load(str(sd1_dir)).unet.state_dict(), loading.load(str(out / "model")).unet.state_dict()
        moved[clip] = max((t[k] - b[k]).abs().max().item() for k in b)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all((x["grad_norm"] is None) == (clip == 0) for x in lines)
    assert moved[0] > 1e-3 and moved[1e-12] < 1e-5, moved


def test_text_encoder_stops_training_after_text_encoder_steps(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--train-text-encoder",
                            "--text-encoder-steps", 1, "--checkpoint-every", 1, "--keep-last", 0,
                            "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    at1 = load_file(out / "checkpoints" / "step-000001.safetensors")
    te = {k.removeprefix("text_encoder."): v for k, v in at1.items() if k.startswith("text_encoder.")}
    final = loading.load(str(out / "model")).text_encoder.state_dict()
    base = loading.load(str(sd1_dir)).text_encoder.state_dict()
    assert te and all(torch.equal(final[k], v) for k, v in te.items())
    assert any(not torch.equal(base[k], v) for k, v in te.items())
    # the UNet's attention kept training after step 1
    at3 = load_file(out / "checkpoints" / "step-000003.safetensors")
    assert any(not torch.equal(at1[k], at3[k]) for k in at1 if k.startswith("unet."))


@pytest.mark.parametrize("name", ["linear", "polynomial", "cosine", "constant"])
def test_lr_schedules_follow_diffusers_after_warmup(name):
    from diffusers.optimization import get_scheduler
    steps, warmup, lr = 50, 5, 1e-4
    cfg = replace(TrainConfig(**{f: None for f in TrainConfig.__dataclass_fields__}), lr_schedule=name, steps=steps,
                  warmup_steps=warmup, lr_power=2.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    kw = {"power": 2.0} if name == "polynomial" else {}
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps, **kw)
    f = lr_lambdas(cfg, [lr])[0]
    for step in range(steps):
        if step >= warmup:
            assert abs(f(step) * lr - ref.get_last_lr()[0]) <= 1e-12, (name, step)
        else:  # ours starts warmup at 1/warmup (no wasted step at lr 0), then matches
            assert f(step) == (step + 1) / warmup
        opt.step()
        ref.step()


def test_bad_option_values_are_one_line_and_write_nothing(sd1_dir, instance_dir, tmp_path):
    cases = [(["--random-crop", "--cache-latents"], "--random-crop has no effect with --cache-latents"),
             (["--class-precision", "fp16", "--device", "cpu"], "--class-precision fp16 needs a GPU"),
             (["--adam-beta2", 1.0], "--adam-beta2 must be in [0, 1)"),
             (["--max-grad-norm", -1], "--max-grad-norm must be >= 0"),
             (["--resolution", 12], "--resolution must be a positive multiple of 8"),
             (["--lr-power", 0], "--lr-power must be > 0"),
             (["--lr", -1], "--lr must be a positive number"),
             (["--snr-gamma", -1], "--snr-gamma must be a positive number"),
             (["--flip", 2], "--flip is a probability in [0, 1]"),
             (["--noise-offset", -0.1], "--noise-offset must be >= 0")]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, *extra))
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (needle, r.output)
        assert not (out / "run.json").exists()


def test_resolution_defaults_to_the_models_native_size(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    args = [a for a in train_args(sd1_dir, instance_dir, out, "--steps", 1) if a not in ("--resolution", 16)]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["resolution"] == 8 * 2  # latent 8 x VAE factor 2


def test_class_images_precision_and_negative_prompt(sd1_dir, instance_dir, tmp_path):
    from PIL import Image
    pix = {}
    for name, extra in (("plain", []), ("neg", ["--class-negative-prompt", "a red star"]),
                        ("bf16", ["--class-precision", "bf16"])):
        out = tmp_path / name
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--class-guidance", 5, *extra))
        assert r.exit_code == 0, r.output
        first = Image.open(out / "class_images" / "class-00000.png")
        pix[name] = torch.tensor(list(first.tobytes()), dtype=torch.float)
    assert (pix["plain"] - pix["neg"]).abs().max() > 0
    assert (pix["plain"] - pix["bf16"]).abs().max() > 0


def test_class_and_validation_samplers(sd1_dir, instance_dir, tmp_path):
    """--class-scheduler draws the class images with that sampler (the image generate() gives from the same
    noise); --validation-scheduler's grid is written; a name that is no sampler is a one-line error."""
    import numpy as np
    from PIL import Image
    from minidream.sampling.pipeline import SamplingParams, generate
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--class-guidance", 5,
                            "--class-scheduler", "heun", "--validation-scheduler", "unipc",
                            "--validation-prompt", "a dog", "--validation-images", 1, "--validation-steps", 2))
    assert r.exit_code == 0, r.output
    assert (out / "samples" / "final.png").exists()
    got = torch.from_numpy(np.array(Image.open(out / "class_images" / "class-00001.png"))).reshape(-1, 3).int()
    m = loading.load(str(sd1_dir))
    side = 16 // m.latent_scale
    noise = torch.randn((4, side, side), generator=torch.Generator().manual_seed(0 * 1_000_003 + 1))[None]
    for sampler, same in (("heun", True), ("ddim", False)):
        params = SamplingParams(steps=2, guidance=5, sampler=sampler, height=16, width=16)
        want = generate(m, ["a photo of dog"], params, latents=noise, progress=False)[0].reshape(-1, 3)
        assert ((got - want.int()).abs().max() <= 1) == same, sampler
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "bad", "--class-scheduler", "lms"))
    assert r.exit_code != 0 and "lms" in r.output


def test_train_takes_the_loader_options(sd1_dir, instance_dir, tmp_path):
    """A single-file base model with --config (its architecture and tokenizer) trains like the folder."""
    from minidream.formats.single_file import save_single_file
    f = tmp_path / "base.safetensors"
    save_single_file(loading.load(str(sd1_dir)), f)
    outs = {}
    for name, model, extra in (("folder", sd1_dir, []), ("file", f, ["--original-config", sd1_dir])):
        outs[name] = tmp_path / name
        r = run_cli(*train_args(model, instance_dir, outs[name], "--train", "lora", "--save-as", "lora-diffusers",
                                "--no-prior", "--device", "cpu", *extra))  # CPU: CUDA runs differ run to run
        assert r.exit_code == 0, r.output
    a = load_file(outs["folder"] / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(outs["file"] / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    # the same base weights, in other memory layouts (float rounding, which Adam's sign-like first steps
    # can amplify on near-zero gradients): the trained adapters agree as a whole
    diff = max(((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a if "lora_B" in k)
    assert diff <= 1e-2, diff
    assert json.loads((outs["file"] / "run.json").read_text())["original_config"] == str(sd1_dir)


def test_sd2_single_file_is_not_guessed(sd2_dir, tmp_path):
    """2.x-base and 2.x-v single files have the same tensors: without metadata the loader asks for --preset;
    with the modelspec metadata (ours writes it) it reads the prediction type from there."""
    from safetensors.torch import save_file
    from minidream.formats.single_file import modelspec, sd2_preset, to_single_file
    m = loading.load(str(sd2_dir))
    bare = tmp_path / "bare.safetensors"
    save_file(to_single_file(m), bare)
    with pytest.raises(loading.ModelError, match="--preset sd21-base or --preset sd21"):
        loading.load(str(bare))
    assert modelspec(m)["modelspec.prediction_type"] == "v"
    for meta, want in (({"modelspec.prediction_type": "epsilon"}, "sd21-base"),
                       ({"modelspec.prediction_type": "v"}, "sd21"),
                       ({"modelspec.architecture": "stable-diffusion-v2-512"}, "sd21-base")):
        f = tmp_path / f"{want}.safetensors"
        save_file({"x": torch.zeros(1)}, f, metadata=meta)
        assert sd2_preset(f) == want


def test_the_demo_model_is_package_data():
    """`pip install .` copies what pyproject's package-data globs match: they must cover every file of the demo."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minidream.demo"]
    matched = {p for g in globs for p in (ROOT / "minidream" / "demo").glob(g) if p.is_file()}
    files = {p for p in (ROOT / "minidream" / "demo" / "weights").rglob("*") if p.is_file()}
    assert files and files <= matched, sorted(str(p) for p in files - matched)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_clips_after_unscaling_and_exports_frozen_tensors_exactly(sd1_dir, instance_dir, tmp_path):
    """On a GPU: fp16 with the loss scaler (gradients unscaled before clipping: the logged norm is the true
    one, not ~65536× it), class images in fp16, TF32 as asked, and the frozen weights exported bit-identical."""
    for tf32 in ("--tf32", "--no-tf32"):
        out = tmp_path / tf32
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--mixed-precision", "fp16",
                                "--device", "cuda", "--save-as", "diffusers", tf32))
        assert r.exit_code == 0, r.output
        assert torch.backends.cuda.matmul.allow_tf32 == (tf32 == "--tf32")
    norms = [json.loads(x)["grad_norm"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < n < 1e3 for n in norms), norms
    base, tuned = loading.load(str(sd1_dir)), loading.load(str(out / "model"))
    for part in ("text_encoder", "vae"):
        b, t = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        assert all(torch.equal(b[k], t[k]) for k in b)
    b, t = base.unet.state_dict(), tuned.unet.state_dict()
    assert all(torch.equal(b[k], t[k]) for k in b if ".attn" not in k)


def test_every_option_is_declared_once_and_the_commands_read_it():
    """`train`'s options are exactly TrainConfig's fields (and --resume, --overwrite), each with its declared help
    and, for a choice, the keys of the table that implements it; `sample` takes SamplingParams' fields alike."""
    from dataclasses import fields
    import typer.main
    from minidream.cli import app
    from minidream.sampling.pipeline import SamplingParams
    from minidream.sampling.samplers import SAMPLERS
    from minidream.training.config import OPTIONS
    from minidream.training.trainable import MODES

    def choices(param):  # the values a choice option takes (typer reads them from its Enum annotation)
        t = param.type_descriptor.annotation if hasattr(param, "type_descriptor") else param.type
        t = next((a for a in getattr(t, "__args__", ()) if a is not type(None)), t)
        return [m.value for m in t] if hasattr(t, "__members__") else list(t.choices)
    commands = typer.main.get_command(app).commands
    train = {p.name: p for p in commands["train"].params}
    assert set(train) == set(OPTIONS) | {"resume", "overwrite", "config", "print_config"}  # (run files' own)
    for name, f in OPTIONS.items():
        assert f.metadata["help"] and train[name].help == f.metadata["help"], name
        if f.metadata["choices"] is not None:
            assert choices(train[name]) == list(f.metadata["choices"]), name
    assert train["mode"].opts == ["--train"] and choices(train["mode"]) == list(MODES)
    sample = {p.name: p for p in commands["sample"].params}
    assert {f.name for f in fields(SamplingParams)} <= set(sample)
    assert sample["sampler"].opts == ["--scheduler"] and choices(sample["sampler"]) == list(SAMPLERS)


def test_options_newer_than_the_torch_floor_say_so(monkeypatch):
    """pyproject's floor is torch 2.6 (the suite's version-specific parts run on it): what needs more says so in
    one line — --fsdp on the CPU (2.6's FSDP2 has no CPU streams) and --attention triton (triton 3.2, torch 2.6's,
    neither compiles nor interprets the kernels). Run for real on 2.6.0 by the session that set the floor."""
    from types import SimpleNamespace
    from minidream.models import attention
    from minidream.training import TrainError, runtime
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    assert runtime.older_torch("2.13") and not runtime.older_torch("2.6")
    with pytest.raises(TrainError, match=r"--fsdp on the CPU needs torch >= 2.13, .*this is 2.6.0"):
        runtime.check_processes(SimpleNamespace(fsdp=True, fused_backward=False), SimpleNamespace(size=2),
                                torch.device("cpu"))
    runtime.check_processes(SimpleNamespace(fsdp=True, fused_backward=False), SimpleNamespace(size=2),
                            torch.device("cuda"))  # on GPUs FSDP2 is 2.6's own
    monkeypatch.setattr(attention, "triton_release_text", lambda: "3.2.0")
    with pytest.raises(ValueError, match=r"--attention triton needs triton >= 3.6, .*this is 3.2.0"):
        attention.resolve_backend("triton", "cuda")
    monkeypatch.setattr(attention, "triton_release_text", lambda: "3.6.0")
    assert attention.resolve_backend("triton", "cuda") == "triton"
