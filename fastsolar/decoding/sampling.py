"""Token selection on the device: transformers' logits processing, greedy or sampled, graph-safe.

`process_logits` is the pure function: repetition penalty -> temperature -> top-k -> top-p, in
transformers' order and with its exact float math (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper). Rows with temperature 0 are greedy: only the penalties apply to them,
as in transformers' greedy search (their warper parameters are neutral by construction). OpenAI's presence
and frequency penalties (fastsolar.decoding.penalties, on the counts of the tokens a row generated) come
right after the repetition penalty, before temperature, as in vLLM.

`Sampler` is the one sampler of generate, stream and the server. It keeps everything per *slot* (a row of
the KV cache): the parameters (`SamplingParams` buffers), the repetition-penalty seen-mask, a 64-bit seed and a
draw counter, and `min_new_tokens`. `reset(...)` fills slots 0..b-1 for a generate call; `assign(slot,
RowParams, prompt)` one slot for a served request; `select(rows)` says which slot each batch row is (through a
device buffer, so one captured graph serves any row map). `sampler(logits [b, V]) -> tokens [b]` runs
transformers' processing, takes the argmax for greedy rows (exactly) and an exponential race with
counter-based noise (`fastsolar.decoding.rng`: a pure function of seed, counter and token) for sampled ones,
and advances the rows' counters, seen-masks and token counts. For rows that ask for them it also writes
the logprobs of the chosen tokens and the top `MAX_TOP_LOGPROBS` (fastsolar.decoding.logprobs: the model's
raw distribution) into its output buffers `logprob`, `top_logprobs`, `top_ids` (indexed by batch row).
A row's tokens depend only on its own logits, parameters, seed
and counter, so a seeded request draws the same tokens alone or in any batch, through `generate`, `stream`,
the CLI and the server: one int `seed` gives row i of a call `seed + i` (`row_seeds`).

`mode` (host flags: which stages run, the union over the selected rows, and whether the rows are slots 0..b-1
in order) is part of a captured graph's key. Calling the sampler never syncs with the host.

`min_new_tokens` (transformers' MinNewTokensLengthLogitsProcessor): the EOS ids are banned (-inf) while a row
has drawn fewer than that many tokens (its counter; the prefill's pick is draw 0), so the ban lifts inside a
captured graph too, without a host sync.

Its device state is explicit: `state_tensors()` (the counters, seen-masks and counts: what a call writes);
`snapshot()` / `restore(snap)` copy them out and back (a graph step's warm-up runs the sampler for real and
must leave no trace). There is no torch.Generator to register with a graph.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastsolar.decoding import rng
from fastsolar.decoding.logprobs import MAX_TOP_LOGPROBS, token_logprobs
from fastsolar.decoding.penalties import LIMIT as PENALTY_LIMIT
from fastsolar.decoding.penalties import apply_count_penalties

Number = int | float
PerRow = Number | Sequence[Number] | torch.Tensor | None


def check_sampling_args(
    *,
    temperature: PerRow = 0.0,
    top_k: PerRow = None,
    top_p: PerRow = None,
    repetition_penalty: PerRow = 1.0,
    min_new_tokens: int = 0,
    seed: int | Sequence[int] | None = None,
    presence_penalty: PerRow = 0.0,
    frequency_penalty: PerRow = 0.0,
) -> None:
    """Raise ValueError for out-of-range sampling parameters (scalars or per-row sequences): the one check of
    them, for generate, stream, the CLI and the server."""
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    if any(s is not None and (isinstance(s, bool) or not isinstance(s, int)) for s in seeds):
        raise ValueError(f"seed must be an integer (or one per row), got {seed!r}")
    for name, value, ok, rule in (
        ("temperature", temperature, lambda v: v >= 0, ">= 0 (0 means greedy)"),
        ("top_k", top_k, lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0 (0 or None disables it)"),
        ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 or None disables it)"),
        ("repetition_penalty", repetition_penalty, lambda v: v > 0, "> 0 (1 disables it)"),
        ("presence_penalty", presence_penalty, lambda v: -PENALTY_LIMIT <= v <= PENALTY_LIMIT,
         f"in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 disables it)"),
        ("frequency_penalty", frequency_penalty, lambda v: -PENALTY_LIMIT <= v <= PENALTY_LIMIT,
         f"in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 disables it)"),
    ):
        if value is None:
            continue
        for v in _values(value):
            if not isinstance(v, (int, float)) or v != v or not ok(v):
                raise ValueError(f"{name} must be {rule}, got {v!r}")


def _values(value: PerRow) -> list:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().flatten().tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _per_row(value: PerRow, batch: int, name: str, default: Number) -> list[float]:
    vals = [default] if value is None else _values(value)
    if len(vals) == 1:
        vals = vals * batch
    if len(vals) != batch:
        raise ValueError(f"{name} has {len(vals)} values for a batch of {batch}")
    return [float(v) for v in vals]


def _div(x: torch.Tensor, d: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x / d exactly as transformers' `tensor / python_float` computes it: PyTorch's CUDA kernel multiplies
    by the float32 reciprocal of a CPU scalar, its CPU kernel divides."""
    return x * inv if x.is_cuda else x / d


