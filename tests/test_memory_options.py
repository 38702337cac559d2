"""Memory options: the other optimizers (8-bit AdamW, Adafactor, Prodigy) checkpoint their own state and resume
bit-exact; --fused-backward trains as the unfused step; the combinations that cannot work are one line."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minidream.training.trainable import MODES
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)
from tests.test_train_options import checkpoint_meta

# each optimizer's own state, as its checkpoint holds it: (a per-parameter entry, its dtype)
OWN_STATE = {"adamw8bit": ("__bnb_optimizer_quant_state__/state1", torch.uint8),
             "adafactor": ("row_var", torch.float32),
             "prodigy": ("p0", torch.float32)}


def checkpoint(out, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step-{step:06d}.safetensors")


def trained(out, step: int) -> dict:
    return {k: v for k, v in checkpoint(out, step).items() if not k.startswith(("optim.", "rng."))}


@pytest.mark.parametrize("optimizer", list(OWN_STATE))
def test_each_optimizer_keeps_its_own_state_and_resumes_bit_exact(sd1_dir, instance_dir, tmp_path, optimizer):
    """3 steps straight, and 1 step then --resume latest to 3: the same weights and optimizer state, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--train", "attention", "--train-text-encoder", "--optimizer", optimizer, "--checkpoint-every", 1,
            "--keep-last", 0]
    r = run_cli(*train_args(sd1_dir, instance_dir, straight, *args))
    assert r.exit_code == 0, r.output
    shutil.copytree(straight, resumed)
    for step in (2, 3):
        (resumed / "checkpoints" / f"step-{step:06d}.safetensors").unlink()
    r = run_cli(*train_args(sd1_dir, instance_dir, resumed, *args, "--resume", "latest"))
    assert r.exit_code == 0 and "at step 1" in r.output, r.output
    a, b = checkpoint(straight, 3), checkpoint(resumed, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key, dtype = OWN_STATE[optimizer]
    own = [v for k, v in a.items() if k.startswith("optim.") and k.endswith(key)]
    assert own and any(v.dtype == dtype for v in own)  # (bitsandbytes keeps 32-bit moments for small tensors)
    assert any(not torch.equal(trained(straight, 1)[k], v) for k, v in trained(straight, 3).items())


def test_optimizer_settings_reach_the_optimizer(sd1_dir, instance_dir, tmp_path):
    """Prodigy's knobs and its default --lr of 1; Adafactor's beta2 decay."""
    runs = {"prodigy": ("--prodigy-d-coef", 2, "--prodigy-bias-correction", "--prodigy-safeguard-warmup"),
            "adafactor": ("--adafactor-beta2-decay", -0.5)}
    for optimizer, knobs in runs.items():
        out = tmp_path / optimizer
        args = [a for a in train_args(sd1_dir, instance_dir, out) if a != 1e-3]  # no --lr ...
        args.remove("--lr")
        r = run_cli(*args, "--train", "attention", "--optimizer", optimizer, "--checkpoint-every", 3, *knobs)
        assert r.exit_code == 0, r.output
        group = checkpoint_meta(out / "checkpoints" / "step-000003.safetensors")["param_groups"][0]
        if optimizer == "prodigy":
            assert group["initial_lr"] == 1.0 and group["d_coef"] == 2 and group["use_bias_correction"]
            assert group["safeguard_warmup"] and group["d"] >= group["d0"] > 0
        else:
            assert group["beta2_decay"] == -0.5 and group["initial_lr"] == MODES["attention"].lr


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_trains_as_the_unfused_step(sd1_dir, instance_dir, tmp_path, optimizer):
    """Without clipping, updating each parameter inside backward is the same training (≤ 1e-6 relative after 3
    steps); with --max-grad-norm the step's gradient norm it reports is the global one (the same at step 1)."""
    runs = {}
    for fused in (False, True):
        for clip in (0, 1):
            out = tmp_path / f"{fused}-{clip}"
            extra = ["--fused-backward"] if fused else []
            r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--train-text-encoder",
                                    "--optimizer", optimizer, "--max-grad-norm", clip, "--checkpoint-every", 3,
                                    *extra))
            assert r.exit_code == 0, r.output
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[fused, clip] = trained(out, 3), metrics
    (a, _), (b, _) = runs[False, 0], runs[True, 0]
    base = trained(tmp_path / "False-0", 3)
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        assert ((a[k] - b[k]).abs().max() / a[k].abs().max()).item() <= 1e-6, k
    (_, unfused), (_, fused) = runs[False, 1], runs[True, 1]
    assert fused[0]["grad_norm"] == pytest.approx(unfused[0]["grad_norm"], rel=1e-5)
    assert [x["loss"] for x in runs[True, 0][1]] == pytest.approx([x["loss"] for x in runs[False, 0][1]], rel=1e-5)


