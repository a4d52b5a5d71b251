"""OpenAI's presence and frequency penalties on next-token logits, per row, graph-safe.

For each row, with count[j] the number of times token j was generated so far in that row (the prompt does
not count) -- OpenAI's definition (platform.openai.com, "Parameter details"), which vLLM follows too:

    logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

Both penalties lie in [-2, 2]; 0 disables them. The counts are a device tensor [rows, vocab] that the
sampler (fastsolar.decoding.sampling.Sampler) updates inside its step, so no host sync is needed.
"""
from __future__ import annotations

import torch

LIMIT = 2.0  # OpenAI's bound on both penalties: each lies in [-LIMIT, LIMIT]


def apply_count_penalties(
    scores: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """`scores` [b, V] float32 minus each row's frequency penalty per count and presence penalty per token
    seen (`counts` [b, V] float32, `frequency` / `presence` [b]); -inf scores stay -inf. A new tensor."""
    return scores - counts * frequency[:, None] - (counts > 0).to(scores.dtype) * presence[:, None]
