"""A DreamBooth run's settings: `TrainConfig`, where each option is declared once (minidream/options.py). A field
carries its default, the help of its command-line option, its check, and whether a resumed run may change it;
`minidream train`'s options (cli.py), `validate` and the resume rules are all read from these declarations. A choice
option's values come from the table that implements them (the --train modes, optimizers, LR schedules, samplers,
export formats, ...). Adding an option is one field here, and its use where it acts.
"""
from dataclasses import dataclass, fields
from pathlib import Path

from minidream.formats import exports
from minidream.models.attention import CHOICES as ATTENTION_BACKENDS
from minidream.models.compile import COMPILE_HELP, COMPILE_MODES
from minidream.models.device import DTYPES
from minidream.models.flux import PRESETS as FLUX_NETS
from minidream.models.mmdit import PRESETS as MMDIT_PRESETS
from minidream.models.quantize import FORMATS as QUANT_FORMATS, check_format
from minidream.models.stable_diffusion import PRESETS
from minidream.options import (Needs, at_least, beta, decay, each_one_of, extension, first_problem, in_range,
                               non_negative, option, option_flag, optional, optional_at_least, optional_count, path,
                               paths, positive, positive_number, probability, seed_range, text, texts)
from minidream.sampling.pipeline import MAX_GUIDANCE, SamplingParams, image_side
from minidream.sampling.samplers import SAMPLERS
from minidream.training import TrainError
from minidream.training.concepts_file import (MAX_CLASS_IMAGES, MAX_REPEATS, check_concepts, check_run_concepts,
                                              concept_noun, concepts_file, word)
from minidream.training.ema import EMAOptions
from minidream.training.objective import Objective
from minidream.training.optim import LR_SCHEDULES, OPTIMIZERS, check_optimizer
from minidream.training.report import REPORT_TO
from minidream.training.text_cache import TEXT_CACHES
from minidream.training.runtime import PRECISIONS
from minidream.models.lora import AdapterSpec
from minidream.training.trainable import MODES, TEXT_TARGETS, UNET_TARGETS, Adapters, check_blocks
from minidream.training.validation import check_validation_set, validation_file


# ---------------------------------------------------------------------------------------------
# The check only a training setting has (the common ones are minidream/options.py's)

# a rank past the widest layer's width adds parameters and no expressiveness (SD's widest input is 2560, SDXL's
# feed-forward 5120): 1024 is beyond what anyone trains (kohya's large LoRAs are 128-256)
MAX_RANK = 1024


def optional_rank(v):
    return None if v is None else at_least(1, MAX_RANK)(v)


# ---------------------------------------------------------------------------------------------
# What a setting asks of the others when given (`needs`; `combinations` checks them)

LORA = (Needs(lambda c: MODES[c.mode].adapters, "{flag} shapes LoRA adapters: it needs --train lora"),)
CONVOLUTIONS = (*LORA, Needs(lambda c: c.lora_targets == "all", "--conv-rank/--conv-alpha shape the 3x3 "
                             "convolutions' adapters: they need --lora-targets all"))
FUSED_BACKWARD = (
    Needs(lambda c: c.grad_accum == 1, "--fused-backward updates the weights in every backward pass: it cannot "
          "accumulate gradients; drop --grad-accum (or --fused-backward)"),
    Needs(lambda c: c.mixed_precision != "fp16", "--fused-backward cannot skip a step whose fp16 gradients "
          "overflowed (it updates during backward): use --mixed-precision bf16"),
    Needs(lambda c: OPTIMIZERS[c.optimizer].per_parameter, "--fused-backward needs an optimizer that updates each "
          "weight from its own gradient; {cfg.optimizer} does not: use adamw, adamw8bit or adafactor"))


def one_lr(name: str) -> tuple[Needs]:
    """A learning rate of its own, which an optimizer with one step size for everything (Prodigy) cannot take."""
    return (Needs(lambda c: not OPTIMIZERS[c.optimizer].one_lr or getattr(c, name) == c.unet_lr,
                  "{cfg.optimizer} takes one learning rate for everything it trains (its step size is shared): drop "
                  "--text-encoder-lr and --token-lr, or give them --lr's value"),)


