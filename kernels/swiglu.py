"""SwiGLU activation of the Llama MLP: out = silu(gate) * up, elementwise.

    silu(g) = g * sigmoid(g) = g / (1 + exp(-g))

Computed in fp32 and rounded once to the input dtype (torch rounds silu(gate) to the input dtype
before the multiply, so in fp16/bf16 the kernel is slightly more accurate than the reference).

Flat 1-D grid, BLOCK elements per program, int64 element indices (an MLP activation of a long
prefill, tokens x 14336, passes 2**31 elements at ~150K tokens). Contiguous tensors are walked
flat; tensors whose rows are strided but whose last dim is contiguous (gate and up as the two
halves of a fused gate_up projection) are addressed as row * row_stride + col instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_rows, check_same_device, check_tensor, output_like
from ._rounding import cast_rtne


@triton.jit
def _swiglu_kernel(
    gate_ptr,  # *T, gate values
    up_ptr,  # *T, up values
    out_ptr,  # *T, silu(gate) * up
    n_elements,  # total elements
    n_cols,  # row length (only used when ROWS)
    stride_g,  # elements between rows of gate (only used when ROWS)
    stride_u,  # elements between rows of up (only used when ROWS)
    stride_o,  # elements between rows of out (only used when ROWS)
    BLOCK: tl.constexpr,  # elements per program
    ROWS: tl.constexpr,  # some tensor has strided rows: address by (row, col) instead of flat index
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n_elements
    if ROWS:
        row = idx // n_cols
        col = idx % n_cols
        g_off = row * stride_g + col
        u_off = row * stride_u + col
        o_off = row * stride_o + col
    else:
        g_off = idx
        u_off = idx
        o_off = idx
    g = tl.load(gate_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + u_off, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + o_off, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


def swiglu_launch_config() -> dict[str, int]:
    """Block size and warps for swiglu (pure; used by the compile check). The same for every size:
    the grid, cdiv(n_elements, BLOCK) on axis 0, is what grows with the input."""
    # 1024 elements over 4 warps = 8 per thread: one 16-byte vector per tensor in fp16/bf16,
    # two in fp32. Decode-size inputs (one token x 14336) still give 14 programs.
    return {"BLOCK": 1024, "num_warps": 4, "num_stages": 1}


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors of any shape; returns a new tensor (or `out`)."""
    check_tensor("gate", gate)
    check_tensor("up", up)
    if up.dtype != gate.dtype:
        raise TypeError(f"up has dtype {up.dtype} but gate has {gate.dtype}; they must match")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_device(gate=gate, up=up)
    out = output_like(gate, out)
    n_elements = gate.numel()
    if n_elements == 0:
        return out
    n = gate.shape[-1] if gate.dim() > 0 else 1
    g2 = as_rows("gate", gate, n, writable=False)
    u2 = as_rows("up", up, n, writable=False)
    o2 = as_rows("out", out, n, writable=True)
    rows = any(t.shape[0] > 1 and t.stride(0) != n for t in (g2, u2, o2))
    cfg = swiglu_launch_config()
    grid = (triton.cdiv(n_elements, cfg["BLOCK"]),)
    _swiglu_kernel[grid](
        g2, u2, o2, n_elements, n,
        g2.stride(0), u2.stride(0), o2.stride(0),
        BLOCK=cfg["BLOCK"], ROWS=rows,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference, as LlamaMLP computes it: F.silu(gate) * up at the input dtype."""
    return torch.nn.functional.silu(gate) * up


__all__ = ["swiglu", "swiglu_ref", "swiglu_launch_config"]
