"""CUDA-graph captured decode step.

UNVERIFIED ON HARDWARE: written and CPU-tested for logic only (static buffers, state snapshot/restore
around warm-up, recapture rules, token equality with the eager step via the `capture=False` path). The
first checks to run on a GPU are tests/test_graphs.py::test_graphed_generate_matches_eager_on_cuda and
bench/gpu_check.sh.

`CudaGraphStep(model, sampler)` is a drop-in for the eager decode step (docs/ARCHITECTURE.md):
`step(tokens [b], positions [b], rows=None) -> next_tokens [b]` = `sampler(model.decode(tokens, positions,
rows))`. The first call at a new key warms the step up, captures it into a `torch.cuda.CUDAGraph` and
replays it; later calls copy tokens/positions (and the cache-row map `rows`, when given) into the graph's
static input buffers, replay, and return a clone of the static output (the next replay cannot overwrite
what the caller holds). A step with a row map and one without are different graphs.

Batch sizes are exact: one graph per batch size, captured lazily on first use. There is no padding to
buckets, because the sampler (per-row params, seen-mask, generator) and possibly the KV cache are sized
to the real batch, and at small batch the step is bound by reading the weights anyway.

Reuse and recapture: graphs live in a `GraphPool` attached to the model (`shared_pool(model)`), so they
outlive one `generate` call. A graph is reused while its `graph_key` is unchanged: batch size,
token/position dtypes, the sampler object (a Sampler `reset` in place keeps its graphs valid; a new
Sampler object means a recapture) and its host-side `mode` flags, the KV cache's storage (addresses,
shapes, strides of `model.cache.k`/`.v`; graphs of a cache that is gone are dropped), and
`fastsolar.ops`' kernel/reference choice. At most `max_graphs` graphs are kept (least recently used
dropped first).

Capture:
- Warm-up runs (default 2) happen on a side stream before capture, as the torch docs prescribe (Triton
  compiles, cuBLAS workspaces on the capture stream). They really run the step, so every tensor the
  sampler holds and the state of its generator(s) are snapshotted before and restored after; the KV
  cache writes of a warm-up are the same values the real step writes.
- All graphs of one model share one memory pool (`torch.cuda.graph_pool_handle()`): replays are
  sequential on one stream and each output is cloned before another graph replays.
- RNG: a custom CUDA generator held by the sampler is registered with
  `CUDAGraph.register_generator_state(gen)` before capture, so each replay advances its Philox offset
  (fresh randomness per replay, the eager stream for the same seed). The default CUDA generator is
  registered by capture itself. On a torch without that method, a sampler with a custom CUDA generator
  is refused with a clear error (use eager, or the default generator).
"""
from __future__ import annotations

import collections
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fastsolar import ops

logger = logging.getLogger(__name__)

def check_batch(batch: int, max_batch: int) -> None:
    """Refuse a step of `batch` rows that the KV cache (`max_batch` rows) cannot hold."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if batch > max_batch:
        raise ValueError(f"batch {batch} exceeds the KV cache's max_batch {max_batch}; call setup_cache first")


class GraphKey(NamedTuple):
    batch: int
    token_dtype: torch.dtype
    position_dtype: torch.dtype
    rows_dtype: torch.dtype | None  # None: the step decodes cache rows 0..b-1
    sampler_id: int
    cache: tuple  # addresses, shapes, strides, dtypes, devices of cache.k and cache.v
    sampler_mode: Any
    kernels: bool | None  # fastsolar.ops' forced choice (kernels / references / by device)


def graph_key(
    model: Any, sampler: Any, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None
) -> GraphKey:
    """Everything a captured step bakes in; a graph is valid for a call only if this key is unchanged."""
    cache = getattr(model, "cache", None)
    if cache is None:
        raise RuntimeError("the model has no KV cache: call model.setup_cache(...) and prefill before decoding")
    b = tokens.shape[0]
    if tokens.dim() != 1 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be [batch], got {tuple(tokens.shape)} and {tuple(positions.shape)}")
    if rows is None:
        check_batch(b, cache.max_batch)
    elif rows.shape != tokens.shape:
        raise ValueError(f"rows must be [batch] like tokens, got {tuple(rows.shape)} and {tuple(tokens.shape)}")
    return GraphKey(
        b,
        tokens.dtype,
        positions.dtype,
        None if rows is None else rows.dtype,
        id(sampler),
        _cache_signature(cache),
        getattr(sampler, "mode", None),  # Sampler's host flags choosing which stages run
        ops._forced,
    )


def _cache_signature(cache: Any) -> tuple:
    return tuple(
        (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in (cache.k, cache.v)
    )


# ---------------------------------------------------------------------------------------------------
# Mutable state of a sampler: snapshot before warm-up, restore after.
# ---------------------------------------------------------------------------------------------------

def _walk(obj: Any, depth: int = 0) -> Iterator[Any]:
    """Tensors and Generators reachable from obj's attributes (and lists/tuples/dicts of them)."""
    if isinstance(obj, (torch.Tensor, torch.Generator)):
        yield obj
        return
    if depth > 2:
        return
    if isinstance(obj, torch.nn.Module):
        if depth > 0:
            return  # never walk into a model the sampler might reference
        items = list(obj.buffers()) + list(obj.parameters()) + list(vars(obj).values())
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _walk(item, depth + 1)


