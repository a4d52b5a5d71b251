"""Host <-> device copies that do not wait for the device: what lets the engine queue step k+1 before it reads
step k's tokens.

A plain `.to("cuda")` of a pageable tensor, or `.tolist()` of a CUDA tensor, waits for every kernel queued before
it; the engine must instead launch the next decode step first and only then wait for the tokens it needs. Inputs
go through pinned memory with a non-blocking copy (the caching host allocator keeps the pinned block until the
copy is done); outputs come back into pinned memory with an event recorded behind the copy, so `ToHost.tolist()`
waits for that copy and what was queued before it, not for the step queued after it. On a CPU both are plain
tensors (copied, as the device copy is): the same structure, no overlap.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device) -> torch.Tensor:
    """int64 tensor of host `values` on `device`, queued without waiting for the device."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class ToHost:
    """A device tensor on its way to host memory, started at construction; `tolist()` waits for it."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if t.is_cuda:
            self._host = t.to("cpu", non_blocking=True)  # torch makes a non-blocking D2H copy's output pinned
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # a snapshot: `t` may be a buffer the next call overwrites (the sampler's logprob outputs)
            self._host = t.clone()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
