"""How many bytes a model needs on a device, how many are free there, and the refusal when it does not fit.

The loader and `KVCache.allocate` ask before they allocate anything, so a checkpoint that cannot fit is refused with the sizes
instead of being OOM-killed (host) or hitting a CUDA out-of-memory error halfway through the load.

- `weight_bytes(shapes, dtype, tensor_bytes=None)`: the bytes of the parameters in `dtype`, or what a
  per-tensor `tensor_bytes(name, shape)` says (a quantised size: int8/fp8 weights plus their scales).
- `free_memory(device)`: CUDA: `torch.cuda.mem_get_info` plus the blocks this process's caching allocator
  holds unused; CPU: psutil's available memory when psutil is installed, else `MemAvailable` from
  /proc/meminfo, lowered to a container's cgroup limit when one is set.
- `check_fits(...)` raises InsufficientMemoryError (a MemoryError) naming the sizes and what to do: the one
  memory check, for a checkpoint's weights (the loader) and for a KV cache (`model.KVCache.allocate`).
- `advise_huge_pages(t)`: fresh host memory for the weights faulted in 2 MiB at a time (Linux THP advice).
"""
from __future__ import annotations

import ctypes
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

#: `tensor_bytes(name, shape)`: the bytes one parameter takes on the device, or None for `numel * itemsize`.
TensorBytes = Callable[[str, tuple[int, ...]], "int | None"]

logger = logging.getLogger(__name__)


class InsufficientMemoryError(MemoryError):
    """The model does not fit in the memory free on the target device (raised before anything is allocated)."""


def weight_bytes(
    shapes: Mapping[str, Sequence[int]], dtype: torch.dtype, tensor_bytes: TensorBytes | None = None
) -> int:
    """Bytes of the parameters `shapes` (name -> shape, tied parameters listed once) on the device in `dtype`.

    `tensor_bytes(name, shape)` gives a parameter's size where it is not `numel * dtype.itemsize` (returns None
    for the default), e.g. for int8 weights `numel + 4 * rows` (one float32 scale per output row).
    """
    total = 0
    for name, shape in shapes.items():
        shape = tuple(shape)
        size = tensor_bytes(name, shape) if tensor_bytes is not None else None
        total += math.prod(shape) * dtype.itemsize if size is None else size
    return total


def format_bytes(n: int) -> str:
    """`"14.48 GB"`, or `"612.35 MB"` below a tenth of a GB (decimal units, as disks and tqdm count)."""
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def margin_bytes(weights: int) -> int:
    """Room kept beside the weights: allocator rounding, the loader's staging buffers, a first forward pass."""
    return 2**29 + weights // 20


HUGE_PAGE = 2 * 2**20  # x86-64 and arm64 transparent huge pages
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the untouched host memory of `t` with transparent huge pages (madvise
    MADV_HUGEPAGE over the 2 MiB-aligned pages inside it), before anything is written there.

    Faulting fresh memory in 4 KiB pages is what bounds a CPU load on a VM: measured on the 2-core dev VM,
    a first write ran at 0.54 GB/s, 3.8 GB/s with this advice (the kernel's THP setting there is "madvise",
    the common default). Only an advice: False (and nothing changed) off Linux, for CUDA tensors, tensors
    smaller than a huge page, or when the kernel refuses.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0


def _cgroup_available() -> int | None:
    """What a memory-limited container (cgroup v2 or v1) has left, counting reclaimable file pages as free."""
    root = Path("/sys/fs/cgroup")
    for limit, usage, stat, inactive in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                          "memory/memory.stat", "total_inactive_file")):
        try:
            raw = (root / limit).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:  # no limit
                return None
            used = int((root / usage).read_text())
            stats = dict(line.split() for line in (root / stat).read_text().splitlines() if line.count(" ") == 1)
            return max(0, int(raw) - used + int(stats.get(inactive, 0)))
        except (OSError, ValueError):
            continue
    return None


def host_available() -> int | None:
    """Bytes of host memory a process can still allocate without swapping; None where the OS does not say."""
    try:
        import psutil
    except ImportError:
        available = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    else:
        available = int(psutil.virtual_memory().available)
    limited = _cgroup_available()
    if limited is not None:
        available = limited if available is None else min(available, limited)
    return available


def free_memory(device: torch.device) -> tuple[int, str] | None:
    """`(bytes free for new tensors on device, where that number comes from)`, or None where it cannot be asked."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        available = host_available()
        return None if available is None else (available, "available host memory")
    return None


def check_fits(
    what: str,
    device: torch.device,
    dtype: torch.dtype,
    nbytes: int,
    *,
    smaller: dict[str, int] | None = None,
    advice: str | None = None,
) -> None:
    """Raise InsufficientMemoryError unless `nbytes` (plus margin_bytes) fit in free_memory(device).

    `what` names what is allocated (a checkpoint's weights, a KV cache) and `dtype` its dtype; `advice` says
    what to do instead (default: a checkpoint's, with `smaller` mapping other dtypes to its size in them).
    Checks nothing (and logs so) where the free memory cannot be asked.
    """
    free = free_memory(device)
    if free is None:
        logger.info("cannot tell how much memory is free on %s; allocating %s without checking", device, what)
        return
    available, source = free
    need = nbytes + margin_bytes(nbytes)
    if need <= available:
        return
    if advice is None:
        sizes = [f"as {name} its weights take {format_bytes(size)}" for name, size in (smaller or {}).items()
                 if size < nbytes]
        where = "a GPU with more free memory" if device.type == "cuda" else "a machine with more memory"
        advice = ("Load it in a smaller dtype" + (f" ({'; '.join(sizes)})" if sizes else "")
                  + f", quantise it, free memory this process holds, or use {where}.")
    raise InsufficientMemoryError(
        f"{what} does not fit on {device}: it takes {format_bytes(nbytes)} as "
        f"{str(dtype).replace('torch.', '')} ({format_bytes(need)} with a {format_bytes(need - nbytes)} margin), "
        f"but only {format_bytes(available)} is free ({source}). {advice}"
    )


__all__ = ["InsufficientMemoryError", "TensorBytes", "check_fits", "format_bytes", "free_memory", "host_available",
           "margin_bytes", "weight_bytes"]
