"""Log-probabilities of the chosen token and the most likely ones, on the device, graph-safe.

Which distribution: the model's own, `log_softmax(logits)` in float32 over the raw logits of the step --
before any repetition / presence / frequency penalty, temperature, top-k or top-p. That is OpenAI's
definition (a token's logprob does not change with the request's sampling parameters) and vLLM's default
("raw" logprobs). The chosen token's logprob is therefore that of the token actually drawn, even where the
penalties or the warpers made another token the most likely under the sampling distribution.

The top-k is a fixed `MAX_TOP_LOGPROBS` wide (a static shape for a captured graph); each request's own k
(0-20) is applied on the host when the response is formatted.
"""
from __future__ import annotations

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs bound; the device always computes this many (or the vocabulary)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob of `tokens` [b], the k largest logprobs [b, k] in descending order, their token ids [b, k])
    under `log_softmax(logits [b, V])` in float32."""
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, tokens[:, None])[:, 0], top.values, top.indices
