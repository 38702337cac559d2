"""T5's SentencePiece (unigram) tokenizer, read from a repo's `tokenizer_3/tokenizer.json` with the `tokenizers`
library: that file holds the whole recipe (normaliser, "▁" word marks, the unigram table, the `</s>` it appends).
What SD3 adds is the call: every prompt padded (with `<pad>`, id 0) or cut to the same length, `</s>` kept last —
as diffusers calls `T5TokenizerFast(padding="max_length", truncation=True)`.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


class T5Tokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.calls: dict[int, Tokenizer] = {}  # per length, a copy that pads and cuts to it (`__call__`)
        missing = [t for t in (PAD, EOS) if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"not a T5 vocabulary: it has no {' or '.join(missing)} token")
        self.pad_id = tok.token_to_id(PAD)

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

    def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
        """(B, length) ids: each prompt's tokens and `</s>`, cut (keeping `</s>`) or padded to `length`."""
        if length not in self.calls:  # the settings are the call's, not the stored file's
            tok = self.calls[length] = Tokenizer.from_str(self.tok.to_str())
            tok.enable_truncation(length)
            tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=PAD)
        batch = self.calls[length].encode_batch(prompts, add_special_tokens=True)
        return torch.tensor([e.ids for e in batch], dtype=torch.long)

    def truncated(self, prompt: str, length: int) -> str | None:
        """The part of `prompt` beyond `length` - 1 tokens (the last position is `</s>`), or None when it fits."""
        plain = Tokenizer.from_str(self.tok.to_str())  # whatever truncation or padding the stored file sets: none
        plain.no_truncation()
        plain.no_padding()
        enc = plain.encode(prompt, add_special_tokens=False)
        return prompt[enc.offsets[length - 1][0]:] if len(enc.ids) > length - 1 else None


def train_unigram(texts: list[str], vocab_size: int) -> T5Tokenizer:
    """A small T5-style vocabulary learned from `texts` (tiny test models): <pad>=0, </s>=1, <unk>=2, the
    "▁"-marked words of SentencePiece, `</s>` appended to every text."""
    t = Tokenizer(Unigram())
    t.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK,
                                      show_progress=False)
    t.train_from_iterator(texts, trainer)
    t.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return T5Tokenizer(t)
