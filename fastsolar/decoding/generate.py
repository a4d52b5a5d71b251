"""Autoregressive generation with the same results as transformers' `generate`.

Left-padded prompts (with `attention_mask`) are turned into right-padded ones so that every row's real
tokens sit at positions 0..len-1 of the static KV cache; after one prefill, each step decodes one token
per row at per-row device positions and picks the next tokens on the device. Everything a step does lives
in one `DecodeLoop` of device buffers (`advance`: decode, sample, positions += 1, EOS bookkeeping, the
token into the loop's history and back in as the next input; fastsolar.decoding.loop), so on CUDA a step is
one graph replay (fastsolar.decoding.graphs.CudaGraphLoop) with no eager launch and no copy around it.
The cache, sampler, loop buffers and graphs belong to a `DecodeSession`: one made for the call (sized to it),
or the caller's `session=`, whose rows 0..b-1 the call claims while it runs (refused if another request holds
them), so that repeated calls reuse one cache and its captured graphs.
Finished rows (after an EOS) get pad tokens, as in transformers. Whether every row has finished is asked
every `CHECK_EVERY` steps (`stream`: every step) without stalling the device: the answer as of step t - 1
is copied to the host behind step t - 1 and read once step t is queued (`DoneProbe`); the output is then
trimmed to the length transformers would have stopped at, so the tokens are the same.

One deliberate difference: the repetition penalty counts only real prompt tokens, while transformers also
penalises the pad ids of left-padded rows; so each row of a padded batch gets what it would get alone.

`generate` and `stream` share one loop (`_token_loop`); `_make_advance` is the single place where the
per-token step is built (eager `loop.advance(session, sampler)`, or the captured CudaGraphLoop).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastsolar.decoding.graphs import CudaGraphLoop
from fastsolar.decoding.loop import DecodeLoop, DoneProbe
from fastsolar.decoding.sampling import PerRow, Sampler, check_sampling_args, row_seeds
from fastsolar.decoding.session import DecodeSession
from fastsolar.model import check_token_ids

CHECK_EVERY = 16  # decode steps between host checks for "every row has finished"


@dataclass
class _Request:
    """A validated generate call (host-side facts only; nothing computed on the device yet)."""

    input_ids: torch.Tensor  # [b, L] int64 on the model's device, as given (left padded)
    attention_mask: torch.Tensor | None
    lengths: list[int]  # real tokens per row
    max_new_tokens: int
    sampling: dict[str, Any]
    seeds: list[int]  # one per row (sampling.row_seeds)
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
    seed: int | Sequence[int] | None,
    cuda_graphs: bool | None,
    min_new_tokens: int = 0,
    pad_token_id: int | None = None,
    presence_penalty: PerRow = 0.0,
    frequency_penalty: PerRow = 0.0,
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
                        min_new_tokens=min_new_tokens, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty)

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
    check_token_ids(real, config.vocab_size)

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
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty),
        seeds=row_seeds(seed, b), eos=eos, pad=pad, cuda_graphs=bool(cuda_graphs), min_new_tokens=min_new_tokens,
    )


def _session_for(model: Any, req: _Request, session: DecodeSession | None) -> DecodeSession:
    """The caller's session, checked to fit the call, or a new one sized to it."""
    b, need = req.input_ids.shape[0], max(req.lengths) + req.max_new_tokens
    if session is None:
        return DecodeSession(model, b, need)
    if not isinstance(session, DecodeSession) or session.model is not model:
        raise ValueError("session must be a DecodeSession of this model")
    if not session.fits(b, need):
        raise ValueError(f"this call needs a session of at least {b} rows x {need} positions on {model.device} in "
                         f"{model.dtype}; the given one has {session.max_batch} x {session.max_seq} on "
                         f"{session.device} in {session.cache.k.dtype}")
    return session


