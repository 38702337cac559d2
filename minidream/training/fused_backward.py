"""--fused-backward: each trained parameter is updated inside backward, as soon as its gradient is complete, and the
gradient is freed at once, so a step never holds every gradient (the memory of a full-UNet step's gradients: 3.4 GB
for SD 1.5 in fp32). kohya's --fused_backward_pass; PyTorch's "optimizer step in backward" recipe.

A function that transforms the training state: `fuse_backward` registers one post-accumulate-grad hook per trained
parameter. The optimizer stays the run's own (the same state, checkpointed the same way): at a parameter's hook it
steps over that parameter alone, with its group's settings. That is the same update as the whole step's for an
optimizer whose update of a parameter reads only that parameter's gradient (AdamW, 8-bit AdamW, Adafactor: the
table's `per_parameter`), not for Prodigy, whose step size sums over every parameter. Clipping the global gradient
norm needs every gradient first, so --max-grad-norm clips each parameter's gradient on its own, as kohya does.
"""

import torch


class FusedBackward:
    """The hooks, and the gradient norm they saw (before clipping) for the step's metrics line."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        # the group's index, not the group: loading a checkpoint replaces the optimizer's group dicts
        self.group_of = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.squares = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self.update) for p in self.group_of]

    def update(self, p: torch.Tensor):
        """p's gradient is complete: clip it (its own norm), step p alone, free the gradient."""
        if self.max_grad_norm:
            self.squares = self.squares + torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm).float() ** 2
        opt = self.optimizer
        groups = opt.param_groups
        opt.param_groups = [{**groups[self.group_of[p]], "params": [p]}]  # a view: its group's settings, p alone
        try:
            opt.step()
        finally:
            opt.param_groups = groups
        p.grad = None

    def grad_norm(self) -> torch.Tensor | None:
        """The step's gradient norm (the root of the parameters' squared norms, before clipping), on the device;
        starts the next."""
        norm, self.squares = torch.as_tensor(self.squares).sqrt() if self.max_grad_norm else None, 0.0
        return norm

    def remove(self):
        for h in self.handles:
            h.remove()


def fuse_backward(optimizer: torch.optim.Optimizer, max_grad_norm: float) -> FusedBackward:
    """From now on, backward updates every parameter of `optimizer` (see the module's docstring)."""
    return FusedBackward(optimizer, max_grad_norm)