def test_fused_backward_is_exact_on_resume(sd1_dir, instance_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--train", "lora", "--fused-backward", "--checkpoint-every", 1, "--keep-last", 0, "--lr-schedule", "linear"]
    assert run_cli(*train_args(sd1_dir, instance_dir, straight, *args)).exit_code == 0
    shutil.copytree(straight, resumed)
    (resumed / "checkpoints" / "step-000003.safetensors").unlink()
    r = run_cli(*train_args(sd1_dir, instance_dir, resumed, *args, "--resume", "latest"))
    assert r.exit_code == 0 and "at step 2" in r.output, r.output
    a, b = checkpoint(straight, 3), checkpoint(resumed, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


BAD = [(("--fused-backward", "--grad-accum", 2), "--fused-backward updates the weights in every backward"),
       (("--fused-backward", "--optimizer", "prodigy"), "prodigy does not: use adamw"),
       (("--optimizer", "sgd"), "'sgd' is not one of"),
       (("--adafactor-beta2-decay", 0.5), "--adafactor-beta2-decay must be in [-1, 0]"),
       (("--prodigy-d-coef", 0), "--prodigy-d-coef must be > 0"),
       (("--optimizer", "prodigy", "--train-token", "--token-lr", 0.5), "prodigy takes one learning rate"),
       (("--optimizer", "prodigy", "--train-text-encoder", "--text-encoder-lr", 1e-4), "prodigy takes one")]


@pytest.mark.parametrize("extra,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_combinations_are_one_line_and_write_nothing(sd1_dir, instance_dir, tmp_path, extra, needle):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *extra))
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("optimizer,package,extra", [("adamw8bit", "bitsandbytes", "bnb"),
                                                     ("prodigy", "prodigyopt", "prodigy")])
def test_a_missing_package_is_one_line_before_any_work(sd1_dir, instance_dir, tmp_path, optimizer, package, extra):
    """The package really not importable in the training process (None in sys.modules, Python's way to block it)."""
    out = tmp_path / "run"
    code = (f"import sys; sys.modules[{package!r}] = None; import minidream.cli as cli; "
            "sys.argv = ['minidream'] + sys.argv[1:]; cli.main()")
    args = [str(a) for a in train_args(sd1_dir, instance_dir, out, "--optimizer", optimizer)]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"pip install 'minidream[{extra}]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_the_step_needs_no_text_encoder_nor_vae_after_set_up(sd1_dir, instance_dir, tmp_path, monkeypatch):
    """With frozen text encoders every prompt (captions too) is encoded at set-up, and with --cache-latents every
    image: after that the step never calls them, so they can leave the accelerator (Runtime.offload; on a GPU).
    Here they are made to fail once set-up is done, and the run trains as one where they could not."""
    import shutil
    from minidream.training import step as step_module
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    for i, f in enumerate(sorted(photos.glob("*.png"))):
        f.with_suffix(".txt").write_text(f"a photo of sks dog, view {i}")
    args = ["--train", "attention", "--cache-latents", "--caption-ext", ".txt", "--checkpoint-every", 3]
    free = tmp_path / "free"
    assert run_cli(*train_args(sd1_dir, photos, free, *args)).exit_code == 0
    prepare = step_module.prepare

    def without_them(cfg, model, *a, **k):
        stepper = prepare(cfg, model, *a, **k)

        def gone(*args, **kwargs):
            raise AssertionError("called after set-up")
        for _, _, te in model.text_encoders():
            monkeypatch.setattr(te, "forward", gone)
        monkeypatch.setattr(model.vae, "encode", gone)
        return stepper
    monkeypatch.setattr("minidream.training.dreambooth.prepare", without_them)
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, photos, out, *args))
    assert r.exit_code == 0, r.output
    a, b = trained(free, 3), trained(out, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_precision_writes_every_export_in_it(sd1_dir, instance_dir, tmp_path):
    """--save-precision fp16: every floating tensor of every export is the fp32 export's, rounded to fp16."""
    files = ["lora/pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "model.safetensors",
             "model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/model.safetensors"]
    runs = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--save-precision", precision,
                                *[x for s in ("lora-diffusers", "lora-kohya", "single-file", "diffusers")
                                  for x in ("--save-as", s)]))
        assert r.exit_code == 0, r.output
        runs[precision] = {f: load_file(out / f) for f in files}
    for f in files:
        full, half = runs["fp32"][f], runs["fp16"][f]
        assert full.keys() == half.keys()
        for k, v in full.items():
            want = v.half() if v.is_floating_point() else v
            assert half[k].dtype == want.dtype and torch.equal(half[k], want), (f, k)


