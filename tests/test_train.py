"""DreamBooth training: loss/gradient parity with the diffusers recipe, every mode, resume, exports, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from minidream.cli import app
from minidream.formats import loading
from minidream.training.step import dreambooth_loss
from tests.conftest import max_rel_err


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("instance")
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        arr = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
    return d


def run_cli(*args):
    r = CliRunner().invoke(app, list(map(str, args)))
    return r


def train_args(model, instance_dir, out, *extra):
    return ["train", "--model", model, "--instance-dir", instance_dir, "--class-noun", "dog", "--out", out,
            "--resolution", 16, "--num-class-images", 2, "--class-steps", 2, "--class-batch-size", 2, "--steps", 3,
            "--checkpoint-every", 0, "--lr", 1e-3, *extra]


def test_one_step_matches_diffusers_dreambooth_loss_and_gradients(sd1_dir):
    """Same batch, noise and timesteps: our loss parts and UNet gradients equal those of diffusers' UNet and
    CLIP with the loss of diffusers' train_dreambooth.py (instance mse + λ·prior mse on the chunked batch)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    from minidream.models.stable_diffusion import DDPMProcess
    ours = loading.load(str(sd1_dir))
    ours.unet.requires_grad_(True)
    ref_unet = UNet2DConditionModel.from_pretrained(sd1_dir / "unet")
    ref_text = CLIPTextModel.from_pretrained(sd1_dir / "text_encoder")
    ref_sched = DDPMScheduler.from_pretrained(sd1_dir / "scheduler")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)  # 2 instance + 2 class
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 700, 999])
    ids = ours.tokenizer(["a photo of sks dog"] * 2 + ["a photo of dog"] * 2)
    lam = 0.7

    # diffusers
    noisy = ref_sched.add_noise(latents, noise, t)
    pred = ref_unet(noisy, t, ref_text(ids)[0]).sample
    model_pred, model_pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    ref_inst = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    ref_prior = torch.nn.functional.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    ref_loss = ref_inst + lam * ref_prior
    ref_loss.backward()

    # ours
    sched = DDPMProcess(ours.scheduler)
    pred = ours.unet(sched.add_noise(latents, noise, t), t, ours.text_encoder(ids))
    loss, inst, prior = dreambooth_loss(pred, sched.target(latents, noise, t), 2, lam)
    loss.backward()
    for a, b in ((loss, ref_loss), (inst, ref_inst), (prior, ref_prior)):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    theirs = dict(ref_unet.named_parameters())
    for name, p in ours.unet.named_parameters():
        assert max_rel_err(p.grad, theirs[name].grad) <= 1e-4, name


