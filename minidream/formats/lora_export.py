"""Writing our LoRA (and DoRA) adapters in the two layouts the other tools load, with the metadata they read.

- diffusers / PEFT (`load_lora_weights`): `unet.<module>.lora_A.weight`, `.lora_B.weight` (a convolution's A keeps
  its kernel, B is 1×1), DoRA's `.lora_magnitude_vector` (a text encoder's `.lora_magnitude_vector.weight`); text
  encoders as `text_encoder.text_model.<module>` (SDXL: and `text_encoder_2.`), as diffusers' scripts save them.
  α/r is folded into B, so the file loads at scale 1 in any tool (ComfyUI and older diffusers read no metadata),
  and the `lora_adapter_metadata` says so to those that read it (PEFT's LoraConfig per component: r, lora_alpha =
  r, rank_pattern/alpha_pattern for the 3×3 convolutions' own rank, target_modules, use_dora), from which diffusers
  builds its adapters. DoRA is unchanged by the folding: its norm is of W + (α/r)·B A either way.
- kohya (A1111, ComfyUI): `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`, DoRA's
  `.dora_scale` (out, 1, ...) as LyCORIS writes it with its magnitude on the output axis (wd_on_out: what LyCORIS
  merges exactly; A1111 reads only the per-input layout and ComfyUI divides this one by ‖W‖, not ‖W + ΔW‖, so the
  trainer warns that the diffusers file or the merged model is the exact DoRA export); text encoders
  under each family's kohya prefix (`lora_te_text_model_`; SDXL `lora_te1_`, `lora_te2_`, and the UNet's modules
  under the original checkpoint's names, `lora_unet_input_blocks_4_1_...`, as kohya's SDXL networks write; SD3's
  MMDiT under the original's, its Q, K, V adapters one fused `qkv` pair: kohya_names.py). The
  ss_* metadata kohya's trainer writes (network, dims, args, base model, resolution, steps, learning rates, times,
  caption tag frequencies) and a modelspec block (what model sites and A1111's extra-networks page show).
"""
import json

import torch

from minidream.formats.files import save_safetensors
from minidream.formats.kohya_names import kohya_denoiser_pairs
from minidream.models.lora import LoRA, loras


def _magnitude(m: LoRA) -> torch.Tensor:
    """DoRA's m as PEFT stores it: (out,) for a linear layer, (1, out, 1, 1) for a convolution."""
    v = m.magnitude.detach().float()
    return v.view(1, -1, 1, 1) if m.lora_down.weight.dim() == 4 else v


def diffusers_lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters of the UNet and text encoders under diffusers' names (α/r folded into B)."""
    sd = {}
    for comp, net in model.components().items():
        denoiser = comp == model.family.denoiser
        prefix = comp if denoiser else f"{comp}.text_model"
        for name, m in loras(net).items():
            sd[f"{prefix}.{name}.lora_A.weight"] = m.lora_down.weight.detach().float()
            sd[f"{prefix}.{name}.lora_B.weight"] = m.lora_up.weight.detach().float() * m.scale
            if m.magnitude is not None:  # PEFT's key; a text encoder's with .weight, which transformers' own
                # loader (diffusers loads text encoders through it) needs and PEFT's accepts
                sd[f"{prefix}.{name}.lora_magnitude_vector{'' if denoiser else '.weight'}"] = _magnitude(m)
    return sd


def diffusers_lora_metadata(model) -> dict[str, object]:
    """PEFT's LoraConfig of each component, keyed `<component>.<field>` as diffusers packs it: the most common
    rank, and a pattern for the modules of another rank (the 3×3 convolutions' --conv-rank); α = r everywhere, as
    α/r is folded into B."""
    meta = {}
    for comp, net in model.components().items():
        adapters = loras(net)
        if not adapters:
            continue
        first = next(iter(adapters.values()))
        ranks = [m.rank for m in adapters.values()]
        r = max(set(ranks), key=ranks.count)
        others = {n: m.rank for n, m in adapters.items() if m.rank != r}
        meta.update({f"{comp}.{k}": v for k, v in {
            "r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": others,
            # a text encoder's names without text_model.: PEFT matches name endings, and transformers 5 dropped it
            "target_modules": sorted(adapters), "use_dora": first.magnitude is not None}.items()})
        # (no lora_dropout: diffusers builds the adapters in training mode, and a pipeline would apply it)
    return meta