def path_text(p) -> str | None:
    """A path option's value as stored in run.json ("" kept: its check refuses it)."""
    return None if p is None else str(p)


def noun(v):
    return "is empty; name the subject's class (e.g. dog)" if v is not None and not v.strip() else text(v)


def identifier(v):
    wrong = word(v)
    return None if wrong is None else wrong.removeprefix(f"{v!r} ")


MODE_HELP = "; ".join(f"{name}: {row.help}" for name, row in MODES.items())


SD3_PRESETS = [name for name in MMDIT_PRESETS if not name.startswith("tiny")]  # the released MMDiTs
FLUX_PRESETS = [name for name in FLUX_NETS if not name.startswith("tiny")]  # the released Flux transformers


@dataclass(frozen=True, kw_only=True)
class TrainConfig(EMAOptions, Objective):
    """Everything a run depends on; stored in run.json and in every checkpoint. The options of the objective (the
    noise, timesteps and loss) are objective.py's, those of the moving average ema.py's."""
    out: str = option(help="Run folder: checkpoints, metrics, samples, exports.", check=path, resumable=True,
                      cli_type=Path,
                      parse=str)
    model: str | None = option(None, "Base model: folder, hub repo id, single-file checkpoint or demo (resuming: the "
                               "run's own).", check=path, resumable=True)
    # the data
    instance_dir: str | None = option(None, "Folder with 3-20 photos of the subject (jpg/png/webp). Named as kohya "
                                      "names them (`10_sks dog`) it gives the repeats, identifier and class noun.",
                                      check=path, resumable=True, cli_type=Path, parse=path_text)
    repeats: int | None = option(None, "Times an epoch sees each photo, and its weight in a draw (default: the "
                                 "folder's N_ prefix, else 1).", check=optional_count)
    class_noun: str | None = option(None, "The subject's class, e.g. dog.", check=noun)
    concepts: tuple = option((), "JSON list of concepts (instead of --instance-dir/--class-noun): {instance_dir, "
                             "instance_prompt | identifier + class_noun, class_prompt, class_dir, num_class_images, "
                             "repeats}; a kohya-named instance_dir (10_sks dog) gives its repeats and prompt.",
                             check=check_concepts, cli_type=Path, parse=concepts_file)
    mask_dir: str | None = option(None, "Masked loss: a folder with PHOTO-NAME.png beside each photo's name (white = "
                                  "the subject, black = ignored); the instance loss is averaged over the mask.",
                                  check=path, resumable=True, cli_type=Path, parse=path_text,
                                  needs=(Needs(lambda c: not c.alpha_mask, "--mask-dir and --alpha-mask both give the "
                                               "loss mask: pass one of them"),
                                         Needs(lambda c: not c.concepts, "--mask-dir names one folder of masks: with "
                                               "--concepts, give each photo its mask in its alpha channel "
                                               "(--alpha-mask)")))
    alpha_mask: bool = option(False, "Masked loss from each photo's alpha channel (opaque = the subject).")
    caption_ext: str | None = option(None, "A caption file beside an image (IMAGE.EXT, e.g. .txt) is that image's "
                                     "prompt.", check=extension)
    caption_dropout: float = option(0.0, "Train on an empty caption instead of a photo's prompt with this probability "
                                    "(the class prompts are kept).", check=beta)
    shuffle_tags: bool = option(False, "Shuffle each photo's comma-separated tags every step (kohya's "
                                "--shuffle_caption); the text encoders then stay loaded.", needs=(Needs(
                                    lambda c: c.cache_text_encoder_outputs != "disk", "{flag} makes a new prompt "
                                    "each step, which --cache-text-encoder-outputs disk cannot hold"),))
    keep_tokens: int = option(0, "With --shuffle-tags: the first N tags stay in place (the trigger word).",
                              check=at_least(0), needs=(Needs(lambda c: c.shuffle_tags, "{flag} keeps tags in place "
                                                              "under --shuffle-tags"),))
    aspect_buckets: bool = option(False, "Aspect-ratio buckets of about --resolution² pixels instead of square crops.")
    max_aspect: float = option(2.0, "Largest bucket aspect ratio.", check=in_range(1, 10))
    identifier: str = option("sks", "Rare token bound to the subject.", check=identifier)
    instance_prompt: str | None = option(None, "Default: 'a photo of IDENTIFIER CLASS'.", check=text)
    class_prompt: str | None = option(None, "Default: 'a photo of CLASS'.", check=text)
    resolution: int | None = option(None, "Training resolution in pixels; default: the model's native one (512 for "
                                    "SD 1.x/2.x-base, 768 for 2.x-v).", check=image_side)
    center_crop: bool = option(True, "Crop mode.", flag="--center-crop/--random-crop",
                               needs=(Needs(lambda c: not c.cache_latents, "--random-crop has no effect with "
                                            "--cache-latents (cached latents are centre crops); drop one of them"),))
    flip: float = option(0.0, "Probability of a horizontal flip.", check=probability)
    # prior preservation (the class images)
    prior: bool = option(True, "Class-specific prior-preservation loss.", flag="--prior/--no-prior")
    prior_source: str = option("images", "The prior's target: images (class images the base model draws, "
                               "DreamBooth's), or model (the base model's own prediction, adapters off, on the "
                               "photos' noised latents for the class prompt: kohya's DOP; no class images; LoRA).",
                               choices=("images", "model"), needs=(Needs(
                                   lambda c: c.prior and MODES[c.mode].adapters, "{flag} model takes the target from "
                                   "the base model with the adapters off: it needs --train lora and --prior"), Needs(
                                   lambda c: not (c.fsdp or c.blocks_to_swap), "{flag} model is not run with --fsdp "
                                   "or --blocks-to-swap yet; drop one of them")))
    class_dir: str | None = option(None, "Class images (generated here if too few). Default: OUT/class_images.",
                                   check=path, resumable=True, cli_type=Path, parse=path_text)
    num_class_images: int = option(200, "Class images to have (generated by the base model).",
                                   check=at_least(0, MAX_CLASS_IMAGES),
                                   needs=(Needs(lambda c: not c.prior or c.num_class_images >= 1, "--num-class-images "
                                                "must be at least 1 with prior preservation (or pass --no-prior)"),))
    prior_loss_weight: float = option(1.0, "λ, weight of the prior-preservation loss.", check=non_negative)
    class_steps: int | None = option(None, "Sampling steps for class images; default: the family's pipeline's (50; "
                                     "SD3: 28).", check=optional_at_least(1, 10 ** 4))
    class_guidance: float | None = option(None, "CFG scale for class images; default: the family's pipeline's (7.5; "
                                          "SD3: 7.0).", check=optional(in_range(0, MAX_GUIDANCE)))
    class_batch_size: int = option(4, "Class images per sampling batch.", check=at_least(1, 4096))
    class_precision: str = option("auto", "Precision of class-image sampling (autocast); auto: fp16 on CUDA, fp32 on "
                                  "CPU.", choices=("auto", *DTYPES))
    class_negative_prompt: str = option("", "Negative prompt for the class images.", check=text)
    class_scheduler: str | None = option(None, "Sampler for class images; default: the model's own.",
                                         choices=SAMPLERS)
    # what trains
    mode: str = option("unet", MODE_HELP + ".", choices=MODES, flag="--train", was="train")
    lora_rank: int = option(4, "LoRA rank r.", check=at_least(1, MAX_RANK))
    lora_alpha: float = option(4.0, "LoRA alpha (scale alpha/r).", check=positive)
    lora_targets: str | None = option(None, "What LoRA adapts in the denoiser: " + "; ".join(
        f"{n}: {row.help}" for n, row in UNET_TARGETS.items()) + " (an MMDiT's: docs/sd3.md, docs/flux.md). Default: "
        "the family's (attn; Flux attn-ff, diffusers' Flux targets).", choices=UNET_TARGETS, needs=LORA)
    text_encoder_targets: str = option("attn", "What LoRA adapts in the text encoder(s) (--train-text-encoder): " +
                                       "; ".join(f"{n}: {row.help}" for n, row in TEXT_TARGETS.items()) + ".",
                                       choices=TEXT_TARGETS,
                                       needs=(*LORA, Needs(lambda c: c.train_text_encoder, "--text-encoder-targets "
                                                           "needs --train-text-encoder")))
    lora_blocks: str | None = option(None, "Only these UNet stages, comma-separated: down.N, mid, up.N (SD and "
                                     "SDXL alike; or prefixes of the UNet's module names, e.g. "
                                     "up_blocks.0.attentions.1); SD3's blocks 0, 1, …; Flux's double.N, single.N. "
                                     "Default: all.", check=check_blocks, needs=LORA)
    conv_rank: int | None = option(None, "LoCon rank of the 3x3 convolutions (--lora-targets all; default: "
                                   "--lora-rank).", check=optional_rank, needs=CONVOLUTIONS)
    conv_alpha: float | None = option(None, "LoCon alpha of the 3x3 convolutions (default: --lora-alpha).",
                                      check=positive_number, needs=CONVOLUTIONS)
    lora_dropout: float = option(0.0, "Dropout on each adapter's input while training (PEFT's lora_dropout).",
                                 check=beta, needs=LORA)
    dora: bool = option(False, "DoRA (weight-decomposed LoRA): train a magnitude per output channel beside the "
                        "low-rank direction (diffusers' --use_dora).", needs=LORA)
    train_text_encoder: bool = option(False, "Also train the text encoder (LoRA with --train lora).")
    train_token: bool = option(False, "Learn a new token embedding <IDENTIFIER>, initialised from the class noun.")
    token_vectors: int = option(1, "Vectors of the new token (--train-token): <IDENTIFIER> stands for N embedding rows "
                                "(textual inversion's multi-vector tokens).", check=at_least(1, 75),
                                needs=(Needs(lambda c: c.train_token, "--token-vectors shapes the learned token: it "
                                             "needs --train-token"),))
    train_token_t5: bool = option(False, "SD3, Flux: the new token gets a row in T5 too, which trains (diffusers' "
                                  "--enable_t5_ti); T5 then runs every step.",
                                  needs=(Needs(lambda c: c.train_token, "--train-token-t5 learns the token's T5 row: "
                                               "it needs --train-token"),
                                         Needs(lambda c: c.t5, "--train-token-t5 learns a row in T5: drop --no-t5")))
    clip_skip: int = option(1, "SD 1.x/2.x: condition on the text encoder's N-th layer from the end, as A1111 and "
                            "kohya number it (1: the last, 2: the penultimate, for community SD 1.x models).",
                            check=at_least(1))
    max_sequence_length: int | None = option(None, "SD3, Flux: T5's tokens per prompt (longer prompts are cut, "
                                             "shorter padded); default: SD3 256 (as diffusers), Flux [dev] 512, "
                                             "[schnell] 256.",
                                             check=optional_at_least(1, 512))
    t5: bool = option(True, "SD3: --no-t5 runs without the T5 text encoder (not even loaded: zeros in its place, as "
                         "diffusers with text_encoder_3=None); saves its memory, costs prompt fidelity.")
    # optimisation
    optimizer: str = option("adamw", "; ".join(f"{n}: {row.help}" for n, row in OPTIMIZERS.items()) + ".",
                            choices=OPTIMIZERS, check=check_optimizer)
    lr: float | None = option(None, "Learning rate. Default per mode: " + ", ".join(
        f"{m} {row.lr:g}" for m, row in MODES.items()) + ".", check=positive_number)
    text_encoder_lr: float | None = option(None, "Learning rate of the text encoder (default: --lr).",
                                           check=positive_number, needs=one_lr("text_encoder_lr"))
    text_encoder_steps: int = option(0, "Stop training the text encoder after this many steps (0: never).",
                                     check=non_negative)
    token_lr: float | None = option(None, "Learning rate of the new token embedding (default: 5e-3; with prodigy 1).",
                                    check=positive_number, needs=one_lr("token_lr"))
    lr_schedule: str = option("constant", "After warmup.", choices=LR_SCHEDULES)
    lr_power: float = option(1.0, "Power of the polynomial schedule.", check=positive)
    warmup_steps: int = option(0, "Linear warmup steps.", check=non_negative)
    adam_beta1: float = option(0.9, "AdamW beta1.", check=beta)
    adam_beta2: float = option(0.999, "AdamW beta2.", check=beta)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", check=positive)
    weight_decay: float = option(1e-2, "AdamW weight decay (not applied to a new token).", check=non_negative)
    adafactor_beta2_decay: float = option(-0.8, "Adafactor: beta2 at step t is 1 - t^decay.", check=decay)
    prodigy_d_coef: float = option(1.0, "Prodigy: multiplier of the estimated step size d.", check=positive)
    prodigy_bias_correction: bool = option(False, "Prodigy: Adam's bias correction (its authors advise it for "
                                           "diffusion models).")
    prodigy_safeguard_warmup: bool = option(False, "Prodigy: keep d from growing too fast during warmup.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0: no clipping; with --fused-backward each "
                                  "parameter's gradient is clipped on its own).", check=non_negative)
    fused_backward: bool = option(False, "Update each parameter inside backward as soon as its gradient is ready, and "
                                  "free the gradient (no memory for all gradients at once; kohya's "
                                  "--fused_backward_pass).", needs=FUSED_BACKWARD)
    steps: int = option(400, "Optimizer steps.", check=at_least(1, 10 ** 8), resumable=True)
    epochs: int | None = option(None, "Instead of --steps: passes over the photos (each photo x its repeats once "
                                "an epoch; --steps is then derived, and recorded in data.json).",
                                check=optional_count, resumable=True)
    batch_size: int = option(1, "Instance images per step (plus as many class images).", check=at_least(1, 4096))
    grad_accum: int = option(1, "Gradient accumulation micro-steps.", check=at_least(1, 4096))
    mixed_precision: str = option("no", "Autocast dtype (fp16 needs a GPU); frozen weights run in it, trained ones "
                                  "keep fp32 masters.", choices=PRECISIONS)
    tf32: bool = option(True, "On CUDA, TF32 tensor cores for fp32 matmuls and convolutions.", resumable=True)
    gradient_checkpointing: bool = option(False, "Recompute activations per block in backward.")
    fsdp: bool = option(False, "Under torchrun: shard the UNet (and a training text encoder), their gradients and "
                        "optimizer state across the processes (FSDP2) instead of a whole copy in each.", resumable=True,
                        needs=(Needs(lambda c: c.optimizer == "adamw" and c.mixed_precision == "no", "--fsdp works "
                                     "with --optimizer adamw and --mixed-precision no for now (a sharded block holds "
                                     "one dtype; other optimizers keep state not shaped like the weights)"),
                               Needs(lambda c: not c.train_token, "--fsdp and --train-token do not go together yet "
                                     "(the token's row is whole, the model sharded); drop one")))
    quantize_base: str | None = option(None, "The frozen linears the step runs (the denoiser's; a text encoder's "
                                       "while it trains) kept in fewer bits, dense only while they compute: " +
        "; ".join(f"{n}: {row.help}" for n, row in QUANT_FORMATS.items()) + ". The exports still read the base files.",
        choices=QUANT_FORMATS, check=check_format, needs=(
            Needs(lambda c: c.mode != "unet", "--quantize-base keeps frozen weights in fewer bits, and --train unet "
                                              "trains them all: use --train lora or attention"),
            Needs(lambda c: not c.fsdp, "--quantize-base and --fsdp do not go together yet (a sharded block holds "
                                        "one dtype)")))
    blocks_to_swap: int = option(0, "SD3 and Flux under LoRA: the frozen weights of the transformer's last N blocks "
                                 "kept in CPU memory, each copied to the GPU just before its block runs (kohya's "
                                 "--blocks_to_swap): less GPU memory, some time.", check=at_least(0, 10 ** 4),
                                 resumable=True, needs=(
            Needs(lambda c: MODES[c.mode].adapters and not c.dora, "--blocks-to-swap moves frozen blocks to the GPU "
                                                                   "and back: it needs --train lora (without --dora)"),
            Needs(lambda c: c.gradient_checkpointing, "--blocks-to-swap needs --gradient-checkpointing (without it "
                                                      "backward keeps every block's weights on the GPU)"),
            Needs(lambda c: not (c.prior and c.class_precision == "fp32"), "--blocks-to-swap holds the swapped "
                                                                           "weights in --mixed-precision's dtype; "
                                                                           "drop --class-precision fp32"),
            Needs(lambda c: not c.fsdp, "--blocks-to-swap and --fsdp both place the model's blocks: use one")))
    cache_text_encoder_outputs: str = option("memory", "Frozen text encoders' outputs: every prompt of the run is "
                                             "encoded before the denoiser loads, then the encoders are freed; kept in "
                                             "memory, or also in OUT/text_cache, which a resumed run reads instead.",
                                             choices=TEXT_CACHES, resumable=True, needs=(Needs(
        lambda c: not (c.train_text_encoder or c.train_token or c.train_token_t5), "--cache-text-encoder-outputs disk "
        "keeps what frozen text encoders output: not with --train-text-encoder or --train-token(-t5)"),))
    cache_latents: bool = option(False, "Encode the images with the VAE once.")
    seed: int = option(0, "Seed of every random draw.", check=seed_range)
    # validation, checkpoints, exports, where it runs
    validation_prompts: tuple[str, ...] = option((), "Prompt for validation grids (repeatable).", check=texts,
                                                 resumable=True,
                                                 flag="--validation-prompt")
    validation_set: tuple = option((), "JSON list of validation grid rows, each {prompt, negative_prompt, guidance, "
                                   "guidance_rescale, height, width, seed, steps} (beside --validation-prompt's).",
                                   check=check_validation_set, resumable=True, flag="--validation-file",
                                   cli_type=Path, parse=validation_file)
    validation_every: int = option(0, "Steps between validation grids and validation losses (0: a grid at the end "
                                   "only).", check=non_negative,
                                   resumable=True)
    validation_images: int = option(4, "Images per validation prompt (fixed seeds).", check=at_least(1, 1024),
                                    resumable=True)
    validation_steps: int = option(25, "Sampling steps for validation images.", check=at_least(1, 10 ** 4),
                                   resumable=True)
    validation_scheduler: str | None = option(None, "Sampler for validation grids; default: the model's own.",
                                              choices=SAMPLERS, resumable=True)
    validation_guidance_rescale: float = option(0.0, "The grids' --guidance-rescale (SD 1.x/2.x/XL; 0.7 for a "
                                                "zero-terminal-SNR model).", check=in_range(0, 1), resumable=True,
                                                needs=(Needs(lambda c: c.validation_prompts or c.validation_set,
                                                             "{flag} rescales the grids' guidance: give "
                                                             "--validation-prompt or --validation-file"),))
    report_to: str = option("none", "Also log to TensorBoard (OUT/tensorboard; pip install "
                            "'minidream[tensorboard]') or Weights & Biases (OUT/wandb; 'minidream[wandb]'; "
                            "WANDB_MODE=offline needs no account). OUT/curves.png is always drawn.", choices=REPORT_TO,
                            resumable=True)
    log_every: int = option(10, "Steps between metrics lines written (each step has its line; the losses are read "
                            "back from the GPU only then, and at every checkpoint, snapshot and grid).",
                            check=at_least(1, 10 ** 6), resumable=True)
    checkpoint_every: int = option(100, "Steps between checkpoints (0: only the last step's; the last step always "
                                   "has one, so a larger --steps extends a finished run).", check=non_negative,
                                   resumable=True)
    keep_last: int = option(2, "Checkpoints to keep (0: all).", check=non_negative, resumable=True)
    save_every: int = option(0, "Steps between snapshots: the --save-as exports of that step in OUT/snapshots/"
                             "step-N, to pick the best step by eye (0: none; the final export stays in OUT).",
                             check=non_negative, resumable=True)
    keep_snapshots: int = option(0, "Snapshots to keep, the newest (0: all).", check=non_negative, resumable=True)
    save_as: tuple[str, ...] = option((), "Export formats (repeatable): " + "; ".join(
        f"{n}: {exports.EXPORTERS[n].help}" for n in exports.CHOICES) + ". Default: " + "; ".join(
        f"{'/'.join(row.save_as)} with --train {m}" for m, row in MODES.items()) + ".",
        choices=exports.CHOICES, check=each_one_of(exports.CHOICES), resumable=True,
        needs=(Needs(lambda c: MODES[c.mode].adapters or not any(exports.EXPORTERS[s].adapters for s in c.save_as),
                     "--save-as lora-* needs --train lora"),))
    save_precision: str | None = option(None, "Precision of the exported weights (fp16 halves a file); default: "
                                        "fp32, and what did not train bit-identical to the base.", choices=DTYPES,
                                        resumable=True)
    attention: str = option("auto", "Attention kernel.", choices=ATTENTION_BACKENDS, resumable=True)
    compile: str = option("off", f"Compile the UNet's step with torch.compile: {COMPILE_HELP}.", choices=COMPILE_MODES,
                          resumable=True)
    device: str | None = option(None, "cuda or cpu; default: cuda when available.", resumable=True)
    # loading the base model (the loader options of `minidream sample`)
    revision: str | None = option(None, "Hub revision (branch, tag or commit) to fetch.")
    variant: str | None = option(None, "Weights variant to load, e.g. fp16.")
    allow_pickle: bool = option(False, "Also load .bin/.ckpt pickle files (weights only). Only for files you trust.",
                                flag="--allow-pickle")
    tokenizer: str | None = option(None, "For single-file checkpoints: folder or hub repo with the tokenizer "
                                   "(default: the official one).")
    preset: str | None = option(None, f"For single-file checkpoints: the architecture ({', '.join(PRESETS)}; SD3: "
                                f"{', '.join(SD3_PRESETS)}; Flux: {', '.join(FLUX_PRESETS)}); inferred when omitted.")
    original_config: str | None = option(None, "For single-file checkpoints: a diffusers-layout folder or repo id "
                                         "whose configs and tokenizer describe it (diffusers' name; was --config).",
                                         was="config")
    text_encoders: tuple[str, ...] = option((), "For an SD3 or Flux single file without its text encoders: ComfyUI's "
                                            "separate files (clip_l, clip_g, t5xxl .safetensors), in any order; "
                                            "repeat the flag (resuming: the run's own, or the same files moved).",
                                            check=paths, resumable=True)
    vae: str | None = option(None, "For a Flux single file (the transformer alone): its VAE file, ae.safetensors "
                             "(resuming: the run's own, or the same file moved).", check=optional(path),
                             resumable=True)

    def __post_init__(self):
        if not self.save_as and self.mode in MODES:  # (): the mode's own formats
            object.__setattr__(self, "save_as", MODES[self.mode].save_as)

    @property
    def class_images(self) -> bool:
        """The prior is learned from class images (which the run reads, or draws with the base model)."""
        return self.prior and self.prior_source == "images"

    @property
    def prompts(self) -> tuple[str, str]:
        token = self.token or self.identifier
        return (self.instance_prompt or f"a photo of {token} {self.class_noun}",
                self.class_prompt or f"a photo of {self.class_noun}")

    @property
    def token(self) -> str | None:
        """The new token --train-token adds: <IDENTIFIER>."""
        return f"<{self.identifier}>" if self.train_token else None

    @property
    def init_word(self) -> str:
        """What a new token's embedding starts from (--train-token): the class noun (the first concept's)."""
        return self.class_noun or next(filter(None, (concept_noun(c) for c in self.concepts)), "photo")

    @property
    def adapters(self) -> Adapters:
        """What --train lora adapts, and how."""
        spec = AdapterSpec(self.lora_rank, self.lora_alpha, self.conv_rank or self.lora_rank,
                           self.conv_alpha or self.lora_alpha, self.lora_dropout, self.dora)
        return Adapters(spec, self.lora_targets, self.text_encoder_targets, self.lora_blocks)

    @property
    def unet_lr(self) -> float:
        return self.lr or OPTIMIZERS[self.optimizer].lr or MODES[self.mode].lr

    @property
    def new_token_lr(self) -> float:
        if OPTIMIZERS[self.optimizer].one_lr:
            return self.unet_lr
        return self.token_lr or OPTIMIZERS[self.optimizer].lr or 5e-3

    @property
    def class_sampling(self) -> SamplingParams:
        return SamplingParams(steps=self.class_steps, guidance=self.class_guidance, sampler=self.class_scheduler,
                              negative_prompt=self.class_negative_prompt or None)

    @property
    def validation_sampling(self) -> SamplingParams:
        return SamplingParams(steps=self.validation_steps, sampler=self.validation_scheduler,
                              guidance_rescale=self.validation_guidance_rescale)


