"""Every sampler of `--scheduler` against the diffusers class it reproduces, built the way a diffusers user
switches samplers: `<Class>.from_config(pipe.scheduler.config, ...)`. Timesteps, the starting-noise scale, the
model input and every step, over a fake model whose output depends on its input (so an error in one step
propagates); fp32, <= 1e-5 of the sample's scale."""
import inspect

import pytest
import torch

from minidream.sampling import samplers
from minidream.sampling.samplers import SAMPLERS, default_sampler, make_sampler
from minidream.models.noise_schedule import SchedulerConfig

SD = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
      "trained_betas": None, "clip_sample": False}  # SD 1.5's file as shipped: no timestep_spacing key
CONFIGS = {
    "sd15": SD,
    "sd15-leading-v": {**SD, "_class_name": "DDIMScheduler", "timestep_spacing": "leading",
                       "prediction_type": "v_prediction"},
    "trailing": {**SD, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True},
    "linspace-linear": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
                        "beta_end": 0.02, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "ddim-defaults": {"_class_name": "DDIMScheduler"},  # every field from the class defaults (clip_sample=True, ...)
    # Lin et al. 2024: ᾱ_T = 0, sampled from t = T (the v-prediction SDXL fine-tunes built on it ship this)
    "zero-snr-v": {**SD, "_class_name": "EulerDiscreteScheduler", "rescale_betas_zero_snr": True,
                   "timestep_spacing": "trailing", "prediction_type": "v_prediction", "steps_offset": 0},
    "zero-snr-eps-leading": {**SD, "_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True},
}
# what a zero-terminal-SNR schedule is refused by: PNDM and Heun ignore it in diffusers; an ε-model's x̂_0 at ᾱ_T = 0
# is a division by zero for the samplers that step on ᾱ_t itself (diffusers' draws NaN)
REFUSED = {("zero-snr-v", "pndm"), ("zero-snr-v", "heun"), ("zero-snr-eps-leading", "pndm"),
           ("zero-snr-eps-leading", "heun")}
OPTIONS = {"pndm": {"skip_prk_steps": True}, "dpmpp-2m-karras": {"use_karras_sigmas": True},
           "dpmpp-2m-sde-karras": {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}}


def reference(name, config):
    import diffusers
    cls = getattr(diffusers, SAMPLERS[name].reference)
    return cls.from_config(config, **OPTIONS.get(name, {}))


def fake_unet(x, i):
    """A smooth function of the input plus a fixed per-step term: a stand-in UNet that feeds errors forward."""
    g = torch.Generator().manual_seed(1000 + i)
    return 0.8 * torch.tanh(x) + 0.3 * torch.randn(x.shape, generator=g)


def run(sampler_step, scale, timesteps, init, x, seed):
    g = torch.Generator().manual_seed(seed)
    x = x * init
    for i, t in enumerate(timesteps):
        x = sampler_step(fake_unet(scale(x, t), i), t, x, g)
    return x


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 4, 13])
def test_sampler_matches_diffusers(name, config, steps):
    d = CONFIGS[config]
    if (config, name) in REFUSED:
        with pytest.raises(ValueError, match="rescale_betas_zero_snr=True"):
            make_sampler(name, SchedulerConfig.from_dict(d))
        return
    if config == "ddim-defaults" and name in ("ddim", "ddpm"):
        pass  # the class defaults clip x̂_0 to [-1, 1]: tested here too
    ref = reference(name, d)
    ours = make_sampler(name, SchedulerConfig.from_dict(d), eta=0.5 if name == "ddim" else 0.0)
    ref.set_timesteps(steps)
    assert ours.set_timesteps(steps).tolist() == pytest.approx(ref.timesteps.tolist(), abs=1e-4)
    assert float(ours.init_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = {"eta": 0.5} if name == "ddim" else {}
    stochastic = "generator" in inspect.signature(ref.step).parameters
    want = run(lambda o, t, x, g: ref.step(o, t, x, generator=g, **extra).prev_sample if stochastic
               else ref.step(o, t, x).prev_sample, ref.scale_model_input, ref.timesteps, ref.init_noise_sigma, x, 7)
    got = run(lambda o, t, x, g: ours.step(o, t, x, generator=g), lambda x, t: ours.scale_input(x),
              ours.timesteps, ours.init_sigma, x, 7)
    assert torch.isfinite(want).all()
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), (name, config, steps, err)


