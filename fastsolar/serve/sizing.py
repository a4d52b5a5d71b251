"""How many KV-cache rows (concurrent requests) fit a memory budget: `fastsolar serve --gpu-memory-utilization`.

As vLLM's flag: the fraction of the device's *total* memory this server may use for the weights, the KV cache
and the activations together. The cache gets what remains of `fraction * total` after the weights (every
parameter and buffer, as stored: quantised weights count at their size) and an activation reserve
(`memory.margin_bytes(weights)`: what a prefill and the allocator's rounding take beside them); each cache row
holds `max_seq` positions of keys and values in every layer.

Total memory: on CUDA the device's (`torch.cuda.mem_get_info`); on CPU the host's physical memory, lowered to
the container's cgroup limit where one is set -- so on CPU the flag is "this fraction of the machine's RAM".
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsolar import memory


def total_memory(device: torch.device) -> int:
    """The device's total memory in bytes (CPU: physical memory, or the cgroup limit if lower)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        raise ValueError(f"--gpu-memory-utilization cannot size a cache on {device.type}: its memory is unknown")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("memory.max", "memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            raw = (Path("/sys/fs/cgroup") / limit).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def row_bytes(model: torch.nn.Module, max_seq: int) -> int:
    """Bytes of one KV-cache row of `max_seq` positions (keys and values, every layer, the model's dtype) as
    this process holds it: a tensor-parallel rank's KV heads only (`model.kv_heads`), as DecodeSession allocates."""
    c = model.config
    return 2 * c.num_hidden_layers * max_seq * model.kv_heads * c.head_dim * model.dtype.itemsize


def rows_that_fit(model: torch.nn.Module, fraction: float, max_seq: int, total: int | None = None) -> int:
    """Cache rows of `max_seq` positions that fit `fraction` of `total` bytes (default: the model's device's)
    beside the weights and the activation reserve; ValueError naming the sizes when not even one fits."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {fraction}")
    total = total_memory(model.device) if total is None else total
    weights = model_bytes(model)
    budget = int(fraction * total) - weights - memory.margin_bytes(weights)
    row = row_bytes(model, max_seq)
    if budget < row:
        raise ValueError(
            f"--gpu-memory-utilization {fraction} of {memory.format_bytes(total)} leaves "
            f"{memory.format_bytes(max(budget, 0))} for the KV cache after the weights "
            f"({memory.format_bytes(weights)}) and the activation reserve "
            f"({memory.format_bytes(memory.margin_bytes(weights))}), but one row of {max_seq} positions takes "
            f"{memory.format_bytes(row)}: raise the fraction or lower --max-model-len")
    return budget // row
