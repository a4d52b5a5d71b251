"""Input checks shared by the kernel launchers, so every op reports bad input the same way."""
from __future__ import annotations

import functools
import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_DIM0 = 2**31 - 1  # CUDA's limit on gridDim.x
MAX_GRID_DIM12 = 65535  # CUDA's limit on gridDim.y and gridDim.z


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor a kernel can take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name} is on {t.device}; Triton kernels need a CUDA tensor "
            "(or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)"
        )
    return t


def check_scalar(name: str, value: object, *, positive: bool = False) -> float:
    """`value` as a float; TypeError/ValueError naming `name` unless it is a finite Python int/float
    (> 0 with `positive`). Tensors, even 0-d ones, are refused: reading one would sync with the device
    and break CUDA-graph capture."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python int or float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and not value > 0.0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


def check_grid_dim(what: str, value: int, axis: int) -> None:
    """ValueError unless `value` programs fit grid axis `axis` (CUDA: 2**31 - 1 on axis 0, 65535 on
    axes 1 and 2; the interpreter has no such limit, so the check is made everywhere)."""
    limit = MAX_GRID_DIM0 if axis == 0 else MAX_GRID_DIM12
    if value > limit:
        raise ValueError(f"{what} = {value} exceeds the CUDA grid limit of {limit} on grid axis {axis}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError when the named tensors live on different devices."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must share one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless `t`'s last dim has stride 1 (row-strided views are fine)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_row_map(rows: object, batch: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """A launcher's row map (`rows=`: batch row i reads/writes row rows[i] of a larger `what`, the KV cache of
    a serving engine) after the checks every such launcher makes: an int32/int64 [batch] tensor on `like`'s
    device. Returned with unit stride (one scalar load per program). Its values are not checked: that would
    sync with the device; the kernels clamp or mask them."""
    rows = check_tensor("rows", rows, ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(**{"rows": rows, what: like})
    if rows.shape[0] != batch:
        raise ValueError(f"rows must have shape [{batch}] (one {what} row per batch row), got {tuple(rows.shape)}")
    return rows.contiguous() if rows.stride(0) != 1 and batch > 1 else rows


def output_like(ref: torch.Tensor, out: torch.Tensor | None, name: str = "out") -> torch.Tensor:
    """A fresh output shaped like `ref`, or the caller's `out` after checking it can receive one."""
    if out is None:
        return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
    check_tensor(name, out, ndim=ref.dim(), dtypes=(ref.dtype,))
    check_same_device(**{"input": ref, name: out})
    if out.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    check_last_dim_contiguous(name, out)
    return out


def as_rows(name: str, t: torch.Tensor, n: int, *, writable: bool) -> torch.Tensor:
    """View `t` as [rows, n] with unit column stride (row-strided views such as a slice of a fused
    projection stay views). An input that cannot be viewed so is copied once; an output must be."""
    try:
        t2 = t.view(-1, n)
    except RuntimeError:
        t2 = None
    if t2 is None or (t2.stride(-1) != 1 and t2.numel() > 0):
        if writable:
            raise ValueError(f"{name} must be viewable as [rows, {n}] with a contiguous last dim, got strides {t.stride()}")
        t2 = t.contiguous().view(-1, n)  # a gather per element would cost more than this one copy
    return t2


# H100 SXM: what launch configs assume where no CUDA device is at hand (interpreter, compile checks).
DEFAULT_CAPABILITY = (9, 0)
DEFAULT_NUM_SMS = 132


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_properties(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of `device`; the H100's on a CPU (interpreter)."""
    if device.type != "cuda":
        return DEFAULT_CAPABILITY, DEFAULT_NUM_SMS
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
