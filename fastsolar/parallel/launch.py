"""Start N tensor-parallel ranks from one process (as vLLM does), and end them all when one fails.

`launch(fn, args, nprocs=N)` spawns N fresh processes (torch.multiprocessing, "spawn": no forked CUDA state), gives
each the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT),
joins the process group (fastsolar.parallel.group.init_from_env) and runs `fn(*args)` on every rank. The launcher
is the watchdog: when a rank exits nonzero (an exception, a kill, a crash) the others are terminated at once and
`RankFailed` names the rank and how it ended; a rank that hangs makes the others' collectives time out after
`timeout` seconds (the process group's timeout), so they fail and the same happens. Nothing waits forever.
`ranks_beside` is the same with the launching process as rank 0 (the command line: rank 0 keeps the terminal).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from fastsolar.parallel.group import DEFAULT_TIMEOUT, init_from_env


_PR_SET_PDEATHSIG = 1


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


def _join_group(rank: int, nprocs: int, port: int, timeout: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():  # N ranks share the CPU cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    init_from_env(timeout)


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple, nprocs: int, port: int, timeout: float) -> None:
    _join_group(rank, nprocs, port, timeout)
    try:
        code = fn(*args)
    finally:
        dist.destroy_process_group()
    if code:  # a command's exit status
        sys.exit(code)


def _follower_main(index: int, *args: Any) -> None:
    """Rank index + 1 beside a rank 0 that is the launching process: Ctrl-C is for rank 0 (which then releases
    the others), and the rank dies with its parent instead of waiting out the timeout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux only
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _rank_main(index + 1, *args)


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


@contextlib.contextmanager
def ranks_beside(fn: Callable[..., Any], args: tuple = (), *, nprocs: int, timeout: float = DEFAULT_TIMEOUT,
                 grace: float = 5.0) -> Iterator[None]:
    """This process becomes rank 0 of `nprocs` (keeping its terminal: stdin, stdout, signals) while ranks
    1..nprocs-1 are spawned and run `fn(*args)`. A watchdog thread ends the run when a spawned rank fails: the
    other ranks are killed and, unless this process finishes within `grace` seconds on its own (its collectives
    fail too), it exits with status 1 after a message naming the rank. On leaving, the spawned ranks get `timeout`
    seconds to finish before they are killed."""
    port = _free_port()
    ctx = mp.start_processes(_follower_main, args=(fn, args, nprocs, port, timeout), nprocs=nprocs - 1, join=False,
                             start_method="spawn")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            failed = [(i + 1, p.exitcode) for i, p in enumerate(ctx.processes) if p.exitcode not in (None, 0)]
            if failed:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                if done.wait(grace):
                    return
                rank, code = failed[0]
                print(f"fastsolar: error: tensor-parallel rank {rank} of {nprocs} {_fate(code)}; ending all ranks",
                      file=sys.stderr, flush=True)
                os._exit(1)

    watchdog = threading.Thread(target=watch, name="tp-watchdog", daemon=True)
    wait = 0.0  # after a failure of rank 0 the others are ended at once: they would wait in a collective
    try:
        _join_group(0, nprocs, port, timeout)
        watchdog.start()
        yield
        wait = timeout
    finally:
        done.set()
        end = time.monotonic() + wait
        for p in ctx.processes:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()
