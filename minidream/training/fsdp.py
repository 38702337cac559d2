"""--fsdp under torchrun: the model sharded across the processes with FSDP2 (`torch.distributed.fsdp.fully_shard`),
so each process holds 1/N of the UNet's weights, of the gradients and of the optimizer state (plain torchrun holds
all of them in every process). A function that transforms a model (`shard`), as LoRA is.

The computation is the one of distributed.py: every process draws the global batch's random numbers and keeps its
rows; FSDP gathers a block's weights for its forward and backward and reduce-scatters (averages) its gradients,
so each process steps its own shard of the optimizer. What is not sharded (a frozen text encoder, the VAE: used
without gradients; a new token's row when its text encoder does not train) is replicated, its gradient averaged as
before.

Checkpoints and exports hold the full tensors (`gathered`: every process takes part, rank 0 keeps them), so a run
resumes on any number of processes, with or without --fsdp; resuming, each process takes its shard of the file's
tensors (`scattered`).
"""
import sys

import torch

from minidream.models.stable_diffusion import StableDiffusion


def shard(model: StableDiffusion, text_encoders: bool, device: torch.device, processes: int):
    """Shard the denoiser block by block (each block's weights gathered only while it runs), then as a whole (its
    stem and head); the text encoders layer by layer when they train."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (processes,))
    unet = model.denoiser
    for _, block in unet.blocks().values():
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    for _, _, te in model.text_encoders() if text_encoders else ():
        for layer in te.encoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(te, mesh=mesh)


def is_sharded(t) -> bool:
    """A shard of a tensor (a DTensor). torch.distributed.tensor is imported only by a run that shards: it takes
    half a second."""
    if t is None or "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def gathered(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor of a shard (every process must call this, in the same order); None where not kept."""
    if not is_sharded(t):
        return t if keep else None
    full = t.full_tensor()
    return full if keep else None


def scattered(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a full tensor, placed as `like` (a sharded parameter) is."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)
