"""bench/run.py's `fastsolar-tp` row: fastsolar's generate on N tensor-parallel ranks (one GPU each; gloo on a CPU).

The benchmark's process becomes rank 0 (fastsolar.parallel.launch.ranks_beside) and spawns ranks 1..N-1. Every
rank holds its slice of the same weights as the other engines: the checkpoint's (--model, each rank reading only
its slices) or bench/engines.random_solar's random ones, drawn in the same order on every rank and sliced
(fastsolar.parallel.plan.shard_of), so the row's tokens are matched like any engine's. For each `gen` call rank 0
broadcasts (ids, n) and every rank runs the same greedy generate, with CUDA graphs on CUDA (the collectives
inside them), over a session kept across calls; rank 0's timing is the row's.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from engines import Engine, decode_weight_bytes


def _shard(config: Any, dtype: torch.dtype, seed: int, model_dir: Any, tp: Any, device: torch.device) -> Any:
    """This rank's slice of the benchmark's model: loaded from `model_dir`, else random_solar's weights."""
    from fastsolar import Solar
    from fastsolar.parallel import load_parallel, plan

    if model_dir is not None:
        return load_parallel(Solar, model_dir, tp.world_size, device=device, dtype=dtype)
    with torch.device("meta"):
        full = Solar(config)
        model = Solar(config, tp).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in full.named_parameters():  # random_solar's order and draws, each kept in part
            if p.dim() == 1:
                params[name].fill_(1.0)
                continue
            whole = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)
            params[name].copy_(plan.shard_of(name, whole, config, tp.rank, tp.world_size))
    return model.eval().requires_grad_(False)


class _Generate:
    """Greedy generate over one session kept across calls (FastsolarEngine's, on every rank alike)."""

    def __init__(self, model: Any) -> None:
        self.model, self.session = model, None
        self.graphs = model.device.type == "cuda"

    def __call__(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        from fastsolar.decoding.generate import generate
        from fastsolar.decoding.session import DecodeSession

        b, need = ids.shape[0], ids.shape[1] + n
        if self.session is None or not self.session.fits(b, need):
            self.session = None
            self.session = DecodeSession(self.model, b, need)
        ids = ids.to(self.model.device)
        return generate(self.model, ids, n, temperature=0.0, eos_token_id=[], cuda_graphs=self.graphs,
                        session=self.session)[:, ids.shape[1]:]


def _exchange(message: Any = None) -> Any:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(config: Any, dtype: torch.dtype, seed: int, model_dir: Any) -> None:
    """Ranks 1..N-1: run each `gen` rank 0 broadcasts until it says stop."""
    from fastsolar.parallel import TensorParallel, rank_device

    tp = TensorParallel()
    run = _Generate(_shard(config, dtype, seed, model_dir, tp, rank_device(tp)))
    while (message := _exchange()) is not None:
        run(*message)


class TensorParallelEngine(Engine):
    def __init__(self, bench: Any, name: str, n: int) -> None:
        from fastsolar.parallel import TensorParallel, rank_device
        from fastsolar.parallel.launch import ranks_beside

        super().__init__()
        self.name = name
        args = bench.args
        self._ranks = contextlib.ExitStack()
        self._ranks.enter_context(ranks_beside(follow, (bench.config, args.dtype, args.seed, args.model), nprocs=n))
        tp = TensorParallel()
        device = rank_device(tp) if bench.device.type == "cuda" else bench.device
        self.run = _Generate(_shard(bench.config, args.dtype, args.seed, args.model, tp, device))
        self.weight_bytes = decode_weight_bytes(self.run.model)
        self.notes.append(f"{n} ranks ({dist.get_backend()}): weights GB and GB/s are one rank's "
                          f"({self.weight_bytes / 1e9:.3g} GB read per step per rank)")

    def gen(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        _exchange((ids.cpu(), n))
        return self.run(ids, n)

    def close(self) -> None:
        try:
            _exchange(None)
        finally:
            self.run = None
            self._ranks.close()
