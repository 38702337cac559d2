"""DPM-Solver++(2M) and UniPC on SD3's rectified flow against diffusers, built as a diffusers user swaps them into
StableDiffusion3Pipeline (the way diffusers' docs do it for flow models such as Wan and SANA):
`<Class>.from_config(pipe.scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction",
flow_shift=<the model's shift>)`, then the pipeline's own `set_timesteps(steps)` (no custom σ). Step by step
(timesteps, σ, every step's latent over a fake velocity model whose output depends on its input, fp32, <= 1e-5 of
the latent's scale) and whole images through the pipeline (within 1/255)."""
import json

import pytest
import torch

from minidream.models.flow_matching import FlowConfig
from minidream.sampling.pipeline import SamplingParams, generate
from minidream.sampling.samplers import FLOW_SAMPLERS, default_sampler, make_sampler
from tests.test_samplers import fake_unet
from tests.test_sd3 import PROMPTS, pipes  # noqa: F401 (pipes: the tiny SD3 pipelines, a fixture)

MULTISTEP = ["dpmpp-2m", "unipc"]


def swapped_in(name, scheduler):
    """The diffusers class of `name`, from the pipeline's FlowMatchEulerDiscreteScheduler as the docs swap it."""
    import diffusers
    cls = getattr(diffusers, FLOW_SAMPLERS[name].reference)
    return cls.from_config(scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction",
                           flow_shift=scheduler.config.shift)


def flow_config(shift):
    """SD3's scheduler_config.json (as save_pretrained writes it), with `shift`, and its diffusers scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    base = FlowMatchEulerDiscreteScheduler(shift=shift)
    return FlowConfig.from_dict(json.loads(base.to_json_string())), base


@pytest.mark.parametrize("name", MULTISTEP)
@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_flow_multistep_matches_diffusers(name, shift, steps):
    config, base = flow_config(shift)
    ref, ours = swapped_in(name, base), make_sampler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.init_sigma == ref.init_noise_sigma == 1.0
    want = got = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):
        want = ref.step(fake_unet(ref.scale_model_input(want, t), i), t, want).prev_sample
        got = ours.step(fake_unet(ours.scale_input(got), i), ours.timesteps[i], got)
        assert torch.isfinite(want).all()
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), (name, shift, steps, i, err)


def test_flow_multistep_rows():
    """A model whose own scheduler is one of them samples with it, at its flow_shift; options they do not implement
    are refused."""
    config, base = flow_config(2.0)
    for name in MULTISTEP:
        theirs = swapped_in(name, base)
        own = FlowConfig.from_dict(json.loads(theirs.to_json_string()))
        assert default_sampler(own) == name and own.shift == 2.0
        ours = make_sampler(name, own)
        ours.set_timesteps(7)
        theirs.set_timesteps(7)
        assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
        for key, value in (("solver_order", 3), ("use_karras_sigmas", True), ("final_sigmas_type", "sigma_min")):
            with pytest.raises(ValueError, match=key):
                make_sampler(name, FlowConfig.from_dict({**config.to_dict(), key: value}))


@pytest.mark.parametrize("pipes", ["sd3-medium"], indirect=True)  # the sampler does not depend on the MMDiT
@pytest.mark.parametrize("name", MULTISTEP)
def test_images_match_sd3_pipeline_with_the_scheduler_swapped_in(pipes, name):
    ref, m = pipes
    ref = type(ref)(**{**ref.components, "scheduler": swapped_in(name, ref.scheduler)})
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPTS, num_inference_steps=5, guidance_scale=4.0, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    want = torch.from_numpy((want * 255).round()).to(torch.uint8)
    params = SamplingParams(steps=5, guidance=4.0, height=16, width=16, sampler=name)
    got = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1
