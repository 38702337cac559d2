"""Where each prompt token looks: the probabilities softmax(QKᵀ/√d) with which image queries attend to each text
token, averaged over heads, layers and sampling steps and upsampled to the image, as DAAM (Tang et al. 2023) and
prompt-to-prompt (Hertz et al. 2022) read them: a UNet's cross-attention layers (attn2), an MMDiT's joint attention
(SD3: the image rows of the softmax over [image; text], at the CLIP tokens' columns, which lead the text).

`capture_cross_attention` is a transform: it puts forward hooks on those layers and returns their handles; the
model code knows nothing of it. The hooks recompute Q and K from the layer's own inputs, so any attention backend
(SDPA, Triton) samples unchanged.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from minidream import plots
from minidream.formats.files import write_text
from minidream.image_files import save_image, save_png
from minidream.models.attention import Attention
from minidream.models.mmdit import JointAttention
from minidream.sampling.pipeline import SamplingParams, generate


class CrossAttentionStore:
    """Running sum of cross-attention maps (B, tokens, h, w) at the latent resolution, over layers and steps."""

    def __init__(self, batch: int, latent_hw: tuple[int, int], tokens: int = 77):
        self.batch, self.hw, self.tokens, self.total, self.calls = batch, latent_hw, tokens, None, 0

    def add(self, probs: torch.Tensor):
        """probs (B', N, M), averaged over heads; the last `batch` rows are the conditional branch of CFG."""
        probs = probs[-self.batch:]
        H, W = self.hw
        f = round((H * W / probs.shape[1]) ** 0.5)  # this layer's downsampling from the latent (an MMDiT's patch)
        m = probs.transpose(1, 2).reshape(self.batch, -1, H // f, W // f)
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        self.total = m if self.total is None else self.total + m
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.total / max(self.calls, 1)


def probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) averaged over heads: q (B, heads, N, d), k (B, heads, M, d) -> (B, N, M)."""
    return ((q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)).softmax(-1).mean(1)


def capture_cross_attention(denoiser: torch.nn.Module, store: CrossAttentionStore) -> list:
    """Hook every layer of `denoiser` where image queries meet the text to add its probabilities to `store`;
    returns the handles (call .remove() on each to undo)."""
    def cross(attn: Attention, args, output):  # a UNet's attn2: the keys are the text's
        x, context = args[0], args[1]
        B, N, _ = x.shape
        q = attn.to_q(x).view(B, N, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(B, context.shape[1], attn.heads, -1).transpose(1, 2)
        store.add(probabilities(q, k))

    def joint(attn: JointAttention, args, output):  # one softmax over image and text keys: the text's columns
        x, context = args[0][-store.batch:], args[1][-store.batch:]  # CFG's conditional rows
        q, k, _ = attn.heads_of(x, attn.to_q, attn.to_k, attn.to_v, "norm_q", "norm_k")
        _, ck, _ = attn.heads_of(context, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, "norm_added_q",
                                 "norm_added_k")
        keys, N, H = torch.cat([k, ck], dim=2), x.shape[1], q.shape[1]
        # a head at a time: the whole (B, heads, N, N + M) table would be gigabytes at 1024 px
        store.add(sum(probabilities(q[:, h:h + 1], keys[:, h:h + 1])[:, :, N:N + store.tokens] for h in range(H)) / H)
    return [m.register_forward_hook(joint if isinstance(m, JointAttention) else cross)
            for name, m in denoiser.named_modules()
            if isinstance(m, JointAttention) and hasattr(m, "add_k_proj")
            or isinstance(m, Attention) and not isinstance(m, JointAttention) and name.endswith("attn2")]


@torch.no_grad()
def attention_maps(model, prompts: list[str], params: SamplingParams = SamplingParams(steps=20), seed: int = 0):
    """(images (B, H, W, 3) uint8, maps (B, 77, H, W) float: each token's mean attention probability)."""
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
    if not handles:  # Flux: its text is T5's tokens, which the maps (CLIP's 77 positions) do not name yet
        raise ValueError(f"attention-maps: {model.family.title}'s attention is not captured yet (it reads its prompt "
                         f"through T5's tokens); SD 1.x/2.x/XL and SD3 are")
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
    key = plots.legend(max(sheet.width, 320), "each token's cross-attention, scaled to its own maximum")
    top = plots.heading(sheet.width, f"where each token of {meta.get('prompt', '')!r} looks")
    save_image(plots.stack([top, sheet, key]), out / "maps.png")
    write_text(out / "maps.json", json.dumps({**meta, "tokens": rows}, indent=1))
    return [out / "maps.png", out / "maps.json"]


SHEET_LABEL = 190  # px left of attention_sheet's tiles, for each row's name


def attention_sheet(rows: list, path: Path, zoom: int = 3, title: str = ""):
    """A row per (label, images (n, H, W, 3), one word's maps (n, H, W)): each sample, then its map laid over it,
    scaled to that map's own maximum (the picture shows where a word looks; how much is localisation's number);
    `title` above, the colour key below."""
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
    sheet = Image.new("RGB", (label + len(tiles[0][1]) * (w + 2), len(tiles) * (h + 4) + 24), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 4), title, fill=plots.INK, font=plots.FONT)
    for r, (name, row) in enumerate(tiles):
        y = 24 + r * (h + 4)
        d.text((4, y + h // 2 - 6), name, fill=plots.INK, font=plots.FONT)
        for c, tile in enumerate(row):
            sheet.paste(tile, (label + c * (w + 2), y))
    key = plots.legend(sheet.width, "the word's cross-attention on each sample, scaled to that map's own maximum")
    save_image(plots.stack([sheet, key]), path)