def sampler_generators(sampler: Any) -> list[torch.Generator]:
    """The distinct torch.Generators the sampler holds."""
    seen: dict[int, torch.Generator] = {}
    for x in _walk(sampler):
        if isinstance(x, torch.Generator):
            seen.setdefault(id(x), x)
    return list(seen.values())


@dataclass
class StateSnapshot:
    """Copies of a sampler's tensors and generator states, to undo what warm-up runs changed."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    generators: list[tuple[torch.Generator, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def take(cls, sampler: Any, extra_generators: list[torch.Generator] = ()) -> "StateSnapshot":
        snap = cls()
        seen: set[int] = set()
        for x in _walk(sampler):
            if isinstance(x, torch.Tensor) and id(x) not in seen:
                seen.add(id(x))
                snap.tensors.append((x, x.detach().clone()))
        gens = {id(g): g for g in sampler_generators(sampler)}
        for g in extra_generators:
            gens.setdefault(id(g), g)
        snap.generators = [(g, g.get_state()) for g in gens.values()]
        return snap

    def restore(self) -> None:
        with torch.inference_mode():  # in-place writes allowed on normal and inference tensors alike
            for live, saved in self.tensors:
                live.copy_(saved)
        for g, state in self.generators:
            g.set_state(state)


# ---------------------------------------------------------------------------------------------------
# Graph bookkeeping
# ---------------------------------------------------------------------------------------------------

@dataclass
class GraphEntry:
    """One captured (or, with capture=False, one recorded) step: its static buffers and graph."""

    key: GraphKey
    tokens: torch.Tensor  # static input buffer [b]
    positions: torch.Tensor  # static input buffer [b]
    rows: torch.Tensor | None  # static input buffer [b] (cache-row map), None for rows 0..b-1
    sampler: Any  # held so id(sampler) in the key cannot be reused while the entry lives
    out: torch.Tensor | None = None  # static output buffer [b] (graph-owned memory when captured)
    graph: Any = None  # torch.cuda.CUDAGraph, or None for the eager static-buffer path
    replays: int = 0


class GraphPool:
    """The graphs of one model, reused across generate calls; see the module docstring."""

    def __init__(self, max_graphs: int = 16) -> None:
        self.max_graphs = max_graphs
        self.entries: collections.OrderedDict[tuple, GraphEntry] = collections.OrderedDict()
        self.captures = 0  # how many times a step was (re)captured or recorded; tests and the bench read it
        self._pool = None  # torch.cuda.graph_pool_handle(), made on first capture
        self._stream = None  # side stream for warm-up and capture

    def lookup(self, key: tuple) -> GraphEntry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def add(self, entry: GraphEntry) -> None:
        # Graphs that point at another KV cache storage are stale: drop them to free their memory.
        for k in [k for k in self.entries if k.cache != entry.key.cache]:
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


_POOL_ATTR = "_fastsolar_graph_pool"


def shared_pool(model: Any) -> GraphPool:
    """The GraphPool attached to `model` (made on first use), so graphs persist across generate calls."""
    pool = model.__dict__.get(_POOL_ATTR)
    if pool is None:
        pool = GraphPool()
        object.__setattr__(model, _POOL_ATTR, pool)
    return pool


def graphs_supported() -> bool:
    """Whether this torch can capture a step that uses a custom (non-default) CUDA generator."""
    return hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class CudaGraphStep:
    """`step(tokens [b], positions [b], rows=None) -> next_tokens [b]` =
    `sampler(model.decode(tokens, positions, rows))`, captured in a CUDA graph per exact batch size. Unverified on hardware (see the module docstring).

    capture: True captures CUDA graphs (needs the model on CUDA); False runs the very same static-buffer
    path (key, warm-up, state restore, static buffers, clone-out) eagerly, which is how the CPU tests prove
    it gives the eager step's tokens; None means "capture when the model is on CUDA".
    """

    def __init__(
        self,
        model: Any,
        sampler: Callable[[torch.Tensor], torch.Tensor],
        *,
        capture: bool | None = None,
        warmup_runs: int = 2,
        pool: GraphPool | None = None,
    ) -> None:
        self.model = model
        self.sampler = sampler
        device = _model_device(model)
        self.capture = (device.type == "cuda") if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs the model on CUDA, it is on {device}")
        self.warmup_runs = warmup_runs
        self.pool = pool if pool is not None else shared_pool(model)

    def _run(self, entry: GraphEntry) -> torch.Tensor:
        return self.sampler(self.model.decode(entry.tokens, entry.positions, entry.rows))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        key = graph_key(self.model, self.sampler, tokens, positions, rows)
        entry = self.pool.lookup(key)
        if entry is None:
            entry = self._record(key, tokens, positions, rows)
            self.pool.add(entry)
        entry.tokens.copy_(tokens)
        entry.positions.copy_(positions)
        if rows is not None:
            entry.rows.copy_(rows)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.out = self._run(entry)
        entry.replays += 1
        return entry.out.clone()

    def _record(
        self, key: GraphKey, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None
    ) -> GraphEntry:
        """Warm up (state restored afterwards) and capture; the caller then replays for the real result."""
        self.pool.captures += 1
        entry = GraphEntry(
            key=key,
            tokens=torch.empty_like(tokens).copy_(tokens),
            positions=torch.empty_like(positions).copy_(positions),
            rows=None if rows is None else torch.empty_like(rows).copy_(rows),
            sampler=self.sampler,
        )
        logger.debug("recording decode step for batch %d (capture=%s)", tokens.shape[0], self.capture)
        if not self.capture:
            snap = StateSnapshot.take(self.sampler)
            for _ in range(self.warmup_runs):
                self._run(entry)
            snap.restore()
            return entry
        return self._capture(entry)

    def _capture(self, entry: GraphEntry) -> GraphEntry:
        device = entry.tokens.device
        generators = [g for g in sampler_generators(self.sampler) if g.device.type == "cuda"]
        custom = [g for g in generators if not _is_default_generator(g)]
        if custom and not graphs_supported():
            raise RuntimeError(
                f"torch {torch.__version__} has no CUDAGraph.register_generator_state, so a sampler with its "
                "own CUDA generator cannot be captured; run generate with cuda_graphs=False"
            )
        # The default generator is the one sampling uses when the sampler holds none; snapshot it too.
        index = device.index if device.index is not None else torch.cuda.current_device()
        extra = [] if generators else [torch.cuda.default_generators[index]]
        snap = StateSnapshot.take(self.sampler, extra_generators=extra)
        stream = self.pool.side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):
                self._run(entry)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        snap.restore()

        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated no-op on torch with lazy registration
            warnings.simplefilter("ignore", DeprecationWarning)
            for g in custom:
                graph.register_generator_state(g)
        with torch.cuda.graph(graph, pool=self.pool.cuda_pool(), stream=stream):
            out = self._run(entry)
        entry.graph = graph
        entry.out = out
        return entry


def _is_default_generator(g: torch.Generator) -> bool:
    if g.device.type != "cuda":
        return False
    return any(g is d for d in torch.cuda.default_generators)


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device
