"""The objective's options (training/objective.py), each against its formula; zero terminal SNR trained into a
model and written into its exports; the options refused on the family they do not apply to."""
import json
import math

import pytest
import torch

from minidream.formats import loading
from minidream.models.flow_matching import FlowConfig, FlowProcess
from minidream.models.noise_schedule import DDPMProcess, SchedulerConfig, TimestepDraw
from minidream.training.objective import HUBER_SCHEDULES, LOSSES, Objective, cell_loss, multires_noise
from minidream.training.step import training_step
from tests.test_sd3_train import sd3_dir  # noqa: F401  (a fixture)
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)

T = 1000


def test_the_default_draw_is_the_uniform_one_it_always_was():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(DDPMProcess(SchedulerConfig()).draw_timesteps(64, g1, "cpu"),
                       torch.randint(0, T, (64,), generator=g2))


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "logit_normal"])
def test_timestep_draws_follow_their_formula_within_the_range(sampling):
    draw = TimestepDraw(sampling, low=200, high=700, logit_mean=0.5, logit_std=1.5, sigmoid_scale=2.0)
    t = draw.draw(4096, T, torch.Generator().manual_seed(0), "cpu")
    assert t.min() >= 200 and t.max() <= 699
    g = torch.Generator().manual_seed(0)
    if sampling == "uniform":
        want = torch.randint(200, 700, (4096,), generator=g)
    else:
        z = torch.randn(4096, generator=g)
        u = torch.sigmoid(0.5 + 1.5 * z) if sampling == "logit_normal" else torch.sigmoid(2.0 * z)
        want = (200 + (u * 500).long()).clamp(200, 699)
    assert torch.equal(t, want)


def test_losses_are_their_formulas():
    d = torch.linspace(-3, 3, 61)
    c = torch.tensor(0.1)
    assert torch.equal(LOSSES["l2"](d, None), d ** 2) and torch.equal(LOSSES["l1"](d, None), d.abs())
    huber = 2 * c * (torch.sqrt(d ** 2 + c ** 2) - c)  # kohya's conditional_loss, "huber"
    assert torch.allclose(LOSSES["huber"](d, c), huber, atol=1e-7)
    assert torch.allclose(LOSSES["smooth-l1"](d, c), huber / c, atol=1e-6)
    small = torch.tensor([1e-3])  # quadratic near 0, linear far out
    assert LOSSES["huber"](small, c).item() == pytest.approx(1e-6, rel=1e-2)  # (float32 cancellation)
    assert LOSSES["huber"](torch.tensor([100.0]), c).item() == pytest.approx(2 * 0.1 * 100, rel=2e-3)


def test_huber_schedules_are_kohyas():
    process = DDPMProcess(SchedulerConfig())
    t = torch.tensor([0, 250, 999])
    assert torch.equal(HUBER_SCHEDULES["constant"](process, t, 0.1), torch.full((3,), 0.1))
    alpha = -math.log(0.1) / T
    assert torch.allclose(HUBER_SCHEDULES["exponential"](process, t, 0.1), torch.exp(-alpha * t.float()))
    a = process.alphas_cumprod[t]
    sigma = ((1 - a) / a) ** 0.5
    assert torch.allclose(HUBER_SCHEDULES["snr"](process, t, 0.1), (1 - 0.1) / (1 + sigma) ** 2 + 0.1)
    flow = FlowProcess(FlowConfig())
    s = torch.tensor([0.0, 0.25, 0.5])
    assert torch.allclose(HUBER_SCHEDULES["snr"](flow, s * T, 0.1), 0.9 / (1 + s / (1 - s)) ** 2 + 0.1)
    # the loss of a batch reads each example's own c
    loss = cell_loss(process, t, Objective(loss_type="huber", huber_schedule="exponential"))
    d = torch.ones(3, 1, 2, 2)
    c = torch.exp(-alpha * t.float())
    assert torch.allclose(loss(d)[:, 0, 0, 0], 2 * c * (torch.sqrt(1 + c ** 2) - c))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_and_min_snr_weights(prediction):
    process = DDPMProcess(SchedulerConfig(prediction_type=prediction))
    t = torch.tensor([0, 10, 500, 999])
    a = process.alphas_cumprod[t]
    snr = (a / (1 - a)).clamp(1e-3, 1000)
    want = 1 / snr.sqrt() if prediction == "epsilon" else 1 / (snr + 1)
    assert torch.allclose(process.debiased_weights(t), want)


