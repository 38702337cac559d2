"""The Stable Diffusion UNet ε_θ(z_t, t, c) (LDM, Rombach et al. 2022, §3.3), SD 1.x, 2.x and XL.

Top to bottom: timestep embedding → ResnetBlock2D → the spatial transformer (self-attention,
cross-attention on the text context, GEGLU feed-forward) → down / mid / up stages → UNet2DCondition.
Attribute names are the diffusers checkpoint keys, so loading is a straight copy.

SDXL (Podell et al. 2023) is the same network with three changes, all config: a transformer depth per stage
(`depth`, e.g. 1/2/10 blocks; none in the first stage), a 2048-wide context, and "micro-conditioning" (§2.2):
the pooled text embedding and six size numbers (original size, crop top-left, target size), each number
Fourier-embedded like the timestep, go through `add_embedding` and are added to the time embedding.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minidream.models.attention import Attention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention: tuple[bool, ...] = (True, True, True, False)  # which down stages (mirrored up) have transformers
    heads: tuple[int, ...] = (8, 8, 8, 8)  # SD 1.x: 8 heads everywhere; SD 2.x: 64-wide heads
    layers_per_block: int = 2
    context_dim: int = 768
    linear_proj: bool = False  # SD 2.x projects into the transformer with Linear, SD 1.x with 1x1 conv
    groups: int = 32
    sample_size: int = 64  # latent side the model was trained at (512 px / 8)
    depth: tuple[int, ...] | None = None  # transformer blocks per stage (None: one each, SD 1.x/2.x)
    add_time_dim: int | None = None  # SDXL: width of each size number's Fourier embedding (256)
    add_in_dim: int | None = None  # SDXL: add_embedding's input, pooled text + 6 x add_time_dim (2816)

    def depth_at(self, stage: int) -> int:
        return self.depth[stage] if self.depth else 1


PRESETS = {
    "sd15": UNetConfig(),
    "sd21": UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=96),
    "sd21-base": UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=64),
    "sdxl": UNetConfig(channels=(320, 640, 1280), attention=(False, True, True), heads=(5, 10, 20), context_dim=2048,
                       linear_proj=True, sample_size=128, depth=(1, 2, 10), add_time_dim=256, add_in_dim=2816),
    "tiny": UNetConfig(channels=(32, 64), attention=(False, True), heads=(2, 4), context_dim=32,
                       groups=8, sample_size=8),
    # SDXL's layout at test size: no attention in the first stage, two transformer blocks in the last
    "tiny-xl": UNetConfig(channels=(32, 64, 64), attention=(False, True, True), heads=(2, 2, 4), context_dim=80,
                          linear_proj=True, groups=8, sample_size=8, depth=(1, 1, 2), add_time_dim=8, add_in_dim=80),
}


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of the diffusion step (Transformer positional encoding), cos first
    as SD was trained (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (temb_channels=None: the
    VAE's blocks, which have no time)."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, cout) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class GEGLU(nn.Module):
    # Gated GELU (Shazeer 2020): half of the projection gates the other half.
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # the Dropout does nothing (p = 0, as SD trained); it holds index 1 so the output layer is `ff.net.2`, the
        # checkpoint's key
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)  # self-attention over the image tokens
        self.norm2 = nn.LayerNorm(dim)
        # cross-attention: queries from the image, keys and values from the text
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The spatial transformer: flatten the feature map into H*W tokens, run the block, fold back."""

    def __init__(self, dim: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.linear_proj = config.linear_proj
        self.norm = nn.GroupNorm(config.groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if config.linear_proj else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads, config.context_dim)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim) if config.linear_proj else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_proj:
            h = self.proj_out(h)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        # nearest-neighbour upsampling, in the input's dtype: torch >= 2.6 has fp16 and bf16 'nearest' on the CPU and
        # CUDA (diffusers still round-trips bf16 through fp32 for older torch; a copy either way, so the same values)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run(module, *args, ckpt: bool = False):
    """Call module(*args), recomputing its activations in backward when gradient checkpointing is on."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, stage: int, downsample: bool, config: UNetConfig):
        super().__init__()
        n, heads, attn = config.layers_per_block, config.heads[stage], config.attention[stage]
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, temb, config.groups)
                                     for i in range(n))
        self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, config.depth_at(stage), config)
                                        for _ in range(n) if attn)
        self.downsamplers = nn.ModuleList([Downsample2D(cout)] if downsample else [])
        self.gradient_checkpointing = False

    def forward(self, h, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage's output, and each layer's output for the up path's skip connections. (Returned, not appended
        to a list the caller passes: a wrapped module (FSDP) may be handed a copy of its arguments.)"""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = run(resnet, h, temb, ckpt=self.gradient_checkpointing)
            if self.attentions:
                h = run(self.attentions[i], h, context, ckpt=self.gradient_checkpointing)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, skip_channels: list[int], temb: int, stage: int, upsample: bool,
                 config: UNetConfig):
        super().__init__()
        ins = [cin] + [cout] * (len(skip_channels) - 1)
        heads, attn = config.heads[stage], config.attention[stage]  # `stage`: the down stage this one mirrors
        self.resnets = nn.ModuleList(ResnetBlock2D(c + s, cout, temb, config.groups)
                                     for c, s in zip(ins, skip_channels))
        self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, config.depth_at(stage), config)
                                        for _ in skip_channels if attn)
        self.upsamplers = nn.ModuleList([Upsample2D(cout)] if upsample else [])
        self.gradient_checkpointing = False

    def forward(self, h, temb, context, skips: list):
        """`skips`: one down-path output per resnet, the deepest first."""
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips[i]], dim=1)  # the U's skip connection from the matching down stage
            h = run(resnet, h, temb, ckpt=self.gradient_checkpointing)
            if self.attentions:
                h = run(self.attentions[i], h, context, ckpt=self.gradient_checkpointing)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb: int, config: UNetConfig):
        super().__init__()
        last = len(config.channels) - 1  # the middle has the deepest stage's heads and transformer depth
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, config.groups),
                                      ResnetBlock2D(ch, ch, temb, config.groups)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, config.heads[last], config.depth_at(last), config)])
        self.gradient_checkpointing = False

    def forward(self, h, temb, context):
        h = run(self.resnets[0], h, temb, ckpt=self.gradient_checkpointing)
        h = run(self.attentions[0], h, context, ckpt=self.gradient_checkpointing)
        return run(self.resnets[1], h, temb, ckpt=self.gradient_checkpointing)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, n = config.channels, len(config.channels)
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if config.add_time_dim:  # SDXL micro-conditioning: [pooled text, Fourier(size ids)] -> added to the time emb.
            self.add_embedding = TimestepEmbedding(config.add_in_dim, temb)

        # Down: every resnet and downsampler output is kept as a skip for the up path.
        skips, cin = [ch[0]], ch[0]
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            last = i == n - 1
            self.down_blocks.append(DownBlock(cin, cout, temb, i, not last, config))
            skips += [cout] * (config.layers_per_block + (0 if last else 1))
            cin = cout
        self.mid_block = MidBlock(ch[-1], temb, config)

        # Up: mirror image; each stage takes layers_per_block + 1 skips, last in first out.
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(reversed(ch)):
            j = n - 1 - i  # the down stage this one mirrors
            take = [skips.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(cin, cout, take, temb, j, i < n - 1, config))
            cin = cout

        self.conv_norm_out = nn.GroupNorm(config.groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    @property
    def downsampling(self) -> int:
        """Latent cells per cell of the deepest stage: image sides must be multiples of it (times the VAE's)."""
        return 2 ** (len(self.config.channels) - 1)

    def blocks(self) -> dict[str, tuple[str, nn.Module]]:
        """The stages in the order they run, by the names --lora-blocks takes (down.N, mid, up.N), each with its
        module-name prefix: what gradient checkpointing, FSDP's sharding and --lora-blocks work block by block."""
        return {**{f"down.{i}": (f"down_blocks.{i}.", b) for i, b in enumerate(self.down_blocks)},
                "mid": ("mid_block.", self.mid_block),
                **{f"up.{i}": (f"up_blocks.{i}.", b) for i, b in enumerate(self.up_blocks)}}

    def set_gradient_checkpointing(self, on: bool = True):
        for _, block in self.blocks().values():
            block.gradient_checkpointing = on
        return self

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        """x (B, 4, H, W) noisy latents, t (B,) or scalar timesteps, context (B, 77, Cc) -> (B, 4, H, W).
        SDXL also takes text_embeds (B, 1280), the pooled text, and time_ids (B, 6), the sizes."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        temb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))
        if self.config.add_time_dim:
            sizes = timestep_embedding(time_ids.reshape(-1), self.config.add_time_dim).reshape(B, -1)
            temb = temb + self.add_embedding(torch.cat([text_embeds, sizes.to(text_embeds.dtype)], dim=-1).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, temb, context)
            skips += outputs
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:  # last in, first out
            h = block(h, temb, context, [skips.pop() for _ in block.resnets])
        return self.conv_out(F.silu(self.conv_norm_out(h)))
