"""The samplers of rectified-flow models (SD3): they integrate dz/dσ = v_θ(z, σ) from σ = 1 (noise) to 0 over the
model's shifted σ schedule (models/flow_matching.py). Timesteps, σ and update rules follow diffusers' flow-matching
schedulers, so the same seed gives the same image.

DPM-Solver++(2M) and UniPC are sigma_samplers.py's, on the flow latent: z_σ = (1-σ) x_0 + σ ε is a latent
α_t x_0 + σ_t ε with α_t = 1 - σ, σ_t = σ, and the velocity v = ε - x_0 gives x̂_0 = z - σ v; the update rules,
written in λ = log(α_t/σ_t), hold as they are. Their σ schedules are diffusers' `use_flow_sigmas` ones, which
differ from Euler's (and from each other's) in where they start.
"""
import torch

from minidream.models.flow_matching import FlowConfig, shifted, time_shifted
from minidream.sampling.sigma_samplers import DPMSolverPP, UniPC


def _check_steps(steps):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")


def np_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy's linspace (float64), bit for bit: diffusers spaces the multistep solvers' flow σ with it,
    and torch.linspace rounds differently in the last bit, enough to move a truncated timestep."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    y = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    y[-1] = stop
    return y


class FlowSampler:
    """The `Sampler` interface (timestep_samplers.py) over a flow schedule: the network's input is the latent
    itself and sampling starts from unit noise (σ_max = 1)."""
    init_sigma = 1.0
    reads_eta = False  # none of them draws noise

    def __init__(self, config: FlowConfig, eta: float = 0.0):
        self.config = config.check()

    def scale_input(self, x):
        return x

    def set_timesteps(self, steps: int, device=None, image_tokens: int | None = None):
        """`steps` σ evenly spaced in t from σ_max to σ_min of the training levels (or, as Flux's pipeline passes
        them, linspace(1, 1/n, n) in float32), then shifted — by the image's size (`image_tokens`) where the
        shift is dynamic; σ = 0 last."""
        c, N = self.config, self.config.num_train_timesteps
        _check_steps(steps)
        if c.dynamic and image_tokens is None:
            raise ValueError("this model's shift depends on the image size: set_timesteps needs image_tokens")
        shift = (lambda s: time_shifted(s, c.mu(image_tokens))) if c.dynamic else (lambda s: shifted(s, c.shift))
        if c.pipeline_sigmas:
            sigmas = shift(np_linspace(1.0, 1 / steps, steps).float())
        else:
            s_max, s_min = (1.0, 1.0 / N) if c.dynamic else (  # diffusers' sigma_max, sigma_min (float32)
                shifted(torch.tensor(1.0), c.shift).item(), shifted(torch.tensor(1.0 / N), c.shift).item())
            sigmas = shift(np_linspace(s_max * N, s_min * N, steps) / N).float()  # diffusers' np.linspace, float64
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

    def set_timesteps(self, steps: int, device=None, image_tokens: int | None = None):
        super().set_timesteps(steps, device, image_tokens)
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


class _FlowMultistep(FlowSampler):
    """A multistep solver of sigma_samplers.py on the flow latent (diffusers' `use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift=<the model's shift>`). Before the solver in the method order:
    FlowSampler's constructor (a flow schedule has no ᾱ_t table), model input (z itself) and starting noise (unit),
    then the σ below; the solver's `step` then runs unchanged. The timesteps are 1000 σ truncated to integers, as
    diffusers casts them."""

    def vp(self, sigma):
        """z_σ = (1-σ) x_0 + σ ε: α_t = 1 - σ, σ_t = σ, so λ = log((1-σ)/σ), +∞ at σ = 0 as before."""
        return 1 - sigma, sigma

    def _x0(self, out, x, sigma):
        """x̂_0 from the velocity v = ε - x_0: z - σ v = (1-σ) x_0 + σ ε - σ ε + σ x_0."""
        return x - sigma * out

    def set_timesteps(self, steps: int, device=None, image_tokens: int | None = None):
        _check_steps(steps)
        sig = self.flow_sigmas(steps, self.config.num_train_timesteps, self.config.shift)
        return self._start(sig, (sig * self.config.num_train_timesteps).long(), device)


class FlowDPMSolverPP(_FlowMultistep, DPMSolverPP):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the flow ODE: diffusers' DPMSolverMultistepScheduler,
    first order on the first step and on the last (to σ = 0, where it returns x̂_0)."""

    @staticmethod
    def flow_sigmas(steps, N, shift):
        """shift(1 - α) for α = linspace(1, 1/N, n + 1), descending, the last (σ = 0) dropped:
        σ_max = shift(1 - 1/N)."""
        return shifted(1.0 - np_linspace(1, 1 / N, steps + 1), shift).flip(0)[:-1]


class FlowUniPC(_FlowMultistep, UniPC):
    """UniPC (Zhao et al. 2023; B(h) = e^h - 1, order 2, corrector on every step but the first) on the flow ODE:
    diffusers' UniPCMultistepScheduler."""

    @staticmethod
    def flow_sigmas(steps, N, shift):
        """shift(linspace(1, 1/N, n + 1)) without its last point: σ_max = 1, moved just below it, where α_t = 0
        would make λ = -∞ (as diffusers does, by 1e-6)."""
        sig = shifted(np_linspace(1, 1 / N, steps + 1)[:-1], shift)
        if abs(sig[0].item() - 1) < 1e-6:
            sig[0] -= 1e-6
        return sig
