"""How a run holds the base model, settled as it loads: the model is read as its files store it (memory-mapped,
nothing copied yet), then each network takes the form it keeps for the whole run, one tensor at a time:

- a network that nothing trains in (the VAE, a frozen text encoder, a denoiser that trains LoRA adapters) in the
  step's precision (--mixed-precision), never a fp32 copy first;
- what trains, or holds what trains (the whole UNet, a text encoder trained whole or learning a token's row), in
  fp32: its master weights (the step casts the frozen rest later, trainable.cast_frozen);
- with --quantize-base, the frozen linears of the networks the step runs quantized layer by layer.

Each dense tensor read from the file and replaced gives its file pages back at once (files.give_back_pages), so a
network is never in memory twice: a fp8 base peaks at its fp8 size, not at its file's plus that. The base is not
changed: the exports read the files again (training/export.py).
"""
import sys

import torch
import torch.nn as nn

from minidream.formats.files import give_back_pages
from minidream.models.quantize import quantize_frozen
from minidream.models.stable_diffusion import StableDiffusion, t5_dtype
from minidream.training.trainable import MODES


def frozen_networks(model: StableDiffusion, cfg) -> list[nn.Module]:
    """The networks no parameter of which trains (adapters added later aside): the VAE; the denoiser under LoRA; a
    CLIP unless it trains whole or learns a token's row (which starts from its fp32 values); T5 unless it learns
    one. Kept as loaded (fp32) until the step: a network whose DoRA magnitudes start from its weights' norms (the
    file's values, as before), and the networks an explicit --class-precision fp32 draws class images with (the
    denoiser and the VAE; the text is encoded once, in the step's precision)."""
    adapters = MODES[cfg.mode].adapters
    drawn_in_fp32 = cfg.class_images and cfg.class_precision == "fp32"
    frozen = [] if drawn_in_fp32 else [model.vae]
    if adapters and not cfg.dora and not drawn_in_fp32:
        frozen.append(model.denoiser)
    clip_trains = (cfg.train_text_encoder and (not adapters or cfg.dora)) or cfg.train_token
    frozen += [te for _, _, te in model.text_encoders() if not clip_trains]
    if model.text_encoder_3 is not None and not cfg.train_token_t5:
        frozen.append(model.text_encoder_3)
    return frozen


def quantized_at_load(model: StableDiffusion, cfg, frozen: list[nn.Module]) -> list[nn.Module]:
    """The frozen networks whose linears the step runs (step.networks_in_step): the denoiser; the CLIPs while
    their adapters train. The others are quantized by the step once what trains in them is chosen."""
    if not cfg.quantize_base:
        return []
    runs = [model.denoiser] + ([te for _, _, te in model.text_encoders()] if cfg.train_text_encoder else [])
    return [net for net in runs if any(net is f for f in frozen)]


def cast_network(net: nn.Module, dtype: torch.dtype):
    """Every floating tensor of `net` in `dtype` (a quantized layer's stored bits as they are), the file pages of
    each one converted given back."""
    for m in net.modules():
        kept = getattr(m, "kept", ())
        for slot in (m._parameters, m._buffers):
            for name, t in slot.items():
                if t is None or not t.is_floating_point() or t.dtype == dtype or name in kept:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data, old = t.data.to(dtype), t.data
                else:
                    slot[name], old = t.to(dtype), t
                give_back_pages([old])


def hold(model: StableDiffusion, cfg, precision: torch.dtype | None, main: bool = True,
         only: list[nn.Module] | None = None, device: torch.device | None = None) -> StableDiffusion:
    """The model, loaded as stored, in the form the run keeps it (the module docstring); `only`: these networks
    (the text encoders, settled and done with before the denoiser is read). Layers are quantized on `device` (the
    run's: bitsandbytes' kernels there, and the layer stays)."""
    nets = [net for net in model.networks() if only is None or any(net is o for o in only)]
    frozen = [net for net in frozen_networks(model, cfg) if any(net is n for n in nets)]
    quantized = quantized_at_load(model, cfg, frozen)
    if quantized:
        before, after = quantize_frozen(quantized, cfg.quantize_base, lambda w: give_back_pages([w]), device)
        if main:
            print(f"--quantize-base {cfg.quantize_base}: the frozen linear weights the step runs, "
                  f"{before / 2 ** 20:,.1f} MiB as stored -> {after / 2 ** 20:,.1f} MiB", file=sys.stderr)
    half = precision or torch.float32
    for net in nets:
        if any(net is f for f in frozen):
            cast_network(net, t5_dtype(half) if net is model.text_encoder_3 else half)
        else:
            cast_network(net, torch.float32)
    return model
