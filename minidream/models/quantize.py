"""A frozen base kept in 8 or 4 bits (--quantize-base): a model transform that replaces each frozen nn.Linear of the
denoiser and the text encoders by a QuantizedLinear holding its weight in the format's few bits and scales.

A call dequantizes that layer's weight alone to the compute dtype, multiplies, and lets the copy go; the backward
pass dequantizes it again instead of keeping it (`_Dequantized`), so one layer's full-precision weight is alive at
a time, never the model's. What trains (LoRA's factors, DoRA's magnitudes, attention projections, a token's rows)
is not touched, and the exports read the base files again (training/export.py): the quantization reaches no written
file. QLoRA (Dettmers et al. 2023) trains adapters on a 4-bit base this way; nf4 is its format.
"""
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: e4m3's largest finite value


def fp8_rows(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """float8 e4m3 with one fp32 scale per output row: each row's largest |w| maps to e4m3's largest value, so a
    row of small weights keeps e4m3's 3 mantissa bits rather than sinking into its subnormals."""
    scale = (w.detach().float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w.detach().float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return {"qweight": q.view(torch.uint8), "scale": scale}  # kept as bytes: a module.to(dtype) cannot widen them


def scaled(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stored × scale per row in `dtype`, with one allocation: the stored values convert exactly (e4m3 and int8 fit in
    bf16 and fp16), and the in-place product is computed in fp32 and rounded once (a small row's scale in fp16 would
    sink into its subnormals); no fp32 copy of the weight is made."""
    return stored.to(dtype).mul_(scale[:, None])


def fp8_dense(q: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    return scaled(q["qweight"].view(FP8), q["scale"], dtype)


def bnb_functional():
    """bitsandbytes.functional, imported quietly (on some CPUs its import warns of an optional kernel package that
    these formats never call)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return importlib.import_module("bitsandbytes.functional")


def int8_rows(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 with one absmax per output row: bitsandbytes' vector-wise quantization, as LLM.int8() stores weights."""
    q, absmax, _ = bnb_functional().int8_vectorwise_quant(w.detach().float().contiguous())
    return {"qweight": q, "scale": absmax.float()}


def int8_dense(q: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    return scaled(q["qweight"], q["scale"] / 127, dtype)


def nf4_blocks(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """4-bit NormalFloat (QLoRA §3: 16 levels at the quantiles of a normal), one absmax per block of 64 weights,
    two weights a byte: bitsandbytes' quantize_4bit."""
    packed, state = bnb_functional().quantize_4bit(w.detach().float().contiguous(), blocksize=64, quant_type="nf4")
    return {"qweight": packed, "scale": state.absmax.float(), "code": state.code.float()}


def nf4_dense(q: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    bnb = bnb_functional()
    # straight to `dtype` (the same values as through fp32: each is a level times its block's absmax, rounded once)
    state = bnb.QuantState(q["scale"], shape=shape, code=q["code"], blocksize=64, quant_type="nf4", dtype=dtype)
    return bnb.dequantize_4bit(q["qweight"], state)


@dataclass(frozen=True)
class Format:
    help: str
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    dense: Callable[..., torch.Tensor]  # (stored tensors, dtype, the weight's shape) -> the weight
    package: str | None = None  # the optional package it needs (an extra of ours)


FORMATS = {
    "fp8": Format("float8 e4m3, a scale per row (torch alone)", fp8_rows, fp8_dense),
    "fp8-matmul": Format("fp8, and on Hopper GPUs each layer's input rounded to e4m3 too, for one fp8 matmul "
                         "(torch._scaled_mm: no dense copy, about 3 percent off the dense product; elsewhere as fp8)",
                         fp8_rows, fp8_dense),
    "int8": Format("int8, an absmax per row (bitsandbytes, the [bnb] extra)", int8_rows, int8_dense,
                   "bitsandbytes"),
    "nf4": Format("4-bit NormalFloat, an absmax per 64 weights, QLoRA's format (bitsandbytes, the [bnb] extra)",
                  nf4_blocks, nf4_dense, "bitsandbytes"),
}


def check_format(name: str | None) -> str | None:
    """The check of --quantize-base: a FORMATS row, its package installed (else the command that installs it)."""
    if name is None:
        return None
    if name not in FORMATS:
        return f"must be one of {', '.join(FORMATS)} (got {name!r})"
    package = FORMATS[name].package
    if package and importlib.util.find_spec(package) is None:
        return f"{name} needs the {package} package: pip install 'minidream[bnb]'"
    return None


def fp8_tensor_cores(device: torch.device) -> bool:
    """The device multiplies fp8 with row-wise scales (Hopper GPUs, compute capability 9.0: torch's row-wise
    _scaled_mm kernels need it), and has not refused to (`SCALED_MM_FAILED`)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0) \
        and device not in SCALED_MM_FAILED


SCALED_MM_FAILED = set()  # the devices whose torch refused a row-wise fp8 matmul once: the dense path from then on


def scaled_mm_takes(x: torch.Tensor, layer) -> bool:
    """torch._scaled_mm runs this layer (--quantize-base fp8-matmul): on fp8 tensor cores, in bf16 (its row-wise
    scales' output), with both sides a multiple of 16 (its kernels' tiles)."""
    return (layer.fmt == "fp8-matmul" and x.dtype == torch.bfloat16 and fp8_tensor_cores(x.device)
            and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)


def fp8_matmul(x: torch.Tensor, layer, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ (+ b) as one fp8 matmul: x quantized to e4m3 row by row (each row's largest |x| at e4m3's largest),
    W as stored, both rows' scales applied to the fp32 accumulator (torch._scaled_mm's row-wise scaling). No dense
    copy of W is made; x's rounding to 3 mantissa bits is the price (the backward pass uses the dense W)."""
    rows = x.reshape(-1, x.shape[-1])
    sx = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (rows.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y = torch._scaled_mm(xq, layer.qweight.view(FP8).t(), scale_a=sx, scale_b=layer.scale[None, :].float(),
                         out_dtype=x.dtype)
    y = y if bias is None else y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


class _Dequantized(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized in the forward pass and again in the backward one: autograd keeps the few
    stored bits, not the dense weight (W and b are frozen: only x gets a gradient). On fp8 tensor cores the
    forward pass is one fp8 matmul instead (`fp8_matmul`)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        if scaled_mm_takes(x, layer):
            try:
                return fp8_matmul(x, layer, bias)
            except RuntimeError:  # this torch or GPU has no row-wise kernel after all: dense, as fp8
                SCALED_MM_FAILED.add(x.device)
        return F.linear(x, layer.dense(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dense(grad.dtype), None, None


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in a FORMATS row's bits (buffers `qweight`, `scale`, and nf4's
    `code`) and read back densely one layer at a time. `weight` is that dense weight in fp32 (what LoRA's DoRA norm
    reads); the bias stays as it was."""
    kept = ("qweight", "scale", "code")  # stored tensors whose dtype is the format's: cast_frozen leaves them be

    def __init__(self, base: nn.Linear, fmt: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = base.in_features, base.out_features, fmt
        for name, t in FORMATS[fmt].quantize(base.weight).items():
            self.register_buffer(name, t)
        self.bias = base.bias

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors the format keeps (what the layer's weight takes in memory)."""
        return {name: getattr(self, name) for name in self.kept if hasattr(self, name)}

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return FORMATS[self.fmt].dense(self.stored(), dtype, torch.Size((self.out_features, self.in_features)))

    @property
    def weight(self) -> torch.Tensor:
        return self.dense(torch.float32)

    def forward(self, x):
        return _Dequantized.apply(self.compute_input(x), self, self.bias)

    def without_bias(self, x):
        """W x alone (DoRA's term with dropout), the weight dense for this call only."""
        return _Dequantized.apply(self.compute_input(x), self, None)

    @staticmethod
    def compute_input(x):
        if torch.is_autocast_enabled(x.device.type):  # the dtype autocast would have run F.linear in
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self.fmt}"


def quantize_frozen(networks: list[nn.Module], fmt: str, replaced: Callable[[torch.Tensor], None] | None = None,
                    device: torch.device | None = None) -> tuple[int, int]:
    """Every frozen nn.Linear of these networks (the base layers inside LoRA adapters among them) replaced by a
    QuantizedLinear (made on `device`, one layer at a time: None, where it is); returns the bytes of their weights
    before and after. `replaced` is handed each dense weight once its layer is quantized (the loader gives back the
    file's pages it was read from)."""
    before = after = 0
    for net in networks:
        for name, m in list(net.named_modules()):
            if type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()):
                read = m.weight.data
                q = QuantizedLinear(m.to(device) if device is not None else m, fmt)
                before += read.numel() * read.element_size()
                after += sum(t.numel() * t.element_size() for t in q.stored().values())
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, q)
                if replaced is not None:
                    replaced(read)
    return before, after
