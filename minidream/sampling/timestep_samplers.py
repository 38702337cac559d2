"""The samplers that work on ᾱ_t (`alphas_cumprod`) directly: DDIM, DDPM, PNDM, and what every sampler shares
(`Sampler`: the inference timesteps, the model input, one step). The σ-space samplers (Euler, Heun, DPM-Solver++,
UniPC) are in sigma_samplers.py; the table of all of them, which `--scheduler` offers, in samplers.py.

The UNet predicts ε ("epsilon") or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 ("v_prediction", Salimans & Ho 2022, §4).
Timesteps, update rules and random draws follow diffusers' schedulers so the same seed gives the same image.
"""
import torch

from minidream.models.noise_schedule import SchedulerConfig, alphas_cumprod


def check_steps(config: SchedulerConfig, steps: int):
    """A number of sampling steps the schedule has room for (the caller names its option before the message)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    if steps > config.num_train_timesteps:
        raise ValueError(f"{steps} steps exceed the model's {config.num_train_timesteps} training timesteps")


def spacing(config: SchedulerConfig, steps: int, solver: bool = False) -> torch.Tensor:
    """The inference timesteps, descending, float64, as diffusers spaces them (the three spacings are compared in
    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). The multistep solvers
    (DPM-Solver, UniPC) space steps + 1 points and drop the last, t = 0 (`solver`)."""
    check_steps(config, steps)
    N = config.num_train_timesteps
    n = steps + 1 if solver else steps
    if config.timestep_spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (N // n)).round().flip(0)[: steps] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        ts = torch.arange(N, 0, -N / steps, dtype=torch.float64).round() - 1
    else:
        ts = torch.linspace(0, N - 1, n, dtype=torch.float64).flip(0)
        ts = ts.round()[: steps] if solver else ts
    if ts.max() >= N:  # leading spacing plus steps_offset can step past the last training timestep
        raise ValueError(f"{steps} steps with this scheduler config reach timestep {int(ts.max())} >= {N}; "
                         f"use fewer")
    if len(set(ts.round().tolist())) < len(ts):  # steps closer than one timestep: a solver divides by zero
        raise ValueError(f"{steps} steps are more than this schedule spaces apart ({N} timesteps, "
                         f"{config.timestep_spacing} spacing); use fewer")
    return ts


class PureNoiseStart(ValueError):
    """A sampler that cannot start where the schedule is pure noise (the sampler's fault, not the steps')."""


class Sampler:
    """What every sampler does, over the model's noise schedule: `set_timesteps(steps)` (the timesteps to visit),
    `scale_input(x)` (the UNet's input at the current one) and `step(out, t, x)` (the latent one step on, from the
    UNet's output); `init_sigma` scales the starting noise. A sampler keeps state between steps (multistep
    history); `set_timesteps` starts it afresh, so one sampler serves many batches."""
    init_sigma = 1.0  # standard deviation of the starting noise (σ-space samplers start from x_T = σ_max ε)

    reads_eta = False  # whether --eta means anything to it (DDIM's η only)
    # ᾱ_T of a zero-terminal-SNR schedule as the σ-space samplers take it (None: 0 as it is). σ_T = √((1-ᾱ)/ᾱ)
    # would be infinite: diffusers' Euler, DPM-Solver and UniPC start from ᾱ_T = 2^-24 (σ_T ≈ 4096) instead.
    terminal_alpha: float | None = None

    def __init__(self, config: SchedulerConfig, eta: float = 0.0):
        """eta scales the fresh noise of stochastic samplers that have a knob for it (DDIM's η)."""
        self.config = config.check()
        self.alphas_cumprod = alphas_cumprod(config)
        if config.rescale_betas_zero_snr and self.terminal_alpha is not None:
            self.alphas_cumprod[-1] = self.terminal_alpha
        if eta < 0:
            raise ValueError(f"--eta must be >= 0 (got {eta})")
        self.eta = eta

    def scale_input(self, x):
        """The UNet's input at the current step (σ-space samplers divide by √(σ²+1))."""
        return x

    def set_timesteps(self, steps: int, device=None):
        self.num_inference_steps = steps
        self.timesteps = spacing(self.config, steps).round().long().to(device)
        self.i = 0  # index of the next step, for samplers that keep state between steps
        if self.config.prediction_type == "epsilon" and self.alphas_cumprod[self.timesteps.cpu()].min() == 0:
            raise PureNoiseStart(f"an ε-prediction model on a zero-terminal-SNR schedule cannot be sampled by "
                                 f"{type(self).__name__} from its last timestep (x̂_0 divides by ᾱ_T = 0); choose "
                                 f"euler (or another σ-space sampler)")
        return self.timesteps

    def _x0_eps(self, out, t, x, a_t):
        """The model output read as (predicted x_0, predicted ε)."""
        if self.config.prediction_type == "epsilon":
            x0 = (x - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
            eps = out
        else:
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
            eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def _noise(self, like, generator):
        # Drawn on the generator's device and moved, as diffusers' randn_tensor does, so a CPU
        # generator gives the same numbers whatever device the model runs on.
        dev = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


class DDIM(Sampler):
    reads_eta = True

    def __init__(self, config: SchedulerConfig, eta: float = 0.0):
        super().__init__(config, eta)
        # ᾱ "before" the first step: 1 (a clean image) or ᾱ_0, as the checkpoint's config says.
        self.final_alpha = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, out, t: int, x, generator=None):
        t = int(t)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        # 0-d float32 tensors, so the arithmetic rounds as the reference's does
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        x0, eps = self._x0_eps(out, t, x, a_t)
        # σ_t of DDIM eq. 16: eta=0 is deterministic DDIM, eta=1 matches DDPM's variance.
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * self._noise(out, generator)
        return x_prev


class DDPM(Sampler):
    def step(self, out, t: int, x, generator=None):
        t = int(t)
        # the next timestep of the schedule (strides are uneven with linspace/trailing spacing)
        ts = self.timesteps.tolist()
        i = ts.index(t)
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        alpha = a_t / a_prev  # one (possibly strided) step's α and β
        beta = 1 - alpha
        x0, _ = self._x0_eps(out, t, x, a_t)
        # Mean of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7.
        x_prev = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # β̃_t, the "fixed_small" variance
            x_prev = x_prev + var ** 0.5 * self._noise(out, generator)
        return x_prev


class PNDM(Sampler):
    """PNDM's pseudo linear multistep method (Liu et al. 2022, "PLMS"), as SD 1.5 ships it (skip_prk_steps):
    the first step is redone as a second-order (Heun-like) step, then Adams-Bashforth over up to four ε."""

    def set_timesteps(self, steps: int, device=None):
        ts = super().set_timesteps(steps, device).tolist()
        # the UNet runs twice at t_1: once to redo the first step, once for the second
        self.timesteps = torch.tensor(ts[:1] + ts[1:2] + ts[1:], device=device)
        self.eps, self.first_x = [], None
        return self.timesteps

    def step(self, out, t: int, x, generator=None):
        t, stride = int(t), self.config.num_train_timesteps // self.num_inference_steps
        prev = t - stride  # diffusers steps a fixed stride, whatever the spacing
        if self.i != 1:
            self.eps = self.eps[-3:] + [out]
        else:  # redo step 0 from its start with the mean of both ε (t is step 1's time)
            prev, t = t, t + stride
        if self.i == 0:
            e, self.first_x = out, x
        elif self.i == 1:
            e, x = (out + self.eps[-1]) / 2, self.first_x
        else:  # Adams-Bashforth coefficients of order 2, 3, 4
            E = self.eps[::-1]
            e = ((3 * E[0] - E[1]) / 2 if len(E) == 2 else (23 * E[0] - 16 * E[1] + 5 * E[2]) / 12 if len(E) == 3
                 else (55 * E[0] - 59 * E[1] + 37 * E[2] - 9 * E[3]) / 24)
        self.i += 1
        return self._transfer(x, t, prev, e)

    def _transfer(self, x, t, prev, e):
        """PNDM's transfer part φ: x_t -> x_prev along the DDIM path for the combined output e."""
        a_t = self.alphas_cumprod[t]
        final = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else final
        if self.config.prediction_type == "v_prediction":
            e = a_t ** 0.5 * e + (1 - a_t) ** 0.5 * x
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e / denom
