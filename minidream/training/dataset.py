"""Training data as users bring it: one or several concepts (`--concepts FILE.json`), a caption file beside an
image (`--caption-ext .txt`), and aspect-ratio buckets (`--aspect-buckets`). What a run trains on is a list of
`Example`s (an image, its prompt, its concept and its bucket), written to OUT/data.json; `TrainingData` holds a run's.

Buckets (as kohya's sd-scripts and NovelAI's write-up do it): shapes of about --resolution² pixels whose sides are
multiples of the model's whole downsampling factor (64 for SD), aspect ratio at most --max-aspect; an image goes
to the bucket nearest its own aspect (in log ratio), is resized to cover it and only the remainder is cropped.
A batch is drawn from one bucket, so its latents stack.
"""
import copy
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from minidream.formats.files import write_text
from minidream.options import text
from minidream.models.stable_diffusion import StableDiffusion
from minidream.models.t5_tokenizer import T5Tokenizer
from minidream.training import TrainError
from minidream.training.class_images import check_class_dir, make_class_images, planned
from minidream.training.concepts_file import Concept, concepts
from minidream.training.config import TrainConfig
from minidream.training.photos import image_files, load_images, load_masks, view
from minidream.training.runtime import Runtime


@dataclass(frozen=True)
class Example:
    image: object  # PIL image, RGB
    file: Path
    prompt: str
    concept: int
    bucket: tuple[int, int]  # (width, height)
    caption_file: Path | None = None
    repeats: int = 1  # its weight in a draw: times an epoch sees it (kohya's N_ folders, --repeats)
    mask: object = None  # PIL 'L' image of its size, white = the subject (--mask-dir, --alpha-mask); None: none
    mask_file: Path | None = None


def buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) shapes of at most resolution² pixels, sides multiples of `step`, aspect <= max_aspect."""
    out = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + 1, step):
        h = (resolution * resolution // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            out.add((w, h))
    side = resolution // step * step
    out.add((side, side))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], shapes: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    return min(shapes, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))


def caption(image_file: Path, ext: str | None) -> tuple[str | None, Path | None]:
    """The text of the caption file beside an image (image.EXT), or (None, None) without one."""
    if not ext:
        return None, None
    f = image_file.with_suffix(ext if ext.startswith(".") else "." + ext)
    if not f.is_file():
        return None, None
    try:
        text = f.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise TrainError(f"--caption-ext: {f} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise TrainError(f"--caption-ext: {f} could not be read ({e.strerror or e})") from None
    return (text or None), f


def examples(images: list, files: list[Path], concept: int, default_prompt: str, cfg: TrainConfig,
             shapes: list[tuple[int, int]], captions: bool, repeats: int = 1) -> list[Example]:
    rows, empty = [], []
    for im, f in zip(images, files):
        text, cf = caption(f, cfg.caption_ext) if captions else (None, None)
        if cf is not None and text is None:
            empty.append(cf.name)
        rows.append(Example(im, f, text or default_prompt, concept, nearest_bucket(im.size, shapes), cf, repeats))
    if empty:
        print(f"warning: --caption-ext: {len(empty)} caption file(s) are empty ({', '.join(empty[:5])}): those "
              f"images train on the instance prompt {default_prompt!r}", file=sys.stderr)
    return rows


def instance_examples(concepts: list[Concept], cfg: TrainConfig, shapes: list[tuple[int, int]]) -> list[Example]:
    rows = []
    for k, c in enumerate(concepts):
        flag = f"--concepts: concept {k}: instance_dir" if cfg.concepts else "--instance-dir"
        images, files = load_images(c.instance_dir, cfg.resolution, flag)
        masks = load_masks(files, images, cfg.mask_dir, cfg.alpha_mask)
        found = examples(images, files, k, c.instance_prompt, cfg, shapes, captions=True, repeats=c.repeats)
        rows += [replace(e, mask=m, mask_file=where) for e, (m, where) in zip(found, masks)]
    if cfg.center_crop:
        warn_cropped_masks(rows, "--mask-dir" if cfg.mask_dir else "--alpha-mask")
    return rows


def warn_cropped_masks(rows: list[Example], flag: str):
    """A mask whose white lies only where the centre crop cuts the photo away trains nothing of it (loss 0): said,
    as an all-black mask file is (load_masks). A random crop (--random-crop) reaches every part of the photo."""
    for e in rows:
        if e.mask is not None and e.mask.getextrema()[1] > 0:
            if view(e.image, e.bucket, True, False, None, e.mask)[2].max() == 0:
                w, h = e.bucket
                print(f"warning: {flag}: the mask of {e.file.name} is all black inside the centre crop to {w}x{h}: "
                      f"nothing of that photo is learned; use --random-crop, or a mask inside the crop",
                      file=sys.stderr)


def class_examples(concepts: list[Concept], cfg: TrainConfig, shapes: list[tuple[int, int]]) -> list[Example]:
    rows = []
    for k, c in enumerate(concepts):
        images, files = load_images(c.class_dir, cfg.resolution, "--class-dir")
        n = c.num_class_images
        rows += examples(images[:n], files[:n], k, c.class_prompt, cfg, shapes, captions=False,
                         repeats=c.class_repeats)
    return rows


def plain(images: list, prompt: str, resolution: int) -> list[Example]:
    """Square examples with one prompt (no files): the benchmark's and the tests' data."""
    return [Example(im, Path(""), prompt, 0, (resolution, resolution)) for im in images]


def check_buckets(instance: list[Example], klass: list[Example]):
    """Prior preservation pairs each instance example with a class example of its concept and bucket."""
    have = {(e.concept, e.bucket) for e in klass}
    for e in instance:
        if (e.concept, e.bucket) not in have:
            w, h = e.bucket
            raise TrainError(f"bucket {w}x{h} of concept {e.concept} has instance images ({e.file.name}) but no class "
                             f"image; add class images of that shape, or let minidream generate them (an empty class "
                             f"dir)")


def check_planned_buckets(concepts: list, cleared: list[bool], instance: list[Example], shapes: list[tuple[int, int]]):
    """Before any class image is drawn: the kept ones and those to draw (image i at the bucket of the concept's
    instance image i mod n, make_class_images) cover every bucket of the concept's instance images."""
    from PIL import Image
    for k, (c, gone) in enumerate(zip(concepts, cleared)):
        sizes = [e.bucket for e in instance if e.concept == k]
        have, free = planned(c.class_dir, c.num_class_images) if not gone else ([], list(range(c.num_class_images)))
        kept = []
        for f in have[:c.num_class_images]:
            with Image.open(f) as im:
                kept.append(nearest_bucket(im.size, shapes))
        covered = set(kept) | {sizes[i % len(sizes)] for i in free}
        short = sorted(set(sizes) - covered)
        if short:
            w, h = short[0]
            raise TrainError(f"concept {k}'s photos fall in {len(set(sizes))} aspect buckets, and its "
                             f"{c.num_class_images} class image(s) would not cover {w}x{h}; raise --num-class-images "
                             f"to at least {len(set(sizes))} (or add class images of that shape)")


