"""The token mask of a decode step: which tokens each batch row may draw, as a device bitmask.

Constrained decoding (`fastsolar.serve.grammar`) fills one bitmask row per batch row between steps -- a
constrained row from its grammar matcher, a free row all ones -- into a host buffer ([rows, ceil(V/32)]
int32, bit i of word w allows token 32w+i: llguidance's, xgrammar's and outlines' layout), copies it into a
fixed device buffer, and the step reads that buffer: `TokenMask.apply(logits)` sets disallowed tokens to
-inf before the sampler's processing, inside the captured step (no host sync: the buffer is a graph input
like the tokens and positions). A batch without a constrained row skips the apply (`active`, a host flag in
the graph key through `MaskedSampler.mode`), so free batches pay nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Fills one int32 bitmask row (a contiguous CPU tensor of ceil(V/32) words) with a row's allowed tokens.
RowFill = Callable[[torch.Tensor], None]


class TokenMask:
    """The per-row token bitmask of a decode step (module docstring): `set(fills)` between steps on
    the host, `apply(logits)` in the step. `rows` bounds the batch; `vocab_size` the logits' width."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        device = torch.device(device)
        self.host = torch.full((rows, self.words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.bits = torch.full((rows, self.words), -1, dtype=torch.int32, device=device)
        self.shift = torch.arange(32, dtype=torch.int32, device=device)  # bit i of a word: token 32 * word + i
        self.active = False  # some row of the selected batch is constrained (a host flag: part of the graph key)

    def set(self, fills: Sequence[RowFill | None]) -> None:
        """The next step's batch row i allows what fills[i] writes (None: every token)."""
        self.active = any(f is not None for f in fills)
        if not self.active:
            return
        b = len(fills)
        for i, fill in enumerate(fills):
            if fill is None:
                self.host[i].fill_(-1)
            else:
                fill(self.host[i])
        # Asynchronous from pinned memory; the buffer is rewritten only after the step's tokens came back to
        # the host (the engine reads them before the next `set`), so the copy has finished by then.
        self.bits[:b].copy_(self.host[:b], non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [b, V] with the tokens the selected rows' grammars forbid at -inf (a new tensor)."""
        if not self.active:
            return logits
        b = logits.shape[0]
        allowed = ((self.bits[:b, :, None] >> self.shift) & 1).view(b, -1)[:, : self.vocab_size]
        return logits.masked_fill(allowed == 0, float("-inf"))


class MaskedSampler:
    """`sampler(mask.apply(logits))`: what a decode step runs when some rows are constrained. Its `mode` is the
    sampler's plus the mask's flag, so a captured graph is keyed on both; its device state is the sampler's
    (the mask buffer is an input, rewritten before every step)."""

    def __init__(self, mask: TokenMask, sampler: Any) -> None:
        self.mask = mask
        self.sampler = sampler

    @property
    def mode(self) -> tuple:
        return (*self.sampler.mode, self.mask.active)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler(self.mask.apply(logits), raw=logits)  # logprobs stay the model's own

    def snapshot(self) -> Any:
        return self.sampler.snapshot()

    def restore(self, snapshot: Any) -> None:
        self.sampler.restore(snapshot)

    def generators(self) -> list[torch.Generator]:
        return self.sampler.generators()
