"""Sampling state kept per KV-cache row, for a batch whose rows come and go.

`fastsolar.decoding.sampling.Sampler` keeps its parameters per *batch* row and one generator for the whole batch,
which is right for one `generate` call. A serving engine decodes whichever requests are running as batch rows
0..b-1, each living in its own cache row; so `RowSampler` keeps everything per *cache* row -- the sampling
parameters (the same `SamplingParams` buffers, filled by the same code), the repetition-penalty seen-mask, a
64-bit seed and a step counter -- and `select(rows)` says which cache row each batch row is before a call.

`sampler(logits [b, V]) -> tokens [b]` then gathers the selected rows' state, runs transformers' logits
processing (`fastsolar.decoding.sampling.process_logits`), takes the argmax for greedy rows and an exponential race
with counter-based noise (`fastsolar.serve.rng`) for sampled ones, and advances the rows' counters and
seen-masks. It never syncs with the host and reads the row map from a device buffer, so
`fastsolar.decoding.graphs.CudaGraphStep(model, sampler)` can capture it; `mode` (which processing stages run: the
union over the selected rows) is part of each graph's key. A row's tokens depend only on its own logits,
parameters, seed and counter: greedy rows get exactly what `generate` gives them alone, and a seeded row
draws the same noise whatever runs beside it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fastsolar.decoding.sampling import DeviceState, SamplingParams, process_logits
from fastsolar.serve import rng


@dataclasses.dataclass(frozen=True)
class RowParams:
    """One request's sampling parameters (validated by SamplingParams when assigned)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0


def _tensor_fields(params: SamplingParams) -> list[str]:
    return [f.name for f in dataclasses.fields(params) if isinstance(getattr(params, f.name), torch.Tensor)]


def _flag_fields(params: SamplingParams) -> list[str]:
    return [f.name for f in dataclasses.fields(params) if isinstance(getattr(params, f.name), bool)]


class RowSampler(DeviceState):
    """Per-cache-row sampling for `rows` rows over a vocabulary of `vocab_size`; see the module docstring."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.params = SamplingParams.empty(rows, vocab_size, self.device)
        self._tensors = _tensor_fields(self.params)
        self._flags = _flag_fields(self.params)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=self.device)
        self.key = torch.zeros(rows, 2, dtype=torch.int64, device=self.device)  # seed words (low, high)
        self.counter = torch.zeros(rows, dtype=torch.int64, device=self.device)  # tokens drawn so far
        self.batch_rows = torch.zeros(rows, dtype=torch.int64, device=self.device)  # batch row i -> cache row
        self.index = torch.arange(vocab_size, dtype=torch.int64, device=self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._row_flags: dict[int, dict[str, bool]] = {}
        self._mode_flags = {name: False for name in self._flags}

    def assign(self, row: int, params: RowParams, prompt_ids: Sequence[int] = ()) -> None:
        """Give cache row `row` a new request's parameters, seed and prompt (marked seen for the penalty).
        Raises ValueError for invalid sampling values."""
        one = SamplingParams.build(
            1, self.vocab_size, "cpu", temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
        )
        for name in self._tensors:
            getattr(self.params, name)[row].copy_(getattr(one, name)[0])
        self._row_flags[row] = {name: getattr(one, name) for name in self._flags}
        self.key[row].copy_(torch.tensor(rng.seed_words(params.seed), dtype=torch.int64))
        self.counter[row] = 0
        self.seen[row] = False
        if one.penalize and len(prompt_ids):
            ids = torch.tensor(list(prompt_ids), dtype=torch.int64, device=self.device)
            self.seen[row].index_fill_(0, ids, True)

    def release(self, row: int) -> None:
        """Forget a finished request's flags, so they no longer widen the mode of later batches."""
        self._row_flags.pop(row, None)

    def select(self, rows: torch.Tensor, host_rows: Sequence[int]) -> None:
        """The next call's batch row i is cache row rows[i] (`rows` a device tensor, `host_rows` the same on
        the host, used only for the host-side mode flags)."""
        self.batch_rows[: rows.shape[0]].copy_(rows)
        flags = [self._row_flags[r] for r in host_rows]
        mode = {name: any(f[name] for f in flags) for name in self._flags}
        if mode.get("sample"):
            # Top-k and top-p leave rows at their neutral values exactly as they are, so a sampling batch
            # always runs them: 4 modes instead of 16, so far fewer captured graphs per batch size.
            mode.update({name: True for name in ("use_top_k", "use_top_p") if name in mode})
        self._mode_flags = mode

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """What a call writes (the draw counters and seen-masks); the noise is counter-based, so there is no
        generator to snapshot or register with a graph."""
        return self.counter, self.seen

    @property
    def mode(self) -> tuple[bool, ...]:
        """Host flags fixing which stages `__call__` runs for the selected rows; part of a graph's key."""
        return tuple(self._mode_flags[name] for name in self._flags)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # b is the batch size the graph was recorded for (a static shape), not a per-step value.
        idx = self.batch_rows[: logits.shape[0]]
        params = dataclasses.replace(
            self.params, **{name: getattr(self.params, name)[idx] for name in self._tensors}, **self._mode_flags
        )
        seen = self.seen[idx] if params.penalize else None
        scores = process_logits(logits, params, seen)
        tokens = scores.argmax(dim=-1)
        counter = self.counter[idx]
        if params.sample:
            probs = scores.softmax(dim=-1)
            sampled = (probs / rng.exponential(self.key[idx], counter, self.index)).argmax(dim=-1)
            tokens = torch.where(params.temperature > 0, sampled, tokens)
        self.counter.index_put_((idx,), counter + 1)
        if params.penalize:
            self.seen.index_put_((idx, tokens), self._true)
        return tokens