def write_data_json(out: Path, instance: list[Example], klass: list[Example], shapes: list[tuple[int, int]],
                    schedule: dict):
    def row(e: Example, kind: str):
        r = {"file": str(e.file), "kind": kind, "concept": e.concept, "prompt": e.prompt, "bucket": list(e.bucket),
             "repeats": e.repeats}
        if e.caption_file:
            r["caption_file"] = str(e.caption_file)
        if e.mask_file:
            r["mask"] = str(e.mask_file)
        if kind == "class":
            r["serves_concept"] = e.concept
        return r
    data = {**schedule, "buckets": [list(b) for b in shapes], "images": [row(e, "instance") for e in instance] +
            [row(e, "class") for e in klass]}
    write_text(out / "data.json", json.dumps(data, indent=1))
    used = sorted({e.bucket for e in instance})
    if len(used) > 1:
        print(f"aspect buckets in use: {', '.join(f'{w}x{h}' for w, h in used)}", file=sys.stderr)


def check_prompts(model: StableDiffusion, cfg: TrainConfig, concepts: list, instance: list[Example]):
    """CLIP reads 77 tokens: a prompt cut before its identifier would train on the class alone. With --train-token
    every instance prompt (each caption too) must hold the new token, or the token learns nothing."""
    pairs = []  # (where the prompt came from, the prompt, its identifier, whether it is an instance prompt)
    for k, c in enumerate(concepts):
        pairs += [(prompt_source(cfg, k, "instance"), c.instance_prompt, c.identifier, True),
                  (prompt_source(cfg, k, "class"), c.class_prompt, c.identifier, False)]
    pairs += [(f"--caption-ext: {e.caption_file}", e.prompt, concepts[e.concept].identifier, True)
              for e in instance if e.caption_file]
    tokenizer, t5 = model.tokenizer, None
    if cfg.train_token:  # the prompts as they will be read: the new token (and its --token-vectors) counted
        tokenizer = copy.deepcopy(tokenizer)
        t5 = copy.deepcopy(model.tokenizer_3) if cfg.train_token_t5 else None
        for tok in filter(None, (tokenizer, t5)):
            try:
                tok.add_vectors(cfg.token, cfg.token_vectors)
            except ValueError:
                raise TrainError(f"--identifier {cfg.identifier!r}: {cfg.token} (the token --train-token learns) is "
                                 f"already in this model's vocabulary; choose another identifier") from None
    for what, prompt, ident, instance_side in pairs:
        if text(prompt):
            raise TrainError(f"{what}: {text(prompt)}")
        if cfg.train_token and instance_side and f"<{ident}>" not in prompt:
            raise TrainError(f"{what}: the prompt {prompt!r} does not hold the token <{ident}> that --train-token "
                             f"learns; write <{ident}> where the identifier goes")
        cut = tokenizer.truncated(prompt)
        many = f"--token-vectors {cfg.token_vectors} makes <{ident}> that many tokens: use fewer, or shorten the " \
            f"prompt" if cfg.train_token and cfg.token_vectors > 1 else "shorten the prompt"
        if cut and instance_side and ident in cut and ident not in prompt[:-len(cut)]:
            raise TrainError(f"{what}: the identifier {ident!r} falls past the text encoder's "
                             f"{model.tokenizer.max_length}-token limit ({many})")
        if t5 is not None and instance_side and past_t5(t5, prompt, cfg.token, model.max_sequence_length):
            raise TrainError(f"{what}: <{ident}> falls past T5's {model.max_sequence_length} tokens, so its T5 row "
                             f"would never train (--train-token-t5): raise --max-sequence-length, or {many}")
        if cut:
            print(f"warning: {what} is longer than {model.tokenizer.max_length} tokens; this part is cut: {cut!r}",
                  file=sys.stderr)


