"""Autoregressive generation with the same results as transformers' `generate`.

Left-padded prompts (with `attention_mask`) are turned into right-padded ones so that every row's real
tokens sit at positions 0..len-1 of the static KV cache; after one prefill, each step decodes one token
per row at per-row device positions (incremented in place) and picks the next tokens on the device.
Finished rows (after an EOS) get pad tokens, as in transformers. Whether every row has finished is only
checked every `CHECK_EVERY` steps (a host sync); the output is then trimmed to the length transformers
would have stopped at, so the tokens are the same.

One deliberate difference: the repetition penalty counts only real prompt tokens, while transformers also
penalises the pad ids of left-padded rows; so each row of a padded batch gets what it would get alone.

`generate` and `stream` share one loop (`_token_loop`); `_make_step` is the single place where the decode
step is built (eager here; fastsolar/graphs.py's CUDA-graph step plugs in there).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastsolar.sampling import PerRow, Sampler, check_sampling_args

CHECK_EVERY = 16  # decode steps between host checks for "every row has finished"
CACHE_ROUND = 256  # cache lengths are rounded up to a multiple of this so later calls can reuse the cache

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# One Sampler per (model, batch size): its buffers persist so captured graphs that read them stay valid.
_samplers: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Sampler]]" = weakref.WeakKeyDictionary()


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


def _make_step(model: Any, sampler: Sampler, batch: int, cuda_graphs: bool) -> Step:
    """The decode step `step(tokens [b], positions [b]) -> next_tokens [b]` = sampler(model.decode(...))."""
    if cuda_graphs:
        from fastsolar.graphs import CudaGraphStep

        return CudaGraphStep(model, sampler)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return sampler(model.decode(tokens, positions))

    return step


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
def _token_loop(model: Any, req: _Request, check_every: int, done_at: list) -> Iterator[torch.Tensor]:
    """Yield each step's tokens `[b]` (finished rows padded). Stops after max_new_tokens steps or at the
    first check (every `check_every` steps) that finds every row finished. Appends the per-row step at
    which each row finished (a device tensor, max_new_tokens when never) to `done_at` when done."""
    b = req.input_ids.shape[0]
    n_new = req.max_new_tokens
    right, valid, lens = _right_pad(req)
    cache_len = min(-(-(right.shape[1] + n_new) // CACHE_ROUND) * CACHE_ROUND, model.config.max_position_embeddings)
    model.setup_cache(b, cache_len)
    sampler = _get_sampler(model, b)
    sampler.reset(**req.sampling, seed=req.seed, prompt_ids=right, prompt_mask=valid,
                  min_new_tokens=req.min_new_tokens, eos_token_ids=req.eos)
    step = _make_step(model, sampler, b, req.cuda_graphs)

    device = right.device
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    finished_at = torch.full((b,), n_new, dtype=torch.int64, device=device)
    eos = torch.tensor(req.eos, dtype=torch.int64, device=device) if req.eos else None
    pad = torch.tensor(req.pad, dtype=torch.int64, device=device)
    positions = lens.clone()
    try:
        tokens = sampler(model.prefill(right, lens))
        for t in range(n_new):
            if t > 0:
                tokens = step(tokens, positions)
                positions += 1
            if eos is not None:
                tokens = torch.where(finished, pad, tokens)
                newly = torch.isin(tokens, eos) & ~finished
                finished_at.masked_fill_(newly, t)
                finished |= newly
            yield tokens
            if eos is not None and t + 1 < n_new and (t + 1) % check_every == 0 and bool(finished.all()):
                break
    finally:
        done_at.append(finished_at)


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
    done_at: list[torch.Tensor] = []
    steps = list(_token_loop(model, req, CHECK_EVERY, done_at))
    with torch.inference_mode():
        new = torch.stack(steps, dim=1)
        # transformers stops right after the step at which the last row finished.
        n = min(len(steps), int(done_at[0].max()) + 1)
        return torch.cat([req.input_ids, new[:, :n]], dim=1)


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
    return _token_loop(model, req, 1, [])


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, eos_token_id=None,
                   attention_mask=None, seed=None, cuda_graphs=None, min_new_tokens=0, pad_token_id=None)
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    allowed.update(kwargs)
    return allowed
