"""The recogniser that measures the demo: a small CNN trained on the toy world's renders (and their VAE
reconstructions), one head per attribute, so a sample's shape, colour, pattern and background can be read off.
"""
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.demo import world
from minidream.demo.architecture import DEMO_DIR
from minidream.models.vae import AutoencoderKL, from_uint8, reparameterize, to_uint8
from minidream.progress import Progress


class Recognizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(96 * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in world.ATTRIBUTES.items()})

    def forward(self, x):
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> list[dict]:
        """(N, H, W, 3) uint8 -> one {attribute: value} per image."""
        x = from_uint8(images_uint8.permute(0, 3, 1, 2))
        logits = self(x)
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: world.ATTRIBUTES[k][idx[k][i]] for k in idx} for i in range(len(x))]


def _degrade(x: torch.Tensor, g: torch.Generator):
    """Blur and noise, so the recogniser also reads the softer images a diffusion model draws."""
    blur = torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.6
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x * (1 - blur) + soft * blur
    return x + torch.randn(x.shape, generator=g) * torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.1


def _labels(toys):
    return {k: torch.tensor([v.index(getattr(t, k)) for t in toys]) for k, v in world.ATTRIBUTES.items()}


def train_recognizer(steps: int = 1500, batch: int = 128, seed: int = 0, vae: AutoencoderKL | None = None):
    """Half of each batch goes through the demo VAE (encode, sample, decode) when one is given, so the
    recogniser also reads the softer images the diffusion model draws, not only clean renders."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Recognizer()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    bar = Progress(steps, "recogniser")
    for step in range(steps):
        toys = [world.random_toy(rng, allow_subject=True, unnamed=True) for _ in range(batch)]
        x = torch.stack([world.to_tensor(world.render(t)) for t in toys])
        if vae is not None:
            with torch.no_grad():
                h = batch // 2
                mean, logvar = vae.encode(x[:h])
                x[:h] = vae.decode(reparameterize(mean, logvar, torch.randn(mean.shape, generator=g))).clamp(-1, 1)
        x = _degrade(x, g)
        out, y = net(x), _labels(toys)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(loss=loss.item())
    net.eval()
    return net, held_out_accuracy(net, seed, vae)


def held_out_accuracy(net: Recognizer, seed: int, vae: AutoencoderKL | None) -> dict:
    """On fresh renders, and on their VAE reconstructions when a VAE is given."""
    acc = {"renders": _accuracy(net, seed + 12345, None)}
    if vae is not None:
        acc["vae_reconstructions"] = _accuracy(net, seed + 12345, vae)
    return acc


@torch.no_grad()
def _accuracy(net: Recognizer, seed: int, vae: AutoencoderKL | None, n: int = 1000) -> dict:
    """Per-attribute accuracy on fresh renders it never saw (or their VAE reconstructions)."""
    rng = random.Random(seed)
    toys = [world.random_toy(rng, allow_subject=True, unnamed=True) for _ in range(n)]
    x = torch.stack([world.to_tensor(world.render(t)) for t in toys])
    if vae is not None:
        x = vae.decode(vae.encode(x)[0])
    imgs = to_uint8(x)
    pred = net.predict(imgs)
    return {k: sum(p[k] == getattr(t, k) for p, t in zip(pred, toys)) / n for k in world.ATTRIBUTES}


def load_recognizer(folder: Path = DEMO_DIR) -> Recognizer:
    from safetensors.torch import load_file
    net = Recognizer()
    net.load_state_dict(load_file(folder / "recognizer.safetensors"))
    return net.eval()
