"""The one attention layer of the UNet, VAE and MMDiT (SD3), and the one function every attention call goes through.

`Attention` holds the Q/K/V/out projections under the diffusers names (`to_q`, `to_k`, `to_v`,
`to_out.0`): that is what training selection and LoRA address by name. Its `backend` picks the
kernel: "sdpa" (PyTorch's fused attention), "math" (plain softmax(QKᵀ/√d)V, the reference), or
"triton" (our fused kernel in `minidream/kernels/attention.py`). `set_attention_backend` sets it on a model.

(Q, K and V computed as one matmul against the three weights concatenated was measured slower on an H100, in a
whole training step: 146 vs 120 ms, benchmarks/results/levers-sd15-NVIDIA_H100_80GB_HBM3.json; so three matmuls.)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def math_attention(q, k, v, scale: float | None = None):
    """The reference (the Triton kernel's too): softmax(q kᵀ · scale) v in fp32, scale 1/√d unless given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() * scale) @ k.float().transpose(-2, -1)  # scale the N×D q, not the N×M scores
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def triton_attention(q, k, v):
    from minidream.kernels.attention import flash_attention
    return flash_attention(q, k, v)


# --attention: each backend's softmax(q kᵀ / √d) v for q (B, H, N, D), k, v (B, H, M, D); "auto" picks one
BACKENDS = {"sdpa": F.scaled_dot_product_attention, "math": math_attention, "triton": triton_attention}
CHOICES = ("auto", *BACKENDS)


def attention(q, k, v, backend: str = "sdpa"):
    """softmax(q kᵀ / √d) v for q (B, H, N, D), k, v (B, H, M, D), by the named backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](q, k, v)


# the oldest triton our kernels are checked with (the GPU run, 3.6.0; the sm_90 compile check, 3.6.0 and 3.9.0):
# triton 3.2, torch 2.6's, neither compiles them for sm_90 nor interprets them
TRITON_TESTED = (3, 6)


def triton_release_text() -> str:
    try:
        import triton
    except ImportError:
        return "none installed"
    return triton.__version__


def triton_release() -> tuple[int, ...]:
    """The installed triton's (major, minor), (0,) when there is none."""
    parts = triton_release_text().split(".")[:2]
    return tuple(int(p) for p in parts if p.isdigit()) or (0,)


def resolve_backend(name: str, device) -> str:
    """'auto': SDPA (PyTorch's fused kernels: flash attention on CPU and GPU, cuDNN on Hopper), measured faster
    than the math reference on both (benchmarks/results). Triton is chosen explicitly until the benchmarks show
    it ahead on the device at hand (on an H100 it is not)."""
    if name not in CHOICES:
        raise ValueError(f"--attention {name!r} is not one of {', '.join(CHOICES)}")
    if name == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--attention triton needs a CUDA GPU (on CPU only under TRITON_INTERPRET=1, for tests)")
    if name == "triton" and triton_release() < TRITON_TESTED:
        raise ValueError(f"--attention triton needs triton >= {'.'.join(map(str, TRITON_TESTED))}, the oldest the "
                         f"kernels are checked with (this is {triton_release_text()}; it came with this torch): "
                         f"upgrade torch, or use --attention sdpa")
    if name != "auto":
        return name
    return "sdpa"


def set_attention_backend(model: nn.Module, name: str):
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = name
    return model


class RMSNorm(nn.Module):
    """x / RMS(x) · weight (Zhang & Sennrich 2019), the mean square taken in fp32: T5's layer norm, and SD3.5's
    per-head qk-norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.to(self.weight.dtype) * self.weight).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.heads, self.backend = heads, "sdpa"
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        """x (B, N, C) attends to context (B, M, Cc), or to itself when context is None."""
        B, N, C = x.shape
        context = x if context is None else context
        M = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1)
        k, v = self.to_k(context).view(B, M, self.heads, -1), self.to_v(context).view(B, M, self.heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, ·, hs): heads become a batch dim, no copy
        y = attention(q, k, v, self.backend)
        return self.to_out[0](y.transpose(1, 2).reshape(B, N, C))
