"""DDIM / DDPM against diffusers' schedulers: timesteps, add_noise, velocity and every step, fp32 <= 1e-6."""
import pytest
import torch

from minidream.models.noise_schedule import SchedulerConfig
from minidream.models.stable_diffusion import DDPMProcess
from minidream.sampling.timestep_samplers import DDIM, DDPM

CONFIGS = [
    SchedulerConfig(),
    SchedulerConfig(prediction_type="v_prediction"),
    SchedulerConfig(timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0),
    SchedulerConfig(timestep_spacing="linspace", beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                    clip_sample=True),
]


def ref_kwargs(c: SchedulerConfig):
    return dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                beta_schedule=c.beta_schedule, prediction_type=c.prediction_type, steps_offset=c.steps_offset,
                timestep_spacing=c.timestep_spacing, clip_sample=c.clip_sample)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_matches_diffusers(cfg, steps):
    from diffusers import DDIMScheduler
    for eta in (0.0, 0.7):
        ref = DDIMScheduler(**ref_kwargs(cfg), set_alpha_to_one=cfg.set_alpha_to_one)
        ref.set_timesteps(steps)
        ours = DDIM(cfg, eta)
        assert ours.set_timesteps(steps).tolist() == ref.timesteps.tolist()
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(ref.timesteps):
            out = torch.randn(x.shape, generator=torch.Generator().manual_seed(i + 1))
            want = ref.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(100 + i)).prev_sample
            got = ours.step(out, t, x, generator=torch.Generator().manual_seed(100 + i))
            assert (got - want).abs().max().item() <= 1e-6, (eta, int(t))
            x = want


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [1, 10, 250])
def test_ddpm_matches_diffusers(cfg, steps):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**ref_kwargs(cfg))
    ref.set_timesteps(steps)
    ours = DDPM(cfg)
    assert ours.set_timesteps(steps).tolist() == ref.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps[:60]):
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(i + 1))
        want = ref.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(100 + i))
        assert (got - want).abs().max().item() <= 1e-6, int(t)
        x = want


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_add_noise_and_training_target(cfg):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**ref_kwargs(cfg))
    ours = DDPMProcess(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    assert (ours.add_noise(x0, noise, t) - ref.add_noise(x0, noise, t)).abs().max() <= 1e-6
    assert (ours.velocity(x0, noise, t) - ref.get_velocity(x0, noise, t)).abs().max() <= 1e-6
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        DDIM(SchedulerConfig()).set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMProcess(SchedulerConfig(prediction_type="sample"))
    with pytest.raises(ValueError, match="eta"):
        DDIM(SchedulerConfig(), eta=-1)
