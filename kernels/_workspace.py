"""Preallocated workspaces for kernels that split a reduction over programs and combine it in the same launch.

A split kernel (split-K GEMV, split-sequence decode attention) writes per-split partial results to an fp32
workspace, then each program takes a ticket from an int32 counter of its output tile; the program whose ticket
completes the count combines the partials, writes the output and sets the counter back to 0, so the next
launch (the next layer, the next replay of a CUDA graph) finds it ready. No second launch, no host sync and
no allocation per call: the buffers are made once per (purpose, shape, dtype, device) and kept for the life
of the process, at a fixed address, which is what a captured CUDA graph needs.

Ordering (UNVERIFIED ON HARDWARE, correct by the PTX memory model): every thread's partial stores come
before a CTA barrier; the ticket is an acq_rel, gpu-scope atomic by one thread after it (release: the whole
CTA's stores are visible to whoever acquires); the last program's ticket acquires, and it reads the partials
with .cg loads (L2, never a stale L1 line). Under the Triton interpreter programs run one after another, so
the CPU tests check the combine logic, not the ordering.

One workspace serves launches that run one after another on a stream; two launches of the same shape running
concurrently on two streams would share it, which no caller here does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BUFFERS: dict[tuple, torch.Tensor] = {}


def workspace(purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer for `purpose` of exactly this shape/dtype/device, made (zero-filled) on first use and then
    always the same tensor. Counters rely on the zero fill; partials are always written before they are read."""
    key = (purpose, tuple(shape), dtype, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None:
        # Outside inference_mode: a tensor made inside it could not be written later under plain no_grad.
        with torch.inference_mode(False):
            buf = torch.zeros(shape, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf


@triton.jit
def arrive_last(counter, n_arrivals):
    """Take a ticket from `counter` (a scalar int32 pointer); True in the one program whose ticket is the
    n_arrivals-th, which also resets the counter to 0 for the next launch. Call after storing the partials."""
    tl.debug_barrier()  # every thread's partial stores happen before the one-thread atomic below
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    last = ticket == n_arrivals - 1
    # Only the last program resets; all n_arrivals tickets were taken, so no one else touches it again.
    tl.atomic_xchg(counter, 0, mask=last, sem="relaxed", scope="gpu")
    return last
