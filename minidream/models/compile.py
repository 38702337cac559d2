"""--compile: torch.compile as a transform of a network, the way LoRA is one: `compile_network(unet, mode)` compiles
its forward in place (nn.Module.compile), so its parameters, state_dict keys, LoRA wrappers and checkpoints are
those of the eager network; only how its forward (and, through AOTAutograd, its backward) runs changes.

Why: on a GPU the eager UNet step is launch-bound (benchmarks/results/*H100*: 2-16% MFU), a few thousand small
kernels each waiting on the Python that launches it. Inductor fuses the elementwise work (GroupNorm + SiLU, the
residual adds, GEGLU) into fewer kernels; CUDA graphs ("graphs": torch.compile's reduce-overhead mode) then replay
the whole forward and backward with one launch each. Both compile once per input shape (one graph per aspect
bucket, `dynamic=False`): the first step of each size takes a while, the later ones replay.

What runs outside the compiled graph stays eager and correct: the optimizer update, gradient clipping, torchrun's
all-reduce, the non-finite-loss check (it reads the loss on the host), validation grids and losses (`eager()`:
they would compile a second, no-grad graph for a few calls).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class CompileMode:
    help: str
    options: dict | None  # torch.compile's keyword arguments; None: eager
    cuda_only: bool = False


# --compile: one row per choice
COMPILE_MODES = {
    "off": CompileMode("eager PyTorch", None),
    "on": CompileMode("torch.compile (Inductor) the UNet: fused kernels; the first step of each image size compiles "
                      "(a minute or more)", {"mode": "default", "dynamic": False}),
    "graphs": CompileMode("as on, and the UNet's forward and backward replay as CUDA graphs (torch.compile's "
                          "reduce-overhead mode): one launch per pass; CUDA only",
                          {"mode": "reduce-overhead", "dynamic": False}, cuda_only=True),
}
COMPILE_HELP = "; ".join(f"{name}: {row.help}" for name, row in COMPILE_MODES.items())


def check_compile(mode: str, device) -> str | None:
    """What is wrong with --compile `mode` on `device`, or None."""
    if mode not in COMPILE_MODES:
        return f"{mode!r} is not one of {', '.join(COMPILE_MODES)}"
    if COMPILE_MODES[mode].cuda_only and torch.device(device).type != "cuda":
        return f"{mode} replays CUDA graphs: it needs a CUDA GPU (on {torch.device(device).type}: --compile on or off)"
    return None


def compile_network(net: nn.Module, mode: str) -> nn.Module:
    """`net` with its forward compiled as --compile `mode` asks (in place; "off": unchanged)."""
    options = COMPILE_MODES[mode].options
    if options is None:
        return net
    # one graph per image size (aspect buckets) and per trained/frozen pass: more than torch's default of 8 recompiles
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    net.compile(**options)
    net.compiled_as = mode
    return net


def graphed(mode: str) -> bool:
    return (COMPILE_MODES[mode].options or {}).get("mode") == "reduce-overhead"


def call(net: nn.Module, *args, **kwargs):
    """net(*args, **kwargs) for a caller that keeps the output past the next call (a multistep sampler): under CUDA
    graphs the output lives in the graph's memory, which the next replay overwrites, so it is copied out."""
    if not graphed(getattr(net, "compiled_as", "off")):
        return net(*args, **kwargs)
    torch.compiler.cudagraph_mark_step_begin()
    return net(*args, **kwargs).clone()


def step_begins(mode: str):
    """Before each training step under CUDA graphs: the last step's graph outputs may be overwritten now (without
    this mark, cudagraph trees would keep them alive, copying each step)."""
    if graphed(mode):
        torch.compiler.cudagraph_mark_step_begin()


@contextmanager
def eager():
    """Compiled networks run their eager forward in the block (validation: a few no-grad calls would compile a
    second graph, and under CUDA graphs record one, for nothing). torch < 2.6 has no stances: there they run
    compiled."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:
        yield
        return
    with stance("force_eager"):
        yield
