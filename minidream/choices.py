"""Every choice list of the command line, defined once. The module that implements a choice takes its list
from here (and checks its input against it); cli.py builds its options from the same tuples. No torch
import here, so `minidream --help` stays fast."""

SAMPLERS = ("ddim", "ddpm", "pndm", "euler", "euler-a", "heun", "dpmpp-2m", "dpmpp-2m-karras",
            "dpmpp-2m-sde-karras", "unipc")                  # samplers.SAMPLERS implements each
ATTENTION_BACKENDS = ("auto", "sdpa", "math", "triton")      # attention.py
DTYPES = ("fp32", "fp16", "bf16")                            # `sample --dtype`
PRESETS = ("sd15", "sd21", "sd21-base", "sdxl", "tiny", "tiny-xl")  # model.PRESETS
TRAIN_MODES = ("unet", "attention", "lora")                  # config.MODE_DEFAULTS, trainable.select_trainable
MIXED_PRECISIONS = ("no", "fp16", "bf16")                    # config.validate, data.HALF
CLASS_PRECISIONS = ("auto", "fp32", "fp16", "bf16")          # auto: fp16 on CUDA (as diffusers' script), else fp32
LR_SCHEDULES = ("constant", "cosine", "linear", "polynomial")  # trainable.lr_lambdas
EXPORTS = ("diffusers", "single-file", "lora-diffusers", "lora-kohya")  # export.EXPORTERS
REPORT_TO = ("none", "tensorboard")                         # report.Log
