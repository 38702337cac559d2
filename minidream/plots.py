"""Pictures drawn with Pillow (already a dependency, so no plotting library is needed): a heat strip of values
by row × column, line plots of training curves, and a map laid over an image."""
import math

import torch
from PIL import Image, ImageDraw, ImageFont

FONT = ImageFont.load_default()
INK, GRID, EMPTY = (30, 30, 30), (200, 200, 200), (250, 250, 250)


def _text_width(text: str) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=FONT))


def colour(v: float) -> tuple[int, int, int]:
    """v in [0, 1] -> a light-yellow-to-dark-red ramp (sequential, readable in grey too)."""
    v = min(max(v, 0.0), 1.0)
    stops = [(255, 245, 200), (250, 170, 70), (215, 60, 40), (110, 0, 30)]
    x = v * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    return tuple(int(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1]))


def heat_strip(values: dict[tuple[str, str], float], rows: list[str], cols: list[str], title: str,
               lo: float = 1e-6, hi: float = 1.0) -> Image.Image:
    """A grid: one cell per (row, col), coloured by log10 of its value between lo and hi; exactly 0 is drawn
    empty with a dot (untouched), a missing cell is blank."""
    cw, ch = 34, 16
    left = max(_text_width(r) for r in rows) + 8
    top = 16 + max(_text_width(c) for c in cols) + 6
    img = Image.new("RGB", (left + cw * len(cols) + 10, top + ch * len(rows) + 40), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), title, fill=INK, font=FONT)
    for j, c in enumerate(cols):  # column labels, written vertically
        label = Image.new("RGB", (_text_width(c) + 2, 12), "white")
        ImageDraw.Draw(label).text((0, 0), c, fill=INK, font=FONT)
        img.paste(label.rotate(90, expand=True), (left + j * cw + cw // 2 - 6, top - label.width - 4))
    span = math.log10(hi) - math.log10(lo)
    for i, r in enumerate(rows):
        d.text((4, top + i * ch + 3), r, fill=INK, font=FONT)
        for j, c in enumerate(cols):
            box = (left + j * cw, top + i * ch, left + (j + 1) * cw - 1, top + (i + 1) * ch - 1)
            v = values.get((r, c))
            if v is None:
                d.rectangle(box, fill="white", outline=EMPTY)
            elif v == 0:
                d.rectangle(box, fill=EMPTY, outline=GRID)
                d.point(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), fill=INK)
            else:
                d.rectangle(box, fill=colour((math.log10(max(v, lo)) - math.log10(lo)) / span), outline=GRID)
    y = top + ch * len(rows) + 10  # the colour bar
    for k in range(100):
        d.rectangle((left + k * 2, y, left + k * 2 + 1, y + 8), fill=colour(k / 99))
    d.text((left, y + 10), f"{lo:.0e}", fill=INK, font=FONT)
    d.text((left + 200 - _text_width(f"{hi:.0e}"), y + 10), f"{hi:.0e}", fill=INK, font=FONT)
    d.text((left + 210, y), "relative change (log); · = untouched", fill=INK, font=FONT)
    return img


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, size=(640, 220),
              log_y: bool = False) -> Image.Image:
    """One panel of (x, y) lines, a colour each, with the axes' ranges written at the corners."""
    palette = [(30, 90, 200), (220, 90, 30), (40, 150, 60), (140, 60, 180)]
    W, H = size
    left, right, top, bottom = 60, 10, 20, 28
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
    d.text((left, 4), title, fill=INK, font=FONT)
    if not pts:
        return img
    f = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(f(p[1]) for p in pts), max(f(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (W - left - right),  # noqa: E731
                          H - bottom - (f(y) - y0) / (y1 - y0) * (H - top - bottom))
    d.rectangle((left, top, W - right, H - bottom), outline=GRID)
    fmt = (lambda v: f"{10 ** v:.2g}") if log_y else (lambda v: f"{v:.3g}")
    d.text((4, top), fmt(y1), fill=INK, font=FONT)
    d.text((4, H - bottom - 10), fmt(y0), fill=INK, font=FONT)
    d.text((left, H - bottom + 4), f"{x0:g}", fill=INK, font=FONT)
    d.text((W - right - _text_width(f"{x1:g}"), H - bottom + 4), f"{x1:g}", fill=INK, font=FONT)
    lx = left + 8
    for k, (name, s) in enumerate(series.items()):
        c = palette[k % len(palette)]
        line = [to_px(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            d.line(line, fill=c, width=1)
        elif line:
            d.point(line, fill=c)
        d.text((lx, top + 4), name, fill=c, font=FONT)
        lx += _text_width(name) + 16
    return img


def stack(images: list[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height
    return out


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.75) -> Image.Image:
    """A (H, W) map in [0, 1] laid over an (H, W, 3) uint8 image in the colour ramp (light = low, dark red = high;
    `legend` draws the key). Over the image's grey, not its colours: a blue background would turn the ramp purple."""
    ramp = torch.tensor([colour(k / 255) for k in range(256)], dtype=torch.float32)
    tint = ramp[(heat.clamp(0, 1) * 255).round().long()]
    mixed = (1 - alpha) * image.float().mean(-1, keepdim=True) + alpha * tint
    return Image.fromarray(mixed.round().clamp(0, 255).to(torch.uint8).numpy())


VIEWABLE = 96  # px: a tile smaller than this (the demo's 32 px model) is scaled up to be seen


def labelled_grid(rows: list[tuple[str, torch.Tensor]], title: str = "", label_width: int = 200,
                  pad: int = 2) -> tuple[Image.Image, dict]:
    """Rows of (label, images (n, H, W, 3) uint8), each row's label (a prompt, "training photos") on its left and
    `title` above; tiles of a tiny model scaled up (nearest, by a whole factor) to VIEWABLE px, rows of other sizes
    on the largest's cells. Returns the picture and its layout (origin, cell step, tile size, zoom: where each
    image sits, which the PNG's text keeps so a tool can cut the images back out)."""
    H, W = max(r.shape[1] for _, r in rows), max(r.shape[2] for _, r in rows)
    zoom = max(1, math.ceil(VIEWABLE / min(H, W)))
    th, tw = H * zoom, W * zoom
    cols = max(len(r) for _, r in rows)
    top = 20 if title else pad
    img = Image.new("RGB", (label_width + cols * (tw + pad) + pad, top + len(rows) * (th + pad)), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((4, 4), title, fill=INK, font=FONT)
    for i, (label, images) in enumerate(rows):
        y = top + i * (th + pad)
        lines = _wrapped(label, label_width - 8, max(1, th // 12))
        for k, line in enumerate(lines):
            d.text((4, y + th // 2 - 6 * len(lines) + 12 * k), line, fill=INK, font=FONT)
        for j, tile in enumerate(images):
            big = tile.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
            img.paste(Image.fromarray(big.contiguous().numpy()), (label_width + pad + j * (tw + pad), y))
    layout = {"origin": [label_width + pad, top], "step": [tw + pad, th + pad], "tile": [tw, th], "zoom": zoom}
    return img, layout


def _wrapped(text: str, width: int, lines: int) -> list[str]:
    """`text` in lines of at most `width` px, at most `lines` of them (the last ending in … if it was cut)."""
    out, line = [], ""
    for word in text.split():
        if line and _text_width(f"{line} {word}") > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(0, len(out[-1]) - 1)] + "…"
    return out


def legend(width: int, what: str) -> Image.Image:
    """A colour bar of the maps' ramp, low on the left and high on the right, with what it measures."""
    img = Image.new("RGB", (width, 30), "white")
    d = ImageDraw.Draw(img)
    bar = min(200, width - 80)
    d.text((4, 2), "low", fill=INK, font=FONT)
    for k in range(bar):
        d.line((30 + k, 2, 30 + k, 12), fill=colour(k / (bar - 1)))
    d.text((34 + bar, 2), "high", fill=INK, font=FONT)
    d.text((4, 16), what, fill=INK, font=FONT)
    return img


def heading(width: int, text: str) -> Image.Image:
    """A strip with one line of text, to stack above a picture."""
    img = Image.new("RGB", (width, 18), "white")
    ImageDraw.Draw(img).text((4, 4), text, fill=INK, font=FONT)
    return img
