"""T5's SentencePiece (unigram) tokenizer, read from a repo's `tokenizer_3/tokenizer.json` with the `tokenizers`
library: that file holds the whole recipe (normaliser, "▁" word marks, the unigram table, the `</s>` it appends).
What SD3 adds is the call: every prompt padded (with `<pad>`, id 0) or cut to the same length, `</s>` kept last —
as diffusers calls `T5TokenizerFast(padding="max_length", truncation=True)`. A learned token (--train-token-t5) is
an added token, as transformers adds one; a multi-vector token's `<tok>` stands for all its rows, as in CLIP.
"""
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram

from minidream.models.tokenizer import joined_vectors, vector_names

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


class T5Tokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.calls: dict[int, Tokenizer] = {}  # per length, a copy that pads and cuts to it (`__call__`); 0: `plain`
        missing = [t for t in (PAD, EOS) if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"not a T5 vocabulary: it has no {' or '.join(missing)} token")
        self.pad_id, self.eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
        self.expand = joined_vectors(self.added)

    @property
    def added(self) -> dict[str, int]:
        """The tokens added to the vocabulary (T5's own specials aside): {token: id}."""
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()
                if t.content not in (PAD, EOS, UNK) and not t.content.startswith("<extra_id_")}

    @classmethod
    def from_dir(cls, folder: Path) -> "T5Tokenizer":
        return cls(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))

    def save(self, folder: Path):
        """tokenizer.json and the config `T5TokenizerFast.from_pretrained` (and `from_dir`) read back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", '
            '"extra_ids": 0, "model_max_length": 512}')

    def __len__(self):
        return self.tok.get_vocab_size()

    def add_vectors(self, token: str, n: int) -> list[str]:
        """A new token of n rows (`token`, `token_1`, …: tokenizer.vector_names), which a prompt's `token` stands for
        all together; returns their names."""
        names = vector_names(token, n)
        taken = [t for t in names if self.tok.token_to_id(t) is not None]
        if taken:
            raise ValueError(f"token {taken[0]!r} is already in the vocabulary")
        self.tok.add_tokens([AddedToken(t, single_word=False, normalized=False) for t in names])
        self.calls.clear()  # the copies that pad and cut were made without it
        self.expand = joined_vectors(self.added)
        return names

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without `</s>` and without truncation (a multi-vector token expanded)."""
        ids = self.plain().encode(text, add_special_tokens=False).ids
        return [j for i in ids for j in self.expand.get(i, (i,))]

    def plain(self) -> Tokenizer:
        """A copy that neither cuts nor pads, whatever the stored file sets (made once: `calls[0]`)."""
        if 0 not in self.calls:
            plain = self.calls[0] = Tokenizer.from_str(self.tok.to_str())
            plain.no_truncation()
            plain.no_padding()
        return self.calls[0]

    def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
        """(B, length) ids: each prompt's tokens and `</s>`, cut (keeping `</s>`) or padded to `length`."""
        if self.expand:  # a token's rows expand before the cut, as diffusers rewrites the prompt before tokenizing
            rows = [self.encode(p)[:length - 1] + [self.eos_id] for p in prompts]
            return torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows], dtype=torch.long)
        if length not in self.calls:  # the settings are the call's, not the stored file's
            tok = self.calls[length] = Tokenizer.from_str(self.tok.to_str())
            tok.enable_truncation(length)
            tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=PAD)
        batch = self.calls[length].encode_batch(prompts, add_special_tokens=True)
        return torch.tensor([e.ids for e in batch], dtype=torch.long)

    def truncated(self, prompt: str, length: int) -> str | None:
        """The part of `prompt` beyond `length` - 1 tokens (the last position is `</s>`), or None when it fits."""
        enc = self.plain().encode(prompt, add_special_tokens=False)
        return prompt[enc.offsets[length - 1][0]:] if len(enc.ids) > length - 1 else None


def train_unigram(texts: list[str], vocab_size: int) -> T5Tokenizer:
    """A small T5-style vocabulary learned from `texts` (tiny test models): <pad>=0, </s>=1, <unk>=2, the
    "▁"-marked words of SentencePiece, `</s>` appended to every text."""
    t = Tokenizer(Unigram())
    t.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    # T5's own file: whitespace thrown away, then every word starts with "▁" (so no "▁" piece beside an added token)
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK,
                                      show_progress=False)
    t.train_from_iterator(texts, trainer)
    t.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return T5Tokenizer(t)
