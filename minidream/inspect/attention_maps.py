"""Where each prompt token looks: the UNet's cross-attention probabilities softmax(QKᵀ/√d) of every text token,
averaged over heads, layers and sampling steps and upsampled to the image, as DAAM (Tang et al. 2023) and
prompt-to-prompt (Hertz et al. 2022) read them.

`capture_cross_attention` is a transform: it puts forward hooks on every cross-attention layer (`attn2`) of a
UNet and returns their handles; the model code knows nothing of it. The hooks recompute Q and K from the
layer's own inputs, so any attention backend (SDPA, Triton) samples unchanged.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from minidream import plots
from minidream.formats.files import write_text
from minidream.image_files import save_image, save_png
from minidream.models.attention import Attention
from minidream.sampling.pipeline import SamplingParams, generate


class CrossAttentionStore:
    """Running sum of cross-attention maps (B, 77, h, w) at the latent resolution, over layers and steps."""

    def __init__(self, batch: int, latent_hw: tuple[int, int]):
        self.batch, self.hw, self.total, self.calls = batch, latent_hw, None, 0

    def add(self, probs: torch.Tensor):
        """probs (B', N, M), averaged over heads; the last `batch` rows are the conditional branch of CFG."""
        probs = probs[-self.batch:]
        H, W = self.hw
        f = round((H * W / probs.shape[1]) ** 0.5)  # this layer's downsampling from the latent
        m = probs.transpose(1, 2).reshape(self.batch, -1, H // f, W // f)
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        self.total = m if self.total is None else self.total + m
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.total / max(self.calls, 1)


def capture_cross_attention(unet: torch.nn.Module, store: CrossAttentionStore) -> list:
    """Hook every cross-attention layer of `unet` to add its probabilities to `store`; returns the handles
    (call .remove() on each to undo)."""
    def hook(attn: Attention, args, output):
        x, context = args[0], args[1]
        B, N, _ = x.shape
        q = attn.to_q(x).float().view(B, N, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(context).float().view(B, context.shape[1], attn.heads, -1).transpose(1, 2)
        store.add(((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1).mean(1))
    return [m.register_forward_hook(hook) for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.endswith("attn2")]


@torch.no_grad()
def attention_maps(model, prompts: list[str], params: SamplingParams = SamplingParams(steps=20), seed: int = 0):
    """(images (B, H, W, 3) uint8, maps (B, 77, H, W) float: each token's mean attention probability)."""
    if model.family.denoiser != "unet":  # the hooks read the UNet's cross-attention (attn2)
        raise ValueError(f"attention maps read the UNet's cross-attention; {model.family.title}'s joint attention "
                         f"is not captured yet")
    height, width = params.height or model.native_resolution, params.width or model.native_resolution
    s = model.latent_scale
    store = CrossAttentionStore(len(prompts), (height // s, width // s))
    images = sample_captured(model, prompts, params, seed, store)
    maps = F.interpolate(store.mean(), size=(height, width), mode="bilinear", align_corners=False)
    return images, maps


@torch.no_grad()
def sample_captured(model, prompts: list[str], params: SamplingParams, seed: int, store) -> torch.Tensor:
    """The images of `prompts`, sampled with every cross-attention layer reporting to `store` (its add(probs))."""
    handles = capture_cross_attention(model.denoiser, store)
    try:
        return generate(model, prompts, params, generator=torch.Generator("cpu").manual_seed(seed), progress=False)
    finally:
        for h in handles:
            h.remove()


def token_positions(tokenizer, prompt: str) -> list[tuple[int, str]]:
    """(position in the 77, token text) of each prompt token (the start token is position 0)."""
    ids = tokenizer.encode(prompt)[: tokenizer.max_length - 2]
    names = {v: k for k, v in {**tokenizer.vocab, **tokenizer.added}.items()}
    return [(i + 1, names.get(t, str(t)).replace("</w>", "")) for i, t in enumerate(ids)]


def localisation(token_map: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the token's attention mass on the masked pixels over the mask's share of the image:
    1.0 = no localisation, > 1 = the token looks at the masked region."""
    share = mask.float().mean().item()
    return (token_map[mask].sum() / token_map.sum()).item() / share if 0 < share < 1 else float("nan")


def write_maps(image: torch.Tensor, maps: torch.Tensor, tokens: list[tuple[int, str]], out: Path, meta: dict):
    """out/maps.png (the image, then one overlay per token, labelled), out/maps/NN-token.png (each map in grey,
    scaled to its maximum) and out/maps.json."""
    from PIL import Image, ImageDraw
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    zoom = max(1, 128 // image.shape[0])  # a 32 px demo image is too small to read
    big = lambda t: t.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)  # noqa: E731
    tiles, rows = [Image.fromarray(big(image).numpy())], []
    labels = ["image"]
    for pos, text in tokens:
        m = maps[pos] / maps[pos].max().clamp_min(1e-12)
        f = out / "maps" / f"{pos:02d}-{''.join(c if c.isalnum() else '_' for c in text)}.png"
        save_png(big((m * 255).round().to(torch.uint8))[..., None].expand(-1, -1, 3).contiguous(), f)
        tiles.append(plots.overlay(big(image), big(m)))
        labels.append(text)
        rows.append({"index": pos, "text": text, "file": str(f.relative_to(out)),
                     "mass": maps[pos].mean().item()})
    w, h = tiles[0].size
    sheet = Image.new("RGB", ((w + 4) * len(tiles) + 4, h + 20), "white")
    d = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        sheet.paste(tile, (4 + i * (w + 4), 4))
        d.text((4 + i * (w + 4), h + 6), label[: w // 6], fill=plots.INK, font=plots.FONT)
    save_image(sheet, out / "maps.png")
    write_text(out / "maps.json", json.dumps({**meta, "tokens": rows}, indent=1))
    return [out / "maps.png", out / "maps.json"]


SHEET_LABEL = 190  # px left of attention_sheet's tiles, for each row's name


def attention_sheet(rows: list, path: Path, zoom: int = 3):
    """A row per (label, images (n, H, W, 3), one word's maps (n, H, W)): each sample, then its map laid over it,
    scaled to that map's own maximum (the picture shows where a word looks; how much is localisation's number)."""
    from PIL import Image, ImageDraw
    tiles = []
    for name, images, maps in rows:
        row = []
        for image, m in zip(images, maps):
            big = image.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
            heat = F.interpolate(m[None, None].float(), scale_factor=zoom, mode="bilinear")[0, 0]
            row += [Image.fromarray(big.numpy()), plots.overlay(big, heat / heat.max().clamp_min(1e-12))]
        tiles.append((name, row))
    (w, h), label = tiles[0][1][0].size, SHEET_LABEL
    sheet = Image.new("RGB", (label + len(tiles[0][1]) * (w + 2), len(tiles) * (h + 4) + 4), "white")
    d = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(tiles):
        y = 4 + r * (h + 4)
        d.text((4, y + h // 2 - 6), name, fill=plots.INK, font=plots.FONT)
        for c, tile in enumerate(row):
            sheet.paste(tile, (label + c * (w + 2), y))
    save_image(sheet, path)
