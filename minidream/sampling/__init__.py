"""Sampling: every sampler `--scheduler` offers, in one table (samplers; the ᾱ-space ones in alpha_space, the σ-space
ones in sigma_space, all behind one protocol, `alpha_space.Sampler`), and text → image with its settings as one
`SamplingParams` (pipeline).

May import: minidream.models and the shared modules.
"""
