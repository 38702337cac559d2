"""What one training step is fed: the subject's photos and the class images (read, checked, generated),
their latents (`LatentSource`: encoded once and cached, or encoded every step), and the prompts'
conditioning (`TextConditioning`: recomputed while the text encoder or a new token trains).
Every random draw comes from the run's one CPU generator, in a fixed order, so a resumed run is exact.
"""
import os
import random
import sys
from pathlib import Path

import torch

from minidream.training.config import TrainConfig, TrainError
from minidream.training.distributed import World, barrier
from minidream.models.stable_diffusion import StableDiffusion, encode_text, size_ids
from minidream.sampling.pipeline import generate, save_png
from minidream.progress import Progress
from minidream.models.vae import from_uint8

HALF = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(folder: Path, resolution: int, flag: str = "--instance-dir") -> tuple[list, list[Path]]:
    """The subject's photos (or the class images), RGB, EXIF orientation applied, and their files; every
    unreadable file named before any compute."""
    from PIL import Image, ImageOps
    if not folder.is_dir():
        raise TrainError(f"{flag} {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise TrainError(f"{flag} {folder}: no images (.jpg, .png, .webp) in it")
    images, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
            images.append(to_rgb(im, f))
        except Exception:
            bad.append(f.name)
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
    from PIL import Image
    W, H = (size, size) if isinstance(size, int) else size
    original = (im.size[1], im.size[0])
    w, h = im.size
    s = max(W / w, H / h)
    im = im.resize((max(W, round(w * s)), max(H, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = ((w - W) // 2, (h - H) // 2) if center_crop else (rng.randint(0, w - W), rng.randint(0, h - H))
    im = im.crop((left, top, left + W, top + H))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = w - W - left
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(H, W, 3)
    return from_uint8(x.permute(2, 0, 1)), size_ids(original, (top, left), (H, W))


def png_prompt(path: Path) -> str | None:
    """The prompt a generated class image was made for (its PNG text), or None for any other image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.text.get("prompt") if hasattr(im, "text") else None
    except Exception:
        return None


def make_class_images(model: StableDiffusion, cfg: TrainConfig, concept, device: torch.device, world: World = World(),
                      k: int = 0, sizes: list[tuple[int, int]] | None = None):
    """Top up the concept's class dir to its number of class images of its class prompt, drawn by the base model
    (under autocast in --class-precision: the weights stay fp32). Existing images are kept, so an interrupted
    generation resumes where it stopped. Image i starts from noise seeded by i alone (and --seed, and the
    concept's index), so the set does not depend on the batch size or on how many processes share the work.
    With buckets, image i is drawn at sizes[i % len(sizes)] (the shapes of the concept's instance images)."""
    class_dir, prompt, wanted = concept.class_dir, concept.class_prompt, concept.num_class_images
    if world.main:
        prepare_class_dir(class_dir, prompt)
    barrier(world)
    have = image_files(class_dir)
    missing = wanted - len(have)
    barrier(world)  # every process has listed the folder before any writes to it
    if missing <= 0:
        return
    free = [i for i in range(wanted + len(have)) if not (class_dir / f"class-{i:05d}.png").exists()][:missing]
    mine = free[world.rank::world.size]
    precision = cfg.class_precision if cfg.class_precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    half = HALF[precision]
    print(f"generating {missing} class images for {prompt!r} into {class_dir} ({precision})", file=sys.stderr)
    size = lambda i: sizes[i % len(sizes)] if sizes else (cfg.resolution, cfg.resolution)  # noqa: E731
    s = model.latent_scale
    bar = Progress(len(mine), "class images")  # this process's share (all of them on one process)
    for shape in sorted({size(i) for i in mine}):
        same = [i for i in mine if size(i) == shape]
        for start in range(0, len(same), cfg.class_batch_size):
            batch = same[start:start + cfg.class_batch_size]
            noise = torch.stack([torch.randn((model.unet.cfg.in_channels, shape[1] // s, shape[0] // s),
                                             generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + k * 100_000_007 + i))
                                 for i in batch])
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                imgs = generate(model, [prompt] * len(batch), cfg.class_negative_prompt or None, steps=cfg.class_steps,
                                guidance=cfg.class_guidance, scheduler=cfg.class_scheduler, latents=noise,
                                height=shape[1], width=shape[0], progress=False)
            for i, img in zip(batch, imgs):
                save_png(img, class_dir / f"class-{i:05d}.png", {"prompt": prompt, "index": i})
            bar.update(len(batch))
    bar.close()
    barrier(world)


def prepare_class_dir(class_dir: Path, prompt: str):
    """Make the folder, drop a killed generation's unfinished files, refuse images made for another prompt."""
    try:
        class_dir.mkdir(parents=True, exist_ok=True)
        probe = class_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--class-dir {class_dir}: not writable ({e.strerror}); choose another folder") from None
    for stale in class_dir.glob(".*.tmp*"):  # a killed generation's unfinished file
        stale.unlink()
    other = [p.name for p in image_files(class_dir) if png_prompt(p) not in (None, prompt)]
    if other:
        raise TrainError(f"--class-dir {class_dir}: {len(other)} image(s) were generated for another class prompt "
                         f"({png_prompt(class_dir / other[0])!r}, not {prompt!r}); choose another --class-dir or empty it")


def check_class_dir(class_dir: Path):
    """A --class-dir that cannot be made or written fails before run.json exists."""
    ancestor = next(p for p in (class_dir, *class_dir.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise TrainError(f"--class-dir {class_dir}: {'is a file or below one' if not ancestor.is_dir() else 'not writable'}; "
                         f"choose another folder")
    return class_dir


class LatentSource:
    """Latents of random picks from the instance examples (pool 0) and the class examples (pool 1), with their
    prompts (and for SDXL each view's size ids: the real photo size and crop). With --cache-latents the VAE runs
    once per image (and per mirrored view) and only q(z|x)'s mean and log-variance are kept: each step still draws a
    fresh z, as encoding anew would. With several buckets a step
    first picks one (in proportion to its instance images); each class row is of its instance row's concept."""

    def __init__(self, model: StableDiffusion, cfg: TrainConfig, pools: list[list], device, g: torch.Generator,
                 world: World = World()):
        self.model, self.cfg, self.pools, self.device, self.g, self.world = model, cfg, pools, device, g, world
        self.vae_dtype = next(model.vae.parameters()).dtype
        self.buckets = sorted({e.bucket for e in pools[0]})
        self.cache = None
        if cfg.cache_latents:
            views = (False, True) if cfg.flip > 0 else (False,)
            self.cache, self.cache_ids = [], []
            with torch.no_grad():
                for pool in pools:
                    x = [[to_tensor(e.image, e.bucket, True, f, None) for f in views] for e in pool]
                    self.cache.append([model.vae.encode(torch.stack([v for v, _ in ex]).to(device, self.vae_dtype))
                                       for ex in x])
                    self.cache_ids.append([torch.stack([ids for _, ids in ex]) for ex in x])

    def draw_step(self, n_inst: int, n_class: int) -> tuple[torch.Tensor, list[str], dict]:
        """(n_inst + n_class, 4, h, w) fp32 latents, their prompts, and the UNet's other per-row conditioning
        (SDXL: time_ids (B, 6)): this process's rows of a global draw."""
        g = self.g
        bucket = self.buckets[0]
        if len(self.buckets) > 1:
            bucket = self.pools[0][int(torch.randint(0, len(self.pools[0]), (1,), generator=g))].bucket
        inst = [i for i, e in enumerate(self.pools[0]) if e.bucket == bucket]
        picked = [inst[i] for i in torch.randint(0, len(inst), (n_inst * self.world.size,), generator=g).tolist()]
        latents, inst_ids = self._latents(0, picked, n_inst)
        rows, ids = [latents], [inst_ids]
        prompts = [self.pools[0][i].prompt for i in picked][self.world.rows(n_inst)]
        if n_class:  # each instance row's partner: a class image of its concept, in its bucket
            concept = [self.pools[0][i].concept for i in picked][: n_class * self.world.size]
            choice = {}
            for c in sorted(set(concept)):
                own = [i for i, e in enumerate(self.pools[1]) if e.concept == c and e.bucket == bucket]
                choice[c] = [own[i] for i in torch.randint(0, len(own), (len(concept),), generator=g).tolist()]
            klass = [choice[c][r] for r, c in enumerate(concept)]
            latents, class_ids = self._latents(1, klass, n_class)
            rows.append(latents)
            ids.append(class_ids)
            prompts += [self.pools[1][i].prompt for i in klass][self.world.rows(n_class)]
        extra = {"time_ids": torch.cat(ids).to(self.device)} if self.model.xl else {}
        return torch.cat(rows), prompts, extra

    def _latents(self, pool: int, idx: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4, h, w) latents scaled for the UNet of this process's n of the globally drawn examples `idx`,
        and their size ids (n, 6)."""
        cfg, g, rows = self.cfg, self.g, self.world.rows(n)
        N = len(idx)
        flips = (torch.rand(N, generator=g) < cfg.flip).tolist()
        if self.cache is not None:
            view = [int(f) if cfg.flip > 0 else 0 for f in flips][rows]
            mean = torch.stack([self.cache[pool][i][0][v] for i, v in zip(idx[rows], view)])
            logvar = torch.stack([self.cache[pool][i][1][v] for i, v in zip(idx[rows], view)])
            ids = torch.stack([self.cache_ids[pool][i][v] for i, v in zip(idx[rows], view)])
        else:  # the crops are drawn for every example in order (cheap), then each process keeps its own
            py = random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            ex = self.pools[pool]
            views = [to_tensor(ex[i].image, ex[i].bucket, cfg.center_crop, f, py) for i, f in zip(idx, flips)][rows]
            ids = torch.stack([v[1] for v in views])
            with torch.no_grad():
                mean, logvar = self.model.vae.encode(torch.stack([v[0] for v in views]).to(self.device, self.vae_dtype))
        eps = torch.randn((N, *mean.shape[1:]), generator=g)[rows].to(self.device, mean.dtype)
        return self.model.vae.latents(mean, logvar, eps).float(), ids


class TextConditioning:
    """The UNet's conditioning for each row's prompt. Recomputed each step while the text encoder (or a new
    token) trains, else computed once per prompt. The run's own prompts (each concept's instance and class
    prompt) are always encoded together, in that order, captions after them. --text-encoder-steps N (kohya's
    --stop_text_encoder_training) freezes the text encoder from step N on."""

    def __init__(self, model: StableDiffusion, cfg: TrainConfig, groups: dict, prompts: list[str]):
        self.model, self.cfg, self.base = model, cfg, list(dict.fromkeys(prompts))
        self.te_params = [p for _, p in groups["text_encoder"]]
        self.token_trains = bool(groups["token"])
        self.fixed = {}

    def __call__(self, step: int, prompts: list[str]) -> dict[str, torch.Tensor]:
        te = self.te_params
        if te and te[0].requires_grad and self.cfg.text_encoder_steps and step >= self.cfg.text_encoder_steps:
            for p in te:
                p.requires_grad_(False)
            self.fixed = {}
        wanted = self.base + [p for p in dict.fromkeys(prompts) if p not in self.base]
        if self.token_trains or (te and te[0].requires_grad):
            cond = encode_text(self.model, wanted)
        else:  # frozen: each prompt encoded once (the first time with the run's own prompts, as one batch)
            missing = [p for p in wanted if p not in self.fixed]
            if missing:
                with torch.no_grad():
                    got = encode_text(self.model, missing)
                self.fixed.update({p: {key: v[k:k + 1] for key, v in got.items()} for k, p in enumerate(missing)})
            cond = {key: torch.cat([self.fixed[p][key] for p in wanted]) for key in self.fixed[wanted[0]]}
        at = {p: k for k, p in enumerate(wanted)}
        return {key: v[[at[p] for p in prompts]] for key, v in cond.items()}


def check_prompts(model: StableDiffusion, cfg: TrainConfig, concepts: list):
    """CLIP reads 77 tokens: a prompt cut before its identifier would train on the class alone."""
    pairs = [(what, p) for c in concepts for what, p in (("--instance-prompt", c.instance_prompt),
                                                         ("--class-prompt", c.class_prompt))]
    for what, prompt in pairs:
        cut = model.tokenizer.truncated(prompt)
        if cut and what == "--instance-prompt" and cfg.identifier in cut and cfg.identifier not in prompt[:-len(cut)]:
            raise TrainError(f"{what}: the identifier {cfg.identifier!r} falls past the text encoder's "
                             f"{model.tokenizer.max_length}-token limit; shorten the prompt")
        if cut:
            print(f"warning: {what} is longer than {model.tokenizer.max_length} tokens; this part is cut: {cut!r}",
                  file=sys.stderr)

