"""The process group a tensor-parallel model runs over, and the model's collectives on it.

NCCL on CUDA, gloo on the CPU (so the CPU tests run the same code). The ranks come from the environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), as `torchrun` and fastsolar.parallel.launch
set them. Every collective has the process group's timeout: a rank that dies or hangs makes the others raise
within it instead of waiting forever. `check_same` refuses ranks started differently (another checkpoint, other
arguments) before any weight is read: they would deadlock or compute garbage later.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fastsolar.model.sharding import Shard

logger = logging.getLogger(__name__)

#: Seconds a collective waits for the other ranks before raising (overridable with FASTSOLAR_TP_TIMEOUT).
DEFAULT_TIMEOUT = 300.0


class TensorParallel(Shard):
    """This process's rank of a process group, and the model's collectives over it (fastsolar.model.sharding)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs an initialised torch.distributed process group: start "
                               "the ranks with `torchrun` or fastsolar.parallel.launch, or call "
                               "fastsolar.parallel.init_from_env()")
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.driver: Callable[..., None] | None = None  # rank 0 of a driven group (fastsolar.parallel.driver)

    def starting(self, op: str, cache: Any, **tensors: torch.Tensor | None) -> None:
        if self.driver is not None:
            self.driver(op, cache, tensors)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """x's elementwise maximum over the ranks (in place)."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def __repr__(self) -> str:
        return f"TensorParallel(rank {self.rank} of {self.world_size}, {dist.get_backend(self.group)})"


def init_from_env(timeout: float | None = None) -> TensorParallel:
    """Join (or reuse) the default process group the environment describes: NCCL with this rank's GPU
    (`LOCAL_RANK`) when CUDA is there, else gloo; collectives time out after `timeout` seconds."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"no process group and no {', '.join(missing)} in the environment: start the ranks "
                               "with `torchrun --nproc-per-node N` or `--tensor-parallel-size N`")
        if timeout is None:
            timeout = float(os.environ.get("FASTSOLAR_TP_TIMEOUT", DEFAULT_TIMEOUT))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return TensorParallel()


def rank_device(tp: TensorParallel) -> torch.device:
    """The device a rank computes on: its own GPU under NCCL (`LOCAL_RANK`), else the CPU."""
    if dist.get_backend(tp.group) == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", tp.rank % torch.cuda.device_count())))
    return torch.device("cpu")


def check_same(tp: TensorParallel, what: str, fingerprint: str) -> None:
    """RuntimeError on every rank unless all ranks hold the same `fingerprint` (a description of `what` they were
    started with): names the ranks that differ from rank 0."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    digests: list[str | None] = [None] * tp.world_size
    dist.all_gather_object(digests, digest, group=tp.group)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise RuntimeError(f"tensor-parallel ranks disagree on {what}: rank(s) {odd} differ from rank 0 "
                           f"(hashes {digests}); start every rank with the same checkpoint and arguments")
