"""CUDA-graph captured decoding: a step for serving engines, and the whole per-token loop body for generate.

Two captured calls (docs/ARCHITECTURE.md, "Generation"):

- `CudaGraphStep(session, sampler)(tokens [b], positions [b], rows=None) -> next_tokens [b]`
  = `sampler(session.decode(tokens, positions, rows))`: the serving engine's step. tokens/positions (and the
  cache-row map `rows`, when given) are copied into the graph's static input buffers, the graph replays,
  and a clone of the static output comes back (the next replay cannot overwrite what the caller holds).
  One recording serves any row map; a step with a map and one without are different graphs.
- `CudaGraphLoop(session, sampler, loop)()`: generate's loop body, `loop.advance(session, sampler)` (decode,
  sample, positions += 1, EOS bookkeeping, the token written into the loop's history and fed back as the
  next input), all on the loop's device buffers, so a token costs one `graph.replay()` and nothing else.
  Its key is checked once, when it is made (at the start of a generate call); calling it only replays.

Batch sizes are exact: one graph per batch size, captured lazily on first use. There is no padding to
buckets, because the sampler (per-row params, seen-mask, generator) and possibly the KV cache are sized
to the real batch, and at small batch the step is bound by reading the weights anyway.

Reuse and recapture: graphs live in the `GraphPool` of the decode session that owns the KV cache they write
(fastsolar.decoding.session.DecodeSession), so they outlive one `generate` call on that session and never
touch another session's cache. A graph is reused while its `GraphKey` is unchanged: what it is (step or loop),
batch size and input dtypes, the sampler object and its host-side `mode` flags (a Sampler `reset` in place
keeps its graphs valid; a new Sampler is a recapture), the loop object, the KV cache's storage, the
weights' storage (`WeightStorage.signature()`, checked at every replay of a step: replacing a layer, a
parameter or its `.data` after capture records anew instead of replaying into freed memory), and `fastsolar.ops.mode()` (the kernel and GEMV choices). Graphs
of a cache that is gone are dropped; at most `max_graphs` are kept (least recently used dropped first).

Capture:
- Warm-up runs (default 2) happen on a side stream before capture, as the torch docs prescribe (Triton
  compiles, the GEMV choice times its candidates, workspaces are made, cuBLAS workspaces on the capture
  stream). They really run the step, so the sampler (and loop) state is snapshotted before and restored
  after through their own `snapshot()` / `restore()`; the KV cache writes of a warm-up are overwritten by
  the real steps before anything reads them.
- All graphs of one session share one memory pool (`torch.cuda.graph_pool_handle()`): replays are
  sequential on one stream and each step's output is cloned before another graph replays.
- RNG: fastsolar's Sampler draws counter-based noise from device counters (no generator), so a replay
  draws what the eager step would. A stateful object that holds its own CUDA generator (`generators()`)
  has it registered with `CUDAGraph.register_generator_state(gen)` before capture, so each replay advances
  its Philox offset; on a torch without that method such an object is refused with a clear error.
"""
from __future__ import annotations

import collections
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from fastsolar import ops

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a captured call needs from the objects whose device state it mutates (Sampler, DecodeLoop)."""

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...

    def generators(self) -> list[torch.Generator]: ...


def check_batch(batch: int, max_batch: int) -> None:
    """Refuse a step of `batch` rows that the KV cache (`max_batch` rows) cannot hold."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if batch > max_batch:
        raise ValueError(f"batch {batch} exceeds the KV cache's max_batch {max_batch}; make a DecodeSession with more rows")


class GraphKey(NamedTuple):
    kind: str  # "step" (CudaGraphStep) or "loop" (CudaGraphLoop)
    batch: int
    token_dtype: torch.dtype
    position_dtype: torch.dtype
    rows_dtype: torch.dtype | None  # None: the step decodes cache rows 0..b-1
    sampler_id: int
    sampler_mode: Any
    loop_id: int | None  # the DecodeLoop a loop graph reads and writes
    cache: tuple  # addresses, shapes, strides, dtypes, devices of cache.k and cache.v
    weights: tuple  # WeightStorage.signature(): where the weights are
    ops_mode: tuple  # fastsolar.ops.mode(): kernels and GEMV choices


