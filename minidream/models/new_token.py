"""A new token as a model transform (textual inversion, Gal et al. 2022; DreamBooth's pivotal tuning): the
identifier gets its own row in each text encoder's token table, initialised from a word the model knows, and only
that row trains. The model files know nothing of it; `make_plain` turns the table back into a plain, larger one.
SD3's and Flux's T5 can learn the token too (diffusers' advanced scripts' --enable_t5_ti): its table has rows past
its vocabulary (32128 for 32100 pieces), and the new token takes the first of them, as transformers gives it.
"""
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenEmbedding(nn.Module):
    """The text encoder's token table plus new rows for learned tokens; only the new rows are parameters that
    train, the original table stays frozen. The new rows are ids `first`, `first` + 1, …: the tokenizer's next ids
    (CLIP: past the table's end; T5: its spare rows, see `with_rows`)."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor, token: str, first: int | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(init.detach().clone().float().reshape(-1, base.embedding_dim))
        self.token = token
        self.first = base.num_embeddings if first is None else first

    @property
    def weight(self):
        return with_rows(self.base.weight, self.first, self.new.to(self.base.weight.dtype))

    def forward(self, ids):
        # rows of the frozen table and of the new ones, picked per id: no copy of the 49k-row table per call
        old = F.embedding(ids.clamp(max=self.first - 1), self.base.weight)
        new = F.embedding((ids - self.first).clamp(min=0), self.new.to(old.dtype))
        return torch.where((ids >= self.first)[..., None], new, old)


def with_rows(table: torch.Tensor, first: int, rows: torch.Tensor) -> torch.Tensor:
    """`table` with `rows` in place from row `first` on, grown where they reach past its end. T5's spare rows (past
    its vocabulary) are never read, so the token's rows replace them and every row its tokenizer reaches is kept:
    the same model as transformers' resize_token_embeddings(len(tokenizer)) gives, at the base's table size."""
    if first > len(table):  # a tokenizer longer than its table: the new ids would not be the new rows
        raise ValueError(f"the tokenizer's next id ({first}) is past its embedding table's {len(table)} rows")
    return torch.cat([table[:first], rows, table[first + len(rows):]])


class TokenTable(NamedTuple):
    """A token table a new token can have a row in: the text encoder's name, its tokenizer, the encoder (whose
    config says the table's size) and where the table sits (`getattr(owner, attr)`)."""
    name: str
    tokenizer: object
    encoder: nn.Module
    owner: nn.Module
    attr: str

    @property
    def table(self) -> nn.Module:
        return getattr(self.owner, self.attr)


def token_tables(model, t5: bool = True) -> list[TokenTable]:
    """Every CLIP's table (`embeddings.token_embedding`), and T5's (`shared`) with `t5` where the model has one."""
    tables = [TokenTable(name, tok, te, te.embeddings, "token_embedding") for name, tok, te in model.text_encoders()]
    if t5 and isinstance(getattr(model, "text_encoder_3", None), nn.Module) and hasattr(model.text_encoder_3, "shared"):
        tables.append(TokenTable("text_encoder_3", model.tokenizer_3, model.text_encoder_3, model.text_encoder_3,
                                 "shared"))
    return tables


def add_token(model, token: str, init_word: str, vectors: int = 1, t5: bool = False):
    """A new token in each CLIP text encoder (SDXL, SD3: both) and with `t5` in T5, its embedding initialised from
    `init_word`'s (the mean of its pieces). With several vectors (textual inversion's multi-vector tokens) the token
    is `token`, `token_1`, … `token_{n-1}`, which a prompt's `token` stands for all together (diffusers' convention;
    A1111 keeps the n rows under one name, which its prompts' name stands for too), each row starting from the same
    init, as diffusers' textual-inversion script starts them."""
    for t in token_tables(model, t5):
        emb, tok = t.table, t.tokenizer
        init = emb.weight[tok.encode(init_word)].mean(0, keepdim=True)
        first = len(tok)  # the id the tokenizer gives the new token
        tok.add_vectors(token, vectors)
        setattr(t.owner, t.attr, TokenEmbedding(emb, init.expand(vectors, -1), token, first))


def learned_tokens(model) -> dict[str, TokenEmbedding]:
    """The learned-token tables by text encoder name (empty when no token was added)."""
    return {t.name: t.table for t in token_tables(model) if isinstance(t.table, TokenEmbedding)}


def set_table(t: TokenTable, weight: torch.Tensor):
    """A plain, frozen nn.Embedding of `weight` in the table's place, its encoder's config saying its size."""
    plain = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    setattr(t.owner, t.attr, plain)
    t.encoder.config = replace(t.encoder.config, vocab_size=weight.shape[0])


def make_plain(model) -> None:
    """Turn each TokenEmbedding back into a plain nn.Embedding (for export and comparison)."""
    for t in token_tables(model):
        if isinstance(t.table, TokenEmbedding):
            set_table(t, t.table.weight.detach())


def base_rows(model) -> dict[str, tuple[int, torch.Tensor]]:
    """Per learned-token table: the new rows' first id and the base's rows from there on (CLIP: none; T5: its
    spare rows), which `cut_to` puts back."""
    return {name: (t.first, t.base.weight[t.first:].detach().clone()) for name, t in learned_tokens(model).items()}


def cut_to(model, rows: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Each named (plain) token table back to the base's (`base_rows`): the base model's vocabulary, the learned
    tokens written elsewhere (a single file for A1111/ComfyUI loads with the base's config)."""
    for t in token_tables(model):
        if t.name in rows:
            first, tail = rows[t.name]
            table = t.table.weight.detach()
            set_table(t, torch.cat([table[:first], tail.to(table)]))
