"""DreamBooth's claims, measured on the demo world (the paper's Table 3 quantities): subject and prompt fidelity, PRES
and DIV from the recogniser's reading of fixed-seed samples, and where words look (their cross-attention mass on the
drawn toy): the identifier's, and the base model's own attribute words as the control.
"""
import math
import random

import torch

from minidream.demo import world
from minidream.demo.architecture import UNET
from minidream.demo.recognizer import Recognizer
from minidream.inspect.attention_maps import attention_maps, localisation
from minidream.models.stable_diffusion import StableDiffusion
from minidream.sampling.pipeline import SamplingParams, generate

INSTANCE_PROMPT = "a sks toy"  # identifier + class noun, whichever subject the photos show
IDENTIFIER = "sks"
CLASS_PROMPT = "a toy"
PROMPTS = (INSTANCE_PROMPT, f"{INSTANCE_PROMPT} on a blue background", CLASS_PROMPT)
CONTEXTS = ("white", "black", "gray", "blue")


def is_subject(p: dict, subject: dict) -> bool:
    """The recogniser's reading `p` of a sample is the subject."""
    return all(p[k] == v for k, v in subject.items())


SAMPLING = SamplingParams(steps=20, guidance=4.0)  # the evaluation's, the grids' (they must agree) and the maps'.
CLASSES = 32  # "a toy" samples in the demo's report; `minidream eval` draws EVAL_CLASSES
EVAL_CLASSES = 128  # the drift without the prior is a few percent: one sample in 32, too coarse to compare


def eval_prompts(n: int = 16, classes: int = CLASSES) -> list[str]:
    """The evaluation's prompts, in groups: n of the instance prompt, n in each new context, then the class prompt."""
    groups = [(INSTANCE_PROMPT, n)] + [(f"{INSTANCE_PROMPT} on a {bg} background", n) for bg in CONTEXTS] \
        + [(CLASS_PROMPT, classes)]
    return [p for p, k in groups for _ in range(k)]


def eval_noise(n: int = 16, seed: int = 100, classes: int = CLASSES) -> torch.Tensor:
    """The evaluation's starting latents, fixed, so models are compared on the same draws."""
    shape = (len(eval_prompts(n, classes)), UNET.in_channels, UNET.sample_size, UNET.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_dreambooth(model: StableDiffusion, net: Recognizer, subject: dict, n: int = 16, seed: int = 100,
                        classes: int = CLASSES):
    """Subject fidelity, prompt fidelity, PRES and DIV from the recogniser's reading of fixed-seed samples.
    Returns (metrics, the images)."""
    readings, images = read_samples(model, net, n, seed, classes)
    return score(readings, subject, n), images


@torch.no_grad()
def read_samples(model: StableDiffusion, net: Recognizer, n: int = 16, seed: int = 100, classes: int = CLASSES):
    """The evaluation's fixed-seed samples, all drawn in one batch (the UNet's cost on CPU is mostly per call, not per
    image), and the recogniser's reading of each. Returns (readings, images)."""
    prompts = eval_prompts(n, classes)
    images = generate(model, prompts, SAMPLING, latents=eval_noise(n, seed, classes), progress=False)
    return net.predict(images), images


def score(pred: list[dict], subject: dict, n: int = 16) -> dict:
    """evaluate_dreambooth's metrics of `subject` from read_samples' readings (n per instance-prompt group)."""
    subj, toys = pred[:n], pred[n * (1 + len(CONTEXTS)):]
    ctx = {bg: pred[n * (1 + i): n * (2 + i)] for i, bg in enumerate(CONTEXTS)}
    all_subj = subj + [p for ps in ctx.values() for p in ps]
    pairs = [(a, b) for i, a in enumerate(toys) for b in toys[i + 1:]]

    def hits(readings) -> int:
        return sum(is_subject(p, subject) for p in readings)
    return {
        "subject_fidelity": hits(all_subj) / len(all_subj),
        "prompt_fidelity": sum(hits(p for p in ps if p["background"] == bg) for bg, ps in ctx.items())
                           / (n * len(CONTEXTS)),
        "PRES": hits(toys) / len(toys),
        "DIV": sum(sum(a[k] != b[k] for k in world.ATTRIBUTES) / len(world.ATTRIBUTES) for a, b in pairs) / len(pairs),
        "samples": {"subject": len(all_subj), "class": len(toys)},
    }


def subject_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) True where a toy-world image is not its plain background (the median colour of its border)."""
    x = images.float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # (B, 2H + 2W, 3)
    return (x - border.median(1).values[:, None, None]).abs().amax(-1) > 40


def token_span(tokenizer, prompt: str, word: str) -> range:
    """Where `word`'s tokens sit in the text encoder's input for `prompt` (the start token is position 0)."""
    ids, piece = tokenizer.encode(prompt), tokenizer.encode(word)
    start = next((i for i in range(len(ids)) if ids[i:i + len(piece)] == piece), None)
    if start is None:
        raise ValueError(f"{word!r} is not in {prompt!r}")
    return range(1 + start, 1 + start + len(piece))


@torch.no_grad()
def localise_words(model: StableDiffusion, prompts: list[str], words: list[dict], seed: int) -> dict:
    """{role: mean localisation} of each sample's words ({role: word} per prompt): the share of the word's
    cross-attention mass (its tokens summed, averaged over heads, layers and steps) on the drawn toy's pixels over
    the toy's share of the image; 1.0 = the word looks everywhere alike."""
    images, maps = attention_maps(model, prompts, SAMPLING, seed=seed)
    return word_ratios(model.tokenizer, prompts, words, maps, subject_mask(images))


