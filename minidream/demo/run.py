"""The embedded demo: a tiny text-to-image model of the toy world (`world.py`), its pretraining, the
recogniser that measures it, and the DreamBooth run and evaluation that use them.

Same classes as the real models (CLIPTextModel, UNet2DConditionModel, AutoencoderKL), tiny configs,
weights under weights/demo/ in the diffusers layout, loaded through the ordinary loader.
"""
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.demo import world
from minidream.models.clip import CLIPConfig, CLIPTextModel
from minidream.formats.diffusers_layout import save_pretrained
from minidream.formats.files import save_safetensors
from minidream.formats.loading import load
from minidream.models.stable_diffusion import StableDiffusion
from minidream.progress import Progress
from minidream.sampling.schedulers import NoiseSchedule, SchedulerConfig
from minidream.models.tokenizer import train_bpe
from minidream.models.unet import UNet2DConditionModel, UNetConfig
from minidream.models.vae import AutoencoderKL, VAEConfig, from_uint8, reparameterize, to_uint8

DEMO_DIR = Path(__file__).resolve().parents[2] / "weights" / "demo"
MAX_TOKENS = 16  # the world's captions are short; fewer positions make every step cheaper

UNET = UNetConfig(channels=(32, 64, 128), attention=(False, True, True), heads=(4, 4, 4), layers_per_block=1,
                  context_dim=64, groups=16, sample_size=8)
VAE = VAEConfig(channels=(32, 64, 64), layers_per_block=1, groups=16, sample_size=32)
# ε-prediction, DDIM from t = 951 (SD 1.x's schedule). A v-prediction model sampled from t = 999 (Lin et al. 2024)
# was tried for the demo's colour failures and bound the subject worse (benchmarks/results/demo-seeds-cpu.json).
SCHEDULER = SchedulerConfig()


# ---------------------------------------------------------------------------------------------
# The recogniser: a small CNN trained on rendered images, one head per attribute.

class Recognizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(96 * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in world.ATTRIBUTES.items()})

    def forward(self, x):
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> list[dict]:
        """(N, H, W, 3) uint8 -> one {attribute: value} per image."""
        x = from_uint8(images_uint8.permute(0, 3, 1, 2))
        logits = self(x)
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: world.ATTRIBUTES[k][idx[k][i]] for k in idx} for i in range(len(x))]


def _degrade(x: torch.Tensor, g: torch.Generator):
    """Blur and noise, so the recogniser also reads the softer images a diffusion model draws."""
    blur = torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.6
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x * (1 - blur) + soft * blur
    return x + torch.randn(x.shape, generator=g) * torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.1


def _labels(toys):
    return {k: torch.tensor([v.index(getattr(t, k)) for t in toys]) for k, v in world.ATTRIBUTES.items()}


