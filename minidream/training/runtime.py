"""Where a run happens: the device, the attention backend, the autocast precision and the process group, as one
`Runtime` that the set-up, the step and the loop share (instead of four positionals each).

`started(cfg)` resolves them from the settings (every problem a one-line TrainError), joins torchrun's processes
(distributed.py), handles SIGTERM as Ctrl-C is (a checkpoint of the last finished step) and leaves the group on
the way out, whatever happened.
"""
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from minidream.models.attention import resolve_backend, set_attention_backend
from minidream.models.compile import check_compile
from minidream.models.device import DTYPES, resolve_device
from minidream.models.stable_diffusion import StableDiffusion
from minidream.training import TrainError, continue_with, distributed
from minidream.training.distributed import ProcessGroup

# --mixed-precision: the autocast dtype of the step (None: fp32)
PRECISIONS = {"no": None, "fp16": DTYPES["fp16"], "bf16": DTYPES["bf16"]}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the device (None: off, fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    attention: str  # the attention backend (resolved: never "auto")
    precision: torch.dtype | None  # the step's autocast dtype; None: fp32
    group: ProcessGroup = ProcessGroup()  # torchrun's processes (one: the plain run)

    @property
    def main(self) -> bool:
        """The process that writes: run.json, metrics, progress, checkpoints, validation grids, exports."""
        return self.group.main

    def describe(self) -> str:
        """"cuda:0 (NVIDIA H100 80GB HBM3), bf16 autocast, attention sdpa, 2 processes": where the steps run."""
        name = f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""
        precision = "fp32" if self.precision is None else f"{DTYPE_NAMES[self.precision]} autocast"
        processes = f", {self.group.size} processes" if self.group.size > 1 else ""
        return f"{self.device}{name}, {precision}, attention {self.attention}{processes}"

    def autocast(self):
        """The step's autocast context (--mixed-precision)."""
        return autocast(self.device, self.precision)

    def offload(self, part: torch.nn.Module):
        """A frozen part that the step no longer needs leaves the accelerator for the CPU's memory (on the CPU:
        nothing to do). `resident` brings it back when it is needed again."""
        if self.device.type != "cpu" and not released(part):
            part.to("cpu")

    @staticmethod
    def release(part: torch.nn.Module):
        """A frozen part that nothing after the step reads gives its memory back (its weights become shapes only:
        a later use fails loudly rather than computing with stale values)."""
        part.to("meta")

    @contextmanager
    def resident(self, model: StableDiffusion):
        """The model whole on the device for the block (a validation grid: the text encoders and the VAE), the
        parts that had left leaving again after it."""
        offloaded = self.device.type != "cpu"
        away = [m for m in model.networks() if offloaded and any(p.device.type == "cpu" for p in m.parameters())]
        for m in away:
            m.to(self.device)
        try:
            yield model
        finally:
            for m in away:
                m.to("cpu")

    def place(self, model: StableDiffusion) -> StableDiffusion:
        """The model on this run's device (the networks it still has), its UNet and VAE with this run's attention
        kernel."""
        for net in model.networks():
            if not released(net):
                net.to(self.device)
        if self.device.type == "cpu":  # oneDNN's convolutions run faster on channels-last tensors (the VAE's
            model.vae.to(memory_format=torch.channels_last)  # encode; docs/benchmarks.md, the SD3.5 step)
            for t in (*model.vae.parameters(), *model.vae.buffers()):  # what did not move still maps the file,
                t.data = t.data.clone()  # whose pages the conversion read: owned copies let the mapping go
        set_attention_backend(model.denoiser, self.attention)
        set_attention_backend(model.vae, self.attention)
        return model


def released(net: torch.nn.Module) -> bool:
    """The network gave its memory back (Runtime.release): shapes only."""
    return any(p.is_meta for p in net.parameters())


def resolve(cfg) -> Runtime:
    """The device, the attention kernel and the autocast dtype the settings ask for, checked; TF32 as asked."""
    try:
        device = resolve_device(cfg.device)
        backend = resolve_backend(cfg.attention, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    wrong = check_compile(cfg.compile, device)
    if wrong:
        raise TrainError(f"--compile {wrong}")
    for what, precision in (("--mixed-precision", cfg.mixed_precision), ("--class-precision", cfg.class_precision)):
        if precision == "fp16" and device.type != "cuda":
            cpu = "no" if what == "--mixed-precision" else "fp32"
            raise TrainError(f"{what} fp16 needs a GPU; use bf16 or {cpu} on CPU")
    if device.type == "cuda":  # TF32 tensor cores for fp32 matmuls/convs: ~10 bits of mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    return Runtime(device, backend, PRECISIONS[cfg.mixed_precision])


def class_precision(cfg, device: torch.device, bf16_only: bool = False) -> str:
    """--class-precision: auto is fp16 on CUDA (as diffusers' script), bf16 for a model trained in it whose
    activations overflow fp16 (Flux: black images, diffusers#9096), else fp32."""
    if cfg.class_precision != "auto":
        return cfg.class_precision
    return ("bf16" if bf16_only else "fp16") if device.type == "cuda" else "fp32"


def older_torch(version: str) -> bool:
    """This torch is older than `version` (its release numbers; a local tag such as +cpu does not count)."""
    return torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) < version


@contextmanager
def started(cfg):
    """The run's Runtime, with torchrun's processes joined (one process: nothing to join). SIGTERM (torchrun
    stopping the other processes, a batch scheduler's preemption) is handled as Ctrl-C is; an error that ends the
    run names the rank it happened on."""
    rt = resolve(cfg)
    try:
        group, device = distributed.init(rt.device)  # torchrun: this process's GPU is LOCAL_RANK's
    except ValueError as e:
        raise TrainError(str(e)) from None
    rt = replace(rt, device=device, group=group)
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        check_processes(cfg, group, device)
        yield rt
    except TrainError as e:
        distributed.speak(group)
        raise TrainError(f"rank {group.rank}: {e}" if group.size > 1 else str(e)) from None
    except distributed.LostProcess as e:  # another process died or timed out before the loop
        distributed.speak(group)
        raise TrainError(f"rank {group.rank}: another process stopped or did not answer ({e}); "
                         f"what was saved is kept; {continue_with(cfg.out)}") from None
    finally:
        distributed.close(group)
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def resumed(rt: Runtime, cfg) -> Runtime:
    """The runtime of the settings a resume merged: the run's own precision and attention (a bare `--resume latest`
    gives the command line's defaults, not the run's); torchrun's process group and its GPU kept."""
    again = resolve(cfg)
    if again.device.type != rt.device.type:
        if rt.group.size > 1:
            raise TrainError(f"--resume: the run trained on {again.device.type}; under torchrun give --device "
                             f"{again.device.type} to each process (or --device {rt.device.type} to move it)")
        return replace(again, group=rt.group)
    return replace(again, device=rt.device, group=rt.group)


def check_processes(cfg, group: ProcessGroup, device: torch.device):
    """The settings that depend on how many processes run, and where (checked again on a resume's merged settings)."""
    if cfg.fsdp and group.size == 1:
        raise TrainError("--fsdp shards the model across torchrun's processes: run it under torchrun with 2 or "
                         "more (torchrun --nproc-per-node N -m minidream train ...), or drop --fsdp")
    if cfg.fsdp and device.type == "cpu" and older_torch("2.13"):  # the floor (pyproject) is 2.6
        raise TrainError(f"--fsdp on the CPU needs torch >= 2.13, the oldest it is tested on (this is "
                         f"{torch.__version__}; 2.6's FSDP2 has no CPU streams): upgrade torch, or drop --fsdp")
    if cfg.fused_backward and group.size > 1:
        raise TrainError("--fused-backward updates each weight during backward, before torchrun's processes "
                         "average the gradients: train on one process, or drop --fused-backward")


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM held back until the block ends (the optimizer's update: a stop inside it would leave the
    weights and moments half updated, and a checkpoint of them unusable). Yields the list of signals that came."""
    came = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
