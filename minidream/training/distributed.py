"""Many processes (torchrun): data parallelism that is the same computation as one process with the global batch.

    torchrun --nproc-per-node N --no-python minidream train ...      (or: torchrun ... -m minidream train ...)

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with WORLD_SIZE=1) nothing here does
anything and the run is the plain single-process one. Each process holds the whole model and draws every
random number for the *global* batch from the same generator, then takes its own rows (`ProcessGroup.rows`):
so N processes with --batch-size b draw exactly what one process with batch N·b draws. After backward the
gradients are averaged over processes (an all-reduce, as DistributedDataParallel does), so every process
takes the same optimizer step and stays bit-identical to the others. Only rank 0 writes files.
"""
import datetime
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


def timeout() -> datetime.timedelta:
    """A process that dies takes its peers' collectives down with an error; one that hangs (a stuck GPU, a lost
    node) is declared dead after MINIDREAM_DIST_TIMEOUT_MIN minutes (30), so the run ends instead of waiting forever."""
    raw = os.environ.get("MINIDREAM_DIST_TIMEOUT_MIN", "30")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1
    if not 0 < minutes < 1e6:  # NaN and inf included
        raise ValueError(f"MINIDREAM_DIST_TIMEOUT_MIN={raw!r} must be a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


class LostProcess(RuntimeError):
    """Another process died or did not answer within TIMEOUT (a collective failed)."""


def _lost(e: RuntimeError) -> LostProcess:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return LostProcess(first.split(". ")[0][:160])


def _collective(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:  # gloo: "Connection closed by peer"; NCCL: a watchdog timeout or a DistBackendError
        raise _lost(e) from None


# what a collective says when another process is gone: gloo's transport (a plain RuntimeError), NCCL's watchdog
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")


@contextmanager
def peers_watched():
    """Inside it, a collective that fails because another process is gone is LostProcess, as `_collective`'s are:
    also one the model calls itself (FSDP's gathers and reductions, in its hooks), which raises torch's DistError or
    gloo's RuntimeError from wherever the forward or backward was."""
    try:
        yield
    except RuntimeError as e:
        gone = isinstance(e, getattr(dist, "DistError", ())) or any(s in str(e) for s in PEER_GONE)
        if isinstance(e, LostProcess) or not gone:
            raise
        raise _lost(e) from None


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes of a run: its rank and how many there are (one without torchrun)."""
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes: run.json, metrics, progress, checkpoints, validation grids, exports."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch made of `size` shares of n rows."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def batch_rows(self, n_inst: int, n_class: int) -> torch.Tensor | None:
        """Indices of this process's rows in the global training batch [instance rows; class rows], each part
        `size` shares wide; None on one process (all rows)."""
        if self.size == 1:
            return None
        inst = torch.arange(self.rank * n_inst, (self.rank + 1) * n_inst)
        cls = self.size * n_inst + torch.arange(self.rank * n_class, (self.rank + 1) * n_class)
        return torch.cat([inst, cls])


def init(device: torch.device) -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); the device becomes this
    process's GPU (LOCAL_RANK). Processes other than rank 0 print nothing but their errors."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ProcessGroup(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout())
    group = ProcessGroup(dist.get_rank(), dist.get_world_size())
    if not group.main:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return group, device


def speak(group: ProcessGroup):
    """Give a rank other than 0 its stderr back (to report its error)."""
    if not group.main:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def barrier(group: ProcessGroup):
    if group.size > 1:
        _collective(dist.barrier)


def mean(values: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The mean over processes (the logged losses): what one process would have logged."""
    if group.size == 1:
        return values
    values = values.clone()
    _collective(dist.all_reduce, values)
    return values / group.size


def average_gradients(params: list[torch.Tensor], group: ProcessGroup):
    """grad ← mean over processes, as one all-reduce of all gradients flattened together."""
    grads = [p.grad for p in params if p.grad is not None]
    if group.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    _collective(dist.all_reduce, flat)
    flat /= group.size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def report_peak_memory(group: ProcessGroup, device: torch.device):
    """Under torchrun, each process's peak memory on one line (rank 0 prints it; every process must call this):
    CUDA's max allocated, or on the CPU the process's peak RSS."""
    if group.size == 1:
        return
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    every = torch.zeros(group.size, dtype=torch.float64, device=device)
    every[group.rank] = peak
    _collective(dist.all_reduce, every)
    what = "max allocated" if device.type == "cuda" else "peak RSS"
    print(f"peak memory per process ({what}): " + ", ".join(f"rank {r} {b / 2 ** 30:.2f} GiB"
                                                          for r, b in enumerate(every.tolist())), file=sys.stderr)


def close(group: ProcessGroup):
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