def train_recognizer(steps: int = 1500, batch: int = 128, seed: int = 0, vae: AutoencoderKL | None = None):
    """Half of each batch goes through the demo VAE (encode, sample, decode) when one is given, so the
    recogniser also reads the softer images the diffusion model draws, not only clean renders."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Recognizer()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    bar = Progress(steps, "recogniser")
    for step in range(steps):
        toys = [world.random_toy(rng, allow_subject=True) for _ in range(batch)]
        x = torch.stack([world.to_tensor(world.render(t)) for t in toys])
        if vae is not None:
            with torch.no_grad():
                h = batch // 2
                mean, logvar = vae.encode(x[:h])
                x[:h] = vae.decode(reparameterize(mean, logvar, torch.randn(mean.shape, generator=g))).clamp(-1, 1)
        x = _degrade(x, g)
        out, y = net(x), _labels(toys)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(loss=loss.item())
    net.eval()
    return net, held_out_accuracy(net, seed, vae)


def held_out_accuracy(net: Recognizer, seed: int, vae: AutoencoderKL | None) -> dict:
    """On fresh renders, and on their VAE reconstructions when a VAE is given."""
    acc = {"renders": _accuracy(net, seed + 12345, None)}
    if vae is not None:
        acc["vae_reconstructions"] = _accuracy(net, seed + 12345, vae)
    return acc


@torch.no_grad()
def _accuracy(net: Recognizer, seed: int, vae: AutoencoderKL | None, n: int = 1000) -> dict:
    """Per-attribute accuracy on fresh renders it never saw (or their VAE reconstructions)."""
    rng = random.Random(seed)
    toys = [world.random_toy(rng, allow_subject=True) for _ in range(n)]
    x = torch.stack([world.to_tensor(world.render(t)) for t in toys])
    if vae is not None:
        x = vae.decode(vae.encode(x)[0])
    imgs = to_uint8(x)
    pred = net.predict(imgs)
    return {k: sum(p[k] == getattr(t, k) for p, t in zip(pred, toys)) / n for k in world.ATTRIBUTES}


def load_recognizer(folder: Path = DEMO_DIR) -> Recognizer:
    from safetensors.torch import load_file
    net = Recognizer()
    net.load_state_dict(load_file(folder / "recognizer.safetensors"))
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Pretraining: the VAE on rendered images, then the UNet and text encoder together on captions.

def _dataset(n: int, seed: int):
    rng = random.Random(seed)
    toys, images = [], []
    for _ in range(n):
        img, _, toy = world.pretraining_example(rng)
        toys.append(toy)
        images.append(world.to_tensor(img))
    return toys, torch.stack(images)


def train_vae(x: torch.Tensor, steps: int, g: torch.Generator) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) and a small KL pull towards N(0, I), as LDM's autoencoder."""
    vae = AutoencoderKL(VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    bar = Progress(steps, "vae")
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        mean, logvar = vae.encode(x[idx])
        z = reparameterize(mean, logvar, torch.randn(mean.shape, generator=g))
        rec = vae.decode(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x[idx]).abs().mean() + (rec - x[idx]).square().mean() + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(loss=loss.item())
    return vae.eval()


def pretrain(out: Path, seed: int = 0, images: int = 20000, vae_steps: int = 2500, unet_steps: int = 4000,
             batch: int = 64, recognizer_steps: int = 1500, reuse: Path | None = None):
    """The demo model from nothing: tokenizer, VAE, then UNet + text encoder, then the recogniser. `reuse`: a demo
    model folder whose VAE and recogniser are kept (only the tokenizer, text encoder and UNet are trained)."""
    t_start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    toys, x = _dataset(images, seed)
    print(f"dataset: {len(toys)} images", file=sys.stderr)

    # Tokenizer: BPE learned on the world's captions, CLIP-style.
    captions = [world.caption(t, rng) for t in toys] + [f"a photo of sks {world.CLASS_NOUN}"]
    tok = train_bpe(captions, 256 + 2 + 64)
    tok.max_length = MAX_TOKENS

    # 1. The VAE, and its latents of every image, scaled to unit variance (LDM §4.3.2)
    vae = load(str(reuse), dtype=torch.float32).vae if reuse else train_vae(x, vae_steps, g)
    with torch.no_grad():
        stats = [vae.encode(x[i:i + 256]) for i in range(0, len(x), 256)]
    means, logvars = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
    if not reuse:
        vae.cfg = VAEConfig(**{**VAE.__dict__, "scaling_factor": 1.0 / means.std().item()})
    scale = vae.cfg.scaling_factor

    # 2. UNet + text encoder, from scratch; 10% empty captions for classifier-free guidance.
    clip = CLIPTextModel(CLIPConfig(vocab_size=len(tok), width=64, layers=2, heads=4, mlp_width=256,
                                    max_positions=MAX_TOKENS))
    unet = UNet2DConditionModel(UNET)
    schedule = NoiseSchedule(SCHEDULER)
    params = list(unet.parameters()) + list(clip.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / unet_steps))))
    bar = Progress(unet_steps, "unet+clip")
    for step in range(unet_steps):
        idx = torch.randint(0, len(x), (batch,), generator=g).tolist()
        caps = [world.caption(toys[i], rng) if rng.random() > 0.1 else "" for i in idx]
        z0 = reparameterize(means[idx], logvars[idx], torch.randn(means[idx].shape, generator=g)) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(schedule.add_noise(z0, noise, t), t, clip(tok(caps)))
        loss = F.mse_loss(pred, schedule.target(z0, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(loss=loss.item())
    model = StableDiffusion(tokenizer=tok, text_encoder=clip.eval(), unet=unet.eval(), vae=vae,
                            scheduler=SCHEDULER, source=str(out))
    save_pretrained(model, out)
    # The UNet's weights ship in fp16 to keep weights/demo small; loading upcasts them (train, demo: fp32).
    save_safetensors({k: v.half() for k, v in unet.state_dict().items()}, out / "unet" / "diffusion_pytorch_model.safetensors")

    # 3. The recogniser, and what it says of the model on caption combinations pretraining never showed.
    if reuse:
        net = load_recognizer(reuse)
        rec_acc = held_out_accuracy(net, seed, vae)
    else:
        net, rec_acc = train_recognizer(recognizer_steps, seed=seed, vae=vae)
    save_safetensors(net.state_dict(), out / "recognizer.safetensors")
    quality = evaluate_pretrained(load(str(out), dtype=torch.float32), net)
    record = {"command": " ".join(sys.argv), "seed": seed, "dataset_images": images,
              **({"vae_and_recognizer_from": str(reuse)} if reuse else {"vae_steps": vae_steps,
                                                                       "recognizer_steps": recognizer_steps}),
              "unet_steps": unet_steps, "batch": batch, "scheduler": SCHEDULER.to_dict(),
              "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "wall_time_s": round(time.time() - t_start, 1),
              "recognizer_accuracy_on_held_out_images": rec_acc, "held_out_caption_quality": quality}
    (out / "PRETRAIN.json").write_text(json.dumps(record, indent=2))
    return record


def full_prompt(toy: world.Toy) -> str:
    pattern = "" if toy.pattern == "plain" else f"{toy.pattern} "
    return f"a {toy.colour} {pattern}{toy.shape} on a {toy.background} background"


@torch.no_grad()
def evaluate_pretrained(model: StableDiffusion, net: Recognizer, n: int = 120, seed: int = 7):
    """Fraction of samples whose shape and colour the recogniser finds as prompted, on held-out combinations."""
    from minidream.sampling.pipeline import generate
    rng = random.Random(seed)
    toys = []
    while len(toys) < n:
        t = world.random_toy(rng)
        if world.held_out(t):
            toys.append(t)
    prompts = [full_prompt(t) for t in toys]
    imgs = torch.cat([generate(model, prompts[i:i + 40], steps=25, guidance=4.0, progress=False,
                               generator=torch.Generator().manual_seed(seed + i)) for i in range(0, n, 40)])
    pred = net.predict(imgs)
    hit = [p["shape"] == t.shape and p["colour"] == t.colour for p, t in zip(pred, toys)]
    return {"samples": n, "shape_and_colour": sum(hit) / n,
            "shape": sum(p["shape"] == t.shape for p, t in zip(pred, toys)) / n,
            "colour": sum(p["colour"] == t.colour for p, t in zip(pred, toys)) / n,
            "pattern": sum(p["pattern"] == t.pattern for p, t in zip(pred, toys)) / n,
            "background": sum(p["background"] == t.background for p, t in zip(pred, toys)) / n}


# ---------------------------------------------------------------------------------------------
# DreamBooth on the embedded subject, and its measurement (DreamBooth paper, Table 3's quantities).

SUBJECT = "a sks toy"  # the instance prompt: identifier + class noun
CLASS_PROMPT = "a toy"
PROMPTS = (SUBJECT, f"{SUBJECT} on a blue background", CLASS_PROMPT)
CONTEXTS = ("white", "black", "gray", "blue")
STEPS = 50  # seeds 0-5, mean fidelity at 25/50/.../150 steps 0.95/0.99/0.96/0.94/0.98/0.98, none < 0.86 (world_2)


def demo_config(out: Path, prior: bool = True, seed: int = 0, steps: int = STEPS, model: Path = DEMO_DIR,
                lr: float = 3e-5, text_encoder_lr: float = 1e-3):
    """The demo's run: the whole UNet and the text encoder, batches of 4 + 4 at the world's 32 px, cached
    latents; everything not named here is TrainConfig's default.

    The text encoder learns 30x faster than the UNet (kohya's --unet_lr / --text_encoder_lr split). The subject's
    colour and pattern are decided early in sampling, where the ε-loss barely sees them: in the earlier world a model
    that drew red dotted stars fit the orange striped photos *better* in every noise band than one that drew the
    subject. Letting the text encoder carry the binding and moving the UNet 10x slower lifted the mean fidelity there
    from 0.48 to 0.78 (seeds 0-5, 100 steps); the world whose attributes lie apart in the latent (world.py) took it
    to 0.99 at 50 steps (benchmarks/results/demo-seeds-cpu.json, sweep_4 and world_2)."""
    from minidream.training.config import TrainConfig
    return TrainConfig(
        model=str(model), instance_dir=str(out / "instance"), class_noun=world.CLASS_NOUN, out=str(out),
        instance_prompt=SUBJECT, class_prompt=CLASS_PROMPT, resolution=world.SIZE, flip=0.5, prior=prior,
        num_class_images=32, class_steps=10, class_guidance=4.0, class_batch_size=64, train_text_encoder=True,
        lr=lr, text_encoder_lr=text_encoder_lr, warmup_steps=10,
        max_grad_norm=0.0,  # the demo's lrs and steps were chosen without clipping
        steps=steps, batch_size=4, cache_latents=True, seed=seed, validation_steps=20, checkpoint_every=0,
        keep_last=1, device="cpu")


def is_subject(p: dict) -> bool:
    return all(p[k] == v for k, v in world.SUBJECT.items())


SAMPLING = {"steps": 20, "guidance": 4.0, "progress": False}  # the evaluation's and the grids' (they must agree)
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
    from minidream.sampling.pipeline import generate
    prompts = eval_prompts(n, classes)
    images = generate(model, prompts, latents=eval_noise(n, seed, classes), **SAMPLING)
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
    from minidream.inspect.attention_maps import attention_maps, localisation
    ids, ident = model.tokenizer.encode(SUBJECT), model.tokenizer.encode(SUBJECT.split()[1])
    start = next(i for i in range(len(ids)) if ids[i:i + len(ident)] == ident)
    images, maps = attention_maps(model, [SUBJECT] * n, steps=20, guidance=4.0, seed=seed)
    masks = subject_mask(images)
    rows = [localisation(maps[b, 1 + start: 1 + start + len(ident)].sum(0), masks[b]) for b in range(n)]
    rows = [r for r in rows if math.isfinite(r)]  # an image with nothing drawn (or nothing else) has no ratio
    return sum(rows) / len(rows) if rows else float("nan")


GRID = 4  # columns of the before/after grids


def grid_rows(n: int = 16) -> list[int]:
    """Where each of PROMPTS' first GRID samples sits in the evaluation's batch."""
    prompts = eval_prompts(n)
    return [prompts.index(p) + i for p in PROMPTS for i in range(GRID)]


def save_grid(images: torch.Tensor, path: Path):
    """Rows: the demo prompts; columns: the evaluation's first draws, so before/after grids line up."""
    from minidream.sampling.pipeline import grid, save_png
    big = F.interpolate(images.permute(0, 3, 1, 2).float(), scale_factor=3, mode="nearest")  # 32 px is small to look at
    save_png(grid(big.permute(0, 2, 3, 1).to(torch.uint8), cols=GRID), path, {"rows": list(PROMPTS)})


def run_demo(out: Path, prior: bool = True, seed: int = 0, steps: int = STEPS, grids: bool = True,
             model_dir: Path = DEMO_DIR, localise: bool = False, classes: int = CLASSES) -> dict:
    """Train DreamBooth on the embedded subject and measure it; writes grids, report.json and report.md."""
    from minidream.training.dreambooth import train
    t0 = time.time()
    out = Path(out)
    (out / "instance").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(world.subject_images(4)):
        img.save(out / "instance" / f"subject-{i}.png")
    net = load_recognizer(model_dir)
    cfg = demo_config(out, prior=prior, seed=seed, steps=steps, model=model_dir)
    rows = grid_rows()
    if grids:  # the base model on the evaluation's starting latents of the grid's rows
        from minidream.sampling.pipeline import generate
        prompts = eval_prompts()
        save_grid(generate(load(cfg.model, dtype=torch.float32), [prompts[i] for i in rows],
                           latents=eval_noise(classes=classes)[rows], **SAMPLING), out / "before.png")
    model, _ = train(cfg, overwrite=True)
    found, images = evaluate_dreambooth(model, net, classes=classes)
    if grids:
        save_grid(images[rows], out / "after.png")
    metrics = {"prior_preservation": prior, "steps": steps, "seed": seed, **found}
    if localise:
        metrics["attention_localisation"] = attention_localisation(model)
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(
        f"# DreamBooth demo ({'with' if prior else 'without'} prior preservation)\n\n"
        f"subject: {world.SUBJECT_WORDS} ('sks toy'); "
        f"{steps} steps, seed {seed}, {metrics['wall_time_s']} s on {platform.machine()} CPU\n\n"
        "| subject fidelity | prompt fidelity | PRES (lower is better) | DIV (higher is better) |\n|---|---|---|---|\n"
        f"| {metrics['subject_fidelity']:.3f} | {metrics['prompt_fidelity']:.3f} | {metrics['PRES']:.3f} | {metrics['DIV']:.3f} |\n")
    return metrics


def _spread(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "each": vals}


def run_eval(out: Path, seeds: tuple[int, ...] = (0, 1, 2), steps: int = STEPS, classes: int = EVAL_CLASSES) -> dict:
    """The base model, and DreamBooth with and without the prior-preservation loss (paper, Table 3), each DreamBooth
    run once per seed (its class images, noise and draws): mean, min and every seed's value; PRES and DIV from
    EVAL_CLASSES class-prompt samples."""
    out = Path(out)
    base_model = load(str(DEMO_DIR), dtype=torch.float32)
    base = {**evaluate_dreambooth(base_model, load_recognizer(), classes=classes)[0], "prior_preservation": None,
            "attention_localisation": attention_localisation(base_model)}
    runs = {"DreamBooth, no prior loss": ("without-prior", False), "DreamBooth, prior loss (λ=1)": ("with-prior", True)}
    per_seed = {k: [run_demo(out / f"{d}-seed{s}", prior=p, seed=s, steps=steps, grids=False, localise=True,
                             classes=classes) for s in seeds] for k, (d, p) in runs.items()}
    keys = ("subject_fidelity", "prompt_fidelity", "PRES", "DIV", "attention_localisation")
    rows = {"base model": {k: _spread([base], k) for k in keys},
            **{name: {k: _spread(rs, k) for k in keys} for name, rs in per_seed.items()}}
    no, yes = (per_seed[k] for k in runs)
    checks = {"prior lowers PRES on every seed": all(b["PRES"] < a["PRES"] for a, b in zip(no, yes)),
              "prior keeps DIV on every seed (no lower)": all(b["DIV"] >= a["DIV"] for a, b in zip(no, yes))}

    def cell(v, digits=3):
        return f"{v['mean']:.{digits}f} ({v['min']:.{digits}f}–{v['max']:.{digits}f})" if len(v["each"]) > 1 \
            else f"{v['mean']:.{digits}f}"
    table = (f"seeds {', '.join(map(str, seeds))}; mean (min–max) over the seeds\n\n"
             "| model | subject fidelity | each seed | prompt fidelity | PRES ↓ | DIV ↑ | identifier attention localisation |\n"
             "|---|---|---|---|---|---|---|\n" +
             "".join(f"| {k} | {cell(v['subject_fidelity'])} | {' / '.join(f'{x:.3f}' for x in v['subject_fidelity']['each'])} "
                     f"| {cell(v['prompt_fidelity'])} | {cell(v['PRES'])} | {cell(v['DIV'])} "
                     f"| {cell(v['attention_localisation'], 2)} |\n" for k, v in rows.items()) +
             "".join(f"\n{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()) + "\n")
    (out / "eval.md").write_text(table)
    (out / "eval.json").write_text(json.dumps({"seeds": list(seeds), "steps": steps, "rows": rows, "checks": checks,
                                               "runs": {"base model": base, **per_seed}}, indent=2))
    return {"rows": rows, "checks": checks, "table": table}
