"""The one attention layer of the UNet and VAE, and the one function every attention call goes through.

`Attention` holds the Q/K/V/out projections under the diffusers names (`to_q`, `to_k`, `to_v`,
`to_out.0`): that is what training selection and LoRA address by name. Its `backend` picks the
kernel: "sdpa" (PyTorch's fused attention), "math" (plain softmax(QKᵀ/√d)V, the reference), or
"triton" (our fused kernel in `kernels/attention.py`). `set_attention_backend` sets it on a model.

`fuse_projections` (set with `set_fused_projections`) computes Q, K, V of self-attention as one matmul
against the three weights concatenated (K, V as one for cross-attention): one larger GEMM instead of
three small ones. The weights stay three separate parameters, so checkpoints, training selection and
LoRA are unchanged; a projection wrapped by LoRA is never fused.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def math_attention(q, k, v):
    """The reference: softmax(q kᵀ / √d) v in fp32."""
    s = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)  # scale the N×D q, not the N×M scores
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def triton_attention(q, k, v):
    from kernels.attention import flash_attention
    return flash_attention(q, k, v)


# --attention: each backend's softmax(q kᵀ / √d) v for q (B, H, N, D), k, v (B, H, M, D); "auto" picks one
BACKENDS = {"sdpa": F.scaled_dot_product_attention, "math": math_attention, "triton": triton_attention}
CHOICES = ("auto", *BACKENDS)


def attention(q, k, v, backend: str = "sdpa"):
    """softmax(q kᵀ / √d) v for q (B, H, N, D), k, v (B, H, M, D), by the named backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](q, k, v)


def resolve_backend(name: str, device) -> str:
    """'auto': SDPA (PyTorch's fused kernels: flash attention on CPU and GPU, cuDNN on Hopper), measured faster
    than the math reference on both (benchmarks/results). Triton is chosen explicitly until the benchmarks show
    it ahead on the device at hand (on an H100 it is not)."""
    if name not in CHOICES:
        raise ValueError(f"--attention {name!r} is not one of {', '.join(CHOICES)}")
    if name == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--attention triton needs a CUDA GPU (on CPU only under TRITON_INTERPRET=1, for tests)")
    if name != "auto":
        return name
    return "sdpa"


def set_attention_backend(model: nn.Module, name: str):
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = name
    return model


def set_fused_projections(model: nn.Module, on: bool = True):
    for m in model.modules():
        if isinstance(m, Attention):
            m.fuse_projections = on
    return model


def _linear_cat(x, layers):
    """x through several nn.Linear at once: one matmul against their weights stacked along the outputs."""
    w = torch.cat([l.weight for l in layers])
    b = None if layers[0].bias is None else torch.cat([l.bias for l in layers])
    return F.linear(x, w, b)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.heads, self.backend, self.fuse_projections = heads, "sdpa", False
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        """x (B, N, C) attends to context (B, M, Cc), or to itself when context is None."""
        B, N, C = x.shape
        M = N if context is None else context.shape[1]
        fuse = self.fuse_projections and all(type(l) is nn.Linear for l in (self.to_q, self.to_k, self.to_v))
        if fuse and context is None:
            q, k, v = _linear_cat(x, (self.to_q, self.to_k, self.to_v)).view(B, N, 3, self.heads, -1).unbind(2)
        elif fuse:
            q = self.to_q(x).view(B, N, self.heads, -1)
            k, v = _linear_cat(context, (self.to_k, self.to_v)).view(B, M, 2, self.heads, -1).unbind(2)
        else:
            context = x if context is None else context
            q = self.to_q(x).view(B, N, self.heads, -1)
            k, v = self.to_k(context).view(B, M, self.heads, -1), self.to_v(context).view(B, M, self.heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, ·, hs): heads become a batch dim, no copy
        y = attention(q, k, v, self.backend)
        return self.to_out[0](y.transpose(1, 2).reshape(B, N, C))
