"""A resumed run's settings: the checkpoint's (`stored_config`, checked as the command line's are) with the resumable
ones the user gives anew (`resumed_config`); a changed fixed one is refused in one line. The rules are read from
the declarations in config.py (`resumable`, `was`) and from ADDED, what older checkpoints lack."""
from dataclasses import replace
from pathlib import Path

from minidream.options import path
from minidream.training import TrainError
from minidream.training.config import OPTIONS, TrainConfig, flag, validate


# The version of the settings a checkpoint stores ("settings_version" in its metadata; none before version 1).
SETTINGS_VERSION = 7

# ADDED[v]: the settings added in version v, with the value that reproduces a run whose checkpoint was written
# before (its settings lack them). A new setting goes under the next version, which SETTINGS_VERSION becomes.
ADDED = {
    1: {"repeats": None, "concepts": (), "mask_dir": None, "alpha_mask": False, "caption_ext": None,
        "aspect_buckets": False, "max_aspect": 2.0, "class_scheduler": "ddim", "lora_targets": "attn",
        "text_encoder_targets": "attn", "lora_blocks": None, "conv_rank": None, "conv_alpha": None,
        "lora_dropout": 0.0, "dora": False, "token_vectors": 1, "clip_skip": 1, "optimizer": "adamw",
        "adafactor_beta2_decay": -0.8, "prodigy_d_coef": 1.0, "prodigy_bias_correction": False,
        "prodigy_safeguard_warmup": False, "fused_backward": False, "epochs": None, "fsdp": False,
        "validation_set": (), "validation_scheduler": "ddim", "report_to": "none", "log_every": 10, "save_every": 0,
        "keep_snapshots": 0, "save_precision": None, "compile": "off"},
    2: {"max_sequence_length": None, "t5": True, "weighting_scheme": None, "logit_mean": 0.0,
        "logit_std": 1.0, "mode_scale": 1.29, "precondition_outputs": None},
    3: {"text_encoders": ()},
    4: {"vae": None, "guidance_scale": None, "timestep_sampling": "sigma", "sigmoid_scale": 1.0,
        "discrete_flow_shift": 3.0},
    5: {"train_token_t5": False, "quantize_base": None},
    6: {"blocks_to_swap": 0, "cache_text_encoder_outputs": "memory"},
    7: {"loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr", "debiased_estimation": False, "min_timestep": 0,
        "max_timestep": None, "zero_terminal_snr": False, "multires_noise_iterations": 0,
        "multires_noise_discount": 0.3, "input_perturbation": 0.0, "caption_dropout": 0.0, "shuffle_tags": False,
        "keep_tokens": 0, "ema_decay": None, "ema_every": 1, "ema_device": "same", "validation_ema": False,
        "validation_guidance_rescale": 0.0, "prior_source": "images"},
}
# CHANGED[v]: settings whose default became "the family's" (None) in version v, with the default before: an older
# run stored that value whether or not it was given, and it reads as the family's (SD3's was it; DDPM's ignore it)
CHANGED = {4: {"weighting_scheme": "logit_normal", "precondition_outputs": True, "lora_targets": "attn"}}


def stored_config(meta: dict, path: Path) -> TrainConfig:
    """The run's settings from a checkpoint, checked like the command line's (a crafted file gets no further)."""
    try:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        for n, f in OPTIONS.items():  # settings renamed since the checkpoint was written
            if f.metadata["was"] in d:
                d[n] = d.pop(f.metadata["was"])
        version = meta.get("settings_version", 0)
        for v, added in ADDED.items():  # settings added since
            if version < v:
                d = {**added, **d}
        for v, changed in CHANGED.items():  # defaults that became the family's since
            if version < v:
                d.update({k: None for k, old in changed.items() if d.get(k) == old})
        missing = [f for f in OPTIONS if f not in d]
        if missing:
            raise TrainError(f"{path}: written by an older minidream (no {', '.join(missing[:4])}"
                             f"{' …' if len(missing) > 4 else ''}); start a new run")
        cfg = TrainConfig(**{k: v for k, v in d.items() if k in OPTIONS})
        validate(cfg)
        if not (isinstance(meta["step"], int) and 0 <= meta["step"]):
            raise TrainError(f"{path}: step {meta['step']!r} is not a step count")
        return cfg
    except TrainError as e:
        raise TrainError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except Exception as e:
        raise TrainError(f"{path}: its stored settings are not usable ({type(e).__name__}: {e})") from None


def short(value) -> str:
    """A setting's value for a one-line message (a concepts list can be long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def shown(value) -> str:
    """A stored setting as the user would have given it: a switch on or off, none for a default left to the model."""
    return "none" if value is None else "on" if value is True else "off" if value is False else short(value)


def resumed_config(cfg: TrainConfig, stored: TrainConfig, given: set[str] | None) -> TrainConfig:
    """The checkpoint's settings, with the resumable ones the user gave; a changed fixed one is refused.
    `given`: the settings the user named (None: every resumable one comes from `cfg`)."""
    resumable = {n for n, f in OPTIONS.items() if f.metadata["resumable"]}
    given = resumable if given is None else given & set(OPTIONS)
    fixed = sorted(k for k in given if k not in resumable and getattr(cfg, k) != getattr(stored, k))
    if fixed:
        was = ", ".join(f"{flag(k)} {shown(getattr(stored, k))}" for k in fixed)
        raise TrainError(f"--resume: {', '.join(flag(k) for k in fixed)} cannot change in a resumed run (it has "
                         f"{was}); drop {'it' if len(fixed) == 1 else 'them'}, or start a new run with --overwrite")
    added = sorted(k for k in given & resumable if OPTIONS[k].metadata.get("check") is path and
                   getattr(stored, k) is None and getattr(cfg, k) is not None)
    if added:  # a folder may be given anew where it moved, not added: the run trained without it
        raise TrainError(f"--resume: this run trained without {flag(added[0])}; it cannot be added to it (start a "
                         f"new run with --overwrite)")
    return replace(stored, **{k: getattr(cfg, k) for k in resumable if k in given})
