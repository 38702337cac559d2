"""Pretraining the demo model from nothing (`minidream demo-pretrain`): a BPE tokenizer on the world's captions,
the VAE on rendered images, then the UNet and text encoder together, then the recogniser; and what the model makes
of caption combinations pretraining never showed.
"""
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minidream.demo import grounding as grounding_
from minidream.demo import world
from minidream.demo.architecture import GROUNDING, MAX_TOKENS, SCHEDULER, UNET, VAE
from minidream.demo.recognizer import Recognizer, held_out_accuracy, load_recognizer, train_recognizer
from minidream.formats.diffusers_layout import save_pretrained
from minidream.formats.files import save_safetensors
from minidream.formats.loading import load
from minidream.models.clip import CLIPConfig, CLIPTextModel
from minidream.models.noise_schedule import DDPMProcess
from minidream.models.stable_diffusion import StableDiffusion
from minidream.models.tokenizer import train_bpe
from minidream.models.unet import UNet2DConditionModel
from minidream.models.vae import AutoencoderKL, VAEConfig, reparameterize
from minidream.progress import Progress
from minidream.sampling.pipeline import SamplingParams, generate


def _dataset(n: int, seed: int):
    rng = random.Random(seed)
    toys, images = [], []
    for _ in range(n):
        img, _, toy = world.pretraining_example(rng)
        toys.append(toy)
        images.append(world.to_tensor(img))
    return toys, torch.stack(images)


def codec_images(n: int, seed: int) -> torch.Tensor:
    """Renders of toys with any shape and pattern, the unnamed ones too (never a subject): the VAE is the world's
    image codec, trained on more than the captioned images, as SD's is; the UNet never sees these."""
    rng = random.Random(seed)
    return torch.stack([world.to_tensor(world.render(world.random_toy(rng, unnamed=True))) for _ in range(n)])


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


def train_denoiser(toys, means, logvars, scale: float, tok, steps: int, batch: int, grounding: float,
                   g: torch.Generator, rng: random.Random):
    """The text encoder and UNet, from scratch, on the VAE's latents (their means and log-variances, scaled by
    `scale`): 10% empty captions for classifier-free guidance; the words naming the toy asked to look at it
    (grounding.py says why), against its coverage of each latent position. Returns (clip, unet)."""
    clip = CLIPTextModel(CLIPConfig(vocab_size=len(tok), width=64, layers=2, heads=4, mlp_width=256,
                                    max_positions=MAX_TOKENS))
    unet = UNet2DConditionModel(UNET)
    schedule = DDPMProcess(SCHEDULER)
    cover = grounding_.coverage(toys, means.shape[-1])
    tap, hooks = grounding_.tap_cross_attention(unet) if grounding > 0 else (None, [])
    params = list(unet.parameters()) + list(clip.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    warm = 200

    def lr(s):  # linear warmup, then half a cosine
        return min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    bar = Progress(steps, "unet+clip")
    for step in range(steps):
        idx = torch.randint(0, len(means), (batch,), generator=g).tolist()
        caps = [world.caption(toys[i], rng) if rng.random() > 0.1 else "" for i in idx]
        z0 = reparameterize(means[idx], logvars[idx], torch.randn(means[idx].shape, generator=g)) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(schedule.add_noise(z0, noise, t), t, clip(tok(caps)))
        loss = F.mse_loss(pred, schedule.target(z0, noise, t))
        stats = {"loss": loss.item()}
        if tap is not None:
            ground = grounding_.grounding_loss(tap.probs, grounding_.object_tokens(tok, caps, MAX_TOKENS), cover[idx])
            tap.probs.clear()
            loss = loss + grounding * ground
            stats["ground"] = ground.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(**stats)
    for h in hooks:
        h.remove()
    return clip, unet


def pretrain(out: Path, seed: int = 0, images: int = 20000, vae_steps: int = 2500, unet_steps: int = 4000,
             batch: int = 64, recognizer_steps: int = 1500, reuse: Path | None = None, grounding: float = GROUNDING):
    """The demo model from nothing: tokenizer, VAE, then UNet + text encoder, then the recogniser. `reuse`: a demo
    model folder whose VAE and recogniser are kept (only the tokenizer, text encoder and UNet are trained).
    `grounding`: the weight of the cross-attention term that grounds the toy's words (demo/grounding.py)."""
    t_start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    toys, x = _dataset(images, seed)
    print(f"dataset: {len(toys)} images", file=sys.stderr)

    # Tokenizer: BPE learned on the world's captions, CLIP-style, with room for every merge they hold, so each word
    # of the world is one token as in CLIP's vocabulary (with 64 merges "yellow" was six letters, and a word's
    # attention was spread over pieces it shares with other words). "sks" is seen once: a rare token, as in CLIP.
    captions = [world.caption(t, rng) for t in toys] + [f"a photo of sks {world.CLASS_NOUN}"]
    tok = train_bpe(captions, 256 + 2 + 512)
    tok.max_length = MAX_TOKENS

    # 1. The VAE, and its latents of every image, scaled to unit variance (LDM §4.3.2)
    vae = load(str(reuse), dtype=torch.float32).vae if reuse else \
        train_vae(torch.cat([x, codec_images(images // 4, seed + 1)]), vae_steps, g)
    with torch.no_grad():
        stats = [vae.encode(x[i:i + 256]) for i in range(0, len(x), 256)]
    means, logvars = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
    if not reuse:
        vae.config = VAEConfig(**{**VAE.__dict__, "scaling_factor": 1.0 / means.std().item()})
    scale = vae.config.scaling_factor

    # 2. UNet + text encoder, from scratch
    clip, unet = train_denoiser(toys, means, logvars, scale, tok, unet_steps, batch, grounding, g, rng)
    model = StableDiffusion(tokenizer=tok, text_encoder=clip.eval(), unet=unet.eval(), vae=vae,
                            scheduler=SCHEDULER, source=str(out))
    save_pretrained(model, out)
    # The UNet's weights ship in fp16 to keep the shipped demo model small; loading upcasts them (train, demo: fp32).
    save_safetensors({k: v.half() for k, v in unet.state_dict().items()},
                     out / "unet" / "diffusion_pytorch_model.safetensors")

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
              "unet_steps": unet_steps, "batch": batch, "grounding": grounding,
              "held_out_subjects": [world.subject_words(s) for s in world.SUBJECTS], "scheduler": SCHEDULER.to_dict(),
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
    rng = random.Random(seed)
    toys = []
    while len(toys) < n:
        t = world.random_toy(rng)
        if world.held_out(t):
            toys.append(t)
    prompts = [full_prompt(t) for t in toys]
    params = SamplingParams(steps=25, guidance=4.0)
    imgs = torch.cat([generate(model, prompts[i:i + 40], params, progress=False,
                               generator=torch.Generator().manual_seed(seed + i)) for i in range(0, n, 40)])
    pred = net.predict(imgs)
    hit = [p["shape"] == t.shape and p["colour"] == t.colour for p, t in zip(pred, toys)]
    return {"samples": n, "shape_and_colour": sum(hit) / n,
            "shape": sum(p["shape"] == t.shape for p, t in zip(pred, toys)) / n,
            "colour": sum(p["colour"] == t.colour for p, t in zip(pred, toys)) / n,
            "pattern": sum(p["pattern"] == t.pattern for p, t in zip(pred, toys)) / n,
            "background": sum(p["background"] == t.background for p, t in zip(pred, toys)) / n}
