"""A new token as a model transform (textual inversion, Gal et al. 2022; DreamBooth's pivotal tuning): the
identifier gets its own row in each text encoder's token table, initialised from a word the model knows, and only
that row trains. The model files know nothing of it; `make_plain` turns the table back into a plain, larger one.
"""
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenEmbedding(nn.Module):
    """The text encoder's token table plus new rows for learned tokens; only the new rows are parameters that
    train, the original table stays frozen."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor, token: str):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(init.detach().clone().float().reshape(-1, base.embedding_dim))
        self.token = token

    @property
    def weight(self):
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids):
        # rows of the frozen table and of the new ones, picked per id: no copy of the 49k-row table per call
        n = self.base.num_embeddings
        old = F.embedding(ids.clamp(max=n - 1), self.base.weight)
        new = F.embedding((ids - n).clamp(min=0), self.new.to(old.dtype))
        return torch.where((ids >= n)[..., None], new, old)


def add_token(model, token: str, init_word: str, vectors: int = 1):
    """A new token in each text encoder (SDXL: both), its embedding initialised from `init_word`'s (the mean of
    its pieces). With several vectors (textual inversion's multi-vector tokens) the token is `token`, `token_1`, …
    `token_{n-1}`, which a prompt's `token` stands for all together (diffusers' convention; A1111 keeps the n rows
    under one name, which its prompts' name stands for too), each row starting from the same init, as diffusers'
    textual-inversion script starts them."""
    for _, tok, te in model.text_encoders():
        emb = te.embeddings.token_embedding
        init = emb.weight[tok.encode(init_word)].mean(0, keepdim=True)
        tok.add_vectors(token, vectors)
        te.embeddings.token_embedding = TokenEmbedding(emb, init.expand(vectors, -1), token)


def learned_tokens(model) -> dict[str, TokenEmbedding]:
    """The learned-token tables by text encoder name (empty when no token was added)."""
    return {name: te.embeddings.token_embedding for name, _, te in model.text_encoders()
            if isinstance(te.embeddings.token_embedding, TokenEmbedding)}


def make_plain(model) -> None:
    """Turn each TokenEmbedding back into a plain, larger nn.Embedding (for export and comparison)."""
    for _, _, te in model.text_encoders():
        emb = te.embeddings.token_embedding
        if isinstance(emb, TokenEmbedding):
            w = emb.weight.detach()
            plain = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            plain.weight = nn.Parameter(w.clone(), requires_grad=False)
            te.embeddings.token_embedding = plain
            te.config = replace(te.config, vocab_size=w.shape[0])


def cut_to(model, sizes: dict[str, int]) -> None:
    """Each named text encoder's (plain) token table cut back to its first `sizes[name]` rows: the base model's
    vocabulary, the learned tokens written elsewhere (a single file for A1111/ComfyUI loads with the base's config)."""
    for name, _, te in model.text_encoders():
        emb = te.embeddings.token_embedding
        if name in sizes and emb.num_embeddings > sizes[name]:
            plain = nn.Embedding(sizes[name], emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
            plain.weight = nn.Parameter(emb.weight.detach()[:sizes[name]].clone(), requires_grad=False)
            te.embeddings.token_embedding = plain
            te.config = replace(te.config, vocab_size=sizes[name])
