"""The Stable Diffusion 3 / 3.5 denoiser: the multimodal diffusion transformer (MMDiT, Esser et al. 2024, §4).

Top to bottom: patch embedding with a cropped 2-D sin-cos position table → the conditioning vector (timestep +
pooled text) → adaLN-Zero modulation → the joint block (two streams, one attention over image and text tokens) →
MMDiT. Attribute names are the diffusers checkpoint keys (`SD3Transformer2DModel`), so loading is a straight copy.

The image (B, 16, H, W) is cut into 2×2 patches, N = HW/4 tokens; the text is the T5 + CLIP sequence (B, M, 4096)
projected to the model width. Each block keeps a separate set of weights per stream (§4.1: "the two modalities
have different weights") but runs one attention over the N + M tokens, so text and image attend to each other.

The three released variants differ in config only:
- SD3 Medium: 24 blocks of width 1536.
- SD3.5 Large: 38 blocks of width 2432, with RMS-normed queries and keys (qk-norm, §5.3.2: it keeps the attention
  logits from growing in mixed precision at this size).
- SD3.5 Medium ("MMDiT-X"): SD3 Medium's size with qk-norm, and in its first 13 blocks a second, image-only
  self-attention (`attn2`) beside the joint one.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.models.attention import Attention, RMSNorm, attention
from minidream.models.unet import TimestepEmbedding, run, timestep_embedding


@dataclass(frozen=True)
class MMDiTConfig:
    # field names are diffusers' config.json keys
    sample_size: int = 128  # latent side the model was trained at (1024 px / 8)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # the text sequence's width (T5 XXL's; the CLIP states are zero-padded to it)
    caption_projection_dim: int = 1536  # = the model width, heads x head dim
    pooled_projection_dim: int = 2048  # CLIP-L's and CLIP-G's pooled embeddings side by side (768 + 1280)
    pos_embed_max_size: int = 192  # the position table's side, in patches: the largest image is this x 16 px
    # SD3.5 Medium: the blocks with the image-only attn2 (block indices)
    dual_attention_layers: tuple[int, ...] = field(default=(), metadata={"indices": True})
    qk_norm: str | None = None  # "rms_norm" (SD3.5)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


PRESETS = {
    "sd3-medium": MMDiTConfig(),
    "sd35-medium": MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35-large": MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                              qk_norm="rms_norm"),
    # each variant's layout at test size
    "tiny-sd3": MMDiTConfig(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                            pos_embed_max_size=24, in_channels=4, out_channels=4),
}


# ---------------------------------------------------------------------------------------------
# Embeddings

def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] at frequencies 1/10000^(2i/dim) (Vaswani et al. 2017, §3.5)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, side: int, base: int) -> torch.Tensor:
    """The (side², dim) position table: half the channels encode the row, half the column, positions scaled so
    `base` patches span `base` units (what SD3 was trained with: base = sample_size / patch_size)."""
    coords = torch.arange(side, dtype=torch.float32) / (side / base)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) latents -> (B, HW/p², width) patch tokens plus their positions. The position table is stored
    (a buffer in the checkpoint) for a pos_embed_max_size² grid; an image takes its centre crop (SD3's way of
    serving every aspect ratio with one table)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        p, side = config.patch_size, config.pos_embed_max_size
        self.patch_size, self.max_size = p, side
        self.proj = nn.Conv2d(config.in_channels, config.width, kernel_size=p, stride=p)
        table = sincos_2d(config.width, side, config.sample_size // p)
        self.register_buffer("pos_embed", table.unsqueeze(0))  # (1, side², width)

    def cropped(self, h: int, w: int) -> torch.Tensor:
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"the image is {h}x{w} patches; this model's position table holds at most "
                             f"{self.max_size} a side")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        grid = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, hw, width), row-major patches
        return x + self.cropped(h, w).to(x.dtype)


class TimeTextEmbed(nn.Module):
    """The conditioning vector y (§4: "timestep and pooled text"), added: MLP(sinusoid(t)) + MLP(pooled), each MLP
    linear → SiLU → linear (diffusers names the pooled one PixArtAlphaTextProjection; it is the UNet's
    TimestepEmbedding)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, config.width)
        self.text_embedder = TimestepEmbedding(config.pooled_projection_dim, config.width)

    def forward(self, t, pooled):
        return self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype)) + self.text_embedder(pooled)


# ---------------------------------------------------------------------------------------------
# The block

