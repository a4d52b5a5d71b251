"""Which implementation runs a decode-sized matrix product: the fused Triton GEMV, or cuBLAS plus the separate
small kernels it replaces (kernels/gemv.py fuses RMSNorm / SwiGLU before and the residual add after).

A fused kernel that loses to cuBLAS must never ship, and which one wins depends on the card and the shape.
So the first time a shape runs on a CUDA device, both candidates are timed on that call's own inputs
(`measure`: each captured in a CUDA graph and replayed, as a decode step runs them, so the Python launch cost
that a captured step never pays does not decide the pick; median of a few samples) and the faster is kept for
the rest of the process, per (op kind, device, dtypes, M, N, K); one INFO line on the
`fastsolar.ops.gemv_choice` logger names the pick and both times. `FASTSOLAR_GEMV=triton|cublas` in the environment, or `force_gemv(...)`,
forces either. Nothing is timed without a CUDA device (the Triton interpreter's times mean nothing), nor
while a CUDA graph is being captured (a sync there would break the capture; a graph step's warm-up runs
first, so its shapes are decided by then): those calls take cuBLAS without remembering it. Tests force
"triton" to run the fused kernels under the interpreter.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger("fastsolar.gemv_choice")  # the logger name the docs give for the picks

CANDIDATES = ("triton", "cublas")


def _from_env() -> str | None:
    value = os.environ.get("FASTSOLAR_GEMV", "").strip().lower()
    if value and value not in CANDIDATES:
        raise ValueError(f"FASTSOLAR_GEMV must be one of {', '.join(CANDIDATES)} (or unset), got {value!r}")
    return value or None


_forced: str | None = _from_env()
_choices: dict[tuple, str] = {}


@contextlib.contextmanager
def force_gemv(mode: str | None) -> Iterator[None]:
    """Within the block, always use `mode` ("triton" or "cublas"), or time and pick (None)."""
    global _forced
    if mode is not None and mode not in CANDIDATES:
        raise ValueError(f"force_gemv takes one of {', '.join(CANDIDATES)} or None, got {mode!r}")
    previous, _forced = _forced, mode
    try:
        yield
    finally:
        _forced = previous


def forced() -> str | None:
    """The forced choice, or None when shapes are timed; part of a captured graph's identity."""
    return _forced


REPLAYS, SAMPLES = 20, 5  # graph replays per timed sample, samples per candidate (median kept)


def measure(fn: Callable[[], Any]) -> float:
    """Median milliseconds of one fn() replayed from a CUDA graph: a warm-up call on a side stream (compiles,
    cuBLAS's choice of kernel and workspace), one capture, then `replay_median_ms` (tests replace this with a
    fake timer). fn runs twice in Python, whatever the replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_median_ms(graph.replay, _event_ms)


def _event_ms(run: Callable[[], Any]) -> float:
    """Milliseconds the device takes for what run() queues (CUDA events around it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def replay_median_ms(replay: Callable[[], Any], elapsed_ms: Callable[[Callable[[], Any]], float],
                     replays: int = REPLAYS, samples: int = SAMPLES) -> float:
    """The median over `samples` of `elapsed_ms` for `replays` back-to-back replays, per replay (one replay first,
    untimed: the first replay uploads the graph)."""
    replay()

    def burst() -> None:
        for _ in range(replays):
            replay()

    times = sorted(elapsed_ms(burst) / replays for _ in range(samples))
    return times[len(times) // 2]


def can_time(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def choose(key: tuple, device: torch.device, candidates: dict[str, Callable[[], Any]]) -> str:
    """The implementation to run for `key`: forced, remembered, or timed now among `candidates` (name -> a
    call that computes the whole fused op on the real inputs, with no side effects)."""
    if _forced is not None:
        return _forced
    pick = _choices.get(key)
    if pick is not None:
        return pick
    if not can_time(device):
        return "cublas"
    times = {name: measure(fn) for name, fn in candidates.items()}
    pick = min(times, key=times.__getitem__)
    _choices[key] = pick
    logger.info("gemv %s on %s: %s (%s)", _describe(key), device, pick,
                ", ".join(f"{name} {ms * 1e3:.1f} us" for name, ms in times.items()))
    return pick


def choices() -> dict[tuple, str]:
    """What was picked so far (a copy), for benchmarks and tests."""
    return dict(_choices)


def _describe(key: tuple) -> str:
    kind, _device, x_dtype, w_dtype, m, n, k = key
    return f"{kind} M={m} N={n} K={k} x {str(x_dtype).replace('torch.', '')} w {str(w_dtype).replace('torch.', '')}"
