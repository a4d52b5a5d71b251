"""Tensor parallelism: one model split over N processes (Megatron-style, fastsolar.model.sharding), on a
torch.distributed process group (NCCL on CUDA, gloo on the CPU).

- `group.py`: the process group from the environment, the model's collectives on it, the start-up agreement check.
- `plan.py`: how each parameter is split (plain data), and which slice of each checkpoint tensor a rank reads.
- `load.py`: a rank's slices read from the safetensors shards, and nothing else.
- `launch.py`: N ranks started from one command (spawn), with a watchdog that ends them all when one fails.
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch

from fastsolar.config import SolarConfig
from fastsolar.model.sharding import ShardSizes
from fastsolar.parallel.group import TensorParallel, check_same, init_from_env, rank_device
from fastsolar.parallel.load import SliceReader, load_sharded

M = TypeVar("M", bound=torch.nn.Module)


def load_parallel(
    cls: type[M],
    model_dir: str | Path,
    tensor_parallel_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    reader: SliceReader | None = None,
    fingerprint: str = "",
) -> M:
    """This process's rank of `cls` split `tensor_parallel_size` ways, inside an initialised process group of that
    size (`Solar.from_pretrained(..., tensor_parallel_size=N)`). A degree the model's heads or MLP cannot be split
    by is refused first, naming both numbers; `device` defaults to the rank's GPU (NCCL) or the CPU (gloo)."""
    ShardSizes.of(SolarConfig.from_pretrained(model_dir), tensor_parallel_size)
    tp = TensorParallel()
    if tp.world_size != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} does not match the process group's "
                         f"{tp.world_size} ranks")
    device = rank_device(tp) if device is None else torch.device(device)
    return load_sharded(cls, model_dir, tp, device=device, dtype=dtype, quantize=quantize, reader=reader,
                        fingerprint=fingerprint)


__all__ = ["SliceReader", "TensorParallel", "check_same", "init_from_env", "load_parallel", "load_sharded",
           "rank_device"]
