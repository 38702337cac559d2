"""A DreamBooth run's settings: `TrainConfig` (every field, with its default: the one place defaults live;
the CLI's options are built from it), the checks that need no model, and the rules for a resumed run.
No torch import: `minidream --help` stays fast.
"""
import math
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from minidream.choices import (CLASS_PRECISIONS, EXPORTS, LR_SCHEDULES, MIXED_PRECISIONS, REPORT_TO, SAMPLERS,
                               TRAIN_MODES)


class TrainError(Exception):
    """Bad input or a failed run, worded for the user (one line)."""


# What each --train mode defaults to. Learning rates (AdamW): the whole UNet needs a small step to keep the
# prior (diffusers' DreamBooth default); the attention projections alone tolerate a few times more; LoRA
# adapters start at zero and need ~1e-4. The text encoder, when trained, uses the same rate as the UNet part.
# Exports: a whole model, or for LoRA the adapter files the other tools load.
MODE_DEFAULTS = {"unet": {"lr": 5e-6, "save_as": ("diffusers",)},
                 "attention": {"lr": 2e-5, "save_as": ("diffusers",)},
                 "lora": {"lr": 1e-4, "save_as": ("lora-diffusers", "lora-kohya")}}
assert tuple(MODE_DEFAULTS) == TRAIN_MODES, "choices.TRAIN_MODES lists the modes defined here"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; stored in run.json and in every checkpoint. The CLI's `train` options
    are these fields (same names, same defaults); `minidream train --help` says what each does."""
    model: str
    out: str
    instance_dir: str | None = None  # None with --concepts (each concept names its own)
    class_noun: str | None = None
    # loading the base model
    revision: str | None = None
    variant: str | None = None
    preset: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    allow_pickle: bool = False
    # prompts and data
    identifier: str = "sks"
    instance_prompt: str | None = None
    class_prompt: str | None = None
    resolution: int | None = None  # None: the model's native resolution, resolved before run.json is written
    center_crop: bool = True
    flip: float = 0.0
    concepts: tuple = ()  # --concepts FILE.json's entries (concepts.read_concepts_file), stored for resume
    caption_ext: str | None = None  # e.g. ".txt": a caption file beside an image is its prompt
    aspect_buckets: bool = False
    max_aspect: float = 2.0
    # prior preservation (the class images)
    prior: bool = True
    class_dir: str | None = None
    num_class_images: int = 200
    prior_loss_weight: float = 1.0
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch_size: int = 4
    class_precision: str = "auto"
    class_negative_prompt: str = ""
    class_scheduler: str | None = None  # None: the model's own (samplers.default_sampler), as diffusers' script
    # what trains
    train: str = "unet"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    train_text_encoder: bool = False
    train_token: bool = False
    # optimisation
    lr: float | None = None  # None: MODE_DEFAULTS[train]["lr"]
    text_encoder_lr: float | None = None
    text_encoder_steps: int = 0
    token_lr: float = 5e-3
    lr_schedule: str = "constant"
    lr_power: float = 1.0
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    steps: int = 400
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    tf32: bool = True
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    # validation, checkpoints, exports, where it runs
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0
    validation_images: int = 4
    validation_steps: int = 25
    validation_scheduler: str | None = None  # None: the model's own
    report_to: str = "none"  # or "tensorboard" (OUT/tensorboard/); OUT/metrics.jsonl and OUT/curves.png always
    checkpoint_every: int = 100
    keep_last: int = 2
    save_as: tuple[str, ...] = ()  # (): MODE_DEFAULTS[train]["save_as"], filled in at construction
    attention: str = "auto"
    device: str | None = None

    def __post_init__(self):
        if not self.save_as and self.train in MODE_DEFAULTS:
            object.__setattr__(self, "save_as", MODE_DEFAULTS[self.train]["save_as"])

    @property
    def prompts(self) -> tuple[str, str]:
        token = f"<{self.identifier}>" if self.train_token else self.identifier
        return (self.instance_prompt or f"a photo of {token} {self.class_noun}",
                self.class_prompt or f"a photo of {self.class_noun}")

    @property
    def init_word(self) -> str:
        """What a new token's embedding starts from (--train-token): the class noun (the first concept's)."""
        return self.class_noun or next((c["class_noun"] for c in self.concepts if c.get("class_noun")), "photo")

    @property
    def unet_lr(self) -> float:
        return self.lr or MODE_DEFAULTS[self.train]["lr"]


FIELDS = tuple(f.name for f in fields(TrainConfig))
DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}

# Settings a resumed run takes from the command line when they are given there; everything else comes
# from the checkpoint, and a different value for it is refused. Paths are the user's: moved folders resume.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "validation_prompts", "validation_every",
                     "validation_images", "validation_steps", "validation_scheduler", "report_to", "save_as", "device", "attention", "tf32",
                     "model", "instance_dir", "class_dir", "out")


# Settings added after checkpoints were first written, with the value that reproduces a run from before them.
ADDED = {"class_scheduler": "ddim", "validation_scheduler": "ddim", "report_to": "none", "concepts": (),
         "caption_ext": None, "aspect_buckets": False, "max_aspect": 2.0}


def validate(cfg: TrainConfig):
    """Every setting that can be checked without the model, before anything is loaded or written."""
    if not cfg.concepts and not (cfg.instance_dir and cfg.class_noun):
        raise TrainError("--instance-dir and --class-noun are needed (or --concepts FILE.json)")
    if not cfg.max_aspect >= 1:
        raise TrainError(f"--max-aspect must be >= 1 (got {cfg.max_aspect})")
    if cfg.caption_ext is not None and not (cfg.caption_ext.strip(".") and "/" not in cfg.caption_ext):
        raise TrainError(f"--caption-ext {cfg.caption_ext!r}: give a file extension such as .txt")
    for flag_, v in (("--class-scheduler", cfg.class_scheduler), ("--validation-scheduler", cfg.validation_scheduler)):
        if v is not None and v not in SAMPLERS:
            raise TrainError(f"{flag_} {v!r} is not one of {', '.join(SAMPLERS)}")
    for flag, v, ok in (("--train", cfg.train, TRAIN_MODES), ("--mixed-precision", cfg.mixed_precision, MIXED_PRECISIONS),
                        ("--lr-schedule", cfg.lr_schedule, LR_SCHEDULES),
                        ("--class-precision", cfg.class_precision, CLASS_PRECISIONS),
                        ("--report-to", cfg.report_to, REPORT_TO)):
        if v not in ok:
            raise TrainError(f"{flag} {v!r} is not one of {', '.join(ok)}")
    bad = [s for s in cfg.save_as if s not in EXPORTS]
    if bad:
        raise TrainError(f"--save-as {bad[0]!r} is not one of {', '.join(EXPORTS)}")
    if any(s.startswith("lora") for s in cfg.save_as) and cfg.train != "lora":
        raise TrainError("--save-as lora-* needs --train lora")
    for flag, v in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                    ("--class-batch-size", cfg.class_batch_size), ("--lora-rank", cfg.lora_rank),
                    ("--validation-images", cfg.validation_images), ("--validation-steps", cfg.validation_steps),
                    ("--class-steps", cfg.class_steps)):
        if v < 1:
            raise TrainError(f"{flag} must be at least 1 (got {v})")
    if not 0 <= cfg.seed < 2 ** 63:
        raise TrainError(f"--seed must be in [0, 2^63) (got {cfg.seed})")
    if cfg.resolution is not None:
        validate_resolution(cfg.resolution)
    for flag, v in (("--max-grad-norm", cfg.max_grad_norm), ("--weight-decay", cfg.weight_decay),
                    ("--text-encoder-steps", cfg.text_encoder_steps), ("--warmup-steps", cfg.warmup_steps),
                    ("--noise-offset", cfg.noise_offset), ("--prior-loss-weight", cfg.prior_loss_weight),
                    ("--class-guidance", cfg.class_guidance), ("--keep-last", cfg.keep_last),
                    ("--checkpoint-every", cfg.checkpoint_every), ("--validation-every", cfg.validation_every),
                    ("--num-class-images", cfg.num_class_images)):
        if not v >= 0:
            raise TrainError(f"{flag} must be >= 0 (got {v})")
    for flag, v in (("--lr", cfg.lr), ("--text-encoder-lr", cfg.text_encoder_lr), ("--token-lr", cfg.token_lr),
                    ("--snr-gamma", cfg.snr_gamma)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TrainError(f"{flag} must be a positive number (got {v})")
    if not 0 <= cfg.flip <= 1:
        raise TrainError(f"--flip is a probability in [0, 1] (got {cfg.flip})")
    if cfg.prior and cfg.num_class_images < 1:
        raise TrainError("--num-class-images must be at least 1 with prior preservation (or pass --no-prior)")
    for flag, v in (("--adam-beta1", cfg.adam_beta1), ("--adam-beta2", cfg.adam_beta2)):
        if not 0 <= v < 1:
            raise TrainError(f"{flag} must be in [0, 1) (got {v})")
    for flag, v in (("--adam-epsilon", cfg.adam_epsilon), ("--lr-power", cfg.lr_power)):
        if not v > 0:
            raise TrainError(f"{flag} must be > 0 (got {v})")
    if cfg.cache_latents and not cfg.center_crop:
        raise TrainError("--random-crop has no effect with --cache-latents (cached latents are centre crops); "
                         "drop one of them")


def validate_resolution(resolution: int, factor: int = 8):
    """A multiple of 8 (the VAE), and once the model is known of its whole downsampling factor (VAE x UNet)."""
    if resolution < factor or resolution % factor:
        raise TrainError(f"--resolution must be a positive multiple of {factor} for this model (got {resolution})"
                         if factor != 8 else f"--resolution must be a positive multiple of 8 (got {resolution})")


def stored_config(meta: dict, path: Path) -> TrainConfig:
    """The run's settings from a checkpoint, checked like the command line's (a crafted file gets no further)."""
    try:
        d = {**ADDED, **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}}
        missing = [f for f in TrainConfig.__dataclass_fields__ if f not in d]
        if missing:
            raise TrainError(f"{path}: written by an older minidream (no {', '.join(missing[:4])}"
                             f"{' …' if len(missing) > 4 else ''}); start a new run")
        cfg = TrainConfig(**{k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__})
        validate(cfg)
        if not (isinstance(meta["step"], int) and 0 <= meta["step"]):
            raise TrainError(f"{path}: step {meta['step']!r} is not a step count")
        return cfg
    except TrainError as e:
        raise TrainError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except Exception as e:
        raise TrainError(f"{path}: its stored settings are not usable ({type(e).__name__}: {e})") from None


def flag(field: str) -> str:
    return "--" + {"validation_prompts": "validation_prompt"}.get(field, field).replace("_", "-")


def resumed_config(cfg: TrainConfig, stored: TrainConfig, given: set[str] | None) -> TrainConfig:
    """The checkpoint's settings, with the resumable ones the user gave; a changed fixed one is refused."""
    given = set(RESUMABLE_CHANGES) if given is None else given & set(TrainConfig.__dataclass_fields__)
    fixed = sorted(k for k in given if k not in RESUMABLE_CHANGES and getattr(cfg, k) != getattr(stored, k))
    if fixed:
        was = ", ".join(f"{flag(k)} {getattr(stored, k)!r}" for k in fixed)
        raise TrainError(f"--resume: {', '.join(flag(k) for k in fixed)} cannot change in a resumed run (it has {was}); "
                         f"drop them, or start a new run with --overwrite")
    return replace(stored, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k in given})


