"""What `model(input_ids, attention_mask=None, labels=None)` returns, in the shape of transformers'
`CausalLMOutputWithPast`, and the loss it holds.

transformers' ModelOutput is an ordered dict of the fields that are set, indexable three ways: `out.logits`,
`out["logits"]` and `out[0]` (the i-th field that is set: with labels, `out[0]` is the loss and `out[1]` the
logits; without, `out[0]` is the logits). Code written against it (`model(ids)[0]`, `model(ids).logits`,
`model(ids, labels=ids).loss`) runs unchanged on this one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' (and torch's cross_entropy's) label for "no loss at this position"


class CausalLMOutput(dict):
    """`loss` (a float32 scalar, only when labels were given) and `logits` `[batch, seq, vocab]`."""

    def __init__(self, logits: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        super().__init__()
        if loss is not None:
            self["loss"] = loss
        self["logits"] = logits

    @property
    def loss(self) -> torch.Tensor | None:
        return self.get("loss")

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The set fields in order (loss first when present), as transformers' `to_tuple`."""
        return tuple(self.values())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss: the mean float32 cross entropy of predicting labels[:, t + 1] from
    logits[:, t], positions labelled IGNORE_INDEX left out (NaN when every position is, as transformers)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")