def test_a_prodigy_run_with_a_new_token_trains(sd1_dir, instance_dir, tmp_path):
    """Prodigy shares one step size: every group takes --lr (here 1e-3, the token too)."""
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "run", "--optimizer", "prodigy", "--train-token",
                            "--train", "lora", "--train-text-encoder", "--checkpoint-every", 3))
    assert r.exit_code == 0, r.output
    groups = checkpoint_meta(tmp_path / "run" / "checkpoints" / "step-000003.safetensors")["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3] * 3


CRAFTED = {"adafactor": [("beta2_decay", 1e308), ("beta2_decay", 5.0), ("eps", [float("nan"), 1e-3]),
                         ("lr", -1.0), ("weight_decay", "x")],
           "prodigy": [("beta3", "x"), ("slice_p", 0), ("fsdp_in_use", True), ("growth_rate", -1), ("k", -5),
                       ("k", 1.5), ("use_bias_correction", 7), ("d", float("nan")), ("d_numerator", float("inf")),
                       ("initial_lr", 2.0)]}


@pytest.mark.parametrize("optimizer", list(CRAFTED))
def test_crafted_optimizer_settings_are_refused_in_one_line(sd1_dir, instance_dir, tmp_path, optimizer):
    """A checkpoint's group settings are the run's (they must equal the optimizer as built); what the optimizer
    changes as it trains is range-checked; the learning rate in force is the schedule's, not the file's."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = tmp_path / "run"
    args = ["--optimizer", optimizer, "--train", "attention", "--checkpoint-every", 2, "--keep-last", 0]
    assert run_cli(*train_args(sd1_dir, instance_dir, out, *args)).exit_code == 0
    ck = out / "checkpoints" / "step-000002.safetensors"
    (out / "checkpoints" / "step-000003.safetensors").unlink()
    with safe_open(str(ck), "pt") as f:
        meta = json.loads(f.metadata()["minidream"])
    tensors = load_file(ck)
    for key, value in CRAFTED[optimizer]:
        groups = [{**g, key: value} for g in meta["param_groups"]]
        save_file(tensors, ck, metadata={"minidream": json.dumps({**meta, "param_groups": groups})})
        r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--resume", "latest"))
        assert r.exit_code == 2 and "not usable" in r.output and "Traceback" not in r.output, (key, r.output)
    save_file(tensors, ck, metadata={"minidream": json.dumps({**meta, "param_groups": [
        {**g, "lr": 2.0} for g in meta["param_groups"]]})})  # a crafted rate in force: the schedule's is used
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--resume", "latest"))
    assert r.exit_code == 0, r.output
    assert checkpoint_meta(out / "checkpoints" / "step-000003.safetensors")["param_groups"][0]["lr"] != 2.0


def test_frozen_parts_no_later_phase_reads_are_released(sd1_dir, instance_dir, tmp_path):
    """A LoRA run's frozen text encoder (and, with cached latents, the VAE) gives its memory back once the prompts
    are encoded, unless a later phase reads it: a validation grid (the final one is drawn), or the caller (the demo
    samples with the model). Before the exports, which read the base from its files, the whole model goes."""
    from dataclasses import replace
    from minidream.training.config import TrainConfig
    from minidream.training.dreambooth import dreambooth
    cfg = TrainConfig(model=str(sd1_dir), instance_dir=str(instance_dir), class_noun="dog", out=str(tmp_path / "a"),
                      resolution=16, num_class_images=2, class_steps=2, class_batch_size=2, steps=1,
                      checkpoint_every=0, cache_latents=True, device="cpu", mode="lora")

    def released(model):
        return [next(net.parameters()).is_meta for net in (model.text_encoder, model.vae, model.denoiser)]
    model, written = dreambooth(cfg)
    assert released(model) == [True, True, True] and written  # the exports read the base from its files
    grid = replace(cfg, out=str(tmp_path / "b"), validation_prompts=("a photo of sks dog",), validation_steps=2)
    assert released(dreambooth(grid)[0]) == [True, True, True] and (tmp_path / "b" / "samples" / "final.png").exists()
    assert released(dreambooth(replace(cfg, out=str(tmp_path / "c")), keep_model=True)[0]) == [False, False, False]
