"""--compile: a compiled UNet trains and samples as the eager one (losses, trained tensors, images), checkpoints and
resumes; what a compiled graph cannot hold says so and runs as it can; CUDA graphs on a CPU are one line.

Inductor compiles C++ on the CPU: a cold cache costs ~2.5 minutes for the tiny UNet's forward and backward, so the
Inductor run is `slow`; the default suite runs the same wiring with torch.compile's aot_eager backend (traced and
split into forward and backward graphs as Inductor's are, run without code generation)."""
import copy
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from minidream.models import compile as compile_module
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (a fixture)

UNET = "model/unet/diffusion_pytorch_model.safetensors"


def metrics(out):
    """The training steps' lines (not the validation's)."""
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def assert_same_training(eager, compiled, trained=UNET, tol=1e-4):
    """Each step's loss and every trained tensor within `tol` relative (the compiled graph sums in another order)."""
    a, b = metrics(eager), metrics(compiled)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol * abs(x["loss"]), (x, y)
    ta, tb = load_file(eager / trained), load_file(compiled / trained)
    assert ta.keys() == tb.keys()
    worst = max(((ta[k] - tb[k]).norm() / ta[k].norm().clamp_min(1e-12)).item() for k in ta)
    assert worst <= tol, worst


@pytest.fixture
def aot_eager(monkeypatch):
    """--compile on through torch.compile's aot_eager backend: the same tracing and autograd split, no codegen."""
    row = compile_module.COMPILE_MODES["on"]
    monkeypatch.setitem(compile_module.COMPILE_MODES, "on",
                        replace(row, options={"backend": "aot_eager", "dynamic": False}))


@pytest.mark.parametrize("mode, trained", [("lora", "lora/pytorch_lora_weights.safetensors")])
def test_compiled_run_trains_as_eager_and_resumes(sd1_dir, instance_dir, tmp_path, aot_eager, mode, trained):
    common = ("--train", mode, "--device", "cpu", "--checkpoint-every", 2, "--validation-prompt", "a photo of sks dog",
              "--validation-images", 1, "--validation-steps", 2, "--validation-every", 2)
    eager = tmp_path / "eager"
    r = run_cli(*train_args(sd1_dir, instance_dir, eager, *common, "--steps", 4))
    assert r.exit_code == 0, r.output
    compiled = tmp_path / "compiled"
    r = run_cli(*train_args(sd1_dir, instance_dir, compiled, *common, "--steps", 3, "--compile", "on"))
    assert r.exit_code == 0, r.output
    assert json.loads((compiled / "run.json").read_text())["compile"] == "on"
    # resumed from the last step's checkpoint (3), compiled again in a new process state, to step 4
    r = run_cli(*train_args(sd1_dir, instance_dir, compiled, *common, "--steps", 4, "--resume", "latest"))
    assert r.exit_code == 0, r.output
    assert (compiled / "samples" / "step-000004.png").is_file()  # validation ran (eager) between compiled steps
    assert_same_training(eager, compiled, trained)


def test_compiled_mode_says_what_it_cannot_capture(capsys):
    from minidream.training.config import TrainConfig
    from minidream.training.runtime import Runtime
    from minidream.training.step import compiled_mode
    rt = Runtime(torch.device("cuda"), "sdpa", None)
    cfg = TrainConfig(model="m", instance_dir="i", class_noun="dog", out="o", compile="graphs")
    assert compiled_mode(cfg, rt) == "graphs" and capsys.readouterr().err == ""
    assert compiled_mode(replace(cfg, grad_accum=2), rt) == "on"
    assert "--grad-accum" in capsys.readouterr().err
    assert compiled_mode(replace(cfg, fused_backward=True), rt) == "off"
    assert "--fused-backward" in capsys.readouterr().err
    assert compiled_mode(replace(cfg, compile="on", fsdp=True), rt) == "off"
    assert "--fsdp" in capsys.readouterr().err


