"""DreamBooth training: one run, from its settings to its exports. `dreambooth.dreambooth` is the whole run as one
straight sequence (validate → runtime → load → data → state → restore → loop → export); one step reads top to bottom
in step.py → batches.py → models/stable_diffusion.py.

    config        every setting, declared once: default, help, check, whether a resume may change it; a resumed
                  run's settings (resume_settings)
    runtime       where the run happens: device, attention backend, precision, process group (distributed)
    dataset       the run's data as users bring it: concepts (concepts_file), captions, buckets (photos, class_images)
    batches       what a step is fed: latents and the prompts' conditioning
    trainable     what trains (a row per --train mode); optim: the optimizers and LR schedules (tables);
                  fused_backward: the update inside backward (a function that transforms the state)
    state         the training state, which a checkpoint holds (checkpoint) in the run folder (run_folder)
    step, loop    the loss and one optimizer step; the loop around it (report, validation)
    objective     the step's noise, timesteps and loss options (one row each); ema: the weights' moving average
    export        the run's exports, from a fresh copy of the base model; model_card: OUT/README.md

May import: minidream.formats, minidream.sampling, minidream.models and the shared modules.
"""


class TrainError(Exception):
    """Bad input or a failed run, worded for the user (one line)."""


def continue_with(out) -> str:
    """The command that continues a stopped run in `out`: every setting comes from its checkpoint (or run.json)."""
    import shlex
    return f"continue with: minidream train --out {shlex.quote(str(out))} --resume latest"


def json_rows(path, flag: str, one_per: str, check, objects: bool) -> tuple:
    """The rows of a JSON-list file an option names (--concepts, --validation-file), checked by `check` (what is
    wrong with the first bad row, or None); every fault a one-line TrainError naming the option and the file.
    `objects`: every row must be an object (else `check` names the row that is not). None: no file, no rows."""
    import json
    from pathlib import Path
    if path is None:
        return ()
    if isinstance(path, (list, tuple)):  # the rows themselves (a run file's inline table, a run's run.json)
        if not path:
            return ()
        objects_only = not objects or all(isinstance(r, dict) for r in path)
        wrong = check(tuple(path)) if objects_only else f"expected a list of objects, one per {one_per}"
        if wrong:
            raise TrainError(f"{flag}: {wrong}")
        return tuple(path)
    if not str(path).strip():
        raise TrainError(f"{flag} is empty; name a JSON file")
    path = Path(path)
    if not path.is_file():  # a folder, or a FIFO, which would block the reader forever
        raise TrainError(f"{flag} {path}: not a file; give a JSON file")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{flag} {path}: not a readable JSON file ({e})") from None
    if not isinstance(rows, list) or not rows or (objects and not all(isinstance(r, dict) for r in rows)):
        raise TrainError(f"{flag} {path}: expected a non-empty list of objects, one per {one_per}")
    wrong = check(tuple(rows))
    if wrong:
        raise TrainError(f"{flag} {path}: {wrong}")
    return tuple(rows)