@dataclass
class SamplingParams:
    """Per-row sampling parameters as device tensors (the buffers of a Sampler), plus host flags.

    Greedy rows (temperature 0) get neutral warper values (divisor 1, top_k = vocab, top-p threshold -1),
    so the warpers leave them unchanged. `top_p_threshold` is `1 - top_p` computed in float64 on the host
    and then rounded to float32, as transformers' comparison against a Python float does.
    """

    temperature: torch.Tensor  # [b] f32, 0 = greedy
    divisor: torch.Tensor  # [b] f32, temperature or 1 for greedy rows
    inv_divisor: torch.Tensor  # [b] f32, float32 reciprocal of divisor
    top_k: torch.Tensor  # [b] int64 in [1, vocab]
    top_p_threshold: torch.Tensor  # [b] f32, -1 when disabled
    penalty: torch.Tensor  # [b] f32
    inv_penalty: torch.Tensor  # [b] f32
    presence: torch.Tensor  # [b] f32, presence_penalty (0 = off)
    frequency: torch.Tensor  # [b] f32, frequency_penalty (0 = off)
    penalize: bool = False  # some row has repetition_penalty != 1
    sample: bool = False  # some row has temperature > 0
    use_top_k: bool = False
    use_top_p: bool = False
    count_penalize: bool = False  # some row has a presence or frequency penalty

    @classmethod
    def empty(cls, batch: int, vocab_size: int, device: torch.device | str) -> "SamplingParams":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            temperature=torch.zeros(batch, **f32), divisor=torch.ones(batch, **f32),
            inv_divisor=torch.ones(batch, **f32),
            top_k=torch.full((batch,), vocab_size, dtype=torch.int64, device=device),
            top_p_threshold=torch.full((batch,), -1.0, **f32), penalty=torch.ones(batch, **f32),
            inv_penalty=torch.ones(batch, **f32), presence=torch.zeros(batch, **f32),
            frequency=torch.zeros(batch, **f32),
        )

    @classmethod
    def build(cls, batch: int, vocab_size: int, device: torch.device | str, **values: PerRow) -> "SamplingParams":
        params = cls.empty(batch, vocab_size, device)
        params.fill(vocab_size, **values)
        return params

    def fill(
        self,
        vocab_size: int,
        *,
        temperature: PerRow = 0.0,
        top_k: PerRow = None,
        top_p: PerRow = None,
        repetition_penalty: PerRow = 1.0,
        presence_penalty: PerRow = 0.0,
        frequency_penalty: PerRow = 0.0,
    ) -> None:
        """Refill the buffers in place from scalars or per-row values (validated)."""
        check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        b = self.temperature.shape[0]
        temp = _per_row(temperature, b, "temperature", 0.0)
        ks = _per_row(top_k, b, "top_k", 0)
        ps = _per_row(top_p, b, "top_p", 1.0)
        pens = _per_row(repetition_penalty, b, "repetition_penalty", 1.0)
        presence = _per_row(presence_penalty, b, "presence_penalty", 0.0)
        frequency = _per_row(frequency_penalty, b, "frequency_penalty", 0.0)
        sampled = [t > 0 for t in temp]
        divisor = [t if s else 1.0 for t, s in zip(temp, sampled)]
        k = [min(max(int(kk), 1), vocab_size) if (s and kk > 0) else vocab_size for kk, s in zip(ks, sampled)]
        thr = [(1.0 - p) if (s and p < 1.0) else -1.0 for p, s in zip(ps, sampled)]
        host = dict(dtype=torch.float32)
        div_t = torch.tensor(divisor, **host)
        pen_t = torch.tensor(pens, **host)
        self.temperature.copy_(torch.tensor(temp, **host))
        self.divisor.copy_(div_t)
        self.inv_divisor.copy_(1.0 / div_t)
        self.top_k.copy_(torch.tensor(k, dtype=torch.int64))
        self.top_p_threshold.copy_(torch.tensor(thr, dtype=torch.float64).to(torch.float32))
        self.penalty.copy_(pen_t)
        self.inv_penalty.copy_(1.0 / pen_t)
        self.presence.copy_(torch.tensor(presence, **host))
        self.frequency.copy_(torch.tensor(frequency, **host))
        self.penalize = any(p != 1.0 for p in pens)
        self.count_penalize = any(p != 0.0 for p in presence + frequency)
        self.sample = any(sampled)
        self.use_top_k = any(kk < vocab_size for kk in k)
        self.use_top_p = any(t >= 0 for t in thr)

    @property
    def mode(self) -> tuple[bool, bool, bool, bool]:
        return (self.penalize, self.sample, self.use_top_k, self.use_top_p)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' processing of next-token logits `[b, V]`, in float32: repetition penalty (on the tokens
    marked in `seen` [b, V]), presence and frequency penalties (on the generated-token `counts` [b, V]), the
    tokens marked in `banned` ([V] or [b, V]) set to -inf (min_new_tokens), then for sampled rows
    temperature, top-k and top-p. Never modifies `logits`."""
    scores = logits.float()
    if params.penalize and seen is not None:
        pen = params.penalty[:, None]
        penalized = torch.where(scores < 0, scores * pen, _div(scores, pen, params.inv_penalty[:, None]))
        scores = torch.where(seen, penalized, scores)
    if params.count_penalize and counts is not None:
        scores = apply_count_penalties(scores, counts, params.frequency, params.presence)
    if banned is not None:
        scores = scores.masked_fill(banned, float("-inf"))
    if not params.sample:
        return scores
    scores = _div(scores, params.divisor[:, None], params.inv_divisor[:, None])
    neg_inf = scores.new_full((), float("-inf"))  # a device fill: a host tensor copy would break graph capture
    if not (params.use_top_k or params.use_top_p):
        return scores
    # One descending sort serves both warpers: top-k reads its k-th value from it, and top-p's ascending
    # order (transformers sorts again) is the same sort reversed, with top-k's cut applied to the values.
    # Only the order among exactly equal values can differ from a second sort, which changes nothing:
    # equal scores get equal probabilities, and -inf ones are removed either way.
    sorted_desc, idx_desc = scores.sort(dim=-1, descending=True)
    if params.use_top_k:
        # The k-th largest value, per row (transformers: torch.topk(scores, k)[0][..., -1]).
        kth = sorted_desc.gather(1, (params.top_k - 1)[:, None])
        scores = torch.where(scores < kth, neg_inf, scores)
        sorted_desc = torch.where(sorted_desc < kth, neg_inf, sorted_desc)
    if params.use_top_p:
        sorted_logits, sorted_idx = sorted_desc.flip(-1), idx_desc.flip(-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= params.top_p_threshold[:, None]
        remove[:, -1] = False
        remove = remove.scatter(1, sorted_idx, remove)
        scores = torch.where(remove, neg_inf, scores)
    return scores


class DeviceState:
    """What a CUDA-graph step needs from a stateful object it runs (fastsolar/graphs.py): its device tensors
    (`state_tensors()`) and generators, so warm-up runs can be undone with `snapshot()` / `restore()` in place
    (captured graphs keep reading the same buffers) and the generators registered with the graph."""

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def generators(self) -> list[torch.Generator]:
        return []

    def snapshot(self) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """Copies of the device tensors and of the generators' states, for `restore`."""
        return tuple(t.clone() for t in self.state_tensors()), [g.get_state() for g in self.generators()]

    def restore(self, snapshot: tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]) -> None:
        """Put back what `snapshot` copied, in place."""
        tensors, generator_states = snapshot
        with torch.inference_mode():  # in-place writes allowed on normal and inference tensors alike
            for live, saved in zip(self.state_tensors(), tensors):
                live.copy_(saved)
        for g, state in zip(self.generators(), generator_states):
            g.set_state(state)


