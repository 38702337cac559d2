"""The samplers of rectified-flow models (SD3): they integrate dz/dσ = v_θ(z, σ) from σ = 1 (noise) to 0 over the
model's shifted σ schedule (models/flow_matching.py). Timesteps, σ and update rules follow diffusers' flow-matching
schedulers, so the same seed gives the same image.
"""
import torch

from minidream.models.flow_matching import FlowConfig, shifted


class FlowSampler:
    """The `Sampler` interface (timestep_samplers.py) over a flow schedule: the network's input is the latent
    itself and sampling starts from unit noise (σ_max = 1)."""
    init_sigma = 1.0

    def __init__(self, config: FlowConfig, eta: float = 0.0):
        self.config = config.check()

    def scale_input(self, x):
        return x

    def set_timesteps(self, steps: int, device=None):
        """`steps` σ evenly spaced in t from σ_max to σ_min of the training levels, then shifted; σ = 0 last."""
        N = self.config.num_train_timesteps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be at least 1 (got {steps})")
        s_max = shifted(torch.tensor(1.0), self.config.shift).item()  # diffusers' sigma_max, sigma_min (float32)
        s_min = shifted(torch.tensor(1.0 / N), self.config.shift).item()
        ts = torch.linspace(s_max * N, s_min * N, steps, dtype=torch.float64)  # diffusers' np.linspace, float64
        sigmas = shifted(ts / N, self.config.shift).float()
        self.timesteps = (sigmas * N).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)
        self.i = 0


class FlowEuler(FlowSampler):
    """Euler on the flow ODE: z ← z + (σ_next - σ) v (diffusers' FlowMatchEulerDiscreteScheduler)."""

    def step(self, out, t, x, generator=None):
        dt = self.sigmas[self.i + 1] - self.sigmas[self.i]
        self.i += 1
        return (x.float() + dt * out).to(out.dtype)
