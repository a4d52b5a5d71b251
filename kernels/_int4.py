"""Packed 4-bit weights with group-wise scales and zero points: the one int4 layout every fastsolar kernel reads.

A weight W [N, K] (nn.Linear's layout, N outputs, K inputs) with group size G_S (GROUP_SIZE) is held as

    qweight  int32 [N, K / 8]            q[n, k] = (qweight[n, k // 8] >> (4 * (k % 8))) & 0xF   (0..15)
    scales   fp16/bf16/fp32 [N, G]       G = cdiv(K, GROUP_SIZE); group g covers k in [g * GROUP_SIZE, ...)
    zeros    uint8 [N, G]                the integer zero point of each group (0..15)

    W[n, k] = (q[n, k] - zeros[n, k // GROUP_SIZE]) * scales[n, k // GROUP_SIZE]

Why this layout: a kernel's weight tile is a [BLOCK_N, BLOCK_K] slice of W's rows, the same tile the 8-bit and
bf16 paths load. Packing along K keeps each output row's bytes contiguous (one row = K / 2 bytes, read in order
by a GEMV), the nibble of k is a shift by 4 * (k % 8) of the int32 at k // 8, and the group of k is k // GROUP_SIZE
of the same row: no transpose, no interleave in the hot loop. GPTQ's and AWQ's layouts ([K / 8, N] and an
interleaved [K, N / 8]) are converted once when a checkpoint loads (a permutation of nibbles, exact); GPTQ's
act-order (g_idx) is turned into contiguous groups at the same time by permuting K. Zeros are integers, as
every producer writes them (GPTQ, AWQ, fastsolar's round-to-nearest), so (q - z) is an exact small integer and
the product with the scale is the only rounding of the dequantised weight. K must be a multiple of 8; the last
group may be partial (GPTQ's ceil(K / group_size) groups).

The reference `dequantize_int4` computes (q - z) * s in fp32 (fp64 for fp64) and rounds once to the requested
dtype: the same values the kernels' weight tiles take before a `tl.dot` in that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor

PACK = 8  # nibbles per int32
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _int4_tile(W_ROWS, S_ROWS, Z_ROWS, mask_n, k0, k_end,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """The dequantised fp32 tile [BLOCK_N, BLOCK_K], columns k0 .. k0 + BLOCK_K (k0 a multiple of BLOCK_K,
    columns from k_end on read as q = 0), of the rows whose packed words start at W_ROWS [BLOCK_N, 1] and whose
    scales / zeros start at S_ROWS / Z_ROWS [BLOCK_N]. The tile lies in one group (`int4_block_k`), so each row
    loads one scale and one zero, and each word is loaded once and split into its 8 nibbles in registers."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(W_ROWS + offs_w[None, :], mask=mask_n[:, None] & (offs_w * 8 < k_end)[None, :], other=0)
    q = (packed[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    q = tl.reshape(q, (BLOCK_N, BLOCK_K))
    g = k0 // GROUP_SIZE
    s = tl.load(S_ROWS + g, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(Z_ROWS + g, mask=mask_n, other=0).to(tl.int32)
    return (q - z[:, None]).to(tl.float32) * s[:, None]


def int4_block_k(block_k: int, k: int, group_size: int) -> int:
    """The largest reduction step <= block_k whose tiles each lie in one group: block_k itself when one group
    covers K (per-channel), else a power of two dividing group_size. ValueError when that is under 16
    (tl.dot's least K): group sizes must then be multiples of 16 (GPTQ's and AWQ's 32 / 64 / 128 are)."""
    if group_size >= k:
        return block_k
    step = min(block_k, group_size & -group_size)
    if step < 16:
        raise ValueError(f"int4 group_size must be a multiple of 16 (or cover all of K = {k}), got {group_size}")
    return step


def int4_groups(k: int, group_size: int) -> int:
    """Groups per row, cdiv(k, group_size)."""
    return -(-k // group_size)


def check_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: object, *, kernel: bool = True
) -> tuple[int, int]:
    """(N, K) of a packed int4 weight after checking the layout (module docstring); TypeError/ValueError naming
    the tensor and the limit otherwise. kernel=False skips the device check (the torch reference runs anywhere)."""
    check = check_tensor if kernel else _check_dtype_ndim
    check("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    check("scales", scales, ndim=2, dtypes=SCALE_DTYPES)
    check("zeros", zeros, ndim=2, dtypes=(torch.uint8,))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n, k = qweight.shape[0], qweight.shape[1] * PACK
    groups = int4_groups(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must have shape [{n}, {groups}] (one per output row and group of {group_size} "
                             f"of K = {k}), got {tuple(t.shape)}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {tuple(t.stride())}")
    if qweight.stride(1) != 1:
        raise ValueError(f"qweight must have contiguous rows (stride 1 along K / 8), got strides {qweight.stride()}")
    return n, k


def _check_dtype_ndim(name: str, t: object, *, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != ndim:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be a {ndim}-d tensor of {allowed}, got {got}")


def pack_int4(q: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
    """int32 [N, K / 8] holding the values 0..15 of q [N, K] (any integer dtype), nibble k % 8 of word k // 8.
    check_range=False skips the range check (a host sync) for values already clamped to 0..15."""
    n, k = q.shape
    if k % PACK:
        raise ValueError(f"int4 packing needs K to be a multiple of {PACK}, got K = {k}")
    if check_range and q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 values must lie in 0..15")
    nib = q.to(torch.int64).view(n, k // PACK, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, device=q.device, dtype=torch.int64)
    words = (nib << shifts).sum(dim=-1)  # < 2**32: the top nibble lands in int32's sign bit below
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The values q [N, K] (uint8, 0..15) packed in qweight int32 [N, K / 8]."""
    shifts = torch.arange(0, 4 * PACK, 4, device=qweight.device, dtype=torch.int32)
    nib = (qweight[..., None] >> shifts) & 0xF
    return nib.reshape(*qweight.shape[:-1], qweight.shape[-1] * PACK).to(torch.uint8)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] in `dtype`: (q - zero) * scale per group, in fp32 (fp64 for fp64) and rounded once to `dtype`."""
    n, k = check_int4(qweight, scales, zeros, group_size, kernel=False)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int4(qweight).to(work)
    col_group = torch.arange(k, device=qweight.device) // group_size
    w = (q - zeros.to(work)[:, col_group]) * scales.to(work)[:, col_group]
    return w.to(dtype)


__all__ = ["PACK", "SCALE_DTYPES", "check_int4", "dequantize_int4", "int4_block_k", "int4_groups", "pack_int4", "unpack_int4"]
