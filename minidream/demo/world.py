"""A tiny procedural world where DreamBooth can be trained, run and measured on a laptop CPU.

Toys — a shape in a colour with a surface pattern, at some position and size — on a plain background,
32×32 pixels, with captions such as "a red striped star on a gray background". The *subjects* (SUBJECTS; the demo's
is the first) each carry a shape or a pattern of their own (UNNAMED): no caption has a word for it and no image the
text-to-image model is pretrained on shows it, so the base model cannot be prompted into drawing a subject, only
DreamBooth can teach it. Only the VAE (the world's image codec, as SD's VAE is trained on far more than SD's
captioned images; never on a subject) and the recogniser (the judge, which reads every combination) see the unnamed
shapes and patterns. The class noun is "toy". Everything is a deterministic function of a seed.

The palette and the patterns are chosen to lie far apart where the diffusion model works: in the VAE's 8×8
latent. An earlier world (orange between red and yellow; thin diagonal stripes and dark dots of one 6 px period)
put its subject 0.21 (rms, in units of the latent's std, each world with its own VAE) from the nearest other toy
and three more within 0.27, and DreamBooth runs flipped between the subject and its neighbours; this one puts the
subject 0.31 from its nearest and the patterns 0.62 apart, not 0.24 (benchmarks/results/demo-seeds-cpu.json, `world_2`).
"""
import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from minidream.models.vae import from_uint8

SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (240, 210, 40),
           "purple": (145, 60, 195), "pink": (240, 110, 180)}
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "blue": (60, 110, 235)}
# Shapes and patterns with no word: only the subjects have them (the labels are the recogniser's, never a caption's).
UNNAMED = {"shape": ("cross", "crescent"), "pattern": ("checked",)}
NAMED = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "background": tuple(BACKGROUNDS)}
ATTRIBUTES = {k: v + UNNAMED.get(k, ()) for k, v in NAMED.items()}  # what the recogniser reads

# The subjects, one of each colour: each has a shape or a pattern of its own (UNNAMED), which the base model has never
# drawn and no prompt can ask for; the rest of each is named, so "a yellow striped star" is the nearest a prompt gets.
SUBJECTS = (
    {"shape": "cross", "colour": "yellow", "pattern": "striped"},  # `minidream demo`'s
    {"shape": "heart", "colour": "green", "pattern": "checked"},
    {"shape": "crescent", "colour": "red", "pattern": "plain"},
)
CLASS_NOUN = "toy"


def subject_words(subject: dict) -> str:
    """"yellow striped cross"."""
    return " ".join(subject[k] for k in ("colour", "pattern", "shape"))


def subject_name(subject: dict) -> str:
    """"yellow-striped-cross": the subject's name on the command line and in run folders."""
    return subject_words(subject).replace(" ", "-")


def pick_subjects(text: str, several: bool = True) -> tuple[dict, ...]:
    """"all", or comma-separated subject names or numbers (1 = the demo's) -> those SUBJECTS; ValueError if not.
    `several` False: one subject only (what the error offers says so)."""
    names = [subject_name(s) for s in SUBJECTS]
    one = f"1-{len(SUBJECTS)} or {', '.join(names)}"
    if not several and (text.strip().lower() == "all" or "," in text):
        raise ValueError(f"{text!r}: name one subject, {one} (`minidream eval --subjects` takes several)")
    if text.strip().lower() == "all":
        return SUBJECTS
    picked = []
    for part in (p.strip().lower() for p in text.split(",")):
        i = int(part) - 1 if part.isdigit() else names.index(part) if part in names else -1
        if not 0 <= i < len(SUBJECTS):
            raise ValueError(f"{part!r} is not a subject; give {'all, ' if several else ''}{one}")
        if SUBJECTS[i] not in picked:  # "1,1" is one subject, not two runs of it
            picked.append(SUBJECTS[i])
    return tuple(picked)


@dataclass(frozen=True)
class Toy:
    shape: str
    colour: str
    pattern: str
    background: str
    x: float = 0.5  # centre, as a fraction of the image side
    y: float = 0.5
    r: float = 0.33  # radius, as a fraction of the image side

    def matches(self, subject: dict) -> bool:
        return all(getattr(self, k) == v for k, v in subject.items())

    def is_subject(self) -> bool:
        """One of the held-out subjects."""
        return any(map(self.matches, SUBJECTS))


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "cross":  # a plus sign, arms 0.7 r wide
        w = 0.35 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        return [(cx + x, cy + y) for x, y in corners] + [(cx - x, cy - y) for x, y in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.pi / 2 + i * math.pi / 5),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.sin(math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * hx / 17, cy - r * hy / 17 + 0.1 * r))
        return pts
    raise ValueError(shape)


