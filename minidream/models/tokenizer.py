"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library from a repo's
`tokenizer/vocab.json` + `merges.txt`.

The recipe is CLIP's own: NFC-normalise, collapse whitespace, lower-case; split into words,
single digits and punctuation runs (OpenAI's regex); byte-level BPE with `</w>` marking word ends;
wrap in <|startoftext|> ... <|endoftext|> and pad to 77 positions.
"""
import json
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's word pattern (simple_tokenizer.py): special tokens, English contractions,
# letter runs, single digits, runs of anything else that is not whitespace.
WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[str], pad_token: str = EOS,
                 max_length: int = 77, added: dict[str, int] | None = None):
        self.vocab, self.merges, self.max_length = vocab, merges, max_length
        self.pad_token = pad_token
        bpe = BPE(vocab=vocab, merges=[tuple(m.split()) for m in merges], unk_token=EOS,
                  continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        self.tok = Tokenizer(bpe)
        self.tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.tok.decoder = decoders.ByteLevel()
        # A literal "<|endoftext|>" in a prompt is the end token, as in CLIP.
        self.tok.add_special_tokens([AddedToken(BOS, normalized=False), AddedToken(EOS, normalized=False)])
        self.added: dict[str, int] = {}
        # a multi-vector embedding's first token id -> all its ids (formats/embeddings.add_embedding): "<tok>" in a
        # prompt stands for "<tok> <tok>_1 …", as diffusers' textual-inversion loader rewrites prompts
        self.expand: dict[int, list[int]] = {}
        for token in sorted(added or {}, key=(added or {}).get):
            self.add_token(token)
        self.expand = joined_vectors(self.added)
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id = self.token_id(pad_token)

    @classmethod
    def from_dir(cls, folder: Path) -> "CLIPTokenizer":
        folder = Path(folder)
        pad, max_length, added = EOS, 77, {}
        if (folder / "vocab.json").exists():  # what the SD hub repos ship
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = [ln for ln in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
                      if ln and not ln.startswith("#version")]
        else:  # transformers 5 writes only tokenizer.json; its "model" section holds the same BPE tables
            full = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = full["model"]["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in full["model"]["merges"]]
            added = {t["content"]: t["id"] for t in full.get("added_tokens", []) if t["content"] not in vocab}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = folder / name
            if f.exists():
                meta = json.loads(f.read_text(encoding="utf-8"))
                p = meta.get("pad_token")
                if p is not None:
                    pad = p["content"] if isinstance(p, dict) else p
                max_length = min(int(meta.get("model_max_length", max_length)), max_length)
                for i, t in meta.get("added_tokens_decoder", {}).items():
                    if t["content"] not in vocab:
                        added[t["content"]] = int(i)
        if (folder / "added_tokens.json").exists():
            added.update({k: v for k, v in json.loads((folder / "added_tokens.json").read_text()).items()
                          if k not in vocab})
        return cls(vocab, merges, pad_token=pad, max_length=max_length, added=added)

    def save(self, folder: Path):
        """Write the files a `CLIPTokenizer.from_pretrained` (and `from_dir`) reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(self.merges) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
             "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}))
        if self.added:
            (folder / "added_tokens.json").write_text(json.dumps(self.added))

    def __len__(self):
        return len(self.vocab) + len(self.added)

    def token_id(self, token: str) -> int:
        return self.added[token] if token in self.added else self.vocab[token]

    def add_token(self, token: str, vector_of: str | None = None) -> int:
        """Add a new whole-word token (a learned identifier such as "<sks>"); returns its id. `vector_of`: the
        multi-vector token it is the next vector of (a prompt's `<tok>` then stands for one more id).
        Its embedding row must be added to the text encoder too (see training)."""
        if token in self.vocab or token in self.added:
            raise ValueError(f"token {token!r} is already in the vocabulary")
        self.added[token] = len(self)
        self.tok.add_tokens([AddedToken(token, single_word=False, normalized=False)])
        got = self.tok.token_to_id(token)
        assert got == self.added[token], (got, self.added[token])
        if vector_of is not None:
            first = self.added[vector_of]
            self.expand[first] = [*self.expand.get(first, [first]), got]
        return got

    def add_vectors(self, token: str, n: int) -> list[str]:
        """A multi-vector token (vector_names), which a prompt's `token` stands for all together; returns them."""
        names = vector_names(token, n)
        self.add_token(token)
        for t in names[1:]:
            self.add_token(t, vector_of=token)
        return names

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [j for i in ids for j in self.expand.get(i, (i,))] if self.expand else ids

    def tokens(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) ids: <start> up to 75 tokens <end>, padded — as SD pipelines call CLIP."""
        rows = []
        for p in prompts:
            ids = [self.bos_id] + self.encode(p)[: self.max_length - 2] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def truncated(self, prompt: str) -> str | None:
        """The part of `prompt` that does not fit in 77 positions, or None when it all fits. A multi-vector token
        counts its vectors; one that does not fit whole is part of the cut."""
        enc = self.tok.encode(prompt, add_special_tokens=False)
        keep, used = self.max_length - 2, 0
        for i, token_id in enumerate(enc.ids):
            used += len(self.expand.get(token_id, (token_id,)))
            if used > keep:
                return prompt[enc.offsets[i][0]:]
        return None


def joined_vectors(added: dict[str, int]) -> dict[int, list[int]]:
    """{first id: every id} of each multi-vector token among `added` ({token: id}): a saved token's `<tok>_1`,
    `<tok>_2`, … (in order) join `<tok>`, as diffusers' maybe_convert_prompt joins any added token's such siblings."""
    expand: dict[int, list[int]] = {}
    for token in sorted(added, key=added.get):
        m = re.fullmatch(r"(.+)_(\d+)", token)
        first = added.get(m[1]) if m else None
        if first is not None and int(m[2]) == len(expand.get(first, [first])):
            expand[first] = [*expand.get(first, [first]), added[token]]
    return expand


def vector_names(token: str, n: int) -> list[str]:
    """The names of an n-vector token's rows: `token`, `token_1`, … `token_{n-1}` (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def train_bpe(texts: list[str], vocab_size: int) -> CLIPTokenizer:
    """A small CLIP-style BPE vocabulary learned from `texts` (tiny test models and the demo world),
    with the same normalisation, word split and `</w>` ends as CLIP's own."""
    from tokenizers import trainers
    t = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    t.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(texts, trainer)
    model = json.loads(t.to_str())["model"]
    # Like CLIP's vocabulary, hold every byte both inside and at the end of a word, so no text is unknown.
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (ch, ch + "</w>"):
            model["vocab"].setdefault(piece, len(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return CLIPTokenizer(model["vocab"], merges)
