"""CLIP text encoder: the transformer that turns a 77-token prompt into the UNet's context.

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (12 layers, 768 wide, quick-GELU). SD 2.x uses the
OpenCLIP ViT-H/14 text tower (1024 wide, plain GELU) and conditions on the *penultimate* layer:
the diffusers checkpoints store only the first 23 of its 24 layers, so running every stored layer
and then the final LayerNorm is exactly what SD 2.x uses. Both are the same module, picked by config.

SDXL uses two towers at once (ViT-L and OpenCLIP ViT-bigG, Podell et al. 2023 §2.1), each read at its
penultimate layer *before* the final LayerNorm, and bigG's pooled state (final-normed, at the end token)
through `text_projection`: `penultimate_and_pooled`. The bigG tower is transformers'
`CLIPTextModelWithProjection`, the same module with `projection_dim` set.

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
    projection_dim: int | None = None  # CLIPTextModelWithProjection (SDXL's second encoder): text_projection's width
    eos_token_id: int = 49407  # where the pooled state is read; 2 in older configs means "the largest id" (argmax)


PRESETS = {
    "sd15": CLIPConfig(),
    "sd21": CLIPConfig(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu"),
    "sdxl": CLIPConfig(layers=12, eos_token_id=2),  # ViT-L: all 12 layers stored, the 11th is read
    "sdxl-2": CLIPConfig(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280,
                         eos_token_id=2),
    "sd3": CLIPConfig(projection_dim=768, eos_token_id=2),  # SD3's CLIP-L is projected too (pooled: 768 + 1280)
    "tiny": CLIPConfig(vocab_size=1000, width=32, layers=2, heads=4, mlp_width=37),
    "tiny-xl": CLIPConfig(vocab_size=1000, width=32, layers=2, heads=4, mlp_width=37),
    "tiny-xl-2": CLIPConfig(vocab_size=1000, width=48, layers=3, heads=2, mlp_width=64, act="gelu", projection_dim=32,
                            eos_token_id=2),
}


def quick_gelu(x):
    # OpenAI trained CLIP with this sigmoid approximation of GELU; the weights expect it.
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text tower is causal: token i sees tokens <= i, so the padding after the end
        # token never changes the states before it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.act = quick_gelu if config.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor, skip: int = 1) -> torch.Tensor:
        """ids (B, T) token ids -> (B, T, width) context for the UNet's cross-attention. `skip`: "clip skip" as
        A1111 and kohya number it: the states of the skip-th layer from the end (1: the last), final-normed."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers[:len(self.encoder.layers) - (skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)

    def penultimate_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's reading: (B, T, width) states after the last-but-one layer, not normed, and (B, proj) the
        final-normed state at each prompt's end token, projected (unprojected without text_projection)."""
        return self._read(ids)[1:]

    def final_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, width) the last layer's states, final-normed, and the pooled state (Flux reads CLIP-L's)."""
        last, _, pooled = self._read(ids)
        return last, pooled

    def _read(self, ids):
        x = self.embeddings(ids)
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        last = self.final_layer_norm(self.encoder.layers[-1](x))
        # the first end token; configs from before transformers fixed eos_token_id (=2) take the largest id,
        # which is the end token unless the prompt holds an added token: kept, as transformers keeps it
        end = ids.argmax(-1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(-1)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), end]
        return last, x, (self.text_projection(pooled) if self.config.projection_dim else pooled)