def test_cuda_graphs_on_a_cpu_is_one_line(sd1_dir, instance_dir, tmp_path):
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "run", "--device", "cpu", "--compile", "graphs"))
    assert r.exit_code == 2 and "--compile graphs" in r.output and "CUDA" in r.output, r.output
    assert not (tmp_path / "run").exists()
    r = run_cli("sample", "--model", sd1_dir, "--prompt", "a dog", "--out", tmp_path / "s", "--device", "cpu",
                "--compile", "graphs")
    assert r.exit_code == 2 and "--compile graphs" in r.output and not (tmp_path / "s").exists(), r.output


def test_ctrl_c_while_sampling_is_one_line_and_leaves_no_empty_folder(sd1_dir, tmp_path):
    import signal
    import time
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "a dog",
                          "--out", str(out), "--device", "cpu", "--steps", "900", "--height", "32", "--width", "32",
                          "--scheduler", "euler"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not out.exists():  # made just before sampling starts
        time.sleep(0.1)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "interrupted; no image was written" in err and "Traceback" not in err, err[-2000:]
    assert not out.exists()


def test_compiled_sampling_gives_the_eager_image(sd1_dir, tmp_path, aot_eager):
    from PIL import Image
    for c in ("off", "on"):
        r = run_cli("sample", "--model", sd1_dir, "--prompt", "a dog", "--out", tmp_path / c, "--device", "cpu",
                    "--steps", 3, "--height", 32, "--width", 32, "--compile", c, "--no-progress")
        assert r.exit_code == 0, r.output
    a, b = (torch.tensor(list(Image.open(tmp_path / c / "0000.png").getdata())) for c in ("off", "on"))
    assert (a - b).abs().max() <= 1


@pytest.mark.slow
def test_inductor_run_trains_as_eager_and_resumes(sd1_dir, instance_dir, tmp_path):
    """The real --compile on (Inductor's generated C++ on the CPU), in a fresh process as a user runs it."""
    def train(out, *extra):
        args = [str(a) for a in train_args(sd1_dir, instance_dir, out, "--device", "cpu", "--checkpoint-every", 2,
                                           *extra)]
        r = subprocess.run([sys.executable, "-m", "minidream", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    train(tmp_path / "eager", "--steps", 4)
    train(tmp_path / "compiled", "--steps", 3, "--compile", "on")
    train(tmp_path / "compiled", "--steps", 4, "--resume", "latest")
    assert_same_training(tmp_path / "eager", tmp_path / "compiled")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["on", "graphs"])
def test_compiled_unet_with_triton_attention_on_gpu(sd1_dir, mode):
    """On CUDA: the UNet compiled as --compile MODE asks, through our Triton kernel, three steps of forward and
    backward (CUDA graphs replay from the third) against eager SDPA, in bf16."""
    from minidream.formats import diffusers_layout
    from minidream.models.attention import set_attention_backend
    from minidream.models.compile import compile_network, step_begins
    from tests.conftest import max_rel_err
    eager = diffusers_layout.load_unet(sd1_dir / "unet").cuda().requires_grad_(True)
    compiled = compile_network(set_attention_backend(copy.deepcopy(eager), "triton"), mode)
    g = torch.Generator("cuda").manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g, device="cuda"), torch.randn(2, 77, 32, generator=g, device="cuda")
    t = torch.tensor([3, 900], device="cuda")
    for _ in range(3):
        grads = {}
        for name, net in (("eager", eager), ("compiled", compiled)):
            net.zero_grad()
            step_begins(mode if name == "compiled" else "off")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(x, t, ctx)
            out.float().square().mean().backward()
            grads[name] = (out.float().detach().clone(), [p.grad.float().clone() for p in net.parameters()])
        assert max_rel_err(grads["compiled"][0], grads["eager"][0]) <= 3e-2
        assert max(max_rel_err(a, b) for a, b in zip(grads["compiled"][1], grads["eager"][1])) <= 5e-2
