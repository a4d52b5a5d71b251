"""RMSNorm, alone and fused with the residual add that precedes it in every Llama block.

For a row x of n elements, weight w and epsilon eps (LlamaRMSNorm):

    rstd = 1 / sqrt(mean_i(x_i^2) + eps)          computed in fp32
    y_i  = w_i * round_to_x_dtype(x_i * rstd)

The inner rounding to x's dtype before the weight multiply is what transformers does, so the
kernel keeps it: the result then matches the reference bit-for-bit far more often than a
single-rounding formula would. The fused variant first forms h = round_to_x_dtype(x + residual),
writes h (the new residual stream) and normalises it, so the row is read from memory once.

One program owns one whole row in registers (BLOCK = next_power_of_2(n)), which bounds n at
MAX_HIDDEN; SOLAR's 4096 needs BLOCK 4096 with 8 warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_rows, check_same_device, check_scalar, check_tensor, output_like
from ._rounding import cast_rtne

# The largest row one program holds in registers; beyond it register spills make a
# single-pass kernel pointless and a looped kernel would be needed instead.
MAX_HIDDEN = 65536

@triton.jit
def _rms_norm_kernel(
    x_ptr,  # *T, input rows; row r starts at x_ptr + r * stride_x, elements contiguous
    res_ptr,  # *T, residual rows (only read when HAS_RESIDUAL)
    w_ptr,  # *W, weight [n], contiguous
    y_ptr,  # *T, normalised output rows
    h_ptr,  # *T, x + residual output rows (only written when HAS_RESIDUAL)
    stride_x,  # elements between consecutive rows of x
    stride_res,  # elements between consecutive rows of residual
    stride_y,  # elements between consecutive rows of y
    stride_h,  # elements between consecutive rows of h
    n_cols,  # row length (hidden size)
    eps,  # fp32 epsilon added to the mean square
    BLOCK: tl.constexpr,  # power of two >= n_cols: the whole row lives in registers
    HAS_RESIDUAL: tl.constexpr,  # fuse h = x + residual before normalising
):
    # int64: rows * stride can pass 2**31 for long prefill batches
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the stream dtype first: torch adds in T, and the residual stream
        # the next layer sees is that rounded h, so the norm must use it too.
        x = cast_rtne(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # Masked lanes hold 0 and so add nothing; divide by the true n, not BLOCK.
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    rstd = tl.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Same double rounding as LlamaRMSNorm: normalise in fp32, round to T, then scale.
    normed = cast_rtne(xf * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    y = normed * w
    tl.store(y_ptr + row * stride_y + cols, cast_rtne(y, y_ptr.dtype.element_ty), mask=mask)


def rms_norm_launch_config(n_cols: int) -> dict[str, int]:
    """Block size and warp count for rows of `n_cols` elements (pure; used by the compile check).

    The one check of the hidden size: the launchers rely on it (ValueError outside [1, MAX_HIDDEN])."""
    if n_cols < 1 or n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: x's last dim (hidden size) must be in [1, {MAX_HIDDEN}], got {n_cols}")
    block = triton.next_power_of_2(n_cols)
    # About 8-16 fp32 values per thread: enough bytes in flight per thread for bandwidth,
    # few enough registers that the row never spills.
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    # No loop in the kernel, so there is nothing to software-pipeline.
    return {"BLOCK": block, "num_warps": num_warps, "num_stages": 1}


def _check_common(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[int, float, dict[str, int]]:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (the hidden dim), got a 0-d tensor")
    n = x.shape[-1]
    if weight.shape[0] != n:
        raise ValueError(f"weight has {weight.shape[0]} elements but x's last dim is {n}")
    cfg = rms_norm_launch_config(n)  # checks the hidden size
    eps = check_scalar("eps", eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return n, eps, cfg


def _launch(x2, r2, w, y2, h2, n: int, eps: float, has_residual: bool, cfg: dict[str, int]) -> None:
    rows = x2.shape[0]
    if rows == 0:
        return
    _rms_norm_kernel[(rows,)](
        x2, r2, w, y2, h2,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        n, eps,
        BLOCK=cfg["BLOCK"], HAS_RESIDUAL=has_residual,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """LlamaRMSNorm over the last dim of `x` (any leading shape); returns y in x's dtype.

    Rows may be strided (e.g. a slice of a wider tensor) as long as the last dim is contiguous;
    other layouts are copied once. `weight` may be any float dtype; it is read as fp32 and the
    product is rounded to x's dtype (torch would promote to weight's dtype if they differ).
    `out`, if given, receives y and must have x's shape and dtype.
    """
    n, eps, cfg = _check_common(x, weight, eps)
    check_same_device(x=x, weight=weight)
    x2 = as_rows("x", x, n, writable=False)
    w = weight.contiguous()  # n elements: the copy (if any) is negligible
    out = output_like(x, out)
    y2 = as_rows("out", out, n, writable=True)
    _launch(x2, x2, w, y2, y2, n, eps, False, cfg)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    out_h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: h = x + residual (in x's dtype), y = rms_norm(h); returns (y, h).

    `residual` must match x's shape and dtype. `out` / `out_h` optionally receive y / h; passing
    `out_h=residual` (or x) updates the residual stream in place, which is safe because each
    program reads its whole row before writing it.
    """
    n, eps, cfg = _check_common(x, weight, eps)
    check_tensor("residual", residual)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x=x, residual=residual, weight=weight)
    x2 = as_rows("x", x, n, writable=False)
    r2 = as_rows("residual", residual, n, writable=False)
    w = weight.contiguous()
    out = output_like(x, out)
    out_h = output_like(x, out_h, "out_h")
    y2 = as_rows("out", out, n, writable=True)
    h2 = as_rows("out_h", out_h, n, writable=True)
    _launch(x2, r2, w, y2, h2, n, eps, True, cfg)
    return out, out_h


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, verbatim for fp16/bf16/fp32.

    The math runs in fp32 as in transformers, except that fp64 input stays fp64 so the tests can
    use this same function as their high-precision reference.
    """
    input_dtype = x.dtype
    h = x.to(torch.promote_types(input_dtype, torch.float32))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference for add_rms_norm: the residual add in x's dtype, then LlamaRMSNorm."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


__all__ = ["rms_norm", "add_rms_norm", "rms_norm_ref", "add_rms_norm_ref", "rms_norm_launch_config"]