def _silhouette(toy: Toy, s: int) -> Image.Image:
    """The toy's shape, white on black, at s × s."""
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = toy.x * s, toy.y * s, toy.r * s
    if toy.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif toy.shape == "crescent":  # a disc with a disc bitten out of its right side
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        b, q = 0.5 * r, 0.75 * r
        d.ellipse((cx + b - q, cy - 0.15 * r - q, cx + b + q, cy - 0.15 * r + q), fill=0)
    elif toy.shape == "square":
        q = r * 0.85
        d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    else:
        d.polygon(_polygon(toy.shape, cx, cy, r), fill=255)
    return mask


def coverage(toy: Toy, side: int) -> torch.Tensor:
    """(side, side): the fraction of each cell the toy covers, e.g. of each latent position (side = SIZE / 4)."""
    s = SIZE * 4
    mask = torch.frombuffer(bytearray(_silhouette(toy, s).tobytes()), dtype=torch.uint8).view(s, s).float() / 255
    return torch.nn.functional.avg_pool2d(mask[None, None], s // side)[0, 0]


def render(toy: Toy, size: int = SIZE) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased like a photo's."""
    s = size * 4
    img = Image.new("RGB", (s, s), BACKGROUNDS[toy.background])
    mask = _silhouette(toy, s)
    base = COLOURS[toy.colour]
    fill = Image.new("RGB", (s, s), base)
    pd = ImageDraw.Draw(fill)
    # Patterns that differ in brightness as well as in shape, and coarse (9 px stripes, 7 px dots at 32 px), so
    # they survive the VAE's 4x downsampling: dark horizontal stripes darken a toy, light dots lighten it.
    if toy.pattern == "striped":
        step = int(s / 3.5)
        for k in range(0, s, step):
            pd.rectangle((0, k, s, k + step // 2), fill=tuple(int(c * 0.3) for c in base))
    elif toy.pattern == "dotted":
        step = int(s / 4.5)
        rr = step * 0.3
        for gx in range(step // 2, s, step):
            for gy in range(step // 2, s, step):
                pd.ellipse((gx - rr, gy - rr, gx + rr, gy + rr), fill=tuple(int(c + (255 - c) * 0.75) for c in base))
    elif toy.pattern == "checked":  # dark squares of 6 px on every other cell, as coarse as the stripes
        step = int(s / 5)
        for gx in range(0, s, step):
            for gy in range(0, s, step):
                if (gx // step + gy // step) % 2:
                    pd.rectangle((gx, gy, gx + step - 1, gy + step - 1), fill=tuple(int(c * 0.3) for c in base))
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.LANCZOS)


def random_toy(rng: random.Random, allow_subject: bool = False, unnamed: bool = False, **fixed) -> Toy:
    """A toy at a random place and size; `unnamed`: its shape and pattern may be ones with no word (UNNAMED)."""
    while True:
        a = {k: fixed.get(k) or rng.choice(v) for k, v in (ATTRIBUTES if unnamed else NAMED).items()}
        same = COLOURS[a["colour"]] == BACKGROUNDS.get(a["background"]) or a["colour"] == a["background"] == "blue"
        if same:
            continue  # a blue toy on a blue background is invisible
        toy = Toy(**a, x=rng.uniform(0.38, 0.62), y=rng.uniform(0.38, 0.62), r=rng.uniform(0.26, 0.38))
        if allow_subject or not toy.is_subject():
            return toy


def caption(toy: Toy, rng: random.Random) -> str:
    """Captions name some of the attributes; "toy" stands for any shape, so "a toy" covers the class."""
    if rng.random() < 0.05:
        return f"a {CLASS_NOUN}"
    words = []
    if rng.random() < 0.85:
        words.append(toy.colour)
    if toy.pattern != "plain" and rng.random() < 0.85:
        words.append(toy.pattern)
    words.append(toy.shape if rng.random() < 0.8 else CLASS_NOUN)
    text = "a " + " ".join(words)
    if rng.random() < 0.7:
        text += f" on a {toy.background} background"
    return text


def held_out(toy: Toy) -> bool:
    """Full attribute combinations kept out of pretraining (about 1 in 7), to test that the model composes."""
    key = SHAPES.index(toy.shape) * 7 + list(COLOURS).index(toy.colour) * 3 + PATTERNS.index(toy.pattern) * 5 + \
        list(BACKGROUNDS).index(toy.background)
    return key % 7 == 3


def pretraining_example(rng: random.Random) -> tuple[Image.Image, str, Toy]:
    while True:
        toy = random_toy(rng)
        if not held_out(toy):
            return render(toy), caption(toy, rng), toy


def subject_images(subject: dict, n: int = 4, seed: int = 0) -> list[Image.Image]:
    """The subject's "photos": the same toy on different backgrounds, positions and sizes (no blue
    background, so "a sks toy on a blue background" asks for a new context)."""
    rng = random.Random(1000 + seed)
    bgs = ["white", "gray", "black", "white", "gray", "black"]
    return [render(random_toy(rng, allow_subject=True, background=bgs[i % len(bgs)], **subject)) for i in range(n)]


def to_uint8(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8, as the pipeline's images."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    return from_uint8(to_uint8(img).permute(2, 0, 1))
