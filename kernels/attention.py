"""Prefill attention: flash-attention-2 forward with grouped-query attention and bottom-right causal masking.

Math, per batch b and query head h (kv head g = h // (n_heads // n_kv_heads)):

    S[i, j] = scale * <q[b, i, h, :], k[b, j, g, :]>
    S[i, j] = -inf            if causal and j > i + (seq_k - seq_q)      (bottom-right aligned)
    P[i, :] = softmax(S[i, :])
    o[b, i, h, :] = sum_j P[i, j] * v[b, j, g, :]

The kernel never materialises S. Each program owns BLOCK_M query rows and streams K/V in
BLOCK_N blocks, keeping a running row maximum m, running denominator l and an unnormalised fp32
accumulator (online softmax). Scores are kept in the log2 domain: t = S * log2(e) so that
exp(S - max) == exp2(t - max(t)); scale * log2(e) is folded into one multiply.

    m_new = max(m, rowmax(t_blk));  alpha = exp2(m - m_new);  p = exp2(t_blk - m_new)
    l = l * alpha + rowsum(p);      acc = acc * alpha + p @ v_blk;  m = m_new
    o = acc / l

A query row that can see no key at all (only possible when causal and seq_q > seq_k) has l == 0;
its output is defined as 0 rather than NaN (the reference does the same).

K and V must be finite at every index below seq_k, including positions the causal mask hides from
some rows. A masked score gives p = 0, but 0 * NaN (and 0 * Inf) in p @ v is still NaN, so a NaN/Inf
in a V row hidden from query row i reaches row i anyway: in the kernel whenever that V row lies in a
BLOCK_N tile that row i's program loads, in attention_ref (whose p @ v spans all of seq_k) always.

Grid: (batch * n_heads, cdiv(seq_q, BLOCK_M)), heads fastest. Programs are launched in that order, so
(a) the query heads of one GQA group (adjacent h) run side by side over the same K/V tiles, which they
then share through L2 instead of each pulling them from memory, and (b) with a causal mask the M-blocks
are walked last-first: the heaviest blocks (the ones that see the most keys) start first and the light
ones fill the tail of the wave. CUDA caps grid axis 1 at 65535 M-blocks (the launcher raises ValueError
past it; the interpreter would not notice).

Tiles (attention_launch_config): on sm_90 (H100/H200, 227 KiB of shared memory per block) d <= 128 runs
BLOCK_M = BLOCK_N = 128 with 3 stages: Q 32 KiB + 3 x (K 32 KiB + V 32 KiB) = 224 KiB, no spills
(tests/test_compile.py checks); sm_80 keeps BLOCK_N = 64, 3 stages (128 KiB of its 164 KiB).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DEFAULT_CAPABILITY,
    check_grid_dim,
    check_last_dim_contiguous,
    check_row_map,
    check_same_device,
    check_scalar,
    check_tensor,
    device_properties,
    output_like,
)

LOG2E = 1.4426950408889634
MIN_HEAD_DIM = 16  # tl.dot needs K >= 16; smaller head dims would be padded anyway, keep the limit honest
MAX_HEAD_DIM = 256  # beyond this the K/V tiles no longer fit shared memory with any useful BLOCK_N


@triton.jit
def _mma(a, b, acc):
    # fp32 inputs default to TF32 on tensor cores (10-bit mantissa), which is far less accurate than
    # torch's fp32 matmul; ask for exact IEEE products there. fp16/bf16 products are exact anyway.
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _attn_fwd_block(
    acc, l_i, m_i, q,
    k_base, v_base,  # scalar pointers to key/value position 0 of this (batch, kv head)
    start, end,  # key range [start, end) handled by this call; start is a multiple of BLOCK_N
    offs_m, offs_n, offs_d, mask_d,
    seq_k, causal_shift, stride_kn, stride_vn, qk_scale,
    BLOCK_M: tl.constexpr,  # query rows in the tile
    BLOCK_N: tl.constexpr,  # keys per step
    MASKED: tl.constexpr,  # False: every key in range is visible to every row and in bounds (no masks)
    CAUSAL: tl.constexpr,  # apply the bottom-right causal mask in masked steps
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        # Tile addresses are rebuilt from a scalar base each step instead of carrying a
        # [BLOCK_N, BLOCK_D] tensor of 64-bit pointers through the loop (2 registers per element).
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            in_bounds = cols < seq_k
            k = tl.load(k_ptrs, mask=in_bounds[:, None] & mask_d[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        qk = qk * qk_scale
        if MASKED:
            visible = in_bounds[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row with no visible key yet keeps m = -inf; subtracting -inf from -inf would give NaN,
            # so shift by 0 instead: exp2(-inf - 0) = 0 keeps p, alpha and l at zero for that row.
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=in_bounds[:, None] & mask_d[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        # P is rounded to V's dtype so the second product runs on tensor cores, as in flash-attention.
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,  # q [B, Sq, H, D], k/v [B or kv_rows, Sk, Hkv, D], o [B, Sq, H, D]; last dim contiguous
    ROWS,  # int32/int64 [B]: the k/v row of each batch row (only read when HAS_ROWS)
    stride_qb, stride_qs, stride_qh,  # q strides (elements) for batch, sequence, head
    stride_kb, stride_ks, stride_kh,  # k strides
    stride_vb, stride_vs, stride_vh,  # v strides
    stride_ob, stride_os, stride_oh,  # o strides
    seq_q, seq_k,  # sequence lengths; any value >= 1
    n_heads,  # query heads H; program_id(0) = b * H + h
    group,  # H // Hkv: query heads sharing one kv head
    qk_scale,  # softmax scale * log2(e)
    kv_rows,  # rows of k/v; the row map is clamped to [0, kv_rows)
    HEAD_DIM: tl.constexpr,  # true head dim D
    BLOCK_D: tl.constexpr,  # D padded to a power of two (>= 16) for tl.arange/tl.dot
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    CAUSAL: tl.constexpr,  # bottom-right aligned causal mask
    HAS_ROWS: tl.constexpr,  # read k/v row ROWS[b] instead of row b
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m  # heaviest (latest) query blocks first
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    off_g = off_h // group
    if HAS_ROWS:
        kv_b = tl.load(ROWS + off_b).to(tl.int64)
        kv_b = tl.minimum(tl.maximum(kv_b, 0), kv_rows - 1)
    else:
        kv_b = off_b.to(tl.int64)
    # Batch/head offsets in int64: a KV cache of B * S * Hkv * D elements can pass 2**31.
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + kv_b * stride_kb + off_g.to(tl.int64) * stride_kh
    v_base = V + kv_b * stride_vb + off_g.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM  # all-true and folded away when HEAD_DIM == BLOCK_D

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Query row i may see keys j <= i + causal_shift (bottom-right alignment).
    causal_shift = seq_k - seq_q
    if CAUSAL:
        # Keys beyond the last row's limit are invisible to the whole block: never load them.
        hi = tl.minimum(seq_k, pid_m * BLOCK_M + BLOCK_M + causal_shift)
        hi = tl.maximum(hi, 0)
        # Blocks ending at or before the first row's limit are visible to every row: no mask needed.
        full = tl.maximum(pid_m * BLOCK_M + causal_shift + 1, 0)
        full = tl.minimum(full, hi)
    else:
        hi = seq_k
        full = seq_k
    n_full = (full // BLOCK_N) * BLOCK_N  # the ragged tail of the unmasked range goes to the masked loop

    acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, 0, n_full,
                                    offs_m, offs_n, offs_d, mask_d, seq_k, causal_shift,
                                    stride_ks, stride_vs, qk_scale,
                                    BLOCK_M, BLOCK_N, False, CAUSAL)
    acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, n_full, hi,
                                    offs_m, offs_n, offs_d, mask_d, seq_k, causal_shift,
                                    stride_ks, stride_vs, qk_scale,
                                    BLOCK_M, BLOCK_N, True, CAUSAL)

    # Rows with no visible key (causal, seq_q > seq_k) have l == 0: write 0, not 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def _block_d(op: str, head_dim: int) -> int:
    """The padded head-dim tile of `op` (a power of two, at least tl.dot's 16); refuses unsupported head dims."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} unsupported; {op} needs {MIN_HEAD_DIM} <= head_dim <= {MAX_HEAD_DIM}")
    return max(16, triton.next_power_of_2(head_dim))


def attention_launch_config(
    head_dim: int,
    dtype: torch.dtype,
    capability: tuple[int, int] = DEFAULT_CAPABILITY,
) -> dict:
    """Block sizes and launch options for `_attn_fwd_kernel`.

    Returns {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}; the launcher
    adds CAUSAL. Depends only on head_dim, dtype and the GPU's compute capability (major, minor).
    """
    block_d = _block_d("attention", head_dim)
    if dtype == torch.float32:
        # fp32 runs exact (IEEE) products on CUDA cores, whose dot lowering keeps whole operand
        # tiles in registers: 32x32 tiles spill from d=128 up; 16x16 over 8 warps stays near 64
        # registers (d=128) / 150 (d=256, 4 warps). A testing/debug path, not tuned for speed.
        if block_d <= 64:
            block_m, block_n, warps, stages = 32, 32, 8, 2
        elif block_d <= 128:
            block_m, block_n, warps, stages = 16, 16, 8, 2
        else:
            block_m, block_n, warps, stages = 16, 16, 4, 2
    elif block_d <= 128 and tuple(capability) >= (9, 0):
        # sm_90: 128-key tiles halve the loop trips and feed wgmma a 128-wide N; Q 32 KiB + 3 stages of
        # K and V (32 KiB each) = 224 KiB of the 227 KiB a block may have.
        block_m, block_n, warps, stages = 128, 128, 8, 3
    elif block_d <= 128:
        # d=128: the 128x128 fp32 accumulator over 8 warps is 64 registers/thread (~180 in all on
        # sm_90, no spills); Q 32 KiB + 3 stages of K and V (16 KiB each) = 128 KiB shared memory:
        # fits sm_80 (164 KiB). d<=64 keeps 8 warps too: at 4 warps the 128x64 score tile plus
        # accumulator reach 255 registers and spill on sm_80.
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        # d=256: a 64x256 accumulator over 8 warps is again 64 registers/thread; 32-key tiles keep
        # Q 32 KiB + 2 stages x (K 16 KiB + V 16 KiB) = 96 KiB shared memory.
        block_m, block_n, warps, stages = 64, 32, 8, 2
    if tuple(capability) < (8, 0):
        stages = min(stages, 2)  # pre-Ampere: no cp.async pipelining, little shared memory
        block_m = min(block_m, 64)
    return {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n,
            "num_warps": warps, "num_stages": stages}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of q over k/v with grouped-query heads; returns o shaped like q.

    q [batch, seq_q, n_heads, head_dim]; k, v [batch, seq_k, n_kv_heads, head_dim] with
    n_heads % n_kv_heads == 0. Strided views are fine as long as the last dim is contiguous.
    causal=True masks key j for query i when j > i + seq_k - seq_q (bottom-right aligned).
    scale (a finite Python number) defaults to head_dim ** -0.5. `out` (optional) receives the result.
    rows (optional, int32/int64 [batch]): batch row b attends over row rows[b] of k/v, which may then
    hold any number of rows (a prefill reading its keys straight out of a KV cache through a serving
    engine's row map); values are clamped into range, not checked (that would sync).
    K and V must be finite below seq_k, also where the causal mask hides them (module docstring).
    batch * n_heads must be at most 65535 (CUDA's limit on grid axis 1).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, seq_q, n_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    kb, seq_k, n_kv_heads, kd = k.shape
    if rows is None and kb != batch:
        raise ValueError(f"k batch {kb} != q batch {batch} (pass rows= to map batch rows onto k/v rows)")
    if rows is not None:
        rows = check_row_map(rows, batch, k, "k/v")
        if kb == 0:
            raise ValueError(f"empty attention: k {tuple(k.shape)} has no rows")
    if kd != head_dim:
        raise ValueError(f"k head_dim {kd} != q head_dim {head_dim}")
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    if seq_q == 0 or seq_k == 0 or batch == 0 or n_heads == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    # Grid axis 1 enumerates (batch, head); it stays axis 1 so M-blocks of one head run together.
    check_grid_dim("batch * n_heads", batch * n_heads, axis=0)
    scale = head_dim ** -0.5 if scale is None else check_scalar("scale", scale)
    out = output_like(q, out)

    cfg = attention_launch_config(head_dim, q.dtype, device_properties(q.device)[0])
    check_grid_dim(f"query blocks of {cfg['BLOCK_M']} rows", triton.cdiv(seq_q, cfg["BLOCK_M"]), axis=1)
    grid = (batch * n_heads, triton.cdiv(seq_q, cfg["BLOCK_M"]))
    _attn_fwd_kernel[grid](
        q, k, v, out, rows if rows is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_q, seq_k, n_heads, n_heads // n_kv_heads, scale * LOG2E, kb,
        CAUSAL=bool(causal), HAS_ROWS=rows is not None, **cfg,
    )
    return out


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch attention: repeated K/V, explicit scores in fp32 (fp64 for fp64 inputs).

    Bottom-right causal mask; rows that see no key give 0. Output in q's dtype. With `rows`, batch row b
    reads k/v row rows[b] (gathered, clamped into range as the kernel does).
    """
    if rows is not None:
        rows = rows.to(k.device).long().clamp(0, k.shape[0] - 1)
        k, v = k.index_select(0, rows), v.index_select(0, rows)
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, n_kv_heads = k.shape[1], k.shape[2]
    if scale is None:
        scale = head_dim ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    group = n_heads // n_kv_heads
    qf = q.to(ct).transpose(1, 2)  # [b, h, sq, d]
    kf = k.to(ct).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(ct).repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(seq_q, device=q.device)[:, None]
        j = torch.arange(seq_k, device=q.device)[None, :]
        s = s.masked_fill(j > i + (seq_k - seq_q), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: 0, as the kernel
    o = p @ vf
    return o.transpose(1, 2).to(q.dtype)
