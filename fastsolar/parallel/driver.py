"""Rank 0 drives, the other ranks follow: how a server (or a chat) runs on a tensor-parallel group.

Only rank 0 has the requests (an HTTP front, a terminal): `drive(model)` makes every pass its model starts
(`forward`, `prefill`, `decode`; fastsolar.model.sharding.Shard.starting) first broadcast its inputs to the
other ranks, where `follow(model)` runs the same pass on their slices, so the collectives inside meet. Each
rank keeps a KV cache for each of rank 0's caches (same rows, same positions, its own KV heads). Sampling,
tokenizing and streaming stay on rank 0: the followers' logits are dropped. `release(tp)` ends the followers.

Driven passes run eagerly: the broadcast is a host-side exchange, which a CUDA graph cannot hold (a server
started with --tensor-parallel-size runs without CUDA graphs; `generate` needs no driving: every rank runs it).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist

from fastsolar.model import KVCache
from fastsolar.parallel.group import TensorParallel

logger = logging.getLogger(__name__)

#: Followers' caches kept for rank 0's most recent caches (a server has one; each generate call makes one).
MAX_CACHES = 4
_STOP = "stop"


def _send(tp: TensorParallel, message: Any) -> Any:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]


class _Sender:
    """What rank 0's shard calls at the start of each pass while driving: broadcast the pass and its inputs."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def __call__(self, op: str, cache: KVCache | None, tensors: dict[str, torch.Tensor | None]) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a driven tensor-parallel model runs eagerly: pass cuda_graphs=False")
        shape = None if cache is None else (id(cache), cache.max_batch, cache.max_seq)
        _send(self.tp, (op, shape, {k: None if v is None else v.cpu() for k, v in tensors.items()}))


def drive(model: Any) -> None:
    """From now on, every pass of rank 0's `model` is mirrored on the followers (module docstring)."""
    tp = model.shard
    if not isinstance(tp, TensorParallel) or tp.rank != 0:
        raise ValueError(f"only rank 0 of a tensor-parallel model drives; this model's shard is {tp!r}")
    tp.driver = _Sender(tp)


def release(tp: TensorParallel) -> None:
    """Rank 0: end the followers' loops (after the last driven pass)."""
    _send(tp, (_STOP, None, {}))


def follow(model: Any) -> None:
    """Ranks 1..N-1: run each pass rank 0 drives on this rank's slice until rank 0 releases them."""
    tp: TensorParallel = model.shard
    caches: OrderedDict[int, KVCache] = OrderedDict()
    while True:
        op, shape, tensors = _send(tp, None)
        if op == _STOP:
            return
        args = {k: None if v is None else v.to(model.device) for k, v in tensors.items()}
        if shape is not None:
            key, max_batch, max_seq = shape
            cache = caches.get(key)
            if cache is None or (cache.max_batch, cache.max_seq) != (max_batch, max_seq):
                cache = KVCache.allocate(model.config, max_batch, max_seq, model.device, model.dtype,
                                         kv_heads=model.kv_heads)
            caches[key] = cache
            caches.move_to_end(key)
            while len(caches) > MAX_CACHES:
                caches.popitem(last=False)
            args["cache"] = cache
        with torch.inference_mode():
            getattr(model, op)(**args)
