"""Attention kernels at the SD shapes: our Triton kernel against every SDPA backend available.

    python -m benchmarks attention            # on a GPU: every SD shape, bf16
    python -m benchmarks attention --smoke    # CPU: tiny shapes through the Triton interpreter, no timing claims

Reports forward, backward and forward+backward median ms and TFLOP/s of *useful* FLOPs (4·N·M·D per
head for the forward, 2.5x that for the backward: no padding counted), and the ratio to the best SDPA backend.
"""
import torch
import torch.nn.functional as F

from .common import timeit, write
from minidream.kernels.shapes import SD_SHAPES

SHAPES = SD_SHAPES  # name: (B, H, N, M, D) at 512 px, batch 2 (instance + prior)
SMOKE_SHAPES = {"tiny-self-d40": (1, 2, 40, 40, 40), "tiny-cross-d80": (1, 1, 24, 77, 80)}


def backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from minidream.kernels.attention import flash_attention
    out = {"triton": flash_attention}
    for name, b in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("sdpa-cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)), ("sdpa-math", SDPBackend.MATH)):
        if b is None:
            continue

        def fn(q, k, v, b=b):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v)
        out[name] = fn
    return out


def run(smoke: bool = False, warmup: int = 10, repeat: int = 30, out=None):
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    warmup, repeat = (0, 1) if smoke else (warmup, repeat)
    rows = measure(shapes, device, warmup, repeat, smoke)
    return write("attention", device, rows, **({"out": out} if out else {}))


def cpu_backends(triton: bool) -> dict:
    """On the CPU: PyTorch's SDPA and the math reference; our kernel only through the Triton interpreter (--smoke:
    it runs the kernel's code line by line, minutes at an SD shape)."""
    fns = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
           "sdpa-math": lambda q, k, v: math_attention(q, k, v)}
    if triton:
        fns = {"triton": backends()["triton"], **fns}
    return fns


def math_attention(q, k, v):
    from minidream.models.attention import math_attention
    return math_attention(q, k, v)


def measure(shapes: dict, device: str, warmup: int, repeat: int, smoke: bool = False, say=print) -> list[dict]:
    """A row per shape: every backend's forward, backward and both, and our kernel's ratio to the best SDPA one."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fns = backends() if device == "cuda" else cpu_backends(triton=smoke)  # the interpreter: tiny shapes only
    rows = []
    for name, (B, H, N, M, D) in shapes.items():
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=device, dtype=dtype, requires_grad=True)
                   for n in (N, M, M))
        do = torch.randn(B, H, N, D, device=device, dtype=dtype)
        fwd_flops = 4 * B * H * N * M * D
        row = {"shape": name, "B": B, "H": H, "N": N, "M": M, "D": D, "dtype": str(dtype).removeprefix("torch."),
               "smoke": smoke, "backends": {}}
        for bname, fn in fns.items():
            try:
                fn(q, k, v)
            except Exception as e:  # a backend that does not support this shape/device
                row["backends"][bname] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                continue
            o = fn(q, k, v)
            fwd = timeit(lambda: fn(q, k, v), device, warmup, repeat)
            bwd = timeit(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), device, warmup, repeat)
            both = timeit(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), device, warmup, repeat)
            r = {"fwd": fwd, "bwd": bwd, "fwd_bwd": both}
            for key, flops in (("fwd", fwd_flops), ("bwd", 2.5 * fwd_flops), ("fwd_bwd", 3.5 * fwd_flops)):
                r[key]["tflops"] = flops / (r[key]["median_ms"] * 1e-3) / 1e12
            row["backends"][bname] = r
        sdpa = {b: r for b, r in row["backends"].items() if b.startswith("sdpa") and "error" not in r}
        if "triton" in row["backends"] and "error" not in row["backends"]["triton"] and sdpa:
            for key in ("fwd", "bwd", "fwd_bwd"):
                best = min(sdpa, key=lambda b: sdpa[b][key]["median_ms"])
                triton_ms = row["backends"]["triton"][key]["median_ms"]
                row[f"speedup_{key}_vs_best_sdpa"] = sdpa[best][key]["median_ms"] / triton_ms
                row[f"best_sdpa_{key}"] = best
        rows.append(row)
        say(f"attention {name}: " + ", ".join(f"{b} {r['fwd_bwd']['median_ms']:.3f} ms" for b, r in
                                              row["backends"].items() if "fwd_bwd" in r))
    return rows