def test_zero_snr_weights_stay_finite():
    """ᾱ_T = 0 on a zero-terminal-SNR schedule: SNR 0 there, where min-SNR's ε weight is its limit, 1."""
    for prediction in ("epsilon", "v_prediction"):
        process = DDPMProcess(SchedulerConfig(prediction_type=prediction, rescale_betas_zero_snr=True))
        t = torch.tensor([0, 500, 999])
        assert process.alphas_cumprod[999] == 0
        for w in (process.min_snr_weights(t, 5.0), process.debiased_weights(t)):
            assert torch.isfinite(w).all()
        assert process.min_snr_weights(t, 5.0)[-1] == (1 if prediction == "epsilon" else 0)


def kohya_pyramid(noise, rs, coarse, discount):
    """kohya's pyramid_noise_like with its random draws given: r per level, then each level's noise."""
    b, c, w, h = noise.shape
    up = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i, (r, n) in enumerate(zip(rs, coarse)):
        noise = noise + up(n) * discount ** i
    return noise / noise.std()


def test_multires_noise_is_kohyas_pyramid():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(1))
    got = multires_noise(noise, g, 10, 0.3)
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    rs, coarse = [], []
    for i in range(10):
        r = float(torch.rand((), generator=g)) * 2 + 2
        h, w = max(1, int(16 / r ** i)), max(1, int(12 / r ** i))
        rs.append(r)
        coarse.append(torch.randn((2, 4, h, w), generator=g))
        if h == 1 or w == 1:
            break
    assert len(coarse) < 10  # it stops at a 1-cell grid
    assert torch.allclose(got, kohya_pyramid(noise, rs, coarse, 0.3), atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    process = DDPMProcess(SchedulerConfig())
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def denoiser(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)
    o = Objective(input_perturbation=0.1)
    loss, _, _ = training_step(denoiser, process, latents, {}, 2, 0.0, torch.Generator().manual_seed(1), o)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, T, (2,), generator=g)
    xi = torch.randn(latents.shape, generator=g)
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["x"], process.add_noise(latents, noise + 0.1 * xi, t))
    assert loss.item() == pytest.approx(noise.square().mean().item(), rel=1e-6)  # target ε, prediction 0


def test_zero_terminal_snr_run_trains_and_exports_the_rescaled_schedule(sd1_dir, instance_dir, tmp_path):
    """--zero-terminal-snr on an ε-model: the step's ᾱ_T is 0, the export's scheduler config says so (trailing,
    a class that samples an ε-model from t = T) and diffusers reads the same ᾱ_t from it."""
    from diffusers import EulerDiscreteScheduler
    from minidream.training.config import TrainConfig
    from minidream.training.step import training_process
    model = loading.load(str(sd1_dir))
    process = training_process(model, TrainConfig(out="o", zero_terminal_snr=True, min_timestep=10))
    assert process.alphas_cumprod[-1] == 0 and process.draw.low == 10
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--zero-terminal-snr",
                            "--loss-type", "huber", "--debiased-estimation", "--multires-noise-iterations", "4",
                            "--input-perturbation", "0.1", "--snr-gamma", "5", "--save-as", "diffusers",
                            "--validation-prompt", "a dog", "--validation-steps", "2"))
    assert r.exit_code == 0, r.output
    d = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert d["rescale_betas_zero_snr"] is True and d["timestep_spacing"] == "trailing"
    assert d["_class_name"] == "EulerDiscreteScheduler"  # PNDM ignores the rescale; DDIM divides by ᾱ_T = 0
    tuned = loading.load(str(out / "model"))
    ref = EulerDiscreteScheduler.from_config(d)
    from minidream.sampling.samplers import make_sampler
    assert torch.equal(make_sampler(None, tuned.scheduler).alphas_cumprod, ref.alphas_cumprod)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