class AdaNormZero(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023, DiT §3.2): y regresses a shift, scale and gate per sub-layer; `n` sets of
    them (6: attention + MLP; 9: MMDiT-X's second attention too). The norm itself has no weights."""

    def __init__(self, width: int, n: int = 6):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(width, n * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, y) -> tuple[torch.Tensor, ...]:
        """y (B, C) -> n tensors (B, 1, C): (shift, scale, gate) for the attention, then for the MLP, …"""
        return self.linear(F.silu(y)).unsqueeze(1).chunk(self.n, dim=-1)


class AdaNormContinuous(nn.Module):
    """The last text stream's and the output's modulation: only a scale and a shift (diffusers' order)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x, y):
        scale, shift = self.linear(F.silu(y).to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def modulate(norm: nn.LayerNorm, x, shift, scale):
    return norm(x) * (1 + scale) + shift


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # index 1 is a no-op Dropout, kept so the output layer is `ff.net.2`, the checkpoint's key
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class JointAttention(Attention):
    """One attention over [image; text] (§4.1, Fig. 2b): each stream has its own Q/K/V (image: to_q/k/v; text:
    add_q/k/v_proj) and its own output (to_out.0; to_add_out, absent in the last block, whose text is not read).
    Without text it is plain self-attention (MMDiT-X's attn2). qk-norm: RMSNorm per head on queries and keys."""

    def __init__(self, width: int, heads: int, qk_norm: str | None, joint: bool, text_out: bool = True):
        super().__init__(width, heads, qkv_bias=True)
        head_dim = width // heads
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(width, width) for _ in range(3))
            if qk_norm:
                self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            if text_out:
                self.to_add_out = nn.Linear(width, width)

    def heads_of(self, x, proj_q, proj_k, proj_v, norm_q: str, norm_k: str):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (proj_q, proj_k, proj_v))  # (B, nh, N, d)
        if hasattr(self, norm_q):
            q, k = getattr(self, norm_q)(q), getattr(self, norm_k)(k)
        return q, k, v

    def forward(self, x, context=None):
        """x (B, N, C) image tokens, context (B, M, C) text tokens -> (B, N, C), (B, M, C) or None."""
        B, N, C = x.shape
        q, k, v = self.heads_of(x, self.to_q, self.to_k, self.to_v, "norm_q", "norm_k")
        if context is not None:
            cq, ck, cv = self.heads_of(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                       "norm_added_q", "norm_added_k")
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        y = attention(q, k, v, self.backend).transpose(1, 2).reshape(B, -1, C)  # (B, N + M, C)
        image = self.to_out[0](y[:, :N])
        if context is None:
            return image
        return image, (self.to_add_out(y[:, N:]) if hasattr(self, "to_add_out") else None)


class JointTransformerBlock(nn.Module):
    """One MMDiT block (Fig. 2b): both streams modulated by y, one joint attention, a gated residual and a
    gated MLP per stream. The last block only lets the text inform the image (`context_pre_only`)."""

    def __init__(self, config: MMDiTConfig, index: int):
        super().__init__()
        C, heads = config.width, config.num_attention_heads
        self.dual = index in config.dual_attention_layers
        self.context_pre_only = index == config.num_layers - 1
        self.norm1 = AdaNormZero(C, 9 if self.dual else 6)
        self.norm1_context = AdaNormContinuous(C) if self.context_pre_only else AdaNormZero(C)
        self.attn = JointAttention(C, heads, config.qk_norm, joint=True, text_out=not self.context_pre_only)
        if self.dual:
            self.attn2 = JointAttention(C, heads, config.qk_norm, joint=False)
        self.norm2 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(C)
        if not self.context_pre_only:
            self.norm2_context = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(C)
        self.gradient_checkpointing = False

    def forward(self, x, context, y):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(y)
        h = self.norm1.norm(x)
        if self.context_pre_only:
            c_in = self.norm1_context(context, y)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(y)
            c_in = modulate(self.norm1_context.norm, context, c_shift, c_scale)
        image, text = self.attn(h * (1 + scale) + shift, c_in)
        x = x + gate * image
        if self.dual:  # MMDiT-X: image-only self-attention on the same normed input, with its own modulation
            shift2, scale2, gate2 = second
            x = x + gate2 * self.attn2(h * (1 + scale2) + shift2)
        x = x + gate_mlp * self.ff(modulate(self.norm2, x, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate * text
        context = context + c_gate_mlp * self.ff_context(modulate(self.norm2_context, context, c_shift_mlp,
                                                                  c_scale_mlp))
        return x, context


# ---------------------------------------------------------------------------------------------
# The model

class SD3Transformer2DModel(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        C = config.width
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbed(config)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(JointTransformerBlock(config, i) for i in range(config.num_layers))
        self.norm_out = AdaNormContinuous(C)
        self.proj_out = nn.Linear(C, config.patch_size ** 2 * config.out_channels)

    @property
    def downsampling(self) -> int:
        """Latent cells per token side: image sides must be multiples of it (times the VAE's)."""
        return self.config.patch_size

    @property
    def max_latent_side(self) -> int:
        """The largest latent side the position table covers (the MMDiT crops it; it cannot extend it)."""
        return self.config.pos_embed_max_size * self.config.patch_size

    def blocks(self) -> dict[str, tuple[str, nn.Module]]:
        """The blocks in the order they run, by the names --lora-blocks takes (0, 1, …), each with its module-name
        prefix: what gradient checkpointing, FSDP's sharding and --lora-blocks work block by block."""
        return {str(i): (f"transformer_blocks.{i}.", b) for i, b in enumerate(self.transformer_blocks)}

    def set_gradient_checkpointing(self, on: bool = True):
        for block in self.transformer_blocks:
            block.gradient_checkpointing = on
        return self

    def forward(self, x, t, context, pooled):
        """x (B, 16, H, W) noisy latents, t (B,) or scalar timesteps (σ·1000), context (B, M, 4096) the text
        sequence, pooled (B, 2048) the pooled CLIP embeddings -> the velocity (B, 16, H, W)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        y = self.time_text_embed(t, pooled)
        h, context = self.pos_embed(x), self.context_embedder(context)
        for block in self.transformer_blocks:
            h, context = run(block, h, context, y, ckpt=block.gradient_checkpointing)
        h = self.proj_out(self.norm_out(h, y))  # (B, hw, p·p·C)
        h = h.reshape(B, H // p, W // p, p, p, -1)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(B, -1, H, W)  # patches back to pixels of the latent
