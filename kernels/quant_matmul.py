"""Weight-only quantised matmul for prefill: int8 or float8_e4m3fn weights, one fp32 scale per output channel.

Math, for x [M, K] (fp16, bf16 or fp32), q [N, K] (int8 or float8_e4m3fn) and scale [N] (fp32):

    y[m, n] = sum_k x[m, k] * (scale[n] * q[n, k])  =  scale[n] * sum_k x[m, k] * q[n, k]

The scale is constant along k, so it leaves the sum: each program converts its weight tile to x's dtype
in registers (exact: every int8 value and every e4m3 value is representable in fp16 and in bf16), feeds
it to `tl.dot` with fp32 accumulation, and multiplies by the scale once in the epilogue. Weights are read
from memory as one byte each and never widened in memory: cuBLAS would need a bf16 copy of the weight
written and read again first (3 extra bytes per weight), which for a short prefill costs more than the
product. Decode (1..8 rows) takes kernels/gemv.py instead, which fuses the block's neighbours too.

The reference is gemv_ref(x, q, scale=scale) (dequantise to x's dtype, then matmul; any number of rows).
The result differs from it only by rounding: the reference rounds scale * q to x's dtype before the
product, the kernel never does.

Grid: one program per [BLOCK_M, BLOCK_N] output tile, 1-D, in groups of GROUP_M row-blocks so that
programs running together share weight tiles in L2 (Triton's matmul tutorial ordering). Rows past M and
columns past N are wrapped onto valid ones for the loads (no masks in the k loop) and masked on the
store; only a K that is not a multiple of BLOCK_K masks the loads (EVEN_K=False). Row offsets are int64:
a long prefill's activations (tokens x 14336) or its logits (tokens x 32000) pass 2**31 elements.

fp8 needs compute capability 8.9+ (the e4m3 conversions); fastsolar.quant refuses it on older cards.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import as_rows, check_grid_dim, check_same_device, check_tensor
from ._rounding import cast_rtne
from .attention import _mma

WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # *T [M, K] activations, row stride stride_xm, unit column stride
    w_ptr,  # *int8 / *fp8e4nv [N, K] quantised weights, row stride stride_wn, unit column stride
    s_ptr,  # *fp32 [N] per-output-channel scales
    y_ptr,  # *T [M, N] output, row stride stride_ym
    M, N, K,  # problem size
    stride_xm, stride_wn, stride_ym,  # row strides (elements)
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_N: tl.constexpr,  # output columns (weight rows) per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-blocks per L2 group
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the k loop
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0.. again instead of being masked in every k step; the store masks them.
    rows_x = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Dequantise in registers: the scale waits for the epilogue, so this conversion is exact.
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs).to(x.dtype)
        else:
            in_k = offs_k[None, :] < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
            # Zeroed after the conversion: `other` cannot be an fp8 constant, and a masked-off lane
            # left as garbage could be an e4m3 NaN, which 0 * NaN would carry into the sum.
            w = tl.where(in_k, tl.load(w_ptrs, mask=in_k).to(x.dtype), 0.0)
        acc = _mma(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask_n = offs_n < N
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_rtne(y, y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


def quant_matmul_launch_config(m: int, k: int, x_dtype: torch.dtype) -> dict[str, int]:
    """Tiles and launch options for `_quant_matmul_kernel` (pure; the compile check builds exactly these).

    m rows of x, reduction length k. The same tiles serve both weight formats, sm_80 and sm_90.
    Returns {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "num_warps", "num_stages"}.
    """
    if x_dtype == torch.float32:
        # Exact (IEEE) fp32 products on CUDA cores hold whole operand tiles in registers: small tiles.
        # A testing/debug path, not tuned for speed.
        bm, bn, bk, warps, stages = 32, 32, 32, 4, 2
    elif m <= 16:
        # Short prefills (decode's 1..8 rows take kernels/gemv.py): still bound by the weight bytes.
        # 32-row weight tiles give N / 32 programs (128 for N = 4096: about one per SM of an H100) and
        # 256-wide k steps keep 8 KiB of weights per stage in flight; tl.dot's minimum M of 16 pads the rows.
        bm, bn, bk, warps, stages = 16, 32, 256, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 3
    else:
        # Prefill: compute-bound tiles; x 16 KiB + w 8 KiB per stage, 4 stages fit sm_80's shared memory.
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": k % bk == 0,
            "num_warps": warps, "num_stages": stages}


def quant_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (scale[:, None] * weight).T for x [..., K] (fp16/bf16/fp32, last dim contiguous), weight [N, K]
    (int8 or float8_e4m3fn, contiguous rows), scale [N] (fp32); returns [..., N] in x's dtype (or `out`)."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES)
    check_tensor("scale", scale, ndim=1, dtypes=(torch.float32,))
    n, k = weight.shape
    if tuple(scale.shape) != (n,):
        raise ValueError(f"scale must have shape [{n}] (one per output channel of weight {tuple(weight.shape)}), "
                         f"got {tuple(scale.shape)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have last dimension {k} (weight's in_features), got shape {tuple(x.shape)}")
    check_same_device(x=x, weight=weight, scale=scale)
    if weight.stride(1) != 1 and k > 1:
        raise ValueError(f"weight must have a contiguous last dimension, got strides {weight.stride()}")
    if not scale.is_contiguous():
        raise ValueError("scale must be contiguous")
    lead = tuple(x.shape[:-1])
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,))
        check_same_device(x=x, out=out)
        if tuple(out.shape) != (*lead, n):
            raise ValueError(f"out must have shape {(*lead, n)}, got {tuple(out.shape)}")
    m = math.prod(lead)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    x2 = as_rows("x", x, k, writable=False)
    y2 = as_rows("out", out, n, writable=True)
    cfg = quant_matmul_launch_config(m, k, x.dtype)
    programs = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    check_grid_dim("output tiles", programs, axis=0)
    _quant_matmul_kernel[(programs,)](
        x2, weight, scale, y2, m, n, k,
        x2.stride(0), weight.stride(0), y2.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=cfg["EVEN_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


__all__ = ["quant_matmul", "quant_matmul_launch_config"]
