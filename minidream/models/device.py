"""Where a model runs: the device a user names (`--device`), and the floating-point types by the names the command
line uses (`--dtype`, `--mixed-precision`, `--class-precision`)."""
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """--device: cuda when available, else cpu; a named device that is not here is an error (ValueError)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name!r}: only cuda and cpu are supported")
    return device