def past_t5(t5: T5Tokenizer, prompt: str, token: str, length: int) -> bool:
    """Whether T5 cuts the prompt (its last place is `</s>`) before the end of the token's rows."""
    ids, rows = t5.encode(prompt), t5.expand.get(t5.tok.token_to_id(token), [t5.tok.token_to_id(token)])
    return rows[0] in ids and ids.index(rows[0]) + len(rows) > length - 1


def prompt_source(cfg: TrainConfig, k: int, side: str) -> str:
    """Where concept k's instance or class prompt came from, as an error names it."""
    if cfg.concepts:
        return f"--concepts: concept {k}'s {side}_prompt"
    given = cfg.instance_prompt if side == "instance" else cfg.class_prompt
    return f"--{side}-prompt" if given else f"the {side} prompt"


class TrainingData:
    """The run's concepts, its instance examples (captions, buckets) and, once made, its class examples. Everything
    a user brought is read and checked here, before the run folder is touched."""

    def __init__(self, cfg: TrainConfig, out: Path, model: StableDiffusion, start_over: bool = False):
        """`start_over`: --overwrite will empty the run folder, class images made there included."""
        self.concepts = concepts(cfg, out)
        self.shapes = buckets(cfg.resolution, model.downsampling, cfg.max_aspect) if cfg.aspect_buckets \
            else [(cfg.resolution, cfg.resolution)]
        self.instance = instance_examples(self.concepts, cfg, self.shapes)
        check_prompts(model, cfg, self.concepts, self.instance)
        cleared = [start_over and c.class_dir.resolve().is_relative_to((out / "class_images").resolve())
                   for c in self.concepts]
        for c, gone in zip(self.concepts, cleared) if cfg.class_images else []:
            check_class_dir(c.class_dir, None if gone else c.class_prompt)
        ready = cfg.class_images and not any(cleared) and all(
            c.class_dir.is_dir() and len(image_files(c.class_dir)) >= c.num_class_images for c in self.concepts)
        if ready:  # no class image will be drawn: their buckets are checked now, before run.json
            check_buckets(self.instance, class_examples(self.concepts, cfg, self.shapes))
        elif cfg.class_images and cfg.aspect_buckets:  # the buckets the kept and the drawn images will have, first
            check_planned_buckets(self.concepts, cleared, self.instance, self.shapes)
        self.klass = []

    def prompts(self) -> list[str]:
        """Each concept's instance and class prompt: what the text encoder always sees together."""
        return [p for c in self.concepts for p in (c.instance_prompt, c.class_prompt)]

    def pools(self) -> list[list[Example]]:
        return [self.instance, self.klass]

    def make_class_images(self, model: StableDiffusion, cfg: TrainConfig, rt: Runtime):
        """The prior-preservation images of every concept (at its instance images' buckets), then read."""
        for k, c in enumerate(self.concepts):
            sizes = [e.bucket for e in self.instance if e.concept == k] if cfg.aspect_buckets else None
            make_class_images(model, cfg, c, rt, k, sizes)
        self.klass = class_examples(self.concepts, cfg, self.shapes)
        check_buckets(self.instance, self.klass)

    def epoch_images(self) -> int:
        """Instance images an epoch shows: each photo times its repeats (kohya's epoch)."""
        return sum(e.repeats for e in self.instance)

    def steps_for(self, epochs: int, images_per_step: int) -> int:
        """--epochs as optimizer steps, the last one completing the last epoch."""
        return max(1, math.ceil(epochs * self.epoch_images() / images_per_step))

    def write_json(self, out: Path, cfg: TrainConfig):
        schedule = {"steps": cfg.steps, "epochs": cfg.epochs, "epoch_images": self.epoch_images(),
                    "captions": {"dropout": cfg.caption_dropout, "shuffle_tags": cfg.shuffle_tags,
                                 "keep_tokens": cfg.keep_tokens}}
        write_data_json(out, self.instance, self.klass, self.shapes, schedule)
