"""Prompts encoded once and remembered, a model transform: `remember(model, batches)` encodes each batch of prompts
with the model's text encoders and gives the model a memo that `encode_text` reads instead of running them. A run
whose text encoders never train encodes every prompt it will use this way, then frees the encoders before the
denoiser takes the device: T5-XXL (9.5 GB) and Flux's transformer are never resident together.
"""
import torch


class TextMemo:
    """Each remembered prompt's conditioning rows (the family's keyword arguments, one row each)."""

    def __init__(self):
        self.rows: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, model, prompts: list[str]):
        """`prompts` encoded as one batch (as the run would encode them together), each row kept."""
        with torch.no_grad():
            got = model.family.conditioning(model, prompts)
        self.rows.update({p: {key: v[k:k + 1] for key, v in got.items()} for k, p in enumerate(prompts)})

    def conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in prompts if p not in self.rows]
        if missing:  # a caller asked for a prompt the run did not list: a bug of ours, not the user's
            raise RuntimeError(f"the prompt {missing[0]!r} was not encoded before the text encoders were freed")
        return {key: torch.cat([self.rows[p][key] for p in prompts]) for key in self.rows[prompts[0]]}


def remember(model, batches: list[list[str]]) -> TextMemo:
    """Each batch's prompts not yet remembered, encoded together; the model reads its text from the memo after."""
    memo = getattr(model, "text_memo", None) or TextMemo()
    for batch in batches:
        new = [p for p in dict.fromkeys(batch) if p not in memo.rows]
        if new:
            memo.add(model, new)
    model.text_memo = memo
    return memo
