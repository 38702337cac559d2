"""Block swap (--blocks-to-swap N, kohya's name and meaning), a model transform: the frozen weights of the
denoiser's last N blocks live in the CPU's (pinned) memory, and each is copied to the device just before its block
runs, on a side stream while the block before it computes, and let go after; in backward the same, in reverse
order. The device holds the other blocks and two or three swapped ones at a time, so a model larger than the card
trains at the price of the copies.

What trains in a block (LoRA's factors, DoRA's magnitudes) stays on the device. A block's frozen weights are
swapped by replacing each tensor's data: autograd's saved references to a weight see whichever copy is in place, so
before a block's backward its weights come back in and after it they leave (a `_Marker` on the block's outputs,
and one on its inputs). With gradient checkpointing the block's forward runs again inside its backward, and its
weights stay in until that backward ends.
"""
import torch
import torch.nn as nn


def frozen_tensors(block: nn.Module) -> list[tuple[dict, str]]:
    """(the dict that holds it, its name) of each frozen parameter and every floating buffer of the block."""
    slots = []
    for m in block.modules():
        slots += [(m._parameters, n) for n, p in m._parameters.items() if p is not None and not p.requires_grad]
        slots += [(m._buffers, n) for n, b in m._buffers.items() if b is not None]
    return slots


class BlockSwap:
    """The swapped blocks' frozen tensors, kept on the CPU, and their copies on the device while their block runs."""

    def __init__(self, blocks: list[nn.Module], n: int, device: torch.device):
        self.blocks, self.device, self.first = blocks, device, len(blocks) - n
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stored, self.ready = {}, {}
        for i in range(self.first, len(blocks)):
            self.stored[i] = []
            for slot, name in frozen_tensors(blocks[i]):
                t = slot[name].detach().cpu()
                self.stored[i].append((slot, name, t.pin_memory() if self.cuda else t))
            self.leave(i)

    def fetch(self, i: int):
        """Start copying block i's weights to the device (on the side stream: they arrive while others compute)."""
        if i not in self.stored or i in self.ready:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [t.to(self.device, non_blocking=True) for _, _, t in self.stored[i]]
                done = torch.cuda.Event()
                done.record(self.stream)
        else:  # the CPU: the stored tensors themselves go back in place (no copy to make: a copy would hold the
            # same values at another address, and a matmul's last bits may follow its operands' alignment)
            copies, done = [t for _, _, t in self.stored[i]], None
        self.ready[i] = (copies, done)

    def enter(self, i: int, step: int):
        """Block i's weights in place (waiting for their copy), and the next swapped block's copy started."""
        if i in self.stored:
            self.fetch(i)
            copies, done = self.ready[i]
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
            for (slot, name, _), t in zip(self.stored[i], copies):
                if self.cuda:  # used on the compute stream: its memory is not reused before that work is done
                    t.record_stream(torch.cuda.current_stream(self.device))
                put(slot, name, t)
        self.fetch(i + step)

    def leave(self, i: int):
        """Block i's device copies let go; its weights are empty until it runs again."""
        if i in self.stored:
            self.ready.pop(i, None)
            for slot, name, t in self.stored[i]:
                put(slot, name, torch.empty(0, dtype=t.dtype, device=self.device))

    def release(self):
        """The stored weights given back (the run no longer reads the model)."""
        self.stored, self.ready = {}, {}


def put(slot: dict, name: str, t: torch.Tensor):
    if isinstance(slot[name], nn.Parameter):
        slot[name].data = t
    else:
        slot[name] = t


class _Marker(torch.autograd.Function):
    """Identity on a block's tensors that need a gradient, all at once: autograd runs its backward once, when the
    gradients of all of them are in. On the block's outputs that is before the block's backward (its weights come
    in); on its inputs, after all of it (they leave)."""

    @staticmethod
    def forward(ctx, swap, i, coming_in, *xs):
        ctx.swap, ctx.i, ctx.coming_in = swap, i, coming_in
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.coming_in:
            ctx.swap.enter(ctx.i, -1)
        else:
            ctx.swap.leave(ctx.i)
        return (None, None, None, *grads)


def marked(swap: BlockSwap, i: int, coming_in: bool, xs: tuple) -> tuple:
    """`xs` with the needing-gradient ones passed through one _Marker."""
    at = [k for k, x in enumerate(xs) if torch.is_tensor(x) and x.requires_grad]
    if not at:
        return xs
    out = list(xs)
    for k, y in zip(at, _Marker.apply(swap, i, coming_in, *(xs[k] for k in at))):
        out[k] = y
    return tuple(out)


def in_backward() -> bool:
    """Autograd is running a backward pass (gradient checkpointing's recompute calls a block from inside one)."""
    return torch._C._current_graph_task_id() != -1  # what torch.utils.checkpoint itself asks


def swapping(forward, swap: BlockSwap, i: int):
    """Block i's forward, its weights brought in before and let go after (kept in when called by its own backward:
    checkpointing's recompute, which that backward then reads)."""
    def run(*args):
        backward = in_backward()
        swap.enter(i, -1 if backward else 1)
        marking = i in swap.stored and torch.is_grad_enabled() and not backward
        out = forward(*(marked(swap, i, False, args) if marking else args))
        if marking:
            out = marked(swap, i, True, out)
        if not backward:
            swap.leave(i)
        return out
    return run


def swap_blocks(denoiser: nn.Module, n: int, device: torch.device) -> BlockSwap:
    """The denoiser's last `n` blocks (in the order they run: `blocks()`) swapped from the CPU."""
    blocks = [b for _, b in denoiser.blocks().values()]
    swap = BlockSwap(blocks, n, device)
    for i, block in enumerate(blocks):
        block.forward = swapping(block.forward, swap, i)
    denoiser.block_swap = swap
    return swap
