"""Autoregressive generation with the same results as transformers' `generate`.

Left-padded prompts (with `attention_mask`) are turned into right-padded ones so that every row's real
tokens sit at positions 0..len-1 of the static KV cache; after one prefill, each step decodes one token
per row at per-row device positions and picks the next tokens on the device. Everything a step does lives
in one `DecodeLoop` of device buffers (`advance`: decode, sample, positions += 1, EOS bookkeeping, the
token into the loop's history and back in as the next input), so on CUDA a step is one graph replay
(fastsolar/graphs.py's CudaGraphLoop) with no eager launch and no copy around it.
Finished rows (after an EOS) get pad tokens, as in transformers. Whether every row has finished is asked
every `CHECK_EVERY` steps (`stream`: every step) without stalling the device: the answer as of step t - 1
is copied to the host behind step t - 1 and read once step t is queued (`_DoneProbe`); the output is then
trimmed to the length transformers would have stopped at, so the tokens are the same.

One deliberate difference: the repetition penalty counts only real prompt tokens, while transformers also
penalises the pad ids of left-padded rows; so each row of a padded batch gets what it would get alone.

`generate` and `stream` share one loop (`_token_loop`); `_make_advance` is the single place where the
per-token step is built (eager `loop.advance`, or the captured CudaGraphLoop).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastsolar.decoding.graphs import CudaGraphLoop
from fastsolar.decoding.sampling import DeviceState, PerRow, Sampler, check_sampling_args

CHECK_EVERY = 16  # decode steps between host checks for "every row has finished"
CACHE_ROUND = 256  # cache lengths are rounded up to a multiple of this so later calls can reuse the cache
EOS_SLOTS = 8  # EOS ids a DecodeLoop holds without being remade (more: a new loop, so a new graph)

# One Sampler and one DecodeLoop per (model, batch size): their buffers persist, so captured graphs that read
# them stay valid across calls.
_samplers: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Sampler]]" = weakref.WeakKeyDictionary()
_loops: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, DecodeLoop]]" = weakref.WeakKeyDictionary()


@dataclass
class DecodeLoop(DeviceState):
    """The per-token state of a generate call as device buffers, refilled in place by `start`.

    `advance(model, sampler)` is one whole step and touches nothing else (what CudaGraphLoop captures):
    next = sampler(model.decode(tokens, positions)); positions += 1; `record(next)`. `record` applies the
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

    def advance(self, model: Any, sampler: Sampler) -> None:
        self.record(sampler(model.decode(self.tokens, self.positions)))
        self.positions += 1

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        # history is left out: a warm-up writes only columns the real steps overwrite before reading.
        return self.tokens, self.positions, self.finished, self.finished_at, self.step



class _DoneProbe:
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


@dataclass
class _Request:
    """A validated generate call (host-side facts only; nothing computed on the device yet)."""

    input_ids: torch.Tensor  # [b, L] int64 on the model's device, as given (left padded)
    attention_mask: torch.Tensor | None
    lengths: list[int]  # real tokens per row
    max_new_tokens: int
    sampling: dict[str, Any]
    seed: int | None
    eos: tuple[int, ...]
    pad: int
    cuda_graphs: bool
    min_new_tokens: int = 0


def _validate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: PerRow,
    top_k: PerRow,
    top_p: PerRow,
    repetition_penalty: PerRow,
    eos_token_id: int | Sequence[int] | None,
    attention_mask: torch.Tensor | None,
    seed: int | None,
    cuda_graphs: bool | None,
    min_new_tokens: int = 0,
    pad_token_id: int | None = None,
) -> _Request:
    config = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an int64 (or int32) tensor of token ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
    b, width = input_ids.shape
    if b == 0 or width == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; at least one token is needed")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                     or not 0 <= pad_token_id < config.vocab_size):
        raise ValueError(f"pad_token_id must be a token id in [0, {config.vocab_size}), got {pad_token_id!r}")
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        min_new_tokens=min_new_tokens)

    device = model.device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    elif cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this model is on {device}")

    ids = input_ids.to(device=device, dtype=torch.int64)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, width):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask shape {shape} does not match input_ids shape {(b, width)}")
        mask = attention_mask.to(device)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.to(torch.int64)
        if width > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask is not left-padded: a row has a 0 after a 1 (pad prompts on the left, "
                "e.g. tokenizer.padding_side = 'left')"
            )
        lengths = mask.sum(dim=1).tolist()
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"empty prompt: attention_mask rows {empty} have no tokens")
        real = ids[mask.bool()]
    else:
        mask = None
        lengths = [width] * b
        real = ids
    lo, hi = (int(v) for v in torch.aminmax(real))
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}); the prompt holds {lo if lo < 0 else hi}")

    prompt_len = max(lengths)
    context = config.max_position_embeddings
    if prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's context of {context} tokens"
        )

    if eos_token_id is None:
        eos = tuple(config.eos_token_ids)
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if pad_token_id is not None:
        pad = pad_token_id
    else:
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return _Request(
        input_ids=ids, attention_mask=mask, lengths=lengths, max_new_tokens=max_new_tokens,
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty),
        seed=seed, eos=eos, pad=pad, cuda_graphs=bool(cuda_graphs), min_new_tokens=min_new_tokens,
    )


