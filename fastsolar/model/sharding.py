"""Which slice of the model one process holds, and the two collectives that join the slices (tensor parallelism).

Megatron-style: q/k/v and gate/up are split by output rows (whole query and KV heads per rank), o and down by
input columns, each followed by one all-reduce of the partial hidden states; the embedding and the lm_head are
split over the vocabulary (rows of `vocab_rows` each, the last rank's padded with zeros), the embedding joined by
an all-reduce of the masked lookups and the lm_head by an all-gather of the logits. `Shard` is the whole model in
one process (no communication: every model runs through the same code); fastsolar.parallel gives the model a
subclass whose collectives run over a torch.distributed process group. The model only asks these sizes and
calls these methods; it never imports torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastsolar.config import SolarConfig


@dataclass(frozen=True)
class ShardSizes:
    """The per-rank sizes of a model split `world_size` ways."""

    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int  # rows of the embedding and lm_head per rank (ceil(vocab_size / world_size))

    @classmethod
    def of(cls, config: SolarConfig, world_size: int) -> ShardSizes:
        """ValueError naming the degree and the size it does not divide (KV heads first: whole heads per rank)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {world_size!r}")
        for name, value in (("num_key_value_heads", config.num_key_value_heads),
                            ("num_attention_heads", config.num_attention_heads),
                            ("intermediate_size", config.intermediate_size)):
            if value % world_size:
                raise ValueError(f"tensor_parallel_size {world_size} does not divide the model's {name} {value}: "
                                 f"each rank must hold whole heads and equal slices")
        return cls(
            n_heads=config.num_attention_heads // world_size,
            n_kv_heads=config.num_key_value_heads // world_size,
            intermediate=config.intermediate_size // world_size,
            vocab=-(-config.vocab_size // world_size),
        )


class Shard:
    """The whole model in one process: rank 0 of 1, and collectives that do nothing."""

    rank: int = 0
    world_size: int = 1

    def starting(self, op: str, cache: Any, **tensors: torch.Tensor | None) -> None:
        """Called as each pass (`forward`, `prefill`, `decode`) starts, after its inputs were checked: where rank 0
        of a driven group tells the other ranks to run the same pass (fastsolar.parallel.driver)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks (in place)."""
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dimension, in rank order."""
        return x

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of `ids` from this rank's rows of the table (rows rank * n .. rank * n + n - 1), summed
        over the ranks: each id is found on exactly one rank, the others contribute zeros."""
        if self.world_size == 1:
            return torch.nn.functional.embedding(ids, weight)
        n = weight.shape[0]
        local = ids - self.rank * n
        inside = (local >= 0) & (local < n)
        h = torch.nn.functional.embedding(local.clamp(0, n - 1), weight)
        return self.all_reduce(h.masked_fill_(~inside[..., None], 0))

    def logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The full logits from every rank's slice of the vocabulary (the padding of the last slice cut off)."""
        if self.world_size == 1:
            return local
        return self.all_gather(local)[..., :vocab_size].contiguous()
