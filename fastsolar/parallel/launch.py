"""Start N tensor-parallel ranks from one process (as vLLM does), and end them all when one fails.

`launch(fn, args, nprocs=N)` spawns N fresh processes (torch.multiprocessing, "spawn": no forked CUDA state), gives
each the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT),
joins the process group (fastsolar.parallel.group.init_from_env) and runs `fn(*args)` on every rank. The launcher
is the watchdog: when a rank exits nonzero (an exception, a kill, a crash) the others are terminated at once and
`RankFailed` names the rank and how it ended; a rank that hangs makes the others' collectives time out after
`timeout` seconds (the process group's timeout), so they fail and the same happens. Nothing waits forever.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from fastsolar.parallel.group import DEFAULT_TIMEOUT, init_from_env


class RankFailed(RuntimeError):
    """One rank of a launched group failed; the others were ended."""


def _fate(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple, nprocs: int, port: int, timeout: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():  # N ranks share the CPU cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    init_from_env(timeout)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], args: tuple = (), *, nprocs: int, timeout: float = DEFAULT_TIMEOUT,
           deadline: float | None = None) -> None:
    """Run `fn(*args)` on `nprocs` spawned ranks of one process group (`fn` must be importable: a module-level
    function). Raises RankFailed (naming the rank and its exception or exit signal) as soon as one rank fails,
    after ending the others; `deadline` (seconds) bounds the whole run (TimeoutError, every rank ended)."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {nprocs!r}")
    ctx = mp.start_processes(_rank_main, args=(fn, args, nprocs, _free_port(), timeout), nprocs=nprocs, join=False,
                             start_method="spawn")
    end = None if deadline is None else time.monotonic() + deadline
    try:
        while not ctx.join(timeout=0.2):
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"the {nprocs} tensor-parallel ranks did not finish within {deadline:g} s")
    except ProcessException as e:  # join has ended the other ranks (SIGTERM); name every rank that failed itself
        failed = [f"rank {i} {_fate(p.exitcode)}" for i, p in enumerate(ctx.processes)
                  if p.exitcode not in (0, -signal.SIGTERM)]
        raise RankFailed(f"tensor-parallel ranks failed ({'; '.join(failed)}); the other ranks of {nprocs} were "
                         f"ended:\n{e}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
