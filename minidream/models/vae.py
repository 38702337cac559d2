"""AutoencoderKL: the VAE that moves images (B, 3, 512, 512) in [-1, 1] to latents (B, 4, 64, 64) and back.

The encoder predicts a diagonal Gaussian q(z|x) (mean, log-variance); SD diffuses in
z * scaling_factor (0.18215; SDXL's VAE 0.13025), which scales the latents to roughly unit variance (LDM §4.3.2).
Names follow the diffusers checkpoint keys.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.models.attention import Attention
from minidream.models.unet import ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512
    # SDXL's VAE overflows fp16 activations: decode in fp32 when the weights are fp16 (diffusers' force_upcast)
    force_upcast: bool = True
    # SD3's 16-channel VAE: latents are (z - shift_factor) * scaling_factor (centred, then scaled to unit variance),
    # and it has no 1x1 convolutions around the latent space
    shift_factor: float = field(default=0.0, metadata={"signed": True})
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True


PRESETS = {
    "sd15": VAEConfig(),
    "sd21": VAEConfig(sample_size=768),
    "sd21-base": VAEConfig(),
    "sdxl": VAEConfig(scaling_factor=0.13025, sample_size=1024),
    "tiny": VAEConfig(channels=(32, 64), layers_per_block=1, groups=8, sample_size=32),
    "tiny-xl": VAEConfig(channels=(32, 64), layers_per_block=1, groups=8, scaling_factor=0.13025, sample_size=32),
    "sd3": VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
                     use_quant_conv=False, use_post_quant_conv=False),
    "flux": VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024,
                      use_quant_conv=False, use_post_quant_conv=False),
}


class VAEAttention(Attention):
    """Single-head self-attention over all pixels of the 1/8 feature map, with its own GroupNorm."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6),
                                      ResnetBlock2D(ch, ch, None, groups, 1e-6)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding (right and bottom only), as the original LDM autoencoder was trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Stage(nn.Module):
    """A run of resnets, then an optional down- or upsampler (key names as diffusers writes them)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, 1e-6) for i in range(n))
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for m in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, n = config.channels, len(config.channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], config.layers_per_block, config.groups, down=i < n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], config.groups)
        self.conv_norm_out = nn.GroupNorm(config.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, n = config.channels[::-1], len(config.channels)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], config.groups)
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, config.groups, up=i < n - 1) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(config.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], config.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(L, L, 1) if config.use_post_quant_conv else nn.Identity()

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> mean, logvar of q(z|x), each (B, 4, H/8, W/8)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def sample(self, x, generator=None):
        """A draw z ~ q(z|x), already multiplied by the scaling factor: what the UNet is trained on."""
        mean, logvar = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.latents(mean, logvar, eps)

    def latents(self, mean, logvar, eps):
        """The denoiser's latents for a given noise draw eps: z ~ q(z|x), shifted and scaled."""
        return (reparameterize(mean, logvar, eps) - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, z):
        """z (B, 4, h, w) unscaled latents -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_latents(self, latents):
        """The denoiser's (shifted, scaled) latents -> images in about [-1, 1]."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)


def reparameterize(mean, logvar, eps):
    """z = μ + σ·ε with σ = exp(½·log σ²): a draw of the diagonal Gaussian q(z|x) (Kingma & Welling 2014, eq. 10)."""
    return mean + torch.exp(0.5 * logvar) * eps


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> the VAE's input range [-1, 1]."""
    return x.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The VAE's output (B, 3, H, W), about [-1, 1] -> (B, H, W, 3) uint8 pixels on the CPU."""
    x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()
    return (x * 255).round().to(torch.uint8)