def _make_advance(session: DecodeSession, sampler: Sampler, loop: DecodeLoop, cuda_graphs: bool) -> Callable[[], None]:
    """One whole step on the loop's buffers: `loop.advance(session, sampler)`, eager or captured in a graph."""
    if cuda_graphs:
        return CudaGraphLoop(session, sampler, loop)
    return lambda: loop.advance(session, sampler)


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
def _token_loop(session: DecodeSession, req: _Request, check_every: int, out: list) -> Iterator[int]:
    """Run the decode loop on rows 0..b-1 of `session` (claimed until the loop ends), yielding the index t of
    each step once its tokens are queued into the loop's history (finished rows padded). Stops after
    max_new_tokens steps or at the first check (every `check_every` steps) that finds every row finished;
    appends the DecodeLoop to `out` first."""
    b = req.input_ids.shape[0]
    n_new = req.max_new_tokens
    rows = session.claim(range(b))
    try:
        right, valid, lens = _right_pad(req)
        sampler = session.sampler(b)
        sampler.reset(**req.sampling, seed=req.seeds, prompt_ids=right, prompt_mask=valid,
                      min_new_tokens=req.min_new_tokens, eos_token_ids=req.eos)
        loop = session.loop(b, len(req.eos))
        loop.start(lens, req.eos, req.pad, n_new)
        out.append(loop)
        loop.record(sampler(session.prefill(right, lens)))
        advance = _make_advance(session, sampler, loop, req.cuda_graphs) if n_new > 1 else None
        probe = DoneProbe(loop) if req.eos else None
        yield 0
        for t in range(1, n_new):
            check = probe is not None and t % check_every == 0
            if check:
                probe.post(t - 1)
            advance()
            if check and probe.all_done():
                return  # every row finished by step t - 1 (step t ran in vain and is dropped)
            yield t
    finally:
        session.release(rows)


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
    seed: int | Sequence[int] | None = None,
    cuda_graphs: bool | None = None,
    min_new_tokens: int = 0,
    pad_token_id: int | None = None,
    session: DecodeSession | None = None,
    presence_penalty: PerRow = 0.0,
    frequency_penalty: PerRow = 0.0,
) -> torch.Tensor:
    """The prompt (as given, left padding kept) followed by the new tokens: `[b, L + n]` int64 on the
    model's device, n <= max_new_tokens (shorter when every row reached an EOS, like transformers).

    temperature 0 is greedy (argmax); otherwise sample after repetition_penalty, temperature, top_k and
    top_p, in transformers' order (OpenAI's `presence_penalty` / `frequency_penalty`, in [-2, 2] and over the
    tokens generated so far, right after repetition_penalty, as fastsolar.decoding.penalties defines); `seed`
    makes sampling reproducible: row i draws with seed + i (a list
    gives each row its own), exactly as a served request with that seed does, whatever else is in the batch. eos_token_id defaults to the config's;
    no EOS is chosen among the first `min_new_tokens` tokens; finished rows are filled with `pad_token_id`
    (default: the config's pad id, else the first EOS id). `session`: the DecodeSession to decode in (its
    cache, sampler and graphs are reused by the next call on it); by default one made for this call.
    """
    req = _validate(
        model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, attention_mask=attention_mask,
        seed=seed, cuda_graphs=cuda_graphs, min_new_tokens=min_new_tokens, pad_token_id=pad_token_id,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )
    out: list[DecodeLoop] = []
    steps = sum(1 for _ in _token_loop(_session_for(model, req, session), req, CHECK_EVERY, out))
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
    options = _with_defaults(kwargs)
    session = options.pop("session")
    req = _validate(model, input_ids, max_new_tokens, **options)
    return _stream(_session_for(model, req, session), req)


def _stream(session: DecodeSession, req: _Request) -> Iterator[torch.Tensor]:
    out: list[DecodeLoop] = []
    for t in _token_loop(session, req, 1, out):
        # A copy: the loop's history is reused by the next call, the caller's tensors must not change.
        with torch.inference_mode():
            yield out[0].history[:, t].clone()


#: generate's keyword options with their defaults, read from its signature: the one definition that `stream`
#: and transformers' translation (fastsolar.hf.compat) take too.
OPTIONS: dict[str, Any] = {name: p.default for name, p in inspect.signature(generate).parameters.items()
                           if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**OPTIONS, **kwargs}
