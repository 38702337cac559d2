"""The options of every command but `train` (whose are TrainConfig's), declared once as `train`'s are: small frozen
dataclasses of declared fields (minidream/options.py), one per command plus the groups several commands take
(`Loader`, `Adapters`, `Run`). A command's options are the fields of its classes (`with_options`), and `checked`
turns the command line's values into instances, each option checked by its own declaration; the checks the
commands share (a seed, an output folder, a device) are written once, in options.py.
"""
from dataclasses import dataclass, field
from pathlib import Path

from minidream.demo.architecture import GROUNDING
from minidream.models.attention import CHOICES as ATTENTION_BACKENDS
from minidream.models.compile import COMPILE_HELP, COMPILE_MODES
from minidream.models.device import DTYPES
from minidream.options import (at_least, comma_integers, device_name, each_one_of, finite, first_problem, in_range,
                               option, optional_at_least, out_folder, path, seed_range, text, texts)
from minidream.training.config import OPTIONS

DEMO_DIR_DEFAULT = "minidream/demo/weights"


def train_option(name: str):
    """A loader option as TrainConfig declares it (`train` takes the same): one declaration for every command."""
    f = OPTIONS[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class Loader:
    """Where a model comes from and how to read it (`sample`, `info`, `diff`, `attention-maps`, as `train`)."""
    revision: str | None = train_option("revision")
    variant: str | None = train_option("variant")
    allow_pickle: bool = train_option("allow_pickle")
    tokenizer: str | None = train_option("tokenizer")
    preset: str | None = train_option("preset")
    original_config: str | None = train_option("original_config")
    t5: bool = train_option("t5")
    text_encoders: tuple[str, ...] = train_option("text_encoders")
    vae: str | None = train_option("vae")


@dataclass(frozen=True)
class MovedConfig:
    """--config as the commands without run files (run_files.py) still take it: the old name of --original-config."""
    config: str | None = option(None, "The old name of --original-config (a single file's architecture).")


@dataclass(frozen=True)
class Adapters:
    """Other tools' LoRAs and embeddings, applied to a loaded model."""
    lora: tuple[str, ...] = option((), "LoRA file to merge, FILE or FILE:SCALE (diffusers/PEFT or kohya/LyCORIS "
                                   "LoCon); repeat for several.")
    lora_scale: float = option(1.0, "Strength of each --lora given without :SCALE.", check=finite)
    embedding: tuple[str, ...] = option((), "Textual-inversion embedding (ours, diffusers', A1111's); repeat for "
                                        "several.")
    embedding_token: tuple[str, ...] = option((), "Token for the --embedding of the same position; default: the "
                                              "name in the file.", check=texts)


@dataclass(frozen=True)
class Run:
    """How a model runs: the device, the precision, the attention kernel, compilation (`sample`)."""
    dtype: str = option("fp32", "Compute dtype (fp16 needs a GPU).", choices=DTYPES)
    device: str | None = option(None, "cuda or cpu; default: cuda when available.", check=device_name)
    attention: str = option("auto", "Attention kernel.", choices=ATTENTION_BACKENDS)
    compile: str = option("off", f"Compile the UNet: {COMPILE_HELP}.", choices=COMPILE_MODES)


@dataclass(frozen=True)
class Sample:
    model: str = option(help="Model folder, hub repo id, single-file checkpoint, or demo (the shipped toy model).",
                        check=path)
    prompt: str = option(help="Text prompt.", check=text)
    out: Path = option(help="Output folder for the PNGs.", check=out_folder, cli_type=Path)
    seed: int = option(0, "Seed of the CPU generator that draws the starting noise; batch k uses seed + k.",
                       check=seed_range)
    num_images: int = option(1, "How many images.", check=at_least(1, 100_000))
    batch_size: int = option(1, "Images per forward pass.", check=at_least(1, 100_000))
    progress: bool = option(True, "Show a progress bar.")
    clip_skip: int = train_option("clip_skip")
    max_sequence_length: int | None = train_option("max_sequence_length")
    zero_terminal_snr: bool = option(False, "SD 1.x/2.x/XL: sample on the model's schedule rescaled to zero terminal "
                                     "SNR (trailing timesteps), as a LoRA or token trained with --zero-terminal-snr "
                                     "on this base expects.")

    def problem(self) -> tuple[str, str] | None:
        """Each option's check, then what they ask of each other: every batch's seed (seed + k) is in range."""
        wrong = first_problem(self)
        if wrong:
            return wrong
        batches = (self.num_images - 1) // self.batch_size + 1
        if self.seed > 2 ** 63 - batches:
            return "seed", f"must be in [0, 2^63) for every batch (got {self.seed}, {batches} batches)"
        return None


@dataclass(frozen=True)
class Diff:
    """`diff`: what fine-tuning changed (its two models are arguments)."""
    out: Path = option(help="Folder for diff.json, diff.md and diff.png.", check=out_folder, cli_type=Path)


@dataclass(frozen=True)
class Maps:
    """`attention-maps`: where each prompt token looks."""
    model: str = option(help="Model folder, hub repo id, single-file checkpoint, or demo (the shipped toy model).",
                        check=path)
    prompt: str = option(help="Text prompt.", check=text)
    out: Path = option(help="Folder for maps.png, maps.json and maps/.", check=out_folder, cli_type=Path)
    seed: int = option(0, "Seed of the starting noise.", check=seed_range)


@dataclass(frozen=True)
class Demo:
    out: Path = option(Path("runs/demo"), "Run folder.", check=out_folder, cli_type=Path)
    steps: int | None = option(None, "DreamBooth steps (default: the demo's, 175).",
                               check=optional_at_least(1, 100_000))
    seed: int = option(0, "Seed.", check=seed_range)
    prior: bool = option(True, "Prior-preservation loss.", flag="--prior/--no-prior")
    subject: str = option("1", "Which held-out subject: 1 (the demo's), 2, 3 or its name, e.g. green-checked-heart.")
    overwrite: bool = option(False, "Start over in an --out folder that holds a finished demo.")


@dataclass(frozen=True)
class Eval:
    out: Path = option(Path("runs/eval"), "Folder for the runs and the table.", check=out_folder, cli_type=Path)
    steps: int | None = option(None, "DreamBooth steps per run (default: the demo's, 175).",
                               check=optional_at_least(1, 100_000))
    seeds: str = option("0,1,2", "Comma-separated seeds; each DreamBooth run once per seed.",
                        check=comma_integers(seed_range))
    subjects: str = option("1", "Held-out subjects: all, or comma-separated numbers or names (1 = the demo's "
                           "yellow-striped-cross).")
    recipe: str = option("whole", "What trains: whole (the demo's UNet and text encoder: with and without the "
                         "prior) or lora (LoRA without the prior, with it from class images, from the model).",
                         choices=("whole", "lora"))


@dataclass(frozen=True)
class Pretrain:
    out: Path = option(Path(DEMO_DIR_DEFAULT), "Where the demo model is written (diffusers layout).",
                       check=out_folder, cli_type=Path)
    seed: int = option(0, "Seed of the world, the initialisation and every draw.", check=seed_range)
    images: int = option(20000, "Rendered pretraining images.", check=at_least(1))
    vae_steps: int = option(2500, "VAE training steps (batch 32).", check=at_least(1))
    unet_steps: int = option(4000, "UNet + text encoder steps.", check=at_least(1))
    batch: int = option(64, "UNet batch size.", check=at_least(1))
    recognizer_steps: int = option(1500, "Recogniser training steps (batch 128).", check=at_least(1))
    reuse: Path | None = option(None, "A demo model folder whose VAE and recogniser are kept.", check=path,
                                cli_type=Path)
    grounding: float = option(GROUNDING, "Weight of the cross-attention term that asks the words naming a toy to "
                              "look at it (demo/grounding.py); 0: none.", check=in_range(0, 100))


@dataclass(frozen=True)
class Bench:
    quick: bool = option(False, "About a minute: three attention shapes, the LoRA step eager, fewer batches and "
                         "sampling steps (on a CPU the tiny architecture).")
    out: Path = option(Path("minidream-bench"), "Folder for the JSON (bench-<device>.json).", check=out_folder,
                       cli_type=Path)
    device: str | None = option(None, "cuda or cpu; default: cuda when available.", check=device_name)
    only: tuple[str, ...] = option((), "A section to run (repeatable): attention, step, unet, sampling, vae; "
                                   "default: all.", check=lambda vs: bench_sections()(vs))


def bench_sections():
    """The check of --only: benchmarks/bench.py's table of sections (imported when `bench` runs, not before)."""
    from minidream.benchmarks.bench import SECTIONS
    return each_one_of(SECTIONS)
