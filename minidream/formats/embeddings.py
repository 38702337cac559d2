"""Textual-inversion embeddings: others' read and added to a loaded model's vocabulary (`add_embedding`: ours,
diffusers', A1111's, SDXL's two-encoder files), and the token a run learned written (`save_learned_tokens`) in
the format diffusers' `load_textual_inversion` reads: {token: vector} for one text encoder, {"clip_l", "clip_g"}
rows for SDXL (diffusers' advanced SDXL script's format), {"clip_l", "t5"} for Flux (its advanced Flux script's,
"t5" where T5 learned the token too), the token in the metadata.
"""
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from minidream.formats.files import ModelError, name_some, read_metadata, read_weights, save_safetensors
from minidream.models.stable_diffusion import FAMILIES
from minidream.models.tokenizer import vector_names
from minidream.models.new_token import learned_tokens, set_table, token_tables, with_rows


# the keys of a learned-token file for a family whose encoders each have one (SDXL: clip_l, clip_g), and with T5's
# rows (SD3, Flux: a run with --train-token-t5)
T5_KEY = "t5"
MULTI_ENCODER_KEYS = [tuple(s.token_key for s in f.encoders) + with_t5 for f in FAMILIES.values()
                      if all(s.token_key for s in f.encoders) for with_t5 in ([(), (T5_KEY,)] if f.t5 else [()])]


def read_embedding(file: Path, allow_pickle: bool = False) -> tuple[str | None, dict[str | None, torch.Tensor]]:
    """(the token the file names, or None; vectors (n, dim) by text encoder key: None for a one-encoder file) from a
    textual-inversion file: ours and diffusers' ({token: vector(s)}), A1111's .pt (`string_to_param` {"*": vectors},
    `name`) and .safetensors (`emb_params`), and SDXL's two-encoder files ({"clip_l": .., "clip_g": ..}, the token in
    our metadata)."""
    sd = read_weights(Path(file), allow_pickle)
    if tuple(sorted(sd)) in [tuple(sorted(keys)) for keys in MULTI_ENCODER_KEYS]:
        token, vecs = read_metadata(Path(file)).get("token") if Path(file).suffix == ".safetensors" else None, sd
    elif len(sd) == 1:
        token, vec = next(iter(sd.items()))
        token, vecs = None if token == "emb_params" else token, {None: vec}
    elif isinstance(sd.get("string_to_param"), dict) and "*" in sd["string_to_param"]:
        token, vecs = sd.get("name"), {None: sd["string_to_param"]["*"]}
    else:
        raise ModelError(f"{file}: not a textual-inversion embedding (expected one {{token: tensor}} entry, "
                         f"A1111's string_to_param, emb_params or SDXL's clip_l + clip_g); it has "
                         f"{name_some(map(str, sd))}")
    if not all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.numel() for v in vecs.values()):
        raise ModelError(f"{file}: the embedding is not a vector or a (vectors, width) matrix")
    vecs = {k: v.reshape(-1, v.shape[-1]) for k, v in vecs.items()}
    if len({len(v) for v in vecs.values()}) > 1:
        raise ModelError(f"{file}: {' and '.join(vecs)} hold different numbers of vectors")
    return (token if isinstance(token, str) else None), vecs


