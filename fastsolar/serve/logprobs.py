"""Token logprobs from the engine, in OpenAI's two response shapes.

The values come from the sampler's step on the device (fastsolar.decoding.logprobs: the model's raw
distribution, log_softmax of the logits before penalties, temperature, top-k and top-p); the engine hands
each generated token's logprob and its top 20 to the API as `TokenLogprob`s, and the request's own k is
applied here.

- chat (`logprobs: true`, `top_logprobs: 0-20`): `choices[i].logprobs = {"content": [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}, ...]}, ...]}`;
- completions (`logprobs: 0-5`, OpenAI's legacy API): `choices[i].logprobs = {tokens, token_logprobs,
  top_logprobs: [{token: logprob}, ...], text_offset}`, each top dict holding the k most likely tokens plus
  the sampled one (so up to k + 1 entries, as OpenAI documents); `text_offset` is each token's character
  offset in the completion's text (0 at its first token; the prompt is not echoed).

Every generated token whose text belongs to the reply is listed (so an EOS that ends a choice is not).
A token's string is its bytes decoded as UTF-8, with a byte that is only part of a character written as
`\\xNN` (the `bytes` field always holds the exact bytes). A logprob of -inf (a token with a -inf logit) is
sent as -9999.0, as OpenAI does, since JSON has no infinity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IMPOSSIBLE = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and the most likely tokens of its step (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else IMPOSSIBLE


class Formatter:
    """Formats TokenLogprobs for one request: `k` top entries per token, strings cached per token id."""

    def __init__(self, tokenizer: Any, k: int) -> None:
        self.tokenizer = tokenizer
        self.k = k
        self._strings: dict[int, tuple[str, list[int]]] = {}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._strings.get(token_id)
        if hit is None:
            raw = self.tokenizer.token_bytes(token_id)  # the bytes it adds to a text (TokenizerBase)
            hit = self._strings[token_id] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return hit

    def chat(self, items: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat `logprobs` object for these tokens."""
        content = []
        for item in items:
            text, raw = self._token(item.token)
            top = []
            for tid, lp in item.top[: self.k]:
                t, b = self._token(tid)
                top.append({"token": t, "logprob": _value(lp), "bytes": b})
            content.append({"token": text, "logprob": _value(item.logprob), "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def completion(
        self, items: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int
    ) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy completions `logprobs` object for these tokens, the first at character `offset`
        of the completion; also the offset after the last one."""
        tokens, values, tops, offsets = [], [], [], []
        for item in items:
            text, _ = self._token(item.token)
            top = {self._token(tid)[0]: _value(lp) for tid, lp in item.top[: self.k]}
            top.setdefault(text, _value(item.logprob))
            tokens.append(text)
            values.append(_value(item.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset
