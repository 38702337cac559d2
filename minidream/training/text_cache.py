"""--cache-text-encoder-outputs disk: each prompt's conditioning kept in OUT/text_cache, one file per prompt, named by
a hash of the prompt and of all its rows depend on (the base model's fingerprint, the encoders' dtypes, clip skip,
T5's length). A resumed run reads them instead of running the text encoders, whose weights it then never reads;
a changed caption misses only its own entry. Each file is written whole or not at all (files.save_safetensors).
"""
import hashlib
import json
from pathlib import Path

import torch

from minidream.formats.files import save_safetensors
from minidream.models.stable_diffusion import StableDiffusion
from minidream.models.text_memo import TextMemo

TEXT_CACHES = {"memory": "in memory, for this run", "disk": "also in OUT/text_cache, read again on resume"}


def entry(folder: Path, model: StableDiffusion, base: str, prompt: str) -> Path:
    """The prompt's file: its name a hash of the prompt, its token ids (another --tokenizer reads it otherwise) and
    what else its conditioning depends on."""
    dtypes = [str(next(te.parameters()).dtype) for te in model.text_networks()]
    ids = [tok([prompt]).tolist() for _, tok, _ in model.text_encoders()]
    if model.tokenizer_3 is not None:
        ids.append(model.tokenizer_3([prompt], model.max_sequence_length).tolist())
    key = json.dumps([1, base, model.family.name, dtypes, model.clip_skip, model.max_sequence_length, ids, prompt])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def read_cached(memo: TextMemo, folder: Path, model: StableDiffusion, base: str, prompts: list[str],
                device: torch.device):
    """The prompts whose file exists (and holds that prompt), into the memo, on the device."""
    from safetensors.torch import safe_open
    for prompt in dict.fromkeys(prompts):
        file = entry(folder, model, base, prompt)
        if prompt in memo.rows or not file.exists():
            continue
        try:
            with safe_open(str(file), "pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    continue
                memo.rows[prompt] = {k: f.get_tensor(k).to(device) for k in f.keys()}
        except Exception:  # an unreadable entry is encoded again (and rewritten)
            continue


def write_cached(memo: TextMemo, folder: Path, model: StableDiffusion, base: str, prompts: list[str]):
    """The prompts' rows, one file each (those read_cached could not read: missing, or unreadable and replaced)."""
    for prompt in dict.fromkeys(prompts):
        save_safetensors(memo.rows[prompt], entry(folder, model, base, prompt), metadata={"prompt": prompt})