def add_embedding(model, file: Path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
    """Add the file's vectors as new tokens, as diffusers' load_textual_inversion does: one token, or for n
    vectors `token`, `token_1`, … `token_{n-1}`, which a prompt's `token` expands to (SDXL: in both encoders).
    Returns the tokens."""
    named, by_key = read_embedding(file, allow_pickle)
    token = token or named or Path(file).stem
    t5_rows = by_key.pop(T5_KEY, None)  # T5's rows (SD3, Flux): added where the model has T5 (not after --no-t5)
    t5_rows = t5_rows if model.text_encoder_3 is not None else None
    if t5_rows is not None:  # checked before anything changes
        check_t5_rows(model, file, token, t5_rows)
    encoders = model.text_encoders()
    keys = [slot.token_key for slot in model.family.encoders]  # None: one encoder, the file's one vector set
    if set(by_key) != set(keys):
        fam = next(f for f in FAMILIES.values() if {s.token_key for s in f.encoders} == set(by_key))
        kind = f"{fam.title} ({' + '.join(s.token_key for s in fam.encoders)})" if None not in by_key \
            else "one text encoder ({token: vector}: SD 1.x/2.x)"
        wanted = "{token: vector}" if None in keys else " + ".join(keys) + (" (+ t5)" if model.family.t5 else "")
        raise ModelError(f"{file}: an embedding for {kind}; {model.family.title} reads {wanted}")
    vecs = [by_key[k] for k in keys]
    if not all(bool(torch.isfinite(v).all()) for v in vecs):
        raise ModelError(f"{file}: its vectors hold NaN or infinite values (a broken embedding)")
    n = len(vecs[0])
    most = encoders[0][1].max_length - 2
    if n > most:  # a prompt holds at most this many tokens: more vectors can never be read
        raise ModelError(f"{file}: {n} vectors; a prompt holds at most {most} tokens")
    tokens = vector_names(token, n)
    for (_, tok, te), vec in zip(encoders, vecs):
        if vec.shape[1] != te.embeddings.token_embedding.weight.shape[1]:
            raise ModelError(f"{file}: embedding width {vec.shape[1]} does not match this text encoder's "
                             f"{te.embeddings.token_embedding.weight.shape[1]} (an embedding for another model "
                             f"family?)")
        for t in tokens:
            if t in tok.vocab or t in tok.added:
                raise ModelError(f"{file}: token {t!r} is already in the vocabulary; name another with "
                                 f"--embedding-token")
    for (_, tok, te), vec in zip(encoders, vecs):
        tok.add_vectors(token, n)  # `token` stands for them all
        emb = te.embeddings.token_embedding
        grown = nn.Embedding(emb.num_embeddings + n, emb.embedding_dim, device=emb.weight.device,
                             dtype=emb.weight.dtype)
        with torch.no_grad():
            grown.weight[: emb.num_embeddings] = emb.weight
            grown.weight[emb.num_embeddings:] = vec.to(emb.weight)
        grown.requires_grad_(emb.weight.requires_grad)
        te.embeddings.token_embedding = grown
        te.config = replace(te.config, vocab_size=grown.num_embeddings)
    if t5_rows is not None:  # at the ids T5's tokenizer gives the token (its table's spare rows first)
        t5, first = next(t for t in token_tables(model) if t.name == "text_encoder_3"), len(model.tokenizer_3)
        model.tokenizer_3.add_vectors(token, len(t5_rows))
        set_table(t5, with_rows(t5.table.weight.detach(), first, t5_rows.to(t5.table.weight)))
    return tokens


def check_t5_rows(model, file: Path, token: str, vec: torch.Tensor):
    """What the token's T5 rows must be: as wide as this T5, finite, their names new to its vocabulary."""
    width = model.text_encoder_3.shared.embedding_dim
    if vec.shape[1] != width:
        raise ModelError(f"{file}: its T5 rows are {vec.shape[1]} wide; this model's T5 is {width}")
    if not bool(torch.isfinite(vec).all()):
        raise ModelError(f"{file}: its T5 rows hold NaN or infinite values (a broken embedding)")
    taken = [t for t in vector_names(token, len(vec)) if model.tokenizer_3.tok.token_to_id(t) is not None]
    if taken:
        raise ModelError(f"{file}: token {taken[0]!r} is already in T5's vocabulary; name another with "
                         f"--embedding-token")


def save_learned_tokens(model, path: Path, dtype: torch.dtype | None = None):
    """The learned token's row(s): under each text encoder's key in the family's token files, or (one encoder) under
    the token itself, as one vector (n, dim) for n vectors: what diffusers' load_textual_inversion and A1111 read."""
    learned = learned_tokens(model)
    token = next(iter(learned.values())).token
    rows = {}
    for slot in model.family.encoders:
        new = learned[slot.name].new.detach().float()
        rows[slot.token_key or token] = new if slot.token_key or len(new) > 1 else new[0]
    if "text_encoder_3" in learned:
        rows[T5_KEY] = learned["text_encoder_3"].new.detach().float()
    save_safetensors(rows, path, metadata={"token": token}, dtype=dtype)
