"""Count the device kernels a piece of code launches, the way a CUDA trace would, without a GPU.

Two sources of launches are counted:
* Triton kernels: every `kernel[grid](...)` goes through `run` of triton's JITFunction (compiled) or
  InterpretedFunction (TRITON_INTERPRET=1); both are wrapped for the duration.
* aten ops, seen by a TorchDispatchMode: every op counts as one kernel except those that only make a
  view, read metadata or allocate (an empty tensor launches nothing). Ops that torch runs inside a
  Triton launch (the interpreter copying arguments) are not counted: on a GPU they do not exist.

`count_launches(fn)` returns (fn's result, Counter of kernel names) so a failing budget can say what ran.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no kernel on CUDA: views, metadata, allocation.
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "slice", "select", "split", "split_with_sizes",
    "unsqueeze", "squeeze", "chunk", "t", "transpose", "permute", "as_strided", "alias", "detach", "unbind", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "view_as",
    "diagonal", "narrow", "unfold", "movedim", "expand_as",
}


class _Counter(TorchDispatchMode):
    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        # An out-of-place op that hands back its input (`.to` the same dtype, `.contiguous()` of a
        # contiguous tensor) did nothing; in-place ops (trailing underscore) return their input too.
        noop = not name.endswith("_") and args and out is args[0]
        if not self.inside_triton and name not in _NO_KERNEL and not noop:
            self.counts[f"aten.{name}"] += 1
        return out


@contextlib.contextmanager
def _wrap_triton(mode: _Counter):
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    originals = []
    for cls in (jit.JITFunction, interp.InterpretedFunction):
        run = cls.run

        def counted(self, *args, __run=run, **kwargs):
            if not kwargs.get("warmup", False):
                mode.counts[f"triton.{self.fn.__name__}"] += 1
            mode.inside_triton += 1
            try:
                return __run(self, *args, **kwargs)
            finally:
                mode.inside_triton -= 1

        originals.append((cls, run))
        cls.run = counted
    try:
        yield
    finally:
        for cls, run in originals:
            cls.run = run


def count_launches(fn: Callable[[], Any]) -> tuple[Any, collections.Counter]:
    """Run fn() and count the kernels it launches (module docstring)."""
    counts: collections.Counter = collections.Counter()
    mode = _Counter(counts)
    with _wrap_triton(mode), mode:
        result = fn()
    return result, counts
