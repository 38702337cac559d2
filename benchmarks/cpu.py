"""The DreamBooth step on the CPU: the trainer's own step (training.step: prepare → Stepper, with the optimizer,
precision and attention choices `minidream train` makes) against the step of diffusers' train_dreambooth.py
(train_dreambooth_lora.py for LoRA), same architecture and weights, fp32, 1 instance + 1 class image.

Each measurement runs in its own child process, so each has its own peak RSS (what `ps` would show the
user), and the rounds alternate the two sides (and which goes first), so a machine that slows down or
speeds up during the run biases neither.

    python -m benchmarks sd --device cpu --res 256      # -> benchmarks/results/step-cpu-sd15-256-<cpu>.json
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("unet", "attention", "lora")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def images(res: int):
    """One instance and one class image: random pixels (the step's cost does not depend on them)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(res, res, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]


def ours(folder: str, mode: str, res: int, **settings):
    """The trainer's step; `settings`: other TrainConfig fields (the memory benchmark's recipes)."""
    from minidream.models.attention import resolve_backend
    from minidream.training.concepts import plain
    from minidream.training.config import TrainConfig
    from minidream.training.export import load_base
    from minidream.training.runtime import PRECISIONS, Runtime
    from minidream.training.step import prepare
    cfg = TrainConfig(model=folder, instance_dir="", class_noun="dog", out="", mode=mode, resolution=res,
                      steps=10 ** 6, device="cpu", **settings)
    device = torch.device("cpu")
    rt = Runtime(device, resolve_backend(cfg.attention, device), PRECISIONS[cfg.mixed_precision])
    model = rt.place(load_base(cfg))
    inst, cls = images(res)
    stepper = prepare(cfg, model, rt, [plain([inst], cfg.prompts[0], res), plain([cls], cfg.prompts[1], res)])
    state = {"step": 0}

    def step():
        stepper(state["step"])
        state["step"] += 1
    return step


def diffusers(folder: str, mode: str, res: int, use_8bit_adam: bool = False, gradient_checkpointing: bool = False):
    """train_dreambooth.py's loop body (with prior preservation), on its defaults: AdamW(lr, betas 0.9/0.999,
    weight decay 1e-2, eps 1e-8), gradient clipping at 1.0, the prompt encoded every step; or with its memory flags
    --use_8bit_adam (bitsandbytes' AdamW8bit) and --gradient_checkpointing."""
    import numpy as np
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae.requires_grad_(False)
    text.requires_grad_(False)
    unet.requires_grad_(mode == "unet")
    if mode == "attention":  # diffusers has no such mode; the same projections as ours, unfrozen
        from minidream.training.trainable import UNET_ATTENTION
        for name, m in unet.named_modules():
            if UNET_ATTENTION.fullmatch(name):
                m.requires_grad_(True)
    elif mode == "lora":  # train_dreambooth_lora.py
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    from minidream.training.trainable import MODES  # our learning rates (the step's cost does not depend on them)
    adamw = torch.optim.AdamW
    if use_8bit_adam:
        import bitsandbytes
        adamw = bitsandbytes.optim.AdamW8bit
    opt = adamw(params, lr=MODES[mode].lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1
                          for im in images(res)])
    ids = tok(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids

    def step():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2,))
        context = text(ids)[0]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, context, return_dict=False)[0]
        prior_preservation_update(pred, noise, params, opt)
    return step


def prior_preservation_update(pred, noise, params: list, opt):
    """The end of diffusers' DreamBooth scripts' step: the instance half's MSE + 1.0 × the class half's, backward,
    clipping at 1.0, the update."""
    import torch.nn.functional as F
    pred, pred_prior = pred.chunk(2)
    target, target_prior = noise.chunk(2)
    loss = F.mse_loss(pred.float(), target.float()) + 1.0 * F.mse_loss(pred_prior.float(), target_prior.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def child(side: str, folder: str, mode: str, res: int, warmup: int, steps: int):
    """One side, one mode: warm-up steps, then timed ones; prints one JSON line."""
    torch.manual_seed(0)
    step = (ours if side == "ours" else diffusers)(folder, mode, res)
    before = rss_now()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": times, "rss_before_first_step": before, "peak_rss": peak_rss()}))


def run_child(side, folder, mode, res, warmup, steps) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cpu", "--child", side, "--folder", folder, "--mode", mode,
           "--res", str(res), "--warmup", str(warmup), "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{side} {mode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(preset: str = "sd15", res: int = 256, rounds: int = 5, warmup: int = 1, steps: int = 1,
        modes=MODES, out=None) -> Path:
    from benchmarks.common import RESULTS, environment
    from benchmarks.sd import PROMPTS
    from minidream.formats.diffusers_layout import save_pretrained
    from minidream.models.stable_diffusion import random_model
    from minidream.models.tokenizer import train_bpe
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(random_model(preset, tokenizer=train_bpe(PROMPTS * 4, 300), seed=0), d)
        for mode in modes:
            runs = {"ours": [], "diffusers": []}
            for r in range(rounds):
                for side in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                    runs[side].append(run_child(side, d, mode, res, warmup, steps))
                    print(f"{mode} round {r} {side}: {statistics.median(runs[side][-1]['step_s']):.2f} s/step, "
                          f"peak RSS {runs[side][-1]['peak_rss'] / 2 ** 30:.2f} GiB", file=sys.stderr)
            row = {"benchmark": "dreambooth_step_cpu", "mode": mode, "res": res, "rounds": rounds}
            for side, rs in runs.items():
                per_round = [statistics.median(x["step_s"]) for x in rs]
                q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
                row[side] = {"median_s": statistics.median(per_round), "p25_s": q[0], "p75_s": q[2],
                             "min_s": min(per_round), "max_s": max(per_round), "per_round_s": per_round,
                             "peak_rss_bytes": max(x["peak_rss"] for x in rs),
                             "rss_before_first_step_bytes": max(x["rss_before_first_step"] for x in rs)}
            ratios = [b / a for a, b in zip(row["ours"]["per_round_s"], row["diffusers"]["per_round_s"])]
            row["speedup"] = row["diffusers"]["median_s"] / row["ours"]["median_s"]
            row["speedup_per_round"] = ratios
            rows.append(row)
            print(f"{mode}: speedup {row['speedup']:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})", file=sys.stderr)
    env = environment("cpu")
    env.update(device=f"cpu: {cpu_name()}, {os.cpu_count()} cores", torch_threads=torch.get_num_threads())
    path = Path(out or RESULTS) / f"step-cpu-{preset}-{res}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "step-cpu", **env, "preset": preset, "warmup_steps": warmup,
                                "timed_steps_per_round": steps, "results": rows}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["ours", "diffusers"])
    ap.add_argument("--folder")
    ap.add_argument("--mode", default=None, help="one of " + ", ".join(MODES) + " (default: all)")
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.folder, a.mode, a.res, a.warmup, a.steps)
    run(a.preset, a.res, a.rounds, a.warmup, a.steps, (a.mode,) if a.mode else MODES, a.out)


if __name__ == "__main__":
    main()