def _changed(before: dict, after: dict):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("mode,extra", [
    ("unet", []), ("attention", []), ("lora", []), ("attention", ["--train-text-encoder"]),
    ("lora", ["--train-text-encoder"]), ("attention", ["--train-token"]),
])
def test_each_mode_trains_only_what_it_selects(sd1_dir, instance_dir, tmp_path, mode, extra):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", mode, "--save-as", "diffusers", *extra))
    assert r.exit_code == 0, r.output
    base, tuned = loading.load(str(sd1_dir)), loading.load(str(out / "model"))
    u = _changed(base.unet.state_dict(), tuned.unet.state_dict())
    assert u, "nothing in the UNet changed"
    if mode == "unet":
        assert any("resnets" in k for k in u)
    else:
        assert all(".attn1." in k or ".attn2." in k for k in u), sorted(u)[:3]
        projections = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
        assert all(k.endswith(projections) for k in u)
    bt, tt = base.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    if "--train-token" in extra:
        assert tt["embeddings.token_embedding.weight"].shape[0] == bt["embeddings.token_embedding.weight"].shape[0] + 1
        assert torch.equal(tt["embeddings.token_embedding.weight"][:-1], bt["embeddings.token_embedding.weight"])
        assert "<sks>" in tuned.tokenizer.added
        assert (out / "learned_embeds.safetensors").exists()
    else:
        te = _changed(bt, tt)
        assert bool(te) == ("--train-text-encoder" in extra)
        if mode == "lora" and te:
            assert all("self_attn" in k for k in te)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_after_kill_is_bit_identical(sd1_dir, instance_dir, tmp_path):
    # on the CPU: CUDA kernels are not deterministic (two uninterrupted runs on an H100 already differ by ~2e-3)
    common = train_args(sd1_dir, instance_dir, "OUT", "--steps", 6, "--checkpoint-every", 2, "--train", "lora",
                        "--save-as", "lora-diffusers", "--keep-last", 0, "--flip", 0.5, "--device", "cpu")

    def cmd(out):
        return [sys.executable, "-m", "minidream", *[str(out) if a == "OUT" else str(a) for a in common]]
    full = tmp_path / "full"
    assert subprocess.run(cmd(full), capture_output=True).returncode == 0
    cut = tmp_path / "cut"
    # killed from outside the trainer: a hook torch calls before every optimizer step SIGKILLs the process at
    # the 6th, i.e. once step 5 is logged (the trainer has no test hook of its own)
    kill_at_6th_step = "\n".join([
        "import os, runpy, signal, sys",
        "from torch.optim.optimizer import register_optimizer_step_pre_hook",
        "steps = []",
        "def hook(*args):",
        "    steps.append(1)",
        "    if len(steps) == 6:",
        "        os.kill(os.getpid(), signal.SIGKILL)",
        "register_optimizer_step_pre_hook(hook)",
        "sys.argv[0] = 'minidream'",
        "runpy.run_module('minidream', run_name='__main__')"])
    r = subprocess.run([sys.executable, "-c", kill_at_6th_step, *cmd(cut)[3:]], capture_output=True, cwd=os.getcwd())
    assert r.returncode == -signal.SIGKILL, r.stderr
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names == ["step-000002.safetensors", "step-000004.safetensors"]
    r = subprocess.run(cmd(cut) + ["--resume", "latest"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(b[k].abs().sum() > 0 for k in b if "lora_B" in k)
    # the killed run had logged step 5; the resumed one starts again from 4: each step once, in order
    assert [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_exports_load_in_diffusers_and_give_our_images(sd1_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from minidream.sampling.pipeline import SamplingParams, generate
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--train-text-encoder", "--lr", 3e-2,
                            "--save-as", "lora-diffusers", "--save-as", "lora-kohya", "--save-as", "diffusers",
                            "--save-as", "single-file"))
    assert r.exit_code == 0, r.output
    prompt = "a photo of sks dog"

    def ours(model):
        return generate(model, [prompt], SamplingParams(steps=4, height=16, width=16), progress=False,
                        generator=torch.Generator().manual_seed(3))

    def theirs(pipe):
        import numpy as np
        pipe.set_progress_bar_config(disable=True)
        img = pipe(prompt, num_inference_steps=4, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(3)).images
        return torch.from_numpy((img * 255).round().astype(np.uint8))

    tuned = loading.load(str(out / "model"))
    want = ours(tuned)
    assert (want.int() - ours(loading.load(str(sd1_dir))).int()).abs().max() > 0, "training changed nothing visible"
    kw = dict(safety_checker=None, requires_safety_checker=False)
    assert (theirs(StableDiffusionPipeline.from_pretrained(out / "model", **kw)).int() - want.int()).abs().max() <= 1
    single = StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(out / "model"),
                                                      local_files_only=True, **kw)
    assert (theirs(single).int() - want.int()).abs().max() <= 1
    for f in (out / "lora" / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **kw)
        pipe.load_lora_weights(str(f))
        pipe.fuse_lora()
        assert (theirs(pipe).int() - want.int()).abs().max() <= 1, f.name
        # and `minidream sample --lora` reads the same file
        base = loading.load(str(sd1_dir))
        from minidream.formats.lora_files import apply_loras
        apply_loras(base, [(f, 1.0)])
        assert (ours(base).int() - want.int()).abs().max() <= 1, f.name


def test_textual_inversion_file_loads_in_diffusers(sd1_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from minidream.sampling.pipeline import SamplingParams, generate
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--train-token", "--lr", 1e-9,
                            "--token-lr", 0.1, "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token="<sks>")
    pipe.set_progress_bar_config(disable=True)
    import numpy as np
    img = pipe("a photo of <sks> dog", num_inference_steps=3, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(1)).images
    want = torch.from_numpy((img * 255).round().astype(np.uint8))
    tuned = loading.load(str(out / "model"))
    # the UNet moved by at most lr=1e-9 steps: the token embedding is what differs
    got = generate(tuned, ["a photo of <sks> dog"], SamplingParams(steps=3, height=16, width=16), progress=False,
                   generator=torch.Generator().manual_seed(1))
    assert (got.int() - want.int()).abs().max() <= 1


def test_bad_input_is_one_line(sd1_dir, instance_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "b.jpg").write_bytes(b"")
    cases = [
        (train_args(sd1_dir, tmp_path / "missing", tmp_path / "o1"), "no such folder"),
        (train_args(sd1_dir, empty, tmp_path / "o2"), "no images"),
        (train_args(sd1_dir, broken, tmp_path / "o3"), "a.png, b.jpg"),
        (train_args(sd1_dir, instance_dir, tmp_path / "o4", "--resume", "latest"), "no checkpoint"),
        (train_args(sd1_dir, instance_dir, tmp_path / "o5", "--save-as", "lora-kohya"), "needs --train lora"),
    ]
    if os.geteuid() != 0:  # root writes anywhere, so only test an unwritable class dir as a normal user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((train_args(sd1_dir, instance_dir, tmp_path / "o6", "--class-dir", ro / "c"), "not writable"))
    for args, needle in cases:
        r = run_cli(*args)
        assert r.exit_code == 2 and needle in r.output, (needle, r.output)
        assert "Traceback" not in r.output
    # an --out folder that holds another run
    out = tmp_path / "o7"
    assert run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1)).exit_code == 0
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1))
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--overwrite")).exit_code == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 8, "--checkpoint-every", 1, "--lr", 1e30,
                            "--keep-last", 0))
    assert r.exit_code == 2 and "lower --lr" in r.output, r.output
    step = int(r.output.split("at step ")[1].split(";")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step-{step - 1:06d}.safetensors"
    # the losses read only every 7 steps and at checkpoints (every 3): the same first non-finite step is named,
    # no checkpoint holds weights a non-finite loss updated, and the good steps' lines are all written
    late = tmp_path / "late"
    r = run_cli(*train_args(sd1_dir, instance_dir, late, "--steps", 8, "--checkpoint-every", 3, "--log-every", 7,
                            "--lr", 1e30, "--keep-last", 0))
    assert r.exit_code == 2 and f"loss is nan at step {step};" in r.output.replace("inf", "nan"), r.output
    assert all(int(p.stem.split("-")[1]) < step for p in (late / "checkpoints").glob("*.safetensors"))
    lines = [json.loads(x) for x in (late / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, step))


def test_ctrl_c_saves_a_checkpoint(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    args = [str(a) for a in train_args(sd1_dir, instance_dir, out, "--steps", 100000, "--no-prior")]
    # a test run started in the background inherits SIGINT *ignored* (and Python then keeps ignoring it):
    # give the child the default disposition, as in a terminal
    p = subprocess.Popen([sys.executable, "-m", "minidream", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--resume latest" in err and "Traceback" not in err
    ck = sorted((out / "checkpoints").iterdir())
    assert len(ck) == 1
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", int(ck[0].stem.split("-")[1]) + 1, "--no-prior",
                            "--resume", "latest"))
    assert r.exit_code == 0, r.output


def test_min_snr_weights_and_v_target_follow_the_references():
    """SNR as diffusers' training_utils.compute_snr; weights min(SNR, γ)/SNR (ε) and min(SNR, γ)/(SNR+1) (v)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from minidream.models.noise_schedule import SchedulerConfig
    from minidream.models.stable_diffusion import DDPMProcess
    t = torch.tensor([0, 10, 250, 500, 999])
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    eps = DDPMProcess(SchedulerConfig())
    snr = compute_snr(ref, t)
    assert torch.allclose(eps.snr(t), snr, rtol=1e-5)
    assert torch.allclose(eps.min_snr_weights(t, 5.0), torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
    v = DDPMProcess(SchedulerConfig(prediction_type="v_prediction"))
    assert torch.allclose(v.min_snr_weights(t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    x0, noise = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    assert torch.allclose(v.target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(eps.target(x0, noise, t), noise)


def test_v_prediction_model_trains(sd2_dir, instance_dir, tmp_path):
    """The SD2-style (v-prediction) tiny model through the whole loop, with min-SNR and noise offset."""
    r = run_cli(*train_args(sd2_dir, instance_dir, tmp_path / "run", "--train", "attention", "--snr-gamma", 5,
                            "--noise-offset", 0.05, "--lr-schedule", "cosine", "--warmup-steps", 1, "--grad-accum", 2,
                            "--mixed-precision", "bf16", "--gradient-checkpointing", "--cache-latents"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
