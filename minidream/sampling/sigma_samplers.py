"""The σ-space samplers.

Karras et al. 2022 (EDM) write the forward process as x = x_0 + σ ε with σ_t = √((1-ᾱ_t)/ᾱ_t); the DDPM latent
x_t is that x times α_t = 1/√(σ_t²+1). Euler, Euler ancestral and Heun integrate the probability-flow ODE
dx/dσ = (x - x̂_0)/σ (EDM eqs. 1 and 3 with σ(t) = t) in that form, so the UNet sees x/√(σ²+1) and sampling
starts from noise of scale σ_max. DPM-Solver++ and UniPC step the DDPM latent itself, in λ = log(α_t/σ_t)
= -log σ. Timesteps, σ schedules, update rules and random draws follow diffusers' classes, so the same seed
gives the same image.
"""

import torch

from minidream.models.noise_schedule import SchedulerConfig
from minidream.sampling.timestep_samplers import Sampler, check_steps, spacing


def karras_sigmas(s_min: float, s_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ with ρ = 7."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of each σ: linear interpolation in log σ."""
    ls = sigmas.clamp(min=1e-10).log()
    low = ((log_sigmas[:, None] <= ls[None]).sum(0) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - ls) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def interp(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[t] for fractional t, linear between neighbours (float64)."""
    t, table = t.double(), table.double()
    lo = t.floor().long().clamp(0, len(table) - 2)
    return table[lo] + (t - lo) * (table[lo + 1] - table[lo])


def vp(sigma):
    """(α_t, σ_t) of the DDPM latent x_t = α_t x_0 + σ_t ε for an EDM σ."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


class _EDMSampler(Sampler):
    """Euler-family samplers: x = x_0 + σ ε, the UNet sees x/√(σ²+1)."""
    terminal_alpha = 2.0 ** -24

    def set_timesteps(self, steps: int, device=None):
        ts = spacing(self.config, steps).float()  # fractional timesteps stay fractional, σ interpolated between
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = torch.cat([interp(ts, table), torch.zeros(1, dtype=torch.float64)]).float()
        self.timesteps, self.num_inference_steps, self.i = ts.to(device), steps, 0
        s = self.sigmas.max()
        # x = x_0 + σ_max ε has std √(σ_max²+1); diffusers starts from that with leading spacing and from σ_max
        # (k-diffusion's choice) with linspace/trailing. Kept as it is, for the same images.
        self.init_sigma = s if self.config.timestep_spacing in ("linspace", "trailing") else (s ** 2 + 1) ** 0.5
        return self.timesteps

    def scale_input(self, x):
        return x / (self.sigmas[self.i] ** 2 + 1) ** 0.5

    def _x0(self, out, x, sigma):
        if self.config.prediction_type == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)  # v -> x_0, in x = x_0 + σ ε terms


class Euler(_EDMSampler):
    def step(self, out, t, x, generator=None):
        s, s_next = self.sigmas[self.i], self.sigmas[self.i + 1]
        x = x.float()
        d = (x - self._x0(out, x, s)) / s  # dx/dσ; Karras et al. Algorithm 1 without the correction
        self.i += 1
        return (x + d * (s_next - s)).to(out.dtype)


class EulerAncestral(_EDMSampler):
    def step(self, out, t, x, generator=None):
        s, s_to = self.sigmas[self.i], self.sigmas[self.i + 1]
        x = x.float()
        d = (x - self._x0(out, x, s)) / s
        # Ancestral step (k-diffusion): go deterministically down to σ_down, then add fresh noise of std σ_up,
        # with σ_down² + σ_up² = σ_to² so the marginal at σ_to is right.
        s_up = (s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2) ** 0.5
        s_down = (s_to ** 2 - s_up ** 2) ** 0.5
        x = x + d * (s_down - s) + self._noise(out, generator) * s_up
        self.i += 1
        return x.to(out.dtype)


class Heun(_EDMSampler):
    """Karras et al. 2022, Algorithm 1: an Euler step to σ_next, then the trapezoid rule with the slope there
    (the UNet runs twice per step, except the last one, to σ = 0, which stays Euler)."""

    def set_timesteps(self, steps: int, device=None):
        super().set_timesteps(steps, device)
        s, ts = self.sigmas, self.timesteps
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self.dt = None
        return self.timesteps

    def step(self, out, t, x, generator=None):
        first = self.dt is None
        s, s_next = self.sigmas[self.i - (0 if first else 1)], self.sigmas[self.i + (1 if first else 0)]
        x0 = self._x0(out, x, s if first else s_next)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:  # Euler predictor, slope kept for the correction
            d = (x - x0) / s
            self.d, self.dt, self.x = d, s_next - s, x
            dt = self.dt
        else:  # trapezoid: the mean of the slopes at both ends, from the step's start
            d = ((x - x0) / s_next + self.d) / 2
            x, dt, self.dt = self.x, self.dt, None
        self.i += 1
        return x + d * dt


class _VPSolver(Sampler):
    """Multistep solvers on the DDPM latent in λ (DPM-Solver++, UniPC); σ from the model's timesteps or Karras'.
    The update rules read the schedule only through `vp` (σ -> α_t, σ_t) and `_x0`, so the same rules step a
    rectified flow's latent z = (1-σ) x_0 + σ ε, α_t = 1 - σ (flow_samplers.py)."""
    karras = False  # the flow subclasses do not run this constructor (no ᾱ_t): they read the class defaults
    terminal_alpha = 2.0 ** -24

    def __init__(self, config: SchedulerConfig, eta: float = 0.0, karras: bool = False):
        super().__init__(config, eta)
        self.karras = karras

    def vp(self, sigma):
        return vp(sigma)

    def lam(self, sigma):
        """λ = log(α_t/σ_t), the half log-SNR that DPM-Solver and UniPC step in (+∞ at σ = 0)."""
        a, s = self.vp(sigma)
        return a.log() - s.log()

    def set_timesteps(self, steps: int, device=None):
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        if self.karras:  # over the whole trained range σ(0)..σ(N-1), timesteps read back from σ and rounded
            check_steps(self.config, steps)
            sig = karras_sigmas(table[0].item(), table[-1].item(), steps)
            ts = sigma_to_t(sig, table.log().double()).round()
        else:
            ts = spacing(self.config, steps, solver=True)
            sig = interp(ts, table)
        return self._start(sig, ts.long(), device)

    def _start(self, sig, timesteps, device):
        """A fresh run over the σ `sig` (float64) and their timesteps."""
        self.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()  # ends at σ = 0: x_0 itself
        self.timesteps, self.num_inference_steps, self.i = timesteps.to(device), len(timesteps), 0
        self.x0s = []  # the last data predictions, newest last
        return self.timesteps

    def _x0(self, out, x, sigma):
        """Data prediction x̂_0 from ε or v at the DDPM latent x."""
        a, s = vp(sigma)
        return (x - s * out) / a if self.config.prediction_type == "epsilon" else a * x - s * out


class DPMSolverPP(_VPSolver):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, midpoint form) and, with `sde`, its SDE
    variant (SDE-DPM-Solver++(2M) in the same paper, as diffusers' "sde-dpmsolver++"). First order on the first
    step and on the last (to σ = 0)."""
    sde = False  # as `karras`: the default of the flow subclass, which has no SDE variant

    def __init__(self, config: SchedulerConfig, eta: float = 0.0, karras: bool = False, sde: bool = False):
        super().__init__(config, eta, karras)
        self.sde = sde

    def step(self, out, t, x, generator=None):
        i, sig = self.i, self.sigmas
        x0 = self._x0(out, x, sig[i])
        self.x0s = (self.x0s + [x0])[-2:]
        x = x.float()
        noise = self._noise(x, generator) if self.sde else None  # drawn every step, the last too, as diffusers does
        (a_t, s_t), (_, s_s) = self.vp(sig[i + 1]), self.vp(sig[i])
        h = self.lam(sig[i + 1]) - self.lam(sig[i])  # +∞ on the last step: the update below is then x̂_0 exactly
        D = x0
        if len(self.x0s) == 2 and i < len(self.timesteps) - 1:  # second order: extrapolate x̂_0 in λ
            r = (self.lam(sig[i]) - self.lam(sig[i - 1])) / h
            D = x0 + 0.5 * (x0 - self.x0s[0]) / r
        if self.sde:
            x = (s_t / s_s * torch.exp(-h)) * x + (a_t * (1 - torch.exp(-2 * h))) * D \
                + s_t * torch.sqrt(1 - torch.exp(-2 * h)) * noise
        else:
            x = (s_t / s_s) * x - (a_t * (torch.exp(-h) - 1)) * D
        self.i += 1
        return x.to(out.dtype)


class UniPC(_VPSolver):
    """UniPC (Zhao et al. 2023) of order 2, data prediction, B(h) = e^h - 1 ("bh2"): each step first corrects the
    current latent with the model output just computed there (UniC), then predicts the next (UniP);
    the last step is first order."""

    def _start(self, sig, timesteps, device):
        self.order, self.last_x = 0, None
        return super()._start(sig, timesteps, device)

    def _update(self, x, s0, t, order, m0, m1=None, m_t=None):
        """x at step s0 -> step t with the data predictions m0 (at s0), m1 (at s0 - 1) and, correcting, m_t (at t)."""
        sig = self.sigmas
        (a_t, s_t), (_, s_s) = self.vp(sig[t]), self.vp(sig[s0])
        h = self.lam(sig[t]) - self.lam(sig[s0])
        phi1 = torch.expm1(-h)  # B(h) too (bh2)
        x_lin = s_t / s_s * x - a_t * phi1 * m0  # the first-order (DDIM) part
        D1, rk = None, None
        if order == 2:
            rk = (self.lam(sig[s0 - 1]) - self.lam(sig[s0])) / h
            D1 = (m1 - m0) / rk
        if m_t is None:  # predictor: ρ = 1/2 at order 2
            return (x_lin - a_t * phi1 * 0.5 * D1 if order == 2 else x_lin).to(x.dtype)
        if order == 1:
            rho = torch.tensor([0.5])
        else:  # ρ solves R ρ = b, with b_k from the φ functions of -h (UniPC's B(h) system)
            hh = -h
            phi_k = phi1 / hh - 1
            b1 = phi_k / phi1
            b2 = (phi_k / hh - 0.5) * 2 / phi1
            R = torch.stack([torch.ones(2), torch.stack([rk, torch.ones(())])])
            rho = torch.linalg.solve(R, torch.stack([b1, b2]))
        corr = rho[-1] * (m_t - m0) + (rho[0] * D1 if order == 2 else 0)
        return (x_lin - a_t * phi1 * corr).to(x.dtype)

    def step(self, out, t, x, generator=None):
        i = self.i
        m = self._x0(out, x, self.sigmas[i])
        if self.last_x is not None:  # UniC: correct x_i, using the model output at x_i itself
            ms = self.x0s
            x = self._update(self.last_x, i - 1, i, self.order, ms[-1], ms[-2] if len(ms) > 1 else None, m_t=m)
        self.x0s = (self.x0s + [m])[-2:]
        self.order = min(2, len(self.timesteps) - i, len(self.x0s))  # warm-up, and first order on the last step
        self.last_x = x
        self.i += 1
        return self._update(x, i, i + 1, self.order, m, self.x0s[0] if self.order == 2 else None)
