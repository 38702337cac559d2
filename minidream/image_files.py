"""Images as files: a PNG written atomically with the settings that made it in its text chunks, and a grid of
several. Every picture minidream writes goes through here."""
import json
import os
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(img: torch.Tensor | Image.Image, path: Path, meta: dict | None = None):
    """One (H, W, 3) uint8 image (or a picture) as PNG, with the settings that made it in the text chunks."""
    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    save_image(img if isinstance(img, Image.Image) else Image.fromarray(img.numpy()), path, pnginfo=info)


def save_image(image: Image.Image, path: Path, **options):
    """A picture as PNG, written under a temporary name and renamed: a kill or a full disk never leaves half a
    PNG. A full disk is an OSError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG", **options)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, H, W, 3) images into one image, row-major, `cols` wide."""
    N, H, W, C = images.shape
    cols = cols or min(N, 4)
    rows = (N + cols - 1) // cols
    out = torch.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return out
