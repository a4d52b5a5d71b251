"""How many threads torch's CPU ops get in a server: the HTTP loop needs a core of its own.

The engine thread runs the model; uvicorn's event loop (parsing requests, streaming chunks) runs on the main
thread. On a CPU, torch's intra-op pool defaults to one thread per core, so a step's threads and the event loop
fight over every core: on a 2-core machine 8 streamed clients got 93 tokens/s with 2 threads and 161-192 with
one. So on a CPU the server leaves one core to the event loop (cores - 1 threads, at least 1) unless told
otherwise: an explicit count (`fastsolar serve --cpu-threads N`) wins, then `OMP_NUM_THREADS` (which torch
reads itself). On CUDA the device does the work; torch's default is kept unless a count is given.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as taskset / cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def server_threads(device: torch.device, requested: int | None = None) -> int:
    """Set and return torch's intra-op thread count for a server on `device` (module docstring)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--cpu-threads must be an integer >= 1, got {requested!r}")
        torch.set_num_threads(requested)
        why = "as asked"
    elif os.environ.get("OMP_NUM_THREADS") or device.type != "cpu":
        why = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "torch's default"
    else:
        torch.set_num_threads(max(1, available_cores() - 1))
        why = f"{available_cores()} cores, one left to the HTTP loop"
    n = torch.get_num_threads()
    logger.info("torch intra-op threads: %d (%s)", n, why)
    return n
