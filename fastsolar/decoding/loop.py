"""The per-token state of a generate call as device buffers (`DecodeLoop`), and the host's look at it that never
stalls the device (`DoneProbe`).

Everything a step of `generate` does lives in one DecodeLoop (`advance`: decode, sample, positions += 1, EOS
bookkeeping, the token into the loop's history and back in as the next input), so on CUDA a step is one graph
replay (fastsolar.decoding.graphs.CudaGraphLoop) with no eager launch and no copy around it. A DecodeLoop
belongs to the decode session whose cache it decodes into (DecodeSession.loop), so a captured graph that reads
its buffers stays valid across calls on that session.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastsolar.decoding.sampling import DeviceState, Sampler

EOS_SLOTS = 8  # EOS ids a DecodeLoop holds without being remade (more: a new loop, so a new graph)


@dataclass
class DecodeLoop(DeviceState):
    """The per-token state of a generate call as device buffers, refilled in place by `start`.

    `advance(session, sampler)` is one whole step and touches nothing else (what CudaGraphLoop captures):
    next = sampler(session.decode(tokens, positions)); positions += 1; `record(next)`. `record` applies the
    EOS rules (finished rows get `pad`; a row's first EOS sets finished_at to the step index), writes the
    step's tokens into column `step` of `history` and into `tokens` (the next step's input), and counts
    `step` up. Like a Sampler it has `snapshot()` / `restore()` / `generators()` for graph warm-up.
    """

    tokens: torch.Tensor  # [b] int64: the last step's tokens, the next step's input
    positions: torch.Tensor  # [b] int64: cache position of the next step's input token
    finished: torch.Tensor  # [b] bool: the row has produced an EOS
    finished_at: torch.Tensor  # [b] int64: step of the row's first EOS (the call's max_new_tokens if none)
    step: torch.Tensor  # [1] int64: index of the next token in history
    history: torch.Tensor  # [b, capacity] int64: the tokens of step t in column t
    eos: torch.Tensor  # [EOS_SLOTS] int64: EOS ids, padded with -1 (never a token)
    pad: torch.Tensor  # [] int64: the token finished rows get

    @classmethod
    def empty(cls, batch: int, capacity: int, eos_slots: int, device: torch.device) -> "DecodeLoop":
        i64 = dict(dtype=torch.int64, device=device)
        return cls(tokens=torch.zeros(batch, **i64), positions=torch.zeros(batch, **i64),
                   finished=torch.zeros(batch, dtype=torch.bool, device=device),
                   finished_at=torch.zeros(batch, **i64), step=torch.zeros(1, **i64),
                   history=torch.zeros(batch, capacity, **i64), eos=torch.full((eos_slots,), -1, **i64),
                   pad=torch.zeros((), **i64))

    def start(self, positions: torch.Tensor, eos: tuple[int, ...], pad: int, max_new_tokens: int) -> None:
        """Refill every buffer in place for a new call (history needs no clearing: column t is written
        before anything reads it)."""
        self.positions.copy_(positions)
        self.finished.zero_()
        self.finished_at.fill_(max_new_tokens)
        self.step.zero_()
        self.eos.copy_(torch.tensor(list(eos) + [-1] * (self.eos.shape[0] - len(eos)), dtype=torch.int64))
        self.pad.fill_(pad)

    def record(self, tokens: torch.Tensor) -> None:
        """One step's sampled tokens through the EOS rules into history and the next input (no host sync)."""
        tokens = torch.where(self.finished, self.pad, tokens)
        newly = (tokens[:, None] == self.eos[None, :]).any(-1) & ~self.finished
        self.finished_at.copy_(torch.where(newly, self.step, self.finished_at))
        self.finished |= newly
        self.history.index_copy_(1, self.step, tokens[:, None])
        self.tokens.copy_(tokens)
        self.step += 1

    def advance(self, session: Any, sampler: Sampler) -> None:
        self.record(sampler(session.decode(self.tokens, self.positions)))
        self.positions += 1

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        # history is left out: a warm-up writes only columns the real steps overwrite before reading.
        return self.tokens, self.positions, self.finished, self.finished_at, self.step



class DoneProbe:
    """"Had every row finished by step t?" read on the host without stalling the device: `post(t)` right
    after step t is queued copies max(finished_at) to (pinned) host memory behind it; `all_done()` called
    once step t + 1 is queued waits for step t and that copy only, while the device works on step t + 1.
    finished_at entries only ever fall from max_new_tokens to a step index, so the answer stays exact."""

    def __init__(self, loop: DecodeLoop) -> None:
        self.loop = loop
        cuda = loop.finished_at.is_cuda
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.step = -1

    def post(self, step: int) -> None:
        self.host.copy_(self.loop.finished_at.amax(), non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.step = step

    def all_done(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host) <= self.step
