"""DreamBooth's claims, measured on the demo world (the paper's Table 3 quantities): subject and prompt fidelity, PRES
and DIV from the recogniser's reading of fixed-seed samples, and where the identifier looks (its cross-attention
mass on the drawn toy).
"""
import math

import torch

from minidream.demo import world
from minidream.demo.model import UNET
from minidream.demo.recognizer import Recognizer
from minidream.inspect.attention_maps import attention_maps, localisation
from minidream.models.stable_diffusion import StableDiffusion
from minidream.sampling.pipeline import SamplingParams, generate

SUBJECT = "a sks toy"  # the instance prompt: identifier + class noun
CLASS_PROMPT = "a toy"
PROMPTS = (SUBJECT, f"{SUBJECT} on a blue background", CLASS_PROMPT)
CONTEXTS = ("white", "black", "gray", "blue")


def is_subject(p: dict) -> bool:
    return all(p[k] == v for k, v in world.SUBJECT.items())


SAMPLING = SamplingParams(steps=20, guidance=4.0)  # the evaluation's, the grids' (they must agree) and the maps'.
CLASSES = 32  # "a toy" samples in the demo's report; `minidream eval` draws EVAL_CLASSES
EVAL_CLASSES = 128  # the drift without the prior is a few percent: one sample in 32, too coarse to compare


def eval_prompts(n: int = 16, classes: int = CLASSES) -> list[str]:
    """The evaluation's prompts, in groups: n of the instance prompt, n in each new context, then the class prompt."""
    groups = [(SUBJECT, n)] + [(f"{SUBJECT} on a {bg} background", n) for bg in CONTEXTS] + [(CLASS_PROMPT, classes)]
    return [p for p, k in groups for _ in range(k)]


def eval_noise(n: int = 16, seed: int = 100, classes: int = CLASSES) -> torch.Tensor:
    """The evaluation's starting latents, fixed, so models are compared on the same draws."""
    shape = (len(eval_prompts(n, classes)), UNET.in_channels, UNET.sample_size, UNET.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_dreambooth(model: StableDiffusion, net: Recognizer, n: int = 16, seed: int = 100, classes: int = CLASSES):
    """Subject fidelity, prompt fidelity, PRES and DIV from the recogniser's reading of fixed-seed samples, all drawn
    in one batch (the UNet's cost on CPU is mostly per call, not per image). Returns (metrics, the images)."""
    prompts = eval_prompts(n, classes)
    images = generate(model, prompts, SAMPLING, latents=eval_noise(n, seed, classes), progress=False)
    pred = net.predict(images)
    subj, toys = pred[:n], pred[n * (1 + len(CONTEXTS)):]
    ctx = {bg: pred[n * (1 + i): n * (2 + i)] for i, bg in enumerate(CONTEXTS)}
    all_subj = subj + [p for ps in ctx.values() for p in ps]
    pairs = [(a, b) for i, a in enumerate(toys) for b in toys[i + 1:]]
    return {
        "subject_fidelity": sum(map(is_subject, all_subj)) / len(all_subj),
        "prompt_fidelity": sum(is_subject(p) and p["background"] == bg for bg, ps in ctx.items() for p in ps)
                           / (n * len(CONTEXTS)),
        "PRES": sum(map(is_subject, toys)) / len(toys),
        "DIV": sum(sum(a[k] != b[k] for k in world.ATTRIBUTES) / len(world.ATTRIBUTES) for a, b in pairs) / len(pairs),
        "samples": {"subject": len(all_subj), "class": len(toys)},
    }, images


def subject_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) True where a toy-world image is not its plain background (the median colour of its border)."""
    x = images.float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # (B, 2H + 2W, 3)
    return (x - border.median(1).values[:, None, None]).abs().amax(-1) > 40


@torch.no_grad()
def attention_localisation(model: StableDiffusion, n: int = 16, seed: int = 300) -> float:
    """Where the identifier looks (#19): its cross-attention mass on the drawn toy's pixels over the toy's share
    of the image, averaged over n samples of the instance prompt (1.0 = no localisation)."""
    ids, ident = model.tokenizer.encode(SUBJECT), model.tokenizer.encode(SUBJECT.split()[1])
    start = next(i for i in range(len(ids)) if ids[i:i + len(ident)] == ident)
    images, maps = attention_maps(model, [SUBJECT] * n, SAMPLING, seed=seed)
    masks = subject_mask(images)
    rows = [localisation(maps[b, 1 + start: 1 + start + len(ident)].sum(0), masks[b]) for b in range(n)]
    rows = [r for r in rows if math.isfinite(r)]  # an image with nothing drawn (or nothing else) has no ratio
    return sum(rows) / len(rows) if rows else float("nan")
