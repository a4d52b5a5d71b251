"""One decoder's state over a model: `DecodeSession` owns the static KV cache, the graphs captured over it, the
samplers and loop buffers those graphs read, and which cache rows are in use.

Whoever decodes holds one: `generate` / `stream` make one per call (or take the caller's, to reuse its cache
and graphs across calls), and the serving engine keeps its own for its lifetime. The model holds weights and
config only, so two users of one model never share a cache row: `model.generate(...)` beside a running
server writes into its own cache. Within a session, `claim` hands out rows and refuses a row already in use.

    session = DecodeSession(model, max_batch=4, max_seq=512)
    out = generate(model, ids, 64, session=session)   # cache, sampler, loop and graphs kept for the next call

A decode step is `session.decode(tokens, positions, rows)` = `model.decode(tokens, positions, session.cache,
rows)`; `session.graphs` keeps its CUDA graphs (fastsolar.decoding.graphs), invalidated by the weights' storage
(`session.weights.signature()`) and the cache's. Nothing is attached to the model.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fastsolar.decoding.graphs import GraphPool, WeightStorage
from fastsolar.decoding.loop import EOS_SLOTS, DecodeLoop
from fastsolar.decoding.sampling import Sampler
from fastsolar.model import KVCache


class RowsInUse(RuntimeError):
    """A cache row asked for is held by another request of the same session."""


class DecodeSession:
    """The KV cache of `max_batch` rows x `max_seq` positions for `model`, its graphs, samplers and loops, and
    the allocation of its rows (module docstring)."""

    def __init__(self, model: Any, max_batch: int, max_seq: int, *, max_graphs: int = 16) -> None:
        self.model = model
        self.cache = KVCache.allocate(model.config, max_batch, max_seq, model.device, model.dtype,
                                      kv_heads=model.kv_heads)
        self.graphs = GraphPool(max_graphs=max_graphs)
        self.weights = WeightStorage(model)
        self._busy: set[int] = set()
        self._samplers: dict[int, Sampler] = {}
        self._loops: dict[int, DecodeLoop] = {}

    @property
    def device(self) -> torch.device:
        return self.cache.k.device

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @property
    def max_seq(self) -> int:
        return self.cache.max_seq

    def fits(self, batch: int, seq: int) -> bool:
        """Whether a call of `batch` rows x `seq` positions fits this session's cache (model and dtype unchanged)."""
        return (batch <= self.max_batch and seq <= self.max_seq and self.cache.k.dtype == self.model.dtype
                and self.cache.k.device == self.model.device)

    # -- rows -------------------------------------------------------------------------------------

    def claim(self, rows: int | Iterable[int]) -> list[int]:
        """Take cache rows for a request: `n` -> the n lowest free rows, or the given rows. Raises RowsInUse
        naming the rows another request holds (or when fewer than n are free); nothing is taken then."""
        if isinstance(rows, int):
            free = [r for r in range(self.max_batch) if r not in self._busy]
            if len(free) < rows:
                raise RowsInUse(f"{rows} cache rows asked for, {len(free)} of {self.max_batch} free in this session")
            wanted = free[:rows]
        else:
            wanted = list(rows)
            bad = [r for r in wanted if not 0 <= r < self.max_batch]
            if bad or len(set(wanted)) != len(wanted):
                raise ValueError(f"rows {wanted} must be distinct cache rows in [0, {self.max_batch})")
            taken = sorted(self._busy.intersection(wanted))
            if taken:
                raise RowsInUse(f"cache rows {taken} of this session are in use by another request; decode with "
                                "a session of your own (DecodeSession) or wait for them to be released")
        self._busy.update(wanted)
        return wanted

    def release(self, rows: Iterable[int]) -> None:
        self._busy.difference_update(rows)

    @property
    def rows_in_use(self) -> frozenset[int]:
        return frozenset(self._busy)

    # -- the model over this session's cache -----------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, seqlens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.prefill(input_ids, seqlens, self.cache, rows)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.decode(tokens, positions, self.cache, rows)

    def copy_rows(self, src: int, dst: Sequence[int], length: int) -> None:
        """Copy the keys and values of cache row `src`'s first `length` positions (every layer) into rows
        `dst`: choices that share a prompt decode on from one prefill instead of recomputing it."""
        bad = [r for r in (src, *dst) if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.max_batch]
        if bad or src in dst or len(set(dst)) != len(dst):
            raise ValueError(f"copy_rows needs distinct cache rows in [0, {self.max_batch}), got {src} -> {list(dst)}")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= self.max_seq:
            raise ValueError(f"length must be an integer in [1, {self.max_seq}], got {length!r}")
        index = torch.tensor(list(dst), dtype=torch.int64, device=self.device)
        self.model.copy_cache_rows(self.cache, torch.tensor(src), index, torch.tensor(length))

    # -- device buffers its graphs read -----------------------------------------------------------------

    def sampler(self, batch: int) -> Sampler:
        """The session's sampler for `batch` rows: one per batch size, refilled in place by each call, so the
        graphs that read it stay valid."""
        sampler = self._samplers.get(batch)
        if sampler is None:
            sampler = self._samplers[batch] = Sampler(batch, self.model.config.vocab_size, self.device)
        return sampler

    def loop(self, batch: int, n_eos: int) -> DecodeLoop:
        """generate's loop buffers for `batch` rows over this cache (one per batch size, like `sampler`)."""
        loop = self._loops.get(batch)
        if loop is None or loop.eos.shape[0] < n_eos:
            loop = self._loops[batch] = DecodeLoop.empty(batch, self.max_seq, max(EOS_SLOTS, n_eos), self.device)
        return loop

    def __repr__(self) -> str:
        return (f"DecodeSession({self.max_batch} rows x {self.max_seq} positions on {self.device}, "
                f"{len(self._busy)} rows in use, {len(self.graphs.entries)} graphs)")
