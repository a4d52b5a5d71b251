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

Packed int4 weights (kernels/_int4.py: int32 [N, K / 8], group scales and uint8 zeros [N, G]) take the same
loop with W_INT4: the scale varies along k, so it cannot wait for the epilogue; each weight tile is unpacked and
dequantised in registers, (q - z) * s in fp32, rounded once to x's dtype (the reference's dequantised values)
and fed to `tl.dot`. BLOCK_K then divides the group size (kernels/_int4.int4_block_k), so a tile needs one
scale and one zero per row.

fp8 needs compute capability 8.9+ (the e4m3 conversions); fastsolar.quant refuses it on older cards.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import as_rows, check_grid_dim, check_same_device, check_tensor
from ._int4 import _int4_tile, check_int4, int4_block_k
from ._rounding import cast_rtne
from .attention import _mma

WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
INT4_WEIGHT = torch.int32  # packed int4 (kernels/_int4.py)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # *T [M, K] activations, row stride stride_xm, unit column stride
    w_ptr,  # *int8 / *fp8e4nv [N, K] quantised weights, row stride stride_wn, unit column stride
    s_ptr,  # *fp32 [N] per-output-channel scales, or int4's group scales [N, G] (row stride stride_sn)
    z_ptr,  # *uint8 [N, G] int4 zero points (W_INT4 only)
    y_ptr,  # *T [M, N] output, row stride stride_ym
    M, N, K,  # problem size
    stride_xm, stride_wn, stride_ym,  # row strides (elements; int32 words for int4's W)
    stride_sn,  # int4: row stride of the scales and zeros
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_N: tl.constexpr,  # output columns (weight rows) per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-blocks per L2 group
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the k loop
    W_INT4: tl.constexpr,  # packed int4 weights with group scales and zeros
    GROUP_SIZE: tl.constexpr,  # int4's group size (unused otherwise)
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
    w_rows = w_ptr + rows_w[:, None] * stride_wn
    s_rows = rows_w * stride_sn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Dequantise in registers; an 8-bit weight's scale waits for the epilogue, so its conversion is exact.
        if W_INT4:
            if EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            # Columns past K read q = 0: finite, against x's zeros there.
            w = _int4_tile(w_rows, s_ptr + s_rows, z_ptr + s_rows, rows_w >= 0, k * BLOCK_K, K,
                           BLOCK_N, BLOCK_K, GROUP_SIZE).to(x.dtype)
        elif EVEN_K:
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
    if W_INT4:
        y = acc
    else:
        y = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_rtne(y, y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


def quant_matmul_launch_config(m: int, k: int, x_dtype: torch.dtype, group_size: int | None = None) -> dict[str, int]:
    """Tiles and launch options for `_quant_matmul_kernel` (pure; the compile check builds exactly these).

    m rows of x, reduction length k. The same tiles serve every weight format, sm_80 and sm_90; a packed int4
    weight (group_size given) takes a BLOCK_K within one group.
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
    if group_size is not None:
        # Unpacking nibbles into the dot's layout costs registers: k steps of 64 (32 beside prefill's 128 x 128
        # accumulator); wider ones spill.
        bk = int4_block_k(min(bk, 32 if bm * bn > 64 * 64 else 64), k, group_size)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": k % bk == 0,
            "num_warps": warps, "num_stages": stages}


def quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """x @ (scale[:, None] * weight).T for x [..., K] (fp16/bf16/fp32, last dim contiguous), weight [N, K]
    (int8 or float8_e4m3fn, contiguous rows), scale [N] (fp32); returns [..., N] in x's dtype (or `out`).
    Or x @ W.T for a packed int4 W: weight int32 [N, K / 8], scale [N, G], zeros [N, G], group_size
    (kernels/_int4.py)."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2, dtypes=WEIGHT_DTYPES + (INT4_WEIGHT,))
    int4 = weight.dtype == INT4_WEIGHT
    if int4:
        if zeros is None or group_size is None:
            raise ValueError("a packed int4 weight (int32) needs its group scale, zeros and group_size")
        n, k = check_int4(weight, scale, zeros, group_size)
    elif zeros is not None or group_size is not None:
        raise ValueError(f"zeros and group_size belong to packed int4 weights (int32), not {weight.dtype}")
    else:
        check_tensor("scale", scale, ndim=1, dtypes=(torch.float32,))
        n, k = weight.shape
    if not int4 and tuple(scale.shape) != (n,):
        raise ValueError(f"scale must have shape [{n}] (one per output channel of weight {tuple(weight.shape)}), "
                         f"got {tuple(scale.shape)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have last dimension {k} (weight's in_features), got shape {tuple(x.shape)}")
    check_same_device(x=x, weight=weight, scale=scale, **({"zeros": zeros} if int4 else {}))
    if weight.stride(1) != 1 and k > 1:
        raise ValueError(f"weight must have a contiguous last dimension, got strides {weight.stride()}")
    if not int4 and not scale.is_contiguous():
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
    cfg = quant_matmul_launch_config(m, k, x.dtype, group_size if int4 else None)
    programs = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    check_grid_dim("output tiles", programs, axis=0)
    _quant_matmul_kernel[(programs,)](
        x2, weight, scale, zeros if int4 else scale, y2, m, n, k,
        x2.stride(0), weight.stride(0), y2.stride(0), scale.stride(0) if int4 else 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=cfg["EVEN_K"], W_INT4=int4, GROUP_SIZE=group_size if int4 else 1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


__all__ = ["quant_matmul", "quant_matmul_launch_config"]