@pytest.mark.parametrize("args,needle", [
    (["--timestep-sampling", "shift"], "--timestep-sampling shift is for rectified-flow models"),
    (["--max-timestep", "1200"], "--max-timestep must be at most the schedule's 1000"),
    (["--min-timestep", "500", "--max-timestep", "400"], "--min-timestep must be below 400"),
    (["--huber-c", "0.2"], "--huber-c is the threshold of --loss-type huber"),
    (["--multires-noise-iterations", "6", "--noise-offset", "0.05"], "give one"),
    (["--multires-noise-discount", "0.5"], "--multires-noise-discount weighs"),
    (["--loss-type", "l3"], "--loss-type"),
])
def test_objective_options_refused_in_one_line(sd1_dir, instance_dir, tmp_path, args, needle):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", *args))
    assert r.exit_code != 0 and needle in r.output, r.output
    assert "Traceback" not in r.output and not (out / "run.json").exists()


def test_ddpm_options_refused_on_a_flow_model(sd3_dir, instance_dir, tmp_path):
    for args in (["--zero-terminal-snr"], ["--min-timestep", "5"], ["--debiased-estimation"]):
        r = run_cli(*train_args(sd3_dir, instance_dir, tmp_path / "run", "--train", "lora", *args))
        assert r.exit_code != 0 and "is trained by rectified flow" in r.output, r.output


def test_single_file_markers_state_v_prediction_and_zero_snr(sd1_dir, tmp_path):
    """kohya's and the v-prediction SDXL fine-tunes' empty `v_pred`/`ztsnr` tensors (which ComfyUI reads): written
    for such a model, and read over the architecture's schedule."""
    from dataclasses import replace
    from safetensors.torch import save_file
    from minidream.formats.single_file import load_single_file, to_single_file
    model = loading.load(str(sd1_dir))
    plain = to_single_file(model)
    assert "v_pred" not in plain and "ztsnr" not in plain
    model.scheduler = replace(model.scheduler, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sd = to_single_file(model)
    assert sd["v_pred"].numel() == 0 and sd["ztsnr"].numel() == 0
    save_file(sd, tmp_path / "m.safetensors")
    back = load_single_file(tmp_path / "m.safetensors", config=str(sd1_dir))  # an ε, unrescaled architecture
    assert back.scheduler.prediction_type == "v_prediction" and back.scheduler.rescale_betas_zero_snr
    assert back.scheduler.timestep_spacing == "trailing" and back.scheduler.class_name == "DDIMScheduler"


def test_adapters_off_is_the_base_layer():
    from minidream.models.lora import LoRA, adapters_off
    net = torch.nn.Sequential(LoRA(torch.nn.Linear(6, 5), 2, 2.0))
    torch.nn.init.normal_(net[0].lora_up.weight)  # a trained adapter
    x = torch.randn(3, 6)
    with adapters_off(net):
        assert torch.equal(net(x), net[0].base(x))
    assert not torch.allclose(net(x), net[0].base(x))


@pytest.mark.parametrize("extra", [[], ["--train-text-encoder"]])
def test_the_prior_from_the_model_itself(sd1_dir, instance_dir, tmp_path, extra):
    """--prior-source model: no class image is made; the class rows' target is the base model's prediction, so
    the first step (whose adapters, B = 0, are the base) has a prior loss of 0, the later ones do not."""
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--prior-source", "model", "--lr", 0.05,
                            "--log-every", 1, "--lora-rank", 2, *extra))
    assert r.exit_code == 0, r.output
    assert not (out / "class_images").exists() and "generating" not in r.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps[0]["loss_prior"] <= 1e-10 and steps[0]["loss_instance"] > 0  # (0 up to batched kernels)
    assert steps[-1]["loss_prior"] > 0


def test_the_class_rows_target_is_what_the_prior_gives():
    process = DDPMProcess(SchedulerConfig())
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def prior(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return torch.full_like(noisy, 0.5)
    loss, inst, prior_part = training_step(lambda x, t: torch.zeros_like(x), process, latents, {}, 2, 1.0,
                                           torch.Generator().manual_seed(1), prior=prior)
    assert seen["noisy"].shape[0] == 2 and prior_part.item() == pytest.approx(0.25)


@pytest.mark.parametrize("args,needle", [
    (["--prior-source", "model"], "--prior-source model takes the target from the base model"),
    (["--prior-source", "model", "--train", "lora", "--no-prior"], "it needs --train lora and --prior"),
    (["--logit-mean", "0.5"], "--logit-mean shapes --timestep-sampling logit_normal's draw"),
])
def test_prior_source_and_draw_options_refused(sd1_dir, instance_dir, tmp_path, args, needle):
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "out", *args))
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output
