"""How each parameter is split over the tensor-parallel ranks (plain data), and which checkpoint slice a rank reads.

`SPLITS` maps every parameter pattern of fastsolar.checkpoint.hf_keys' key map to its split:
- `ROWS`: output rows (q/k/v, gate/up): each part of a fused parameter split alike, so a rank holds whole query
  and KV heads and matching gate and up rows; its local parameter is its slices of the parts, in part order.
- `COLUMNS`: input columns (o, down): each rank's product is a partial sum, joined by one all-reduce.
- `VOCAB`: rows of the vocabulary (embedding, lm_head), `ShardSizes.vocab` per rank, the last rank's padded with
  zero rows (a padded logit is cut off after the gather, a padded embedding row is never looked up).
- `WHOLE`: every rank holds all of it (the RMSNorm weights: a few KB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastsolar.checkpoint import hf_keys
from fastsolar.model.sharding import ShardSizes

ROWS, COLUMNS, VOCAB, WHOLE = "rows", "columns", "vocab", "whole"

SPLITS: dict[str, str] = {
    "embed_tokens.weight": VOCAB,
    "layers.{i}.attention_norm": WHOLE,
    "layers.{i}.attention.wqkv.weight": ROWS,
    "layers.{i}.attention.wo.weight": COLUMNS,
    "layers.{i}.ffn_norm": WHOLE,
    "layers.{i}.feed_forward.w_gate_up.weight": ROWS,
    "layers.{i}.feed_forward.w_down.weight": COLUMNS,
    "norm": WHOLE,
    "lm_head.weight": VOCAB,
}


@dataclass(frozen=True)
class Slice:
    """What one rank reads of one checkpoint tensor (`rows`, and `cols` of each row, or all columns when None) and
    where it goes: rows `dest` of its local parameter."""

    rows: slice
    cols: slice | None
    dest: slice


def rank_slice(split: str, shape: tuple[int, ...], part_start: int | None, rank: int, world_size: int,
               vocab_rows: int) -> Slice:
    """The slice of a checkpoint tensor of `shape` that `rank` of `world_size` holds under `split`; `part_start`:
    the first row of the tensor inside its fused parameter (None: not fused); `vocab_rows`: ShardSizes.vocab."""
    if split == WHOLE:
        return Slice(slice(0, shape[0]), None, slice(0, shape[0]))
    if split == ROWS:
        n = shape[0] // world_size
        # Every part of a fused parameter shrinks by world_size, so its local start does too.
        start = (part_start or 0) // world_size
        return Slice(slice(rank * n, rank * n + n), None, slice(start, start + n))
    if split == COLUMNS:
        k = shape[1] // world_size
        return Slice(slice(0, shape[0]), slice(rank * k, rank * k + k), slice(0, shape[0]))
    if split == VOCAB:
        lo = min(rank * vocab_rows, shape[0])
        hi = min(lo + vocab_rows, shape[0])
        return Slice(slice(lo, hi), None, slice(0, hi - lo))
    raise ValueError(f"unknown split {split!r}; known: {ROWS}, {COLUMNS}, {VOCAB}, {WHOLE}")


def pattern_of(name: str) -> str:
    """A parameter's pattern in SPLITS: layers.3.ffn_norm -> layers.{i}.ffn_norm."""
    parts = name.split(".")
    return ".".join(hf_keys.LAYER if i == 1 and parts[0] == "layers" else p for i, p in enumerate(parts))


def shard_of(name: str, full: torch.Tensor, config: Any, rank: int, world_size: int) -> torch.Tensor:
    """`rank`'s local value of parameter `name` from its whole value `full` (each part of a fused parameter
    sliced alike; the vocabulary's padding rows zero): what the loader reads, for weights made in memory."""
    pattern = pattern_of(name)
    vocab_rows = ShardSizes.of(config, world_size).vocab
    parts = hf_keys.fused_parts(config).get(pattern, (full.shape[0],))
    pieces, start = [], 0
    for size in parts:
        part = full[start:start + size]
        s = rank_slice(SPLITS[pattern], tuple(part.shape), None, rank, world_size, vocab_rows)
        piece = part[s.rows] if s.cols is None else part[s.rows, s.cols]
        if SPLITS[pattern] == VOCAB:
            piece = torch.cat([piece, piece.new_zeros(vocab_rows - piece.shape[0], *piece.shape[1:])])
        pieces.append(piece)
        start += size
    return torch.cat(pieces)
