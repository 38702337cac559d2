"""Sampling: every sampler `--scheduler` offers, in one table (samplers): those that step between the schedule's
discrete timesteps through ᾱ_t (DDIM, DDPM, PNDM) in timestep_samplers, those that integrate over the noise level σ
(Euler, Heun, DPM-Solver++, UniPC) in sigma_samplers, all behind one protocol (`timestep_samplers.Sampler`); and
text → image with its settings as one `SamplingParams` (pipeline).

May import: minidream.models and the shared modules.
"""
