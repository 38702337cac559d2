"""Timing, FLOP counting and result files shared by the benchmarks; the DreamBooth step's inputs and the end of
diffusers' scripts' step, shared by the step benchmarks (step.py, diffusers_sdxl.py)."""
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup: int, repeat: int) -> dict:
    """Median and spread of `repeat` timed calls after `warmup` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeat)):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "p25_ms": q[0], "p75_ms": q[2], "warmup": warmup, "repeat": repeat}


def count_flops(fn) -> int:
    """FLOPs of one call, counted by torch on the graph that actually runs."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory(fn, device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def environment(device) -> dict:
    cuda = torch.device(device).type == "cuda"
    env = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
           "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for mod in ("triton", "diffusers", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def device_tag(env: dict) -> str:
    """The device's name as a file name part: NVIDIA_H100_80GB_HBM3, cpu_x86_64."""
    return env["device"].replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_")


def write(name: str, device, rows: list[dict], out: Path = RESULTS, extra: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    tag = "smoke" if any(r.get("smoke") for r in rows) else device_tag(env)
    path = out / f"{name}-{tag}.json"
    path.write_text(json.dumps({"benchmark": name, **env, **(extra or {}), "results": rows}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


# Dense bf16 tensor-core peak, for MFU; None where we do not know the part.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def images(res: int):
    """One instance and one class image: random pixels (the step's cost does not depend on them)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(res, res, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]


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


def script_pixels(res: int, device, dtype) -> torch.Tensor:
    """The two images as diffusers' scripts feed them: (2, 3, res, res) in [-1, 1]."""
    import numpy as np
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
                        for im in images(res)]).to(device, dtype)


def script_noising(vae, dist, pixels, scheduler, device):
    """The scripts' draw: latents (from the cached distribution `dist`, or encoded now) × the VAE's scaling factor,
    noise, timesteps. Returns (noisy latents, noise, timesteps)."""
    latents = (dist or vae.encode(pixels).latent_dist).sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    return scheduler.add_noise(latents, noise, t), noise, t
