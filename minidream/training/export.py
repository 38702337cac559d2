"""Exports of a DreamBooth run (--save-as): a diffusers folder, an original-layout single file, LoRA files
(diffusers and kohya) and the learned token (textual inversion).

Every export starts from a fresh fp32 copy of the *base model*, read again from its files, into which the
trained tensors (the fp32 master weights) are written; LoRA is merged into the base weights in fp32. So a
tensor that did not train is written bit-identical to the base, whatever precision training ran in, and
the model that trained is never changed by exporting (the order of the formats does not matter).
"""
from pathlib import Path

import torch

from minidream.models import lora as lora_lib
from minidream.choices import EXPORTS
from minidream.formats.diffusers_layout import save_pretrained
from minidream.formats.files import save_safetensors
from minidream.models.stable_diffusion import StableDiffusion
from minidream.formats.single_file import save_single_file, unet_original_name
from minidream.training.trainable import learned_tokens, merged_text_encoder_state, select_trainable


def with_trained(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg) -> StableDiffusion:
    """The base model with the run's trainable structure (adapters, new token) and its trained values."""
    with torch.random.fork_rng(devices=[]):  # adapter init draws are overwritten below; keep the caller's RNG
        groups = select_trainable(base, cfg.train, cfg.lora_rank, cfg.lora_alpha, cfg.train_text_encoder,
                                  f"<{cfg.identifier}>" if cfg.train_token else None, cfg.init_word)
    params = {name: p for ps in groups.values() for name, p in ps}
    if params.keys() != trained.keys():
        raise RuntimeError(f"trained tensors do not match the run's selection: {sorted(params.keys() ^ trained.keys())[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trained[name])
    return base


def write_lora_diffusers(model: StableDiffusion, cfg, out: Path) -> Path:
    path = out / "lora" / "pytorch_lora_weights.safetensors"
    # text encoder modules under transformers' full names (text_model.encoder...), as diffusers' scripts save them
    nets = {"unet": model.unet, **{f"{name}.text_model": te for name, _, te in model.text_encoders()}}
    save_safetensors(lora_lib.diffusers_lora_state_dict(nets), path)
    return path


def write_lora_kohya(model: StableDiffusion, cfg, out: Path) -> Path:
    """kohya's names: SD 1.x/2.x `lora_te_` and the UNet's diffusers module names; SDXL `lora_te1_`, `lora_te2_`
    and the original UNet's names (as sd-scripts' SDXL networks write them)."""
    path = out / "lora_kohya.safetensors"
    if model.xl:
        nets = {"lora_unet_": model.unet, "lora_te1_text_model_": model.text_encoder,
                "lora_te2_text_model_": model.text_encoder_2}
        sd = lora_lib.kohya_lora_state_dict(nets, rename=lambda n: unet_original_name(model.unet.cfg, n))
    else:
        sd = lora_lib.kohya_lora_state_dict({"lora_unet_": model.unet, "lora_te_text_model_": model.text_encoder})
    save_safetensors(sd, path, metadata={"ss_network_dim": str(cfg.lora_rank), "ss_network_alpha": str(cfg.lora_alpha),
                                         **({"ss_base_model_version": "sdxl_base_v1-0"} if model.xl else {})})
    return path


def write_diffusers(model: StableDiffusion, cfg, out: Path) -> Path:
    save_pretrained(model, out / "model")
    return out / "model"


def write_single_file(model: StableDiffusion, cfg, out: Path) -> Path:
    save_single_file(model, out / "model.safetensors")
    return out / "model.safetensors"


# --save-as format -> (whether it writes a plain model: adapters merged, the learned token a normal row; writer).
# A new format is a row here (and its name in choices.EXPORTS).
EXPORTERS = {"diffusers": (True, write_diffusers), "single-file": (True, write_single_file),
             "lora-diffusers": (False, write_lora_diffusers), "lora-kohya": (False, write_lora_kohya)}
assert tuple(EXPORTERS) == EXPORTS, "choices.EXPORTS lists the formats defined here"


def make_plain(model: StableDiffusion):
    """Merge LoRA adapters into their (fp32 base) weights and make a learned token a normal embedding row."""
    lora_lib.merge_lora(model.unet)
    for _, _, te in model.text_encoders():
        lora_lib.merge_lora(te)
    merged_text_encoder_state(model)


def export(base: StableDiffusion, trained: dict[str, torch.Tensor], cfg, out: Path) -> list[Path]:
    """Write the formats asked for by cfg.save_as (and the learned token, when there is one).
    `base` is a fresh fp32 load of the base model, used up by this call."""
    model = with_trained(base, trained, cfg)
    written = []
    new = learned_tokens(model)
    if new:  # SDXL: one row per encoder, as diffusers' advanced SDXL script saves them (clip_l, clip_g)
        token = f"<{cfg.identifier}>"
        rows = {"clip_l": new["text_encoder"].float(), "clip_g": new["text_encoder_2"].float()} if model.xl \
            else {token: new["text_encoder"][0].float()}
        save_safetensors(rows, out / "learned_embeds.safetensors", metadata={"token": token})
        written.append(out / "learned_embeds.safetensors")
    for fmt, (plain, write) in sorted(EXPORTERS.items(), key=lambda row: row[1][0]):  # adapter files before merging
        if fmt in cfg.save_as:
            if plain:
                make_plain(model)
            written.append(write(model, cfg, out))
    return written