#: The host flags of a sampling step (`Sampler.mode`): which stages run for the selected rows.
MODE_FLAGS = ("penalize", "sample", "use_top_k", "use_top_p", "suppress_eos", "count_penalize", "logprobs")


@dataclass(frozen=True)
class RowParams:
    """One request's sampling parameters (checked by `check_sampling_args` when a row is assigned)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # the step writes this row's logprobs into the sampler's output buffers


def row_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """Each row's seed for a call of `batch` rows: a list gives each row its own; one int gives row i
    `seed + i` (so row 0 of any call with seed s draws as a request with seed s does); None draws a base
    seed from torch's default generator (reproducible under torch.manual_seed)."""
    check_sampling_args(seed=seed)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed has {len(seed)} values for a batch of {batch}")
        return list(seed)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return [seed + i for i in range(batch)]


class Sampler(DeviceState):
    """Sampling state per slot (a row of the KV cache) for `slots` slots; `sampler(logits [b, V]) -> tokens [b]`
    where batch row i is slot `rows[i]` (`select`; slots 0..b-1 after `reset`). See the module docstring.

    `coarse_modes`: a batch with any sampled row runs the top-k and top-p stages for all of them, and one
    with any penalised row all three penalties (neutral rows come out unchanged), so a serving engine records
    at most 8 graphs per batch size (penalties x sampling x logprobs) instead of 64.
    """

    def __init__(self, slots: int, vocab_size: int, device: torch.device | str, *, coarse_modes: bool = False) -> None:
        self.slots = slots
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.coarse_modes = coarse_modes
        self.params = SamplingParams.empty(slots, vocab_size, self.device)
        self._tensors = [f.name for f in dataclasses.fields(self.params) if isinstance(getattr(self.params, f.name), torch.Tensor)]
        self.seen = torch.zeros(slots, vocab_size, dtype=torch.bool, device=self.device)
        # Generated-token counts for the presence / frequency penalties (float: they multiply the penalty).
        self.counts = torch.zeros(slots, vocab_size, dtype=torch.float32, device=self.device)
        # Outputs of a step with logprobs, per batch row: read by the host after the step.
        self.top_k_logprobs = min(MAX_TOP_LOGPROBS, vocab_size)
        self.logprob = torch.zeros(slots, dtype=torch.float32, device=self.device)
        self.top_logprobs = torch.zeros(slots, self.top_k_logprobs, dtype=torch.float32, device=self.device)
        self.top_ids = torch.zeros(slots, self.top_k_logprobs, dtype=torch.int64, device=self.device)
        self.key = torch.zeros(slots, 2, dtype=torch.int64, device=self.device)  # seed words (low, high)
        self.counter = torch.zeros(slots, dtype=torch.int64, device=self.device)  # tokens drawn since assigned
        self.min_new_tokens = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.batch_rows = torch.arange(slots, dtype=torch.int64, device=self.device)  # batch row i -> slot
        self.index = torch.arange(vocab_size, dtype=torch.int64, device=self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._one = torch.ones((), dtype=torch.float32, device=self.device)
        self._has_eos = False
        self._slot_flags: dict[int, tuple[bool, ...]] = {}
        self._mode: tuple[bool, ...] = (False,) * (len(MODE_FLAGS) + 1)

    # -- filling slots (host side, between steps) ---------------------------------------------------------

    def set_eos(self, eos_token_ids: Sequence[int]) -> None:
        """The EOS ids `min_new_tokens` bans (the model's, shared by every slot)."""
        eos = sorted({int(e) for e in eos_token_ids})
        if eos and not 0 <= eos[0] <= eos[-1] < self.vocab_size:
            raise ValueError(f"eos_token_ids {eos} must lie in [0, {self.vocab_size})")
        self.eos_mask.zero_()
        self.eos_mask[eos] = True
        self._has_eos = bool(eos)

    def assign(self, slot: int, params: RowParams, prompt_ids: Sequence[int] | torch.Tensor = ()) -> None:
        """Give slot `slot` a request's parameters, seed and prompt (marked seen for the repetition penalty),
        its draw counter back at 0. Raises ValueError for invalid values."""
        self.fill(range(slot, slot + 1), temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                  repetition_penalty=params.repetition_penalty, seed=[params.seed],
                  min_new_tokens=params.min_new_tokens, presence_penalty=params.presence_penalty,
                  frequency_penalty=params.frequency_penalty, logprobs=params.logprobs)
        if self._slot_flags[slot][0] and len(prompt_ids):
            ids = torch.as_tensor(prompt_ids, dtype=torch.int64).to(self.device)
            self.seen[slot].index_fill_(0, ids, True)

    def fill(
        self,
        slots: range,
        *,
        temperature: PerRow = 0.0,
        top_k: PerRow = None,
        top_p: PerRow = None,
        repetition_penalty: PerRow = 1.0,
        seed: int | Sequence[int] | None = None,
        min_new_tokens: int = 0,
        presence_penalty: PerRow = 0.0,
        frequency_penalty: PerRow = 0.0,
        logprobs: bool = False,
    ) -> None:
        """Refill the contiguous slots `slots` in place from scalars or per-row values (validated), seeds
        as `row_seeds` gives them; their seen-masks, token counts and counters zeroed. `logprobs`: the
        steps write these rows' logprobs (`logprob`, `top_logprobs`, `top_ids`)."""
        check_sampling_args(min_new_tokens=min_new_tokens)
        n = len(slots)
        one = SamplingParams.build(n, self.vocab_size, "cpu", temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                   frequency_penalty=frequency_penalty)
        sl = slice(slots.start, slots.stop)
        for name in self._tensors:
            getattr(self.params, name)[sl].copy_(getattr(one, name))
        words = [rng.seed_words(s) for s in row_seeds(seed, n)]
        self.key[sl].copy_(torch.tensor(words, dtype=torch.int64))
        self.counter[sl] = 0
        self.min_new_tokens[sl] = min_new_tokens
        self.seen[sl] = False
        self.counts[sl] = 0
        ban = min_new_tokens > 0 and self._has_eos
        for slot, t, k, thr, pen, pres, freq in zip(
                slots, one.temperature.tolist(), one.top_k.tolist(), one.top_p_threshold.tolist(),
                one.penalty.tolist(), one.presence.tolist(), one.frequency.tolist()):
            self._slot_flags[slot] = (pen != 1.0, t > 0, k < self.vocab_size, thr >= 0, ban,
                                      pres != 0.0 or freq != 0.0, bool(logprobs))

    def reset(
        self,
        *,
        temperature: PerRow = 0.0,
        top_k: PerRow = None,
        top_p: PerRow = None,
        repetition_penalty: PerRow = 1.0,
        seed: int | Sequence[int] | None = None,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        min_new_tokens: int = 0,
        eos_token_ids: Sequence[int] = (),
        presence_penalty: PerRow = 0.0,
        frequency_penalty: PerRow = 0.0,
    ) -> None:
        """A generate call's batch in slots 0..b-1 (b: prompt_ids' rows, else every slot), selected in
        order. `prompt_ids` [b, s] with `prompt_mask` [b, s] (True = real token) marks the prompt's tokens as
        seen for the repetition penalty; `eos_token_ids` are banned for each row's first `min_new_tokens`."""
        b = prompt_ids.shape[0] if prompt_ids is not None else self.slots
        self.set_eos(eos_token_ids)
        self.fill(range(b), temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, min_new_tokens=min_new_tokens,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        if prompt_ids is not None and any(self._slot_flags[r][0] for r in range(b)):
            ids = prompt_ids.to(self.device, torch.int64)
            if prompt_mask is not None:
                # Padding goes to an extra column that is dropped, so it marks nothing.
                ids = torch.where(prompt_mask.to(self.device, torch.bool), ids, self.vocab_size)
            marks = torch.zeros(b, self.vocab_size + 1, dtype=torch.bool, device=self.device)
            marks.scatter_(1, ids, True)
            self.seen[:b].copy_(marks[:, : self.vocab_size])
        self.select(torch.arange(b, device=self.device), list(range(b)))

    def release(self, slot: int) -> None:
        """Forget a finished request's flags, so they no longer widen the mode of later batches."""
        self._slot_flags.pop(slot, None)

    def select(self, rows: torch.Tensor, host_rows: Sequence[int]) -> None:
        """The next calls' batch row i is slot rows[i] (`rows` a device tensor, `host_rows` the same on the
        host, read only for the host-side mode flags)."""
        self.batch_rows[: rows.shape[0]].copy_(rows)
        flags = [self._slot_flags[r] for r in host_rows]
        mode = [any(f[i] for f in flags) for i in range(len(MODE_FLAGS))]
        if self.coarse_modes and mode[1]:
            mode[2] = mode[3] = True
        if self.coarse_modes and (mode[0] or mode[5]):  # neutral penalties leave a row's scores exactly as they are
            mode[0] = mode[5] = True
        # The buffers' host flags describe the selection, so `params` is the SamplingParams of these rows.
        self.params.penalize, self.params.sample, self.params.use_top_k, self.params.use_top_p = mode[:4]
        self.params.count_penalize = mode[5]
        # Slots 0..b-1 in order (a generate call) are read as slices: no gather per parameter and step.
        self._mode = (*mode, list(host_rows) == list(range(len(host_rows))))

    # -- the device step -------------------------------------------------------------------------------

    @property
    def mode(self) -> tuple[bool, ...]:
        """Host flags fixing which stages `__call__` runs for the selected rows (MODE_FLAGS, then whether the
        rows are slots 0..b-1 in order); part of a captured graph's key."""
        return self._mode

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """What a call writes: the draw counters, seen-masks and token counts (the noise is counter-based: no
        generator). The logprob outputs are left out: every step overwrites them before anyone reads them."""
        return self.counter, self.seen, self.counts

    def __call__(self, logits: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The selected rows' next tokens from `logits`; the logprobs (when the mode asks) are of `raw`, the
        model's own logits where a caller has already masked `logits` (fastsolar.serve.token_mask)."""
        # b is the batch size the graph was recorded for (a static shape), not a per-step value.
        b = logits.shape[0]
        penalize, sample, use_top_k, use_top_p, suppress_eos, count_penalize, logprobs, in_order = self._mode
        rows = slice(0, b) if in_order else self.batch_rows[:b]
        params = dataclasses.replace(self.params, **{name: getattr(self.params, name)[rows] for name in self._tensors},
                                     penalize=penalize, sample=sample, use_top_k=use_top_k, use_top_p=use_top_p,
                                     count_penalize=count_penalize)
        counter = self.counter[rows]
        banned = self.eos_mask[None, :] & (counter < self.min_new_tokens[rows])[:, None] if suppress_eos else None
        scores = process_logits(logits, params, self.seen[rows] if penalize else None, banned,
                                self.counts[rows] if count_penalize else None)
        tokens = scores.argmax(dim=-1)
        if sample:
            # Exponential race: argmax(p / E) with E ~ Exp(1) from each row's own counter-based noise draws
            # from p without a host sync.
            probs = scores.softmax(dim=-1)
            sampled = (probs / rng.exponential(self.key[rows], counter, self.index)).argmax(dim=-1)
            tokens = torch.where(params.temperature > 0, sampled, tokens)
        if sample or suppress_eos:  # only the noise and the EOS ban read the counter
            if in_order:
                self.counter[rows].add_(1)
            else:
                self.counter.index_put_((rows,), counter + 1)
        if penalize:
            if in_order:
                self.seen[rows].scatter_(1, tokens[:, None], True)
            else:
                self.seen.index_put_((rows, tokens), self._true)
        if count_penalize:
            if in_order:
                self.counts[rows].scatter_add_(1, tokens[:, None], self._one.expand(b, 1))
            else:  # rows are distinct slots, so each (row, token) is written once: no accumulating put needed
                self.counts.index_put_((rows, tokens), self.counts[rows, tokens] + 1)
        if logprobs:
            chosen, top_values, top_ids = token_logprobs(logits if raw is None else raw, tokens, self.top_k_logprobs)
            self.logprob[:b].copy_(chosen)
            self.top_logprobs[:b].copy_(top_values)
            self.top_ids[:b].copy_(top_ids)
        return tokens
