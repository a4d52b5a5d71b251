"""The one seam between the model and the kernels.

Every op the model needs goes through this module. On CUDA tensors it runs the Triton kernels; elsewhere
it runs their torch references (`*_ref`, written beside each kernel), so the same model runs on a CPU.
`force_kernels(True)` (or `FASTSOLAR_KERNELS=1`) sends CPU tensors to the kernels as well, which is how
the test suite runs the whole kernel path of a tiny model under the Triton interpreter;
`force_kernels(False)` keeps a CUDA model on the torch references (the benchmark's reference engine).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastsolar import kernels as K

_forced: bool | None = {"1": True, "0": False}.get(os.environ.get("FASTSOLAR_KERNELS", ""))


@contextlib.contextmanager
def force_kernels(enabled: bool | None) -> Iterator[None]:
    """Within the block, use the kernels always (True), never (False) or on CUDA only (None)."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernel rather than the torch reference."""
    return t.is_cuda if _forced is None else _forced


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (K.rms_norm if use_kernels(x) else K.rms_norm_ref)(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (K.add_rms_norm if use_kernels(x) else K.add_rms_norm_ref)(x, residual, weight, eps)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (K.apply_rotary if use_kernels(q) else K.apply_rotary_ref)(q, k, positions, theta)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (K.swiglu if use_kernels(gate) else K.swiglu_ref)(gate, up)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    return (K.attention if use_kernels(q) else K.attention_ref)(q, k, v, causal=causal, scale=scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    fn = K.decode_attention if use_kernels(q) else K.decode_attention_ref
    return fn(q, k_cache, v_cache, seqlens, rows=rows)


def linear(x: torch.Tensor, weight: torch.Tensor, *, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T. With `scale`, weight is quantised (int8 or float8_e4m3fn [N, K], fastsolar.quant) and
    scale its fp32 per-output-channel scale [N]: the weight-only quantised matmul kernel, or its reference
    (dequantise to x's dtype, then matmul) off the kernel path."""
    if scale is None:
        return F.linear(x, weight)
    return (K.quant_matmul if use_kernels(x) else K.quant_matmul_ref)(x, weight, scale)