def word_ratios(tokenizer, prompts: list[str], words: list[dict], maps: torch.Tensor, masks: torch.Tensor) -> dict:
    """localise_words' numbers from given maps (B, tokens, H, W) and toy masks (B, H, W)."""
    rows = {role: [] for role in words[0]}
    for b, (prompt, named) in enumerate(zip(prompts, words)):
        for role, word in named.items():
            span = token_span(tokenizer, prompt, word)
            rows[role].append(localisation(maps[b, span.start:span.stop].sum(0), masks[b]))
    rows = {role: [r for r in rs if math.isfinite(r)] for role, rs in rows.items()}  # nothing drawn: no ratio
    return {role: sum(rs) / len(rs) if rs else float("nan") for role, rs in rows.items()}


@torch.no_grad()
def identifier_maps(model: StableDiffusion, n: int = 16, seed: int = 300):
    """Where the identifier looks (#19) on n samples of the instance prompt: (its localisation, the samples, its
    attention maps (n, H, W))."""
    prompts, words = [INSTANCE_PROMPT] * n, [{"identifier": IDENTIFIER}] * n
    images, maps = attention_maps(model, prompts, SAMPLING, seed=seed)
    span = token_span(model.tokenizer, INSTANCE_PROMPT, IDENTIFIER)
    found = word_ratios(model.tokenizer, prompts, words, maps, subject_mask(images))["identifier"]
    return found, images, maps[:, span.start:span.stop].sum(1)


def attention_localisation(model: StableDiffusion, n: int = 16, seed: int = 300) -> float:
    """The identifier's localisation over n samples of the instance prompt."""
    return identifier_maps(model, n, seed)[0]


def attribute_prompts(n: int = 24, seed: int = 301) -> tuple[list[str], list[dict]]:
    """n prompts "a {colour} {pattern} {shape}" (striped or dotted, so every prompt names all three) and their
    {role: word}s."""
    rng = random.Random(seed)
    toys = [world.random_toy(rng, pattern=rng.choice(("striped", "dotted"))) for _ in range(n)]
    return [f"a {t.colour} {t.pattern} {t.shape}" for t in toys], \
        [{k: getattr(t, k) for k in ("colour", "pattern", "shape")} for t in toys]


def word_localisation(model: StableDiffusion, n: int = 24, seed: int = 301) -> dict:
    """The control: where the base model's own attribute words look (attribute_prompts)."""
    return localise_words(model, *attribute_prompts(n, seed), seed)


def vocabulary_prompts() -> list[str]:
    """Every prompt the world's words can form for one toy: each colour × pattern × shape word (or the class noun),
    alone and on each background ("plain" is no word: captions leave it out)."""
    shapes = [*world.SHAPES, world.CLASS_NOUN]
    toys = [" ".join(w for w in (c, "" if p == "plain" else p, s) if w)
            for c in world.COLOURS for p in world.PATTERNS for s in shapes]
    return [f"a {t}{f' on a {bg} background' if bg else ''}" for t in toys for bg in ("", *world.BACKGROUNDS)]


@torch.no_grad()
def best_prompt_fidelity(model: StableDiffusion, net: Recognizer, screen: int = 4, recheck: int = 32, top: int = 3,
                         seed: int = 200) -> dict:
    """What the base model draws of each subject when asked as well as words can ask. Every vocabulary prompt is
    screened on `screen` samples; per subject, the `top` prompts that drew it most often (ties: those naming more of
    its words) are drawn again on `recheck` fresh samples, and the best of those is its best-prompt fidelity (a
    maximum over 540 noisy screens alone would be biased up). {subject name: {"fidelity", "prompt", "screened"}}."""
    prompts = vocabulary_prompts()
    screened = _readings(model, net, [p for p in prompts for _ in range(screen)], seed)
    best = {}
    for subject in world.SUBJECTS:
        hits = dict.fromkeys(prompts, 0)
        for k, p in enumerate(screened):
            hits[prompts[k // screen]] += is_subject(p, subject)
        named = {p: sum(w in p.split() for w in subject.values()) for p in prompts}
        picked = sorted(prompts, key=lambda p: (-hits[p], -named[p]))[:top]
        again = _readings(model, net, [p for p in picked for _ in range(recheck)], seed + 1)
        found = {p: sum(is_subject(r, subject) for r in again[i * recheck:(i + 1) * recheck]) / recheck
                 for i, p in enumerate(picked)}
        prompt = max(found, key=found.get)
        best[world.subject_name(subject)] = {"fidelity": found[prompt], "prompt": prompt,
                                             "screened": max(hits.values()) / screen}
    return best


def _readings(model: StableDiffusion, net: Recognizer, prompts: list[str], seed: int, batch: int = 512) -> list:
    g = torch.Generator().manual_seed(seed)
    return [r for i in range(0, len(prompts), batch)
            for r in net.predict(generate(model, prompts[i:i + batch], SAMPLING, progress=False, generator=g))]