def test_class_defaults_are_diffusers_constructor_defaults():
    """A key missing from scheduler_config.json takes the sampler class's own default, as from_config does."""
    import diffusers
    fields = set(SchedulerConfig.__dataclass_fields__) - {"class_name", "given", "extra"}
    for cls_name, ours in {row.reference: row.defaults for row in samplers.SAMPLERS.values()}.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        accepted = {k: p.default for k, p in params.items() if k in fields}
        assert {k: v for k, v in ours.items() if k in accepted} == accepted, cls_name


@pytest.mark.parametrize("class_name,extra,want", [
    ("PNDMScheduler", {"skip_prk_steps": True}, "pndm"), ("DDIMScheduler", {}, "ddim"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "euler"),
    ("EulerAncestralDiscreteScheduler", {}, "euler-a"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp-2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp-2m-karras"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
     "dpmpp-2m-sde-karras"),
    ("UniPCMultistepScheduler", {}, "unipc"),
])
def test_default_is_the_models_own_scheduler(class_name, extra, want):
    assert default_sampler(SchedulerConfig.from_dict({"_class_name": class_name, **extra})) == want


@pytest.mark.parametrize("d,needle", [
    ({"_class_name": "LMSDiscreteScheduler"}, "LMSDiscreteScheduler"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "Karras"),
])
def test_unimplemented_model_scheduler_says_what_to_pick(d, needle):
    with pytest.raises(ValueError, match=needle) as e:
        make_sampler(None, SchedulerConfig.from_dict(d))
    assert "dpmpp-2m-karras" in str(e.value)  # it lists what can be named instead


def test_unimplemented_schedule_options_are_refused():
    with pytest.raises(ValueError, match="trained_betas"):  # the schedule itself: at load time
        SchedulerConfig.from_dict({**SD, "trained_betas": [0.1] * 1000}).check()
    fixed_log = SchedulerConfig.from_dict({"_class_name": "DDPMScheduler", "variance_type": "fixed_small_log"})
    make_sampler("euler", fixed_log)  # Euler does not read variance_type
    with pytest.raises(ValueError, match="variance_type='fixed_small_log'"):
        make_sampler("ddpm", fixed_log)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_zero_snr_epsilon_model_is_refused_by_samplers_that_divide_by_alpha(name):
    """diffusers' DDIM/DDPM draw NaN for it (x̂_0 = (x - ε)/√ᾱ_T, ᾱ_T = 0): refused, naming what works."""
    config = SchedulerConfig.from_dict({**SD, "_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True,
                                        "timestep_spacing": "trailing"})
    with pytest.raises(ValueError, match="choose euler"):
        make_sampler(name, config).set_timesteps(10)


def test_zero_snr_alphas_match_diffusers():
    """ᾱ_t of a rescaled schedule: 0 at the last step (DDIM), 2^-24 for the σ-space samplers (σ_T finite)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    config = SchedulerConfig.from_dict({**SD, "rescale_betas_zero_snr": True})
    ddim, euler = DDIMScheduler.from_config(CONFIGS["zero-snr-v"]), EulerDiscreteScheduler.from_config(
        CONFIGS["zero-snr-v"])
    assert make_sampler("ddim", config).alphas_cumprod[-1] == 0 == ddim.alphas_cumprod[-1]
    assert torch.allclose(make_sampler("ddim", config).alphas_cumprod, ddim.alphas_cumprod, rtol=1e-6, atol=0)
    assert torch.equal(make_sampler("euler", config).alphas_cumprod, euler.alphas_cumprod)
