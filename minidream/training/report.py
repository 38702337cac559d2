"""The run's record: OUT/metrics.jsonl (one JSON line per optimizer step, and one per validation loss), TensorBoard
or Weights & Biases when asked (`--report-to tensorboard|wandb`, the optional extras `pip install
'minidream[tensorboard]'`, `'minidream[wandb]'`), and
OUT/curves.png, the instance and prior losses, the validation losses and the learning rate over steps, drawn from
metrics.jsonl after training."""
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from minidream import plots
from minidream.image_files import save_image
from minidream.training import TrainError


def summary_writer():
    """TensorBoard's writer class; a one-line error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--report-to tensorboard needs the tensorboard package: pip install 'minidream[tensorboard]' "
                         "(or pip install tensorboard)") from None
    return SummaryWriter


def wandb_module():
    """Weights & Biases' package; a one-line error when the optional package is missing."""
    try:
        import wandb
    except ImportError:
        raise TrainError("--report-to wandb needs the wandb package: pip install 'minidream[wandb]' (or pip install "
                         "wandb); WANDB_MODE=offline logs without an account") from None
    return wandb


class WandbWriter:
    """TensorBoard's add_scalar / add_image / close over a Weights & Biases run (project "minidream", named after
    the run folder, its settings those of OUT/run.json). A resumed run logs on into the same W&B run: its id is kept
    in OUT/wandb/run-id. Its files go to OUT/wandb (WANDB_MODE=offline: `wandb sync` uploads them later)."""

    def __init__(self, out: Path):
        wandb = wandb_module()
        folder = out / "wandb"
        folder.mkdir(exist_ok=True)
        ids = folder / "run-id"
        run_id = ids.read_text().strip() if ids.exists() else secrets.token_hex(6)
        ids.write_text(run_id)
        settings = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        self.wandb = wandb
        self.run = wandb.init(project="minidream", name=out.name, id=run_id, resume="allow", dir=str(out),
                              config=settings)

    def add_scalar(self, tag: str, value: float, step: int):
        self.run.log({tag: value}, step=step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC"):
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self):
        self.run.finish()


@dataclass(frozen=True)
class Reporter:
    check: Callable[[], object]  # fails (one line) when it cannot report, before the run starts
    open: Callable[[Path], object]  # a writer with TensorBoard's add_scalar / add_image / close, for the run folder
    output: str  # what it writes into the run folder


# --report-to: where the metrics go besides OUT/metrics.jsonl and OUT/curves.png
REPORT_TO = {"none": None,
             "tensorboard": Reporter(summary_writer, lambda out: summary_writer()(log_dir=str(out / "tensorboard")),
                                     "tensorboard"),
             "wandb": Reporter(wandb_module, WandbWriter, "wandb")}
OUTPUTS = ("metrics.jsonl", "curves.png")  # what the record itself writes into the run folder


class Log:
    """Where a step's metrics line goes (only on the process that writes: rank 0)."""

    def __init__(self, out: Path, report_to: str, main: bool):
        self.path = out / "metrics.jsonl"
        self.file = open(self.path, "a") if main else None
        self.tb = REPORT_TO[report_to].open(out) if main and REPORT_TO[report_to] else None

    def step(self, line: dict, group: str = "train"):
        """A metrics line (`group`: TensorBoard's tag prefix: train, or validation for the validation loss)."""
        if self.file:
            try:
                self.file.write(json.dumps(line) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: name the file (a failed flush does not)
                raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.tb:
            for k, v in line.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", v, line["step"])

    def image(self, tag: str, png: Path, step: int):
        if self.tb:
            import numpy as np
            self.tb.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self):
        for f in (self.file, self.tb):
            try:
                if f:
                    f.close()
            except OSError:  # the line that did not fit was reported where it failed; a resume rewrites it
                pass


def smooth(values: list[float], frac: float = 0.05) -> list[float]:
    """A centred running mean over about `frac` of the run (single steps' losses are dominated by the timestep
    drawn)."""
    k = max(1, int(len(values) * frac) // 2)
    return [sum(values[max(0, i - k): i + k + 1]) / len(values[max(0, i - k): i + k + 1]) for i in range(len(values))]


def curves(out: Path) -> Path | None:
    """OUT/curves.png from OUT/metrics.jsonl: the losses (smoothed, log scale) and the learning rate."""
    f = Path(out) / "metrics.jsonl"
    every = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
    rows = [r for r in every if "loss_instance" in r]  # a step's line (a validation line holds val_loss_*)
    held = [r for r in every if "val_loss_instance" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = {"instance loss": [r["loss_instance"] for r in rows]}
    if any(r["loss_prior"] for r in rows):
        losses["prior loss"] = [r["loss_prior"] for r in rows]
    panels = [plots.line_plot({k: list(zip(steps, smooth(v))) for k, v in losses.items()},
                              "training loss (running mean over 5% of the steps, log scale): each step draws its "
                              "own timesteps and noise, whose spread hides the fit", log_y=True, size=(720, 220)),
              plots.line_plot({"learning rate": [(s, r["lr"]) for s, r in zip(steps, rows)]}, "learning rate",
                              size=(720, 220))]
    if held:  # the fit to the photos and the drift from the prior, on fixed (image, timestep, noise) triples
        names = {"val_loss_instance": "on the photos (falls: the fit)",
                 "val_loss_prior": "on class images (a rise: drift from the class)"}
        panels.insert(0, plots.line_plot({label: [(r["step"], r[k]) for r in held if k in r]
                                          for k, label in names.items() if any(k in r for r in held)},
                                         "validation loss: fixed images, timesteps and noise, so it moves only "
                                         "with the weights", size=(720, 220)))
    png = Path(out) / "curves.png"
    save_image(plots.stack(panels), png)
    return png