def _get_sampler(model: Any, batch: int) -> Sampler:
    per_model = _samplers.setdefault(model, {})
    key = (batch, model.config.vocab_size, model.device)
    if key not in per_model:
        per_model[key] = Sampler(batch, model.config.vocab_size, model.device)
    return per_model[key]


def _get_loop(model: Any, batch: int, capacity: int, n_eos: int) -> DecodeLoop:
    per_model = _loops.setdefault(model, {})
    key = (batch, model.device)
    loop = per_model.get(key)
    if loop is None or loop.history.shape[1] < capacity or loop.eos.shape[0] < n_eos:
        loop = per_model[key] = DecodeLoop.empty(batch, capacity, max(EOS_SLOTS, n_eos), model.device)
    return loop


def _make_advance(model: Any, sampler: Sampler, loop: DecodeLoop, cuda_graphs: bool) -> Callable[[], None]:
    """One whole step on the loop's buffers: `loop.advance(model, sampler)`, eager or captured in a graph."""
    if cuda_graphs:
        return CudaGraphLoop(model, sampler, loop)
    return lambda: loop.advance(model, sampler)


def _right_pad(req: _Request) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt `[b, max_len]` (padding = token 0), its validity mask and lengths (device)."""
    ids = req.input_ids
    b, width = ids.shape
    device = ids.device
    lens = torch.tensor(req.lengths, dtype=torch.int64, device=device)
    max_len = max(req.lengths)
    cols = torch.arange(max_len, device=device)
    src = (cols[None, :] + (width - lens)[:, None]).clamp(max=width - 1)
    valid = cols[None, :] < lens[:, None]
    right = torch.where(valid, ids.gather(1, src), 0)
    return right, valid, lens


@torch.inference_mode()
def _token_loop(model: Any, req: _Request, check_every: int, out: list) -> Iterator[int]:
    """Run the decode loop, yielding the index t of each step once its tokens are queued into the loop's
    history (finished rows padded). Stops after max_new_tokens steps or at the first check (every
    `check_every` steps) that finds every row finished; appends the DecodeLoop to `out` first."""
    b = req.input_ids.shape[0]
    n_new = req.max_new_tokens
    right, valid, lens = _right_pad(req)
    cache_len = min(-(-(right.shape[1] + n_new) // CACHE_ROUND) * CACHE_ROUND, model.config.max_position_embeddings)
    model.setup_cache(b, cache_len)
    sampler = _get_sampler(model, b)
    sampler.reset(**req.sampling, seed=req.seed, prompt_ids=right, prompt_mask=valid,
                  min_new_tokens=req.min_new_tokens, eos_token_ids=req.eos)
    loop = _get_loop(model, b, model.cache.max_seq, len(req.eos))
    loop.start(lens, req.eos, req.pad, n_new)
    out.append(loop)
    loop.record(sampler(model.prefill(right, lens)))
    advance = _make_advance(model, sampler, loop, req.cuda_graphs) if n_new > 1 else None
    probe = _DoneProbe(loop) if req.eos else None
    yield 0
    for t in range(1, n_new):
        check = probe is not None and t % check_every == 0
        if check:
            probe.post(t - 1)
        advance()
        if check and probe.all_done():
            return  # every row finished by step t - 1 (step t ran in vain and is dropped)
        yield t


def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    temperature: PerRow = 0.0,
    top_k: PerRow = None,
    top_p: PerRow = None,
    repetition_penalty: PerRow = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    cuda_graphs: bool | None = None,
    min_new_tokens: int = 0,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """The prompt (as given, left padding kept) followed by the new tokens: `[b, L + n]` int64 on the
    model's device, n <= max_new_tokens (shorter when every row reached an EOS, like transformers).

    temperature 0 is greedy (argmax); otherwise sample after repetition_penalty, temperature, top_k and
    top_p, in transformers' order; `seed` makes sampling reproducible. eos_token_id defaults to the config's;
    no EOS is chosen among the first `min_new_tokens` tokens; finished rows are filled with `pad_token_id`
    (default: the config's pad id, else the first EOS id).
    """
    req = _validate(
        model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, attention_mask=attention_mask,
        seed=seed, cuda_graphs=cuda_graphs, min_new_tokens=min_new_tokens, pad_token_id=pad_token_id,
    )
    out: list[DecodeLoop] = []
    steps = sum(1 for _ in _token_loop(model, req, CHECK_EVERY, out))
    loop = out[0]
    with torch.inference_mode():
        # transformers stops right after the step at which the last row finished.
        n = min(steps, int(loop.finished_at.max()) + 1)
        return torch.cat([req.input_ids, loop.history[:, :n]], dim=1)


def stream(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens `[batch]` (device tensors) as they are produced; same arguments and the
    same tokens as `generate` (finished rows yield pad tokens until every row has finished).

    Arguments are validated at the call; the work starts at the first `next()`.
    """
    req = _validate(model, input_ids, max_new_tokens, **_with_defaults(kwargs))
    return _stream(model, req)


def _stream(model: Any, req: _Request) -> Iterator[torch.Tensor]:
    out: list[DecodeLoop] = []
    for t in _token_loop(model, req, 1, out):
        # A copy: the loop's history is reused by the next call, the caller's tensors must not change.
        with torch.inference_mode():
            yield out[0].history[:, t].clone()


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, eos_token_id=None,
                   attention_mask=None, seed=None, cuda_graphs=None, min_new_tokens=0, pad_token_id=None)
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    allowed.update(kwargs)
    return allowed