def save_lora_diffusers(model, path, dtype: torch.dtype | None = None, info: dict | None = None):
    """(`info`, the run's facts, goes to the kohya file only: diffusers' metadata is PEFT's config, nothing else.)"""
    save_safetensors(diffusers_lora_state_dict(model), path, dtype=dtype, metadata={
        "format": "pt", "lora_adapter_metadata": json.dumps(diffusers_lora_metadata(model))})


def kohya_lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters under kohya's names: the family's prefix per text encoder, the UNet's modules under diffusers'
    names or (SDXL) the original checkpoint's, as sd-scripts' networks write them."""
    encoders = {name: te for name, _, te in model.text_encoders()}
    pairs = {f"lora_unet_{name}": pair for name, pair in kohya_denoiser_pairs(model).items()}
    for slot in model.family.encoders:
        for name, m in loras(encoders[slot.name]).items():
            pair = {"lora_down": m.lora_down.weight.detach().float(), "lora_up": m.lora_up.weight.detach().float(),
                    "alpha": torch.tensor(float(m.alpha))}
            if m.magnitude is not None:
                pair["dora_scale"] = m.magnitude.detach().float().view(-1, 1)
            pairs[slot.kohya + name.replace(".", "_")] = pair
    return {f"{key}.{part}{'' if part in ('alpha', 'dora_scale') else '.weight'}": v
            for key, pair in pairs.items() for part, v in pair.items()}


def save_lora_kohya(model, path, dtype: torch.dtype | None = None, info: dict | None = None):
    """With the metadata kohya's trainer writes: what the network is (kohya_metadata), and `info`, the run's facts
    (training/export.py: base model, resolution, steps, learning rates, times, tag frequencies)."""
    save_safetensors(kohya_lora_state_dict(model), path, metadata={**kohya_metadata(model), **(info or {})},
                     dtype=dtype)


def kohya_metadata(model) -> dict[str, str]:
    """The ss_* fields that describe the network (kohya's train_network.py names; LyCORIS' module and args where
    the file holds LoCon convolutions or DoRA), the family's own (base model version) and modelspec's architecture."""
    adapters = [m for net in model.components().values() for m in loras(net).values()]
    linear = [m for m in adapters if m.lora_down.weight.dim() == 2 or m.base.kernel_size == (1, 1)]
    conv = [m for m in adapters if m not in linear]
    first = (linear or adapters)[0]
    dora = first.magnitude is not None
    args = {}
    if conv:
        args.update(conv_dim=str(conv[0].rank), conv_alpha=f"{conv[0].alpha:g}")
    if dora:
        args.update(algo="lora", dora_wd="True", wd_on_output="True")
    dropout = getattr(first.dropout, "p", 0.0)
    if dropout:  # PEFT's dropout of the adapter's input (kohya's ss_network_dropout is one after lora_down)
        args.update(lora_dropout=f"{dropout:g}")
    meta = {"ss_network_module": "lycoris.kohya" if dora else model.family.kohya_network,
            "ss_network_dim": str(first.rank), "ss_network_alpha": f"{first.alpha:g}", "ss_network_dropout": "None",
            "ss_network_args": json.dumps(args) if args else "null",
            **dict(model.family.kohya_metadata),
            "modelspec.sai_model_spec": "1.0.0", **model.modelspec,
            "modelspec.implementation": model.family.modelspec_implementation}
    meta["modelspec.architecture"] += "/lora"
    if model.scheduler.prediction_type == "v_prediction":
        meta["ss_v_parameterization"] = "True"
    return meta
