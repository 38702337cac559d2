"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU feed-forward, no dropout, untied head): SD3's third
text encoder, whose last states (B, 256, 4096) are most of the MMDiT's text sequence.

Top to bottom: RMS layer norm → self-attention with relative position buckets → gated-GELU MLP → block → encoder.
Attribute names are transformers' `T5EncoderModel` checkpoint keys.

Two things differ from CLIP and the other transformers here:
- no position embeddings: each attention adds a learned bias per head for the (bucketed) distance between query and
  key (§2.1 "we use a simplified form of position embeddings"); only the first block holds the table, the others
  reuse its bias;
- no 1/√d scaling of the logits (it is folded into the initialisation, Mesh TensorFlow's convention).
fp16 overflows in its feed-forward (T5 was trained in bf16): run it in bf16 or fp32.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.models.attention import RMSNorm


@dataclass(frozen=True)
class T5Config:
    # field names are transformers' config.json keys
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


PRESETS = {
    "t5-v1_1-xxl": T5Config(),
    "tiny": T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
}


def relative_buckets(n: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """(n, n) bucket of each key's offset from each query (bidirectional): half the buckets for keys before, half
    for keys after; within a half, offsets below num_buckets/4 each get their own bucket, larger ones share
    logarithmically wider buckets up to max_distance (all beyond share the last)."""
    offset = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]  # key - query
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    dist = offset.abs()
    exact = half // 2
    far = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        self.q, self.k, self.v = (nn.Linear(config.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x, bias):
        """x (B, T, C), bias (1, nh, T, T) -> (B, T, C): softmax(q kᵀ + bias) v, unscaled."""
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_bias_table)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """GEGLU (Shazeer 2020): gelu(x W₀) ⊙ (x W₁), then W_o; the tanh GELU, as v1.1 was trained ("gelu_new")."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, first: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_bias_table=first), T5LayerFF(config)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, first=i == 0) for i in range(config.num_layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def position_bias(self, T: int, device) -> torch.Tensor:
        """(1, nh, T, T): the first block's learned bias for each query-key distance, shared by every block."""
        c = self.config
        buckets = relative_buckets(T, c.relative_attention_num_buckets, c.relative_attention_max_distance, device)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> the last states (B, T, d_model), every position attended (SD3 passes no mask: the padding
        is part of what the MMDiT was trained to read)."""
        x = self.shared(ids)
        bias = self.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
