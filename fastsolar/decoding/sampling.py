"""Token selection on the device: transformers' logits processing, greedy or sampled, graph-safe.

`process_logits` is the pure function: repetition penalty -> temperature -> top-k -> top-p, in
transformers' order and with its exact float math (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper). Rows with temperature 0 are greedy: only the penalty applies to them,
as in transformers' greedy search (their warper parameters are neutral by construction).

`Sampler` holds the per-row parameters and the seen-token mask as device buffers for one batch size and
refills them in place on `reset`, so a CUDA graph that captured `sampler(logits)` stays valid across
generate calls as long as `Sampler.mode` (host flags choosing which stages run) is unchanged: a graph
cache must include `mode` in its key. Calling the sampler never syncs with the host.

`min_new_tokens` (transformers' MinNewTokensLengthLogitsProcessor): the EOS ids are banned (-inf) while
fewer than that many tokens have been chosen. The count is a device-side step counter the sampler
advances on every call while the ban is on (the prefill's pick is step 0), so the ban lifts inside a
captured graph too, without a host sync.

Its device state is explicit: `state_tensors()` (the parameter buffers, the seen mask and the EOS-ban
state) and `generator`; `snapshot()` / `restore(snap)` copy them out and back (a graph step's warm-up runs
the sampler for real and must leave no trace), and `generators()` names the generator a CUDA graph must
register.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Number = int | float
PerRow = Number | Sequence[Number] | torch.Tensor | None


def check_sampling_args(
    *,
    temperature: PerRow = 0.0,
    top_k: PerRow = None,
    top_p: PerRow = None,
    repetition_penalty: PerRow = 1.0,
    min_new_tokens: int = 0,
) -> None:
    """Raise ValueError for out-of-range sampling parameters (scalars or per-row sequences)."""
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    for name, value, ok, rule in (
        ("temperature", temperature, lambda v: v >= 0, ">= 0 (0 means greedy)"),
        ("top_k", top_k, lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0 (0 or None disables it)"),
        ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 or None disables it)"),
        ("repetition_penalty", repetition_penalty, lambda v: v > 0, "> 0 (1 disables it)"),
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
    penalize: bool = False  # some row has repetition_penalty != 1
    sample: bool = False  # some row has temperature > 0
    use_top_k: bool = False
    use_top_p: bool = False

    @classmethod
    def empty(cls, batch: int, vocab_size: int, device: torch.device | str) -> "SamplingParams":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            temperature=torch.zeros(batch, **f32), divisor=torch.ones(batch, **f32),
            inv_divisor=torch.ones(batch, **f32),
            top_k=torch.full((batch,), vocab_size, dtype=torch.int64, device=device),
            top_p_threshold=torch.full((batch,), -1.0, **f32), penalty=torch.ones(batch, **f32),
            inv_penalty=torch.ones(batch, **f32),
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
    ) -> None:
        """Refill the buffers in place from scalars or per-row values (validated)."""
        check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        b = self.temperature.shape[0]
        temp = _per_row(temperature, b, "temperature", 0.0)
        ks = _per_row(top_k, b, "top_k", 0)
        ps = _per_row(top_p, b, "top_p", 1.0)
        pens = _per_row(repetition_penalty, b, "repetition_penalty", 1.0)
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
        self.penalize = any(p != 1.0 for p in pens)
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
) -> torch.Tensor:
    """transformers' processing of next-token logits `[b, V]`, in float32: repetition penalty (on the tokens
    marked in `seen` [b, V]), the tokens marked in `banned` ([V] or [b, V]) set to -inf (min_new_tokens),
    then for sampled rows temperature, top-k and top-p. Never modifies `logits`."""
    scores = logits.float()
    if params.penalize and seen is not None:
        pen = params.penalty[:, None]
        penalized = torch.where(scores < 0, scores * pen, _div(scores, pen, params.inv_penalty[:, None]))
        scores = torch.where(seen, penalized, scores)
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


class Sampler(DeviceState):
    """Device-resident sampling state for a batch of `batch` rows; `sampler(logits) -> tokens [b] int64`."""

    def __init__(self, batch: int, vocab_size: int, device: torch.device | str) -> None:
        self.batch = batch
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.params = SamplingParams.empty(batch, vocab_size, self.device)
        self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self._tiny = torch.finfo(torch.float32).tiny
        # min_new_tokens: EOS ids banned while step < min_new_tokens; step counts calls since reset.
        self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.min_new_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.suppress_eos = False

    @property
    def mode(self) -> tuple[bool, ...]:
        """Host flags fixing which stages `__call__` runs; part of any captured graph's identity."""
        return (*self.params.mode, self.suppress_eos)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor the sampler reads or writes when called."""
        p = self.params
        return (p.temperature, p.divisor, p.inv_divisor, p.top_k, p.top_p_threshold, p.penalty, p.inv_penalty,
                self.seen, self.eos_mask, self.min_new_tokens, self.step)

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    def reset(
        self,
        *,
        temperature: PerRow = 0.0,
        top_k: PerRow = None,
        top_p: PerRow = None,
        repetition_penalty: PerRow = 1.0,
        seed: int | None = None,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        min_new_tokens: int = 0,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        """Refill every buffer in place. `prompt_ids` [b, s] with `prompt_mask` [b, s] (True = real token)
        marks the prompt's tokens as seen for the repetition penalty; `eos_token_ids` are banned for the
        first `min_new_tokens` calls."""
        self.params.fill(self.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty)
        check_sampling_args(min_new_tokens=min_new_tokens)
        eos = sorted({int(e) for e in eos_token_ids})
        if eos and not 0 <= eos[0] <= eos[-1] < self.vocab_size:
            raise ValueError(f"eos_token_ids {eos} must lie in [0, {self.vocab_size})")
        self.eos_mask.zero_()
        self.eos_mask[eos] = True
        self.min_new_tokens.fill_(min_new_tokens)
        self.step.zero_()
        self.suppress_eos = min_new_tokens > 0 and bool(eos)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self.seen.zero_()
        if prompt_ids is not None and self.params.penalize:
            b = prompt_ids.shape[0]
            ids = prompt_ids.to(self.device, torch.int64)
            if prompt_mask is not None:
                # Padding goes to an extra column that is dropped, so it marks nothing.
                ids = torch.where(prompt_mask.to(self.device, torch.bool), ids, self.vocab_size)
            marks = torch.zeros(b, self.vocab_size + 1, dtype=torch.bool, device=self.device)
            marks.scatter_(1, ids, True)
            self.seen[:b].copy_(marks[:, : self.vocab_size])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        banned = self.eos_mask & (self.step < self.min_new_tokens) if self.suppress_eos else None
        scores = process_logits(logits, self.params, self.seen, banned)
        tokens = scores.argmax(dim=-1)
        if self.params.sample:
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, without a host sync.
            probs = scores.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(self._tiny)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(self.params.temperature > 0, sampled, tokens)
        if self.params.penalize:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.suppress_eos:  # only the EOS ban reads the counter; without it the step stays as it was
            self.step.add_(1)
        return tokens
