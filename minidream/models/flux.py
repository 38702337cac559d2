"""The Flux.1 denoiser (Black Forest Labs 2024): SD3's MMDiT grown up, with rotary positions and a second kind of
block.

Top to bottom: 2×2 latent packing → rotary position embedding over (t, h, w) → the conditioning vector (timestep +
pooled CLIP text, + the distilled guidance scale for [dev]) → the double-stream block (two streams, one attention,
as SD3's joint block) → the single-stream block (one stream over [text; image], attention and MLP side by side in
one fused input projection) → the model. Attribute names are the diffusers checkpoint keys
(`FluxTransformer2DModel`); formats/flux_layout.py maps Black Forest Labs' own (`double_blocks.N.img_attn.qkv`).

The differences from SD3 (models/mmdit.py), each a config or a module:
- Positions are not added to the tokens but rotated into the queries and keys (RoPE, Su et al. 2021): each token has
  an id (t, h, w) — image tokens (0, row, column), text tokens (0, 0, 0) — and the 128 channels of a head are split
  16/56/56 between the three axes.
- The image is packed: a 2×2 patch of 16 latent channels is one token of 64 features, with no convolution.
- Every attention has RMS qk-norm; the text stream attends first ([text; image]).
- After 19 double-stream blocks, 38 single-stream blocks run one set of weights over the joined sequence, with the
  attention and the MLP in parallel (Dehghani et al. 2023's parallel layers): `linear1` computes Q, K, V and the MLP's
  input at once, `linear2` maps both back.
- [dev] is guidance-distilled: the CFG scale is an input (`guidance_embedder`), and one pass draws a guided image.
  [schnell] is timestep-distilled (4 steps) and has no guidance input.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.models.attention import Attention, RMSNorm, attention
from minidream.models.mmdit import AdaNormContinuous, AdaNormZero, FeedForward, modulate
from minidream.models.unet import TimestepEmbedding, run, timestep_embedding


@dataclass(frozen=True)
class FluxConfig:
    # field names are diffusers' config.json keys
    patch_size: int = 1  # on the packed latent: one token per packed cell
    in_channels: int = 64  # 16 latent channels x a 2x2 patch
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL's width
    pooled_projection_dim: int = 768  # CLIP-L's pooled width
    guidance_embeds: bool = False  # [dev]: the guidance scale is an input
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # a head's channels per position axis (t, h, w)
    sample_size: int = 128  # the latent side of its default 1024 px image (FluxPipeline's; not in its config.json)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


PRESETS = {
    "flux-dev": FluxConfig(guidance_embeds=True),
    "flux-schnell": FluxConfig(),
    # the layout at test size
    "tiny-flux": FluxConfig(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6), sample_size=16),
}


# ---------------------------------------------------------------------------------------------
# Packing and positions

def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, HW/4, 4C) tokens: each 2×2 patch one token, features ordered (c, row, column)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of `pack`: (B, HW/4, 4C) -> (B, C, H, W)."""
    B, _, D = x.shape
    x = x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, H, W)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(hw, 3) position ids of the packed image's tokens, row-major: (0, row, column)."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def rope(ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, Σ axes) for position ids (S, n_axes): per axis, the frequencies θ^(-2i/d) of RoPE (Su et al.
    2021, eq. 15) times that coordinate, each repeated for the pair of channels it rotates (computed in float64)."""
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(ids[:, i].float().double(), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) with each channel pair (x₁, x₂) rotated by its angle: (x₁ cos - x₂ sin, x₂ cos + x₁ sin)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings

class TimeTextEmbed(nn.Module):
    """The conditioning vector: MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled CLIP-L)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, config.width)
        if config.guidance_embeds:
            self.guidance_embedder = TimestepEmbedding(256, config.width)
        self.text_embedder = TimestepEmbedding(config.pooled_projection_dim, config.width)

    def forward(self, t, guidance, pooled):
        y = self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype))
        if hasattr(self, "guidance_embedder"):
            y = y + self.guidance_embedder(timestep_embedding(guidance, 256).to(pooled.dtype))
        return y + self.text_embedder(pooled)


# ---------------------------------------------------------------------------------------------
# The blocks