OPTIONS = {f.name: f for f in fields(TrainConfig)}


def flag(name: str) -> str:
    """A setting's option on the command line."""
    return option_flag(OPTIONS[name])


def validate(cfg: TrainConfig, resuming: bool = False):
    """Every setting that can be checked without the model, before anything is loaded or written. Resuming, the
    data comes from the checkpoint (checked there): what the command line gives need not name it again."""
    wrong = first_problem(cfg)
    if wrong:
        raise TrainError(f"{flag(wrong[0])} {wrong[1]}")
    if not resuming:
        if not cfg.model:
            raise TrainError("--model is needed: a diffusers folder, hub repo id or single-file checkpoint (to "
                             "continue the run in --out: --resume latest)")
        if not cfg.concepts and not cfg.instance_dir:
            raise TrainError("--instance-dir and --class-noun are needed (or --concepts FILE.json)")
        if not cfg.concepts and not cfg.class_noun:  # a kohya-named folder (`10_sks dog`) would have given it
            raise TrainError(f"--class-noun is needed: the subject's class (e.g. dog); or name --instance-dir as "
                             f"kohya does, N_IDENTIFIER CLASS (e.g. 10_sks dog; {Path(cfg.instance_dir).name!r} is "
                             f"not that: N from 1 to {MAX_REPEATS})")
        if cfg.concepts and (cfg.instance_dir or cfg.class_noun):
            raise TrainError("--concepts names each concept's folder and class: drop --instance-dir and "
                             "--class-noun")
    if not resuming:  # resuming, the settings a resume merges are checked together (dreambooth.py): the command
        combinations(cfg)  # line alone lacks the checkpoint's (--train lora, --train-token, ...)
        check_run_concepts(cfg, Path(cfg.out))


def combinations(cfg: TrainConfig):
    """What the settings ask of each other, read from each given setting's `needs`: checked on the command line's,
    and again on those a resume merges (the checkpoint's with the resumable ones given anew)."""
    for f in fields(TrainConfig):
        if getattr(cfg, f.name) != f.default:
            wrong = next((need for need in f.metadata["needs"] if not need.holds(cfg)), None)
            if wrong:
                raise TrainError(wrong.why.format(flag=option_flag(f), cfg=cfg))