def _cache_signature(cache: Any) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in (cache.k, cache.v))


class WeightStorage:
    """Where a model's weights live, cheap to ask at every replay: `signature()` is the address of every
    parameter and buffer. The module tree is walked once; each call then reads each module's child and tensor
    slots directly, so a replaced layer (quantize), a re-registered parameter and new `.data` all change the
    answer without a walk per step (a changed child walks the tree again)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._walk()

    def _walk(self) -> None:
        modules = list(self.model.modules())
        self._children = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self._slots = [(d, name) for m in modules for d in (m._parameters, m._buffers) for name in d]

    def signature(self) -> tuple:
        if any(d.get(name) is not child for d, name, child in self._children):
            self._walk()
        return tuple(t.data_ptr() for d, name in self._slots if (t := d.get(name)) is not None)


@dataclass
class GraphEntry:
    """One captured (or, with capture=False, one recorded) call: its static buffers and graph."""

    key: GraphKey
    held: tuple  # the sampler / loop the graph reads: held so the ids in the key stay unique
    run: Callable[[], Any] | None = None  # what the graph holds: one decode step over the static buffers
    tokens: torch.Tensor | None = None  # CudaGraphStep's static input buffers [b] ...
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # ... and its cache-row map, None for rows 0..b-1
    out: Any = None  # static output (graph-owned memory when captured)
    graph: Any = None  # torch.cuda.CUDAGraph, or None for the eager static-buffer path
    replays: int = 0

    def replay(self) -> Any:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.run()
        self.replays += 1
        return self.out


class GraphPool:
    """The graphs of one decode session, reused across its calls; see the module docstring."""

    def __init__(self, max_graphs: int = 16) -> None:
        self.max_graphs = max_graphs
        self.entries: collections.OrderedDict[GraphKey, GraphEntry] = collections.OrderedDict()
        self.captures = 0  # how many times a call was (re)captured or recorded; tests and the bench read it
        self._pool = None  # torch.cuda.graph_pool_handle(), made on first capture
        self._stream = None  # side stream for warm-up and capture

    def lookup(self, key: GraphKey) -> GraphEntry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def add(self, entry: GraphEntry) -> None:
        # Graphs that point at another KV cache storage or other weights are stale: drop them to free memory.
        for k in [k for k in self.entries if (k.cache, k.weights) != (entry.key.cache, entry.key.weights)]:
            del self.entries[k]
        self.entries[entry.key] = entry
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()

    def cuda_pool(self) -> tuple[int, int]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def record(
        self, entry: GraphEntry, states: tuple[Stateful, ...], device: torch.device, capture: bool, warmup_runs: int
    ) -> GraphEntry:
        """Warm `entry.run` up (the states restored afterwards) and, with `capture`, capture it on `device`;
        the caller then replays for the real result."""
        self.captures += 1
        logger.debug("recording %s for batch %d (capture=%s)", entry.key.kind, entry.key.batch, capture)
        snaps = [(s, s.snapshot()) for s in states]
        if not capture:
            for _ in range(warmup_runs):
                entry.run()
            for s, snap in snaps:
                s.restore(snap)
            return entry
        generators = [g for s in states for g in s.generators() if g.device.type == "cuda"]
        custom = [g for g in generators if not any(g is d for d in torch.cuda.default_generators)]
        if custom and not graphs_supported():
            raise RuntimeError(
                f"torch {torch.__version__} has no CUDAGraph.register_generator_state, so a sampler with its "
                "own CUDA generator cannot be captured; run generate with cuda_graphs=False"
            )
        stream = self.side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup_runs):
                entry.run()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        for s, snap in snaps:
            s.restore(snap)

        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated no-op on torch with lazy registration
            warnings.simplefilter("ignore", DeprecationWarning)
            for g in custom:
                graph.register_generator_state(g)
        with torch.cuda.graph(graph, pool=self.cuda_pool(), stream=stream):
            entry.out = entry.run()
        entry.graph = graph
        return entry


def graphs_supported() -> bool:
    """Whether this torch can capture a step that uses a custom (non-default) CUDA generator."""
    return hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def _resolve_capture(device: torch.device, capture: bool | None) -> bool:
    capture = (device.type == "cuda") if capture is None else capture
    if capture and device.type != "cuda":
        raise ValueError(f"CUDA graph capture needs the model on CUDA, it is on {device}")
    return capture


class CudaGraphStep:
    """`step(tokens [b], positions [b], rows=None) -> next_tokens [b]` =
    `sampler(session.decode(tokens, positions, rows))`, captured in a CUDA graph per exact batch size (the
    serving engine's step; module docstring). The graphs live in `session.graphs`.

    `sampler` is a `fastsolar.decoding.sampling.Sampler` (or anything with its call and `snapshot()` /
    `restore()` / `generators()`). capture: True captures CUDA graphs (needs the model on CUDA); False runs the
    very same static-buffer path (key, warm-up, state restore, static buffers, clone-out) eagerly, which is how
    the CPU tests prove it gives the eager step's tokens; None means "capture when the model is on CUDA".
    """

    def __init__(self, session: Any, sampler: Any, *, capture: bool | None = None, warmup_runs: int = 2) -> None:
        self.session = session
        self.sampler = sampler
        self.capture = _resolve_capture(session.device, capture)
        self.warmup_runs = warmup_runs

    @property
    def pool(self) -> GraphPool:
        return self.session.graphs

    def key(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> GraphKey:
        """Everything a captured step bakes in; a graph is valid for a call only if this key is unchanged."""
        cache = self.session.cache
        b = tokens.shape[0]
        if tokens.dim() != 1 or positions.shape != tokens.shape:
            raise ValueError(f"tokens and positions must both be [batch], got {tuple(tokens.shape)} and {tuple(positions.shape)}")
        if rows is None:
            check_batch(b, cache.max_batch)
        elif rows.shape != tokens.shape:
            raise ValueError(f"rows must be [batch] like tokens, got {tuple(rows.shape)} and {tuple(tokens.shape)}")
        return GraphKey("step", b, tokens.dtype, positions.dtype, None if rows is None else rows.dtype,
                        id(self.sampler), getattr(self.sampler, "mode", None), None, _cache_signature(cache),
                        self.session.weights.signature(), ops.mode())

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        key = self.key(tokens, positions, rows)
        entry = self.pool.lookup(key)
        if entry is None:
            entry = GraphEntry(key=key, held=(self.sampler,),
                               tokens=torch.empty_like(tokens).copy_(tokens),
                               positions=torch.empty_like(positions).copy_(positions),
                               rows=None if rows is None else torch.empty_like(rows).copy_(rows))
            session, sampler = self.session, self.sampler
            entry.run = lambda: sampler(session.decode(entry.tokens, entry.positions, entry.rows))
            self.pool.record(entry, (sampler,), tokens.device, self.capture, self.warmup_runs)
            self.pool.add(entry)
        entry.tokens.copy_(tokens)
        entry.positions.copy_(positions)
        if rows is not None:
            entry.rows.copy_(rows)
        return entry.replay().clone()


class CudaGraphLoop:
    """generate's loop body `loop.advance(session, sampler)` captured in one CUDA graph (module docstring):
    `CudaGraphLoop(session, sampler, loop)()` advances the loop by one token with one replay. The key is
    checked and the graph recorded (if needed) when it is made. capture as in CudaGraphStep."""

    def __init__(
        self, session: Any, sampler: Any, loop: Any, *, capture: bool | None = None, warmup_runs: int = 2
    ) -> None:
        self.pool = session.graphs
        tokens, positions = loop.tokens, loop.positions
        check_batch(tokens.shape[0], session.cache.max_batch)
        key = GraphKey("loop", tokens.shape[0], tokens.dtype, positions.dtype, None, id(sampler),
                       getattr(sampler, "mode", None), id(loop), _cache_signature(session.cache),
                       session.weights.signature(), ops.mode())
        entry = self.pool.lookup(key)
        if entry is None:
            entry = GraphEntry(key=key, held=(sampler, loop), run=lambda: loop.advance(session, sampler))
            self.pool.record(entry, (sampler, loop), tokens.device, _resolve_capture(session.device, capture),
                             warmup_runs)
            self.pool.add(entry)
        self.entry = entry

    @torch.inference_mode()
    def __call__(self) -> None:
        self.entry.replay()
