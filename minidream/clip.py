"""CLIP text encoder: the transformer that turns a 77-token prompt into the UNet's context.

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (12 layers, 768 wide, quick-GELU). SD 2.x uses the
OpenCLIP ViT-H/14 text tower (1024 wide, plain GELU) and conditions on the *penultimate* layer:
the diffusers checkpoints store only the first 23 of its 24 layers, so running every stored layer
and then the final LayerNorm is exactly what SD 2.x uses. Both are the same module, picked by config.

Attribute names follow transformers' `CLIPTextModel` (without the `text_model.` prefix, which
the loader strips), so a checkpoint loads by straight copy.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP (SD 2.x) uses "gelu"
    eps: float = 1e-5


PRESETS = {
    "sd15": CLIPConfig(),
    "sd21": CLIPConfig(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu"),
    "tiny": CLIPConfig(vocab_size=1000, width=32, layers=2, heads=4, mlp_width=37),
}


def quick_gelu(x):
    # OpenAI trained CLIP with this sigmoid approximation of GELU; the weights expect it.
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text tower is causal: token i sees tokens <= i, so the padding after the end
        # token never changes the states before it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) token ids -> (B, T, width) context for the UNet's cross-attention."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
