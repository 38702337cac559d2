"""The run's images as files: reading the subject's photos and the class images (RGB, EXIF orientation applied, every
unreadable file named before any compute), and one training view of an image: resized to cover its bucket,
cropped, maybe mirrored, with the size ids SDXL is conditioned on.
"""
import random
import sys
from pathlib import Path

import torch

from minidream.models.stable_diffusion import size_ids
from minidream.models.vae import from_uint8
from minidream.training import TrainError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_files(folder: Path) -> list[Path]:
    """The images in a folder: regular files with an image suffix (a FIFO named x.png would block a reader)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_images(folder: Path, resolution: int, flag: str = "--instance-dir") -> tuple[list, list[Path]]:
    """The subject's photos (or the class images), RGB, EXIF orientation applied, and their files; every
    unreadable file named before any compute."""
    from PIL import Image, ImageOps
    if not folder.is_dir():
        raise TrainError(f"{flag} {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise TrainError(f"{flag} {folder}: no images (.jpg, .png, .webp) in it")
    images, bad, large = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
            images.append(to_rgb(im, f))
        except Image.DecompressionBombError:  # Pillow's guard: more pixels than it will decode
            large.append(f.name)
        except Exception:
            bad.append(f.name)
    if large:
        raise TrainError(f"{flag} {folder}: image(s) too large to read ({', '.join(large)}: over "
                         f"{2 * Image.MAX_IMAGE_PIXELS // 10 ** 6} megapixels); scale them down")
    if bad:
        raise TrainError(f"{flag} {folder}: unreadable image(s): {', '.join(bad)}; remove or fix them")
    small = [f.name for f, im in zip(files, images) if min(im.size) < resolution]
    if small:
        print(f"warning: {len(small)} image(s) smaller than --resolution {resolution} will be upscaled: "
              f"{', '.join(small[:5])}", file=sys.stderr)
    return images, files


def to_rgb(im, f: Path):
    """8-bit RGB. 16-bit and 32-bit grayscale are scaled down (a plain convert clips them to white);
    RGBA, grayscale, CMYK and palette images convert as usual; anything rarer is converted with a warning."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        top = 65535 if im.mode.startswith("I;16") or (im.getextrema()[1] or 0) > 255 else 255
        return im.convert("I").point(lambda v: v * (255 / top)).convert("L").convert("RGB")
    if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1"):
        print(f"warning: {f.name}: unusual image mode {im.mode}, converted to 8-bit RGB", file=sys.stderr)
    return im.convert("RGB")


def to_tensor(im, size: int | tuple[int, int], center_crop: bool, flip: bool, rng: random.Random):
    """Resize to cover `size` (a side, or a bucket's (width, height)), crop the remainder, maybe mirror;
    -> (3, H, W) in [-1, 1], and SDXL's size ids of this view (6,): the photo's (h, w), the crop's top-left in
    the resized photo (of the mirrored one when mirrored, as if mirrored before cropping), the target (H, W)."""
    x, ids, _ = view(im, size, center_crop, flip, rng)
    return x, ids


def view(im, size: int | tuple[int, int], center_crop: bool, flip: bool, rng: random.Random, mask=None):
    """`to_tensor`'s view, and the same view of the photo's loss mask ('L' image, its size), (1, H, W) in [0, 1]
    (None without one): the mask follows the resize, the crop and the mirror."""
    from PIL import Image
    W, H = (size, size) if isinstance(size, int) else size
    original = (im.size[1], im.size[0])
    w, h = im.size
    s = max(W / w, H / h)
    resized = (max(W, round(w * s)), max(H, round(h * s)))
    im = im.resize(resized, Image.BICUBIC)
    w, h = im.size
    left, top = ((w - W) // 2, (h - H) // 2) if center_crop else (rng.randint(0, w - W), rng.randint(0, h - H))
    im = im.crop((left, top, left + W, top + H))
    if mask is not None:
        mask = mask.resize(resized, Image.BILINEAR).crop((left, top, left + W, top + H))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if mask is not None else None
        left = w - W - left
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(H, W, 3)
    m = None if mask is None else torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, H, W) / 255
    return from_uint8(x.permute(2, 0, 1)), size_ids(original, (top, left), (H, W)), m


def load_masks(files: list[Path], images: list, mask_dir: str | None, alpha: bool) -> list[tuple]:
    """Each photo's (loss mask ('L', white = the subject), the file it was read from): MASK_DIR/PHOTO-NAME.png, or
    the photo's alpha channel (--alpha-mask); a missing or mis-sized one is a one-line error. (None, None) for
    each without masks."""
    from PIL import Image, ImageOps
    if not (mask_dir or alpha):
        return [(None, None)] * len(files)
    masks = []
    for f, im in zip(files, images):
        where = Path(mask_dir) / f"{f.stem}.png" if mask_dir else f
        flag = "--mask-dir" if mask_dir else "--alpha-mask"
        if mask_dir and Path(mask_dir).resolve() == f.parent.resolve():
            raise TrainError(f"--mask-dir {mask_dir} is the photos' folder: each photo would be read as its own "
                             f"mask; give the folder that holds the masks")
        if mask_dir and not where.is_file():
            raise TrainError(f"--mask-dir: no mask {where} for the photo {f.name}; add it (white = the subject)")
        try:
            with Image.open(where) as m:
                m = ImageOps.exif_transpose(m)
                if alpha and "A" not in m.getbands() and "transparency" not in m.info:
                    raise TrainError(f"--alpha-mask: {f} has no alpha channel; save it as RGBA, or use --mask-dir")
                # a mask reads as a photo does (16-bit greyscale scaled, not clipped), then its luminance
                m = m.convert("RGBA").getchannel("A") if alpha else to_rgb(m, where).convert("L")
        except TrainError:
            raise
        except Exception:
            raise TrainError(f"{flag}: {where} is not a readable image") from None
        if m.size != im.size:
            raise TrainError(f"{flag}: the mask {where} is {m.size[0]}x{m.size[1]}, its photo {f.name} "
                             f"{im.size[0]}x{im.size[1]}; give a mask of the photo's size")
        if m.getextrema()[1] == 0:
            print(f"warning: {flag}: the mask of {f.name} is all black: nothing of that photo is learned (white = "
                  f"the subject)", file=sys.stderr)
        masks.append((m, where))
    return masks


def png_prompt(path: Path) -> str | None:
    """The prompt a generated class image was made for (its PNG text), or None for any other image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.text.get("prompt") if hasattr(im, "text") else None
    except Exception:
        return None