class FluxAttention(Attention):
    """Attention with RMS qk-norm and rotary positions. Joint (the double block): the text's own projections
    (add_q/k/v_proj, to_add_out) and one attention over [text; image]. Pre-only (the single block): Q, K, V and no
    output projection (the block's linear2 is it)."""

    def __init__(self, width: int, heads: int, joint: bool):
        super().__init__(width, heads, qkv_bias=True)
        head_dim = width // heads
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(width, width) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_add_out = nn.Linear(width, width)
        else:
            del self.to_out

    def heads_of(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (proj_q, proj_k, proj_v))  # (B, nh, N, d)
        return norm_q(q), norm_k(k), v

    def forward(self, x, rotary, context=None):
        """x (B, N, C), context (B, M, C) or None, rotary: cos, sin (M + N, d) -> attention over [context; x]."""
        q, k, v = self.heads_of(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        M = 0
        if context is not None:
            M = context.shape[1]
            cq, ck, cv = self.heads_of(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                       self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        y = attention(q, k, v, self.backend).transpose(1, 2).flatten(2)  # (B, M + N, C)
        if context is None:
            return y
        return self.to_out[0](y[:, M:]), self.to_add_out(y[:, :M])


def fp16_clip(x):
    """fp16 activations past its range become inf; the reference clips them (as diffusers does)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """The double-stream block: SD3's joint block with rotary positions and qk-norm (models/mmdit.py)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        C = config.width
        self.norm1, self.norm1_context = AdaNormZero(C), AdaNormZero(C)
        self.attn = FluxAttention(C, config.num_attention_heads, joint=True)
        self.norm2 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(C)
        self.norm2_context = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(C)
        self.gradient_checkpointing = False

    def forward(self, x, context, y, cos, sin):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(y)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(y)
        image, text = self.attn(modulate(self.norm1.norm, x, shift, scale), (cos, sin),
                                modulate(self.norm1_context.norm, context, c_shift, c_scale))
        x = x + gate * image
        x = x + gate_mlp * self.ff(modulate(self.norm2, x, shift_mlp, scale_mlp))
        context = context + c_gate * text
        context = context + c_gate_mlp * self.ff_context(modulate(self.norm2_context, context, c_shift_mlp,
                                                                  c_scale_mlp))
        return x, fp16_clip(context)


class FluxSingleTransformerBlock(nn.Module):
    """The single-stream block over [text; image]: one modulation (shift, scale, gate), then attention and a GELU
    MLP side by side on the same normed input, their outputs joined and projected by proj_out (BFL's linear2; Q, K,
    V and proj_mlp are its linear1)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        C = config.width
        self.norm = AdaNormZero(C, 3)
        self.proj_mlp = nn.Linear(C, 4 * C)
        self.attn = FluxAttention(C, config.num_attention_heads, joint=False)
        self.proj_out = nn.Linear(C + 4 * C, C)
        self.gradient_checkpointing = False

    def forward(self, x, context, y, cos, sin):
        M = context.shape[1]
        h = torch.cat([context, x], dim=1)
        shift, scale, gate = self.norm(y)
        normed = modulate(self.norm.norm, h, shift, scale)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        h = fp16_clip(h + gate * self.proj_out(torch.cat([self.attn(normed, (cos, sin)), mlp], dim=2)))
        return h[:, M:], h[:, :M]


# ---------------------------------------------------------------------------------------------
# The model

class FluxTransformer2DModel(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        C = config.width
        self.time_text_embed = TimeTextEmbed(config)
        self.context_embedder = nn.Linear(config.joint_attention_dim, C)
        self.x_embedder = nn.Linear(config.in_channels, C)
        self.transformer_blocks = nn.ModuleList(FluxTransformerBlock(config) for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleTransformerBlock(config)
                                                       for _ in range(config.num_single_layers))
        self.norm_out = AdaNormContinuous(C)
        self.proj_out = nn.Linear(C, config.patch_size ** 2 * (config.out_channels or config.in_channels))

    @property
    def downsampling(self) -> int:
        """Latent cells per token side: the 2x2 packing."""
        return 2

    def blocks(self) -> dict[str, tuple[str, nn.Module]]:
        """The blocks in the order they run, by the names --lora-blocks takes (double.0, …, single.0, …), each with
        its module-name prefix: what gradient checkpointing, FSDP's sharding and --lora-blocks work block by block."""
        double = {f"double.{i}": (f"transformer_blocks.{i}.", b) for i, b in enumerate(self.transformer_blocks)}
        single = {f"single.{i}": (f"single_transformer_blocks.{i}.", b)
                  for i, b in enumerate(self.single_transformer_blocks)}
        return {**double, **single}

    def set_gradient_checkpointing(self, on: bool = True):
        for _, block in self.blocks().values():
            block.gradient_checkpointing = on
        return self

    def forward(self, x, t, context, pooled, guidance=None):
        """x (B, C, H, W) noisy latents (C = in_channels / 4), t (B,) or scalar timesteps (σ·1000), context (B, M,
        4096) T5's states, pooled (B, 768) CLIP-L's pooled embedding, guidance (B,) the CFG scale ([dev]) -> the
        velocity (B, C, H, W)."""
        B, _, H, W = x.shape
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("Flux.1 [dev] takes the guidance scale as an input: pass guidance")
        h, context = self.x_embedder(pack(x)), self.context_embedder(context)
        # t and the guidance rounded as the reference rounds them (the embedding's fast sinusoids see the rounding):
        # the timestep to the latents' dtype (the pipeline), then σ = t/1000 to the hidden states' (the transformer)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B).to(x.dtype)
        t = (t / 1000).to(h.dtype) * 1000
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(B).to(h.dtype) * 1000
        y = self.time_text_embed(t, guidance, pooled)
        ids = torch.cat([torch.zeros(context.shape[1], 3, device=x.device), image_ids(H // 2, W // 2, x.device)])
        cos, sin = rope(ids.to(x.dtype), self.config.axes_dims_rope)
        for _, block in self.blocks().values():
            h, context = run(block, h, context, y, cos, sin, ckpt=block.gradient_checkpointing)
        return unpack(self.proj_out(self.norm_out(h, y)), H, W)
