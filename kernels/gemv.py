"""Skinny matrix products for decode (M = 1..8 rows), with the Llama block's neighbours fused in.

For x [M, K] (M <= MAX_M), weight W [N, K] (nn.Linear's layout) and an optional per-output-channel scale:

    y[m, n] = scale[n] * sum_k a[m, k] * W[n, k]        (+ residual[m, n])

where the product's input a is one of (the *prologue*):

    plain    a = x
    norm     a = round(round(x * rstd[m]) * g)           rstd[m] = 1 / sqrt(mean_k x[m, k]^2 + eps)
             (LlamaRMSNorm with its rounding to x's dtype before and after the weight g: the same bits as
             rms_norm followed by a matmul; the sum of squares is a first pass over the row, which is tiny)
    swiglu   a = round(silu(x[m, k]) * x[m, K + k])     x holds [gate | up], 2K columns

and round() is to x's dtype. The residual add (the *epilogue*) happens in fp32 before the one rounding of
y to x's dtype. So one launch replaces norm + GEMV, SwiGLU + GEMV or GEMV + add.

Weights: fp16/bf16/fp32 (scale optional), or int8 / float8_e4m3fn with an fp32 scale [N] (weight-only
quantisation, y[n] = scale[n] * sum_k a[k] W[n, k]): the weight tile is widened in registers after the load,
so an 8-bit weight moves half the bytes of a bf16 one and the rest of the kernel is the same. Packed int4
(kernels/_int4.py: int32 [N, K / 8], group scales [N, G] and uint8 zeros [N, G]) is unpacked and dequantised
in the tile, W[n, k] = (q - z) * s of k's group, in fp32 (M == 1) or rounded once to x's dtype before the dot
(M >= 2: the bits the reference's dequantised weight has); a quarter of bf16's bytes plus the group data. GPUs before
sm_89 have no fp8 conversion (Triton refuses fp8e4nv there), so on them the e4m3 bytes are loaded as uint8
and decoded with integer ops (`_e4m3_to_f32`: sign, 4-bit exponent biased by 7, 3-bit mantissa,
subnormals m * 2^-9, 0x7f/0xff NaN), exact like the hardware conversion.

Two inner products, picked by M (a constexpr):
- M == 1: W tile [BLOCK_N, BLOCK_K] times the broadcast row of a, in fp32 on CUDA cores, reduced over the
  tile's K each step (no tensor-core padding, no shared memory, ~80 registers).
- M >= 2: tl.dot of a [16, BLOCK_K] (rows past M are zero) with W^T; decode is bound by reading W, so the
  wasted tensor-core rows cost nothing, and the pipelined dot loads keep several W tiles in flight.

Split-K: with few output blocks (N small next to the SM count) the K axis is cut into SPLIT_K slices, one
program each; each stores its fp32 partial [M, BLOCK_N] into a preallocated workspace and takes a ticket
(kernels/_workspace.py); the last of the SPLIT_K sums the partials in a fixed order (deterministic), applies
scale and residual and writes y. Still one launch, no allocation per call, graph-safe.

Grid: (cdiv(N, BLOCK_N), SPLIT_K). Offsets into W are int64 (N * K passes 2**31 for a 32000 x 65536 head).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DEFAULT_CAPABILITY,
    DEFAULT_NUM_SMS,
    as_rows,
    check_same_device,
    check_scalar,
    check_tensor,
    device_properties,
)
from ._rounding import cast_rtne
from ._int4 import _int4_tile, check_int4, dequantize_int4, int4_block_k
from ._workspace import arrive_last, workspace
from .attention import _mma

MAX_M = 8  # rows a launch takes: decode batch 1..8; more rows are a GEMM's job
FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)
QUANT_WEIGHTS = (torch.int8, torch.float8_e4m3fn)
INT4_WEIGHT = torch.int32  # packed int4 (kernels/_int4.py)
PROLOGUES = {"plain": 0, "norm": 1, "swiglu": 2}


@triton.jit
def _load_a(
    X, offs_m, offs_k, mask_m, mask_k, stride_xm, up_offset, rstd, NORM_W,
    PROLOGUE: tl.constexpr,  # 0 plain, 1 rmsnorm, 2 swiglu
):
    """The product's input tile a [BLOCK_M, BLOCK_K] in x's dtype (zeros where masked)."""
    mask = mask_m[:, None] & mask_k[None, :]
    ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if PROLOGUE == 1:
        g = tl.load(NORM_W + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        normed = cast_rtne(x.to(tl.float32) * rstd[:, None], X.dtype.element_ty).to(tl.float32)
        x = cast_rtne(normed * g[None, :], X.dtype.element_ty)
    elif PROLOGUE == 2:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + up_offset, mask=mask, other=0.0).to(tl.float32)
        x = cast_rtne(gate * tl.sigmoid(gate) * up, X.dtype.element_ty)
    return x


@triton.jit
def _e4m3_to_f32(bits):
    """float8_e4m3fn bytes (uint8) -> fp32 with integer ops only (module docstring)."""
    b = bits.to(tl.uint32)
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((b >> 7) << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # 2^-9: the subnormal step
    sub = tl.where((b >> 7) != 0, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    return tl.where((e == 15) & (m == 7), float("nan"), v)


@triton.jit
def _gemv_kernel(
    X,  # *T, x rows [M, K] (or [M, 2K] gate|up for SWIGLU), last dim contiguous
    W,  # *Tw, weight [N, K], contiguous rows (stride_wn), Tw float or int8/fp8
    SCALE,  # *fp32 [N] per-output-channel scale (only read when HAS_SCALE), or int4's group scales [N, G]
    ZEROS,  # *uint8 [N, G] int4 zero points (only read when W_INT4)
    NORM_W,  # *Tg [K] RMSNorm weight (only read when PROLOGUE == 1)
    RES,  # *T residual [M, N] (only read when HAS_RESIDUAL)
    Y,  # *T output [M, N]
    PART,  # *fp32 workspace [SPLIT_K, M, N] of partial sums (only used when SPLIT_K > 1)
    COUNTERS,  # *int32 [cdiv(N, BLOCK_N)], zero between launches (only used when SPLIT_K > 1)
    M, N, K,  # rows, output features, reduction length
    stride_xm, stride_wn, stride_rm, stride_ym,  # row strides (elements; int32 words for int4's W)
    stride_sn,  # int4: row stride of SCALE and ZEROS
    up_offset,  # SWIGLU: elements from a gate column to its up column (K for a fused gate|up row)
    eps,  # RMSNorm epsilon
    k_per_split,  # K columns per split, a multiple of BLOCK_K
    BLOCK_M: tl.constexpr,  # 1 (elementwise product) or 16 (tl.dot, rows past M masked)
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_K: tl.constexpr,  # reduction columns per step
    SPLIT_K: tl.constexpr,  # programs along K (grid dim 1)
    PROLOGUE: tl.constexpr,  # 0 plain, 1 rmsnorm, 2 swiglu
    HAS_SCALE: tl.constexpr,  # multiply by SCALE[n]
    HAS_RESIDUAL: tl.constexpr,  # add RES[m, n]
    W_E4M3_BITS: tl.constexpr,  # W holds float8_e4m3fn bytes as uint8: decode them in registers
    W_INT4: tl.constexpr,  # W holds packed int4 (kernels/_int4.py), SCALE/ZEROS its groups
    GROUP_SIZE: tl.constexpr,  # int4's group size (unused otherwise)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K)

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1:
        # The whole row's mean square first (x is M x K elements, read from L2 by every program).
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_kb
            xk = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                         mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xk * xk, 1)
        rstd = tl.rsqrt(ss / K + eps)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < k_end
        a = _load_a(X, offs_m, offs_k, mask_m, mask_k, stride_xm, up_offset, rstd, NORM_W, PROLOGUE)
        if W_INT4:
            s_rows = offs_n.to(tl.int64) * stride_sn
            w = _int4_tile(w_rows, SCALE + s_rows, ZEROS + s_rows, mask_n, k0, k_end, BLOCK_N, BLOCK_K, GROUP_SIZE)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if W_E4M3_BITS:
            w = _e4m3_to_f32(w)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * a.to(tl.float32), 1)[None, :]
        else:
            # 8-bit weights widen exactly to fp16/bf16 (int8 |v| <= 128, e4m3 has 3 mantissa bits); an int4
            # tile rounds here once, as the reference's dequantised weight does.
            acc = _mma(a, tl.trans(w.to(a.dtype)), acc)

    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        part = PART + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part + pid_k.to(tl.int64) * M * N, acc, mask=out_mask)
        is_last = arrive_last(COUNTERS + pid_n, SPLIT_K)
    else:
        is_last = True
    if is_last:
        if SPLIT_K > 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # a fixed order: the same bits on every run
                acc += tl.load(part + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_RESIDUAL:
            res = tl.load(RES + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
            acc = acc + res.to(tl.float32)
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 cast_rtne(acc, Y.dtype.element_ty), mask=out_mask)


def gemv_launch_config(
    m: int,
    n: int,
    k: int,
    w_dtype: torch.dtype,
    capability: tuple[int, int] = DEFAULT_CAPABILITY,
    num_sms: int = DEFAULT_NUM_SMS,
    group_size: int | None = None,
) -> dict:
    """Launch settings for `_gemv_kernel` from shapes only: the constexprs {"BLOCK_M", "BLOCK_N", "BLOCK_K",
    "SPLIT_K", "W_E4M3_BITS", "W_INT4"}, "num_warps"/"num_stages", and the runtime "k_per_split". ValueError outside
    1 <= m <= MAX_M. group_size: a packed int4 weight's (int32 w_dtype), whose tiles stay within one group."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} rows (decode batch sizes), got {m}; use a matmul for more")
    if n < 1 or k < 1:
        raise ValueError(f"gemv needs N >= 1 and K >= 1, got N={n}, K={k}")
    # int4 tiles are dequantised to fp32 / x's dtype in registers: size them as bf16 tiles.
    item = 2 if w_dtype == INT4_WEIGHT else torch.empty((), dtype=w_dtype).element_size()
    if m == 1:
        # 512 bytes of each weight row per step: a 16-byte load per thread per row over 32 lanes;
        # 32 rows x 256 bf16 = 16 KiB of W in flight per program, 64 fp32 accumulators per thread.
        block_m, block_n, block_k, warps, stages = 1, 32, 512 // item, 4, 2
    else:
        # a [16, BLOCK_K] x W^T [BLOCK_K, 64]: 16 KiB bf16 W tiles, 2 stages in shared memory (24 KiB a program,
        # so ~9 programs share an SM and hide the loads between them). 3 stages spilled (8 B, 3 LDL/STL) on
        # sm_90 with triton 3.6, the lent image's, in the fused-RMSNorm qkv product at 8 rows.
        block_m, block_n, block_k, warps, stages = 16, 64, 256 // item if item < 4 else 32, 4, 2
        if item == 4:
            block_n = 32  # fp32 (the test/debug dtype): exact products on CUDA cores, tiles stay small
        if w_dtype == INT4_WEIGHT:
            block_k = 64  # unpacking nibbles for the dot's layout costs registers: 128-wide tiles spill
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if w_dtype == INT4_WEIGHT:
        block_k = int4_block_k(block_k, k, group_size if group_size is not None else k)
    blocks_n = triton.cdiv(n, block_n)
    # Split K while there are fewer than ~4 programs per SM and each split keeps >= 4 steps of K.
    split = 1
    while blocks_n * split < 4 * num_sms and split < 16 and triton.cdiv(k, block_k * 2 * split) >= 4:
        split *= 2
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)  # drop slices rounding left empty
    e4m3_bits = w_dtype == torch.float8_e4m3fn and tuple(capability) < (8, 9)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "W_E4M3_BITS": e4m3_bits,
            "W_INT4": w_dtype == INT4_WEIGHT, "num_warps": warps, "num_stages": stages, "k_per_split": k_per_split}


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """y = prologue(x) @ weight.T (* scale) (+ residual) for 1..MAX_M rows, in one launch (module docstring).

    x [..., K] (fp16/bf16/fp32; rows may be strided, last dim contiguous), or [..., 2K] = [gate | up] with
    swiglu=True; the leading dims hold 1..MAX_M rows. weight [N, K]: fp16/bf16/fp32, or int8 /
    float8_e4m3fn together with scale fp32 [N] (weight-only quantisation), or packed int4 int32 [N, K / 8]
    with its group scale [N, G], zeros [N, G] and group_size (kernels/_int4.py). norm_weight [K]: RMS-normalise
    x first (eps a Python float). residual [..., N] in x's dtype. Returns y [..., N] in x's dtype (into
    `out` when given).
    """
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_WEIGHTS + QUANT_WEIGHTS + (INT4_WEIGHT,))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-d tensor")
    int4 = weight.dtype == INT4_WEIGHT
    if int4:
        if scale is None or zeros is None or group_size is None:
            raise ValueError("a packed int4 weight (int32) needs its group scale, zeros and group_size")
        n, k = check_int4(weight, scale, zeros, group_size)
    elif zeros is not None or group_size is not None:
        raise ValueError(f"zeros and group_size belong to packed int4 weights (int32), not {weight.dtype}")
    else:
        n, k = weight.shape
    kx = 2 * k if swiglu else k
    if x.shape[-1] != kx:
        what = "2 * K (gate | up)" if swiglu else "K"
        raise ValueError(f"x's last dim must be {what} = {kx} for weight {tuple(weight.shape)}, got {x.shape[-1]}")
    if swiglu and norm_weight is not None:
        raise ValueError("gemv fuses either an RMSNorm or a SwiGLU prologue, not both")
    m = x.numel() // kx
    cfg = gemv_launch_config(m, n, k, weight.dtype, *device_properties(x.device),  # checks 1 <= m <= MAX_M
                             group_size=group_size)
    if weight.dtype in QUANT_WEIGHTS and scale is None:
        raise ValueError(f"a {weight.dtype} weight needs its per-output-channel scale (fp32 [{n}])")
    tensors = {"x": x, "weight": weight}
    if int4:
        tensors.update(scale=scale, zeros=zeros)
    elif scale is not None:
        check_tensor("scale", scale, ndim=1, dtypes=(torch.float32,))
        if scale.shape[0] != n:
            raise ValueError(f"scale must have shape [{n}] (one per output feature), got {tuple(scale.shape)}")
        scale = scale.contiguous()
        tensors["scale"] = scale
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1)
        if norm_weight.shape[0] != k:
            raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
        norm_weight = norm_weight.contiguous()
        tensors["norm_weight"] = norm_weight
        eps = check_scalar("eps", eps)
    out_shape = (*x.shape[:-1], n)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have shape {out_shape}, got {tuple(residual.shape)}")
        tensors["residual"] = residual
    check_same_device(**tensors)
    if weight.stride(1) != 1:
        raise ValueError(f"weight must have contiguous rows (stride 1 along K), got strides {weight.stride()}")
    x2 = as_rows("x", x, kx, writable=False)
    if out is None:
        y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,))
        check_same_device(x=x, out=out)
        if tuple(out.shape) != out_shape:
            raise ValueError(f"out must have shape {out_shape}, got {tuple(out.shape)}")
        y = out
    y2 = as_rows("out", y, n, writable=True)
    r2 = as_rows("residual", residual, n, writable=False) if residual is not None else y2

    split, k_per_split = cfg.pop("SPLIT_K"), cfg.pop("k_per_split")
    part, counters = y2, y2
    if split > 1:
        part = workspace("gemv.partials", (split, m, n), torch.float32, x.device)
        counters = workspace("gemv.counters", (triton.cdiv(n, cfg["BLOCK_N"]),), torch.int32, x.device)
    if cfg["W_E4M3_BITS"]:
        weight = weight.view(torch.uint8)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x2, weight, scale if scale is not None else y2, zeros if int4 else y2,
        norm_weight if norm_weight is not None else y2, r2, y2, part, counters,
        m, n, k,
        x2.stride(0), weight.stride(0), r2.stride(0), y2.stride(0), scale.stride(0) if int4 else 0,
        k, float(eps), k_per_split,
        SPLIT_K=split, PROLOGUE=PROLOGUES["swiglu" if swiglu else "norm" if norm_weight is not None else "plain"],
        HAS_SCALE=scale is not None and not int4, HAS_RESIDUAL=residual is not None,
        GROUP_SIZE=group_size if int4 else 1, **cfg,
    )
    return y


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale[:, None] * weight in `dtype`: the weight widened exactly (every int8 and e4m3 value is an fp16 /
    bf16 / fp32 value), times its row's scale in fp32 (fp64 for a float64 result), rounded once to `dtype`.
    A new tensor of the weight's shape; the weight is not modified."""
    return weight.to(dtype, copy=True).mul_(scale[:, None])


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """The same as torch ops at x's dtype: rms_norm_ref / F.silu(gate) * up, then F.linear with the weight in
    x's dtype (with `scale`: dequantised first, `dequantize`, or `dequantize_int4` for a packed int4 weight), plus residual, each rounded as torch rounds.
    With fp64 x every step is fp64 (the tests' truth). Any number of rows: it is also the reference of the
    quantised prefill GEMM (kernels/quant_matmul.py)."""
    from .rms_norm import rms_norm_ref

    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight.to(x.dtype), eps)
    elif swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    if weight.dtype == INT4_WEIGHT:
        w = dequantize_int4(weight, scale, zeros, group_size, x.dtype)
    else:
        w = weight.to(x.dtype) if scale is None else dequantize(weight, scale, x.dtype)
    y = _linear(x, w)
    if residual is not None:
        y = residual + y
    return y


# A CPU product with 1.._CPU_FEW_ROWS rows and a weight of at least _CPU_BIG_WEIGHT bytes runs as (W @ x.T).T.
_CPU_FEW_ROWS = 8
_CPU_BIG_WEIGHT = 8 << 20


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T. On a CPU, a few rows (a decode batch) against a weight larger than the caches run as (w @ x.T).T:
    F.linear's MKL call with few rows against the transposed weight is up to 2-3x slower than the same product
    with the weight as the row-major left operand (min of 12-15 on the shared 2-core machine, 32000 x 256 fp32:
    1 row 11.9 ms vs 3.7, 2 rows 8.0 vs 2.0, 8 rows 13.8 vs 6.8); from 16 rows on, and for cache-resident
    weights, F.linear is as fast or faster, so prefill and small weights keep it."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    big = w.numel() * w.element_size() >= _CPU_BIG_WEIGHT
    if x.is_cuda or not big or not 0 < rows <= _CPU_FEW_ROWS:
        return torch.nn.functional.linear(x, w)
    y = torch.mm(w, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    return y.view(*x.shape[:-1], w.shape[0])


__all__ = ["MAX_M", "dequantize", "gemv", "gemv_launch_config", "gemv_ref"]
