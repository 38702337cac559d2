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


class FlowHeun(FlowSampler):
    """Heun's second-order method on the flow ODE (Karras et al. 2022, Algorithm 1 without churn; diffusers'
    FlowMatchHeunDiscreteScheduler): an Euler step to σ_next, the velocity there, then the step again with the
    mean of both velocities. Each σ but the first is visited twice (2n - 1 network calls); the last step, to σ = 0,
    is plain Euler."""

    def set_timesteps(self, steps: int, device=None):
        super().set_timesteps(steps, device)
        self.timesteps = torch.cat([self.timesteps[:1], self.timesteps[1:].repeat_interleave(2)])
        self.pending = None  # (z at σ, v at σ, σ_next - σ) between a step's two calls

    def step(self, out, t, x, generator=None):
        if self.pending is not None:  # the correction: back to z at σ, with the mean velocity
            z, v, dt = self.pending
            self.pending, self.i = None, self.i + 1
            return (z + dt * (v + out.float()) / 2).to(out.dtype)
        dt = self.sigmas[self.i + 1] - self.sigmas[self.i]
        z = x.float()
        if self.sigmas[self.i + 1] > 0:
            self.pending = (z, out.float(), dt)
        else:
            self.i += 1
        return (z + dt * out).to(out.dtype)
