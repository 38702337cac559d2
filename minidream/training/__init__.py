"""DreamBooth training: one run, from its settings to its exports. `dreambooth.dreambooth` is the whole run as one
straight sequence (validate → runtime → load → data → state → restore → loop → export); one step reads top to bottom
in step.py → batches.py → models/stable_diffusion.py.

    config        every setting, declared once: default, help, check, whether a resume may change it
    runtime       where the run happens: device, attention backend, precision, process group (distributed)
    concepts      the run's data as users bring it: concepts (concepts_file), captions, buckets (photos, class_images)
    batches       what a step is fed: latents and the prompts' conditioning
    trainable     what trains (a row per --train mode); optim: the optimizers and LR schedules (tables);
                  fused_backward: the update inside backward (a function that transforms the state)
    state         the training state, which a checkpoint holds (checkpoint) in the run folder (run_folder)
    step, loop    the loss and one optimizer step; the loop around it (report, validation)
    export        the run's exports, from a fresh copy of the base model

May import: minidream.formats, minidream.sampling, minidream.models and the shared modules.
"""


class TrainError(Exception):
    """Bad input or a failed run, worded for the user (one line)."""


def continue_with(out) -> str:
    """The command that continues a stopped run in `out`: every setting comes from its checkpoint (or run.json)."""
    import shlex
    return f"continue with: minidream train --out {shlex.quote(str(out))} --resume latest"
