"""Decode attention (one new query per sequence) over a padded KV cache, flash-decoding in one launch.

Math, per batch b and query head h (kv head g = h // GROUP, GROUP = n_heads // n_kv_heads),
with n = seqlens[b] valid cache positions (the new token already written at n - 1):

    t[j]   = scale * log2(e) * <q[b, h, :], k_cache[b, j, g, :]>       for 0 <= j < n
    o[b, h, :] = sum_j exp2(t[j] - max t) * v_cache[b, j, g, :] / sum_j exp2(t[j] - max t)

Grid (batch * n_kv_heads, MAX_SPLITS). A program handles every query head of one kv group (a [GROUP,
BLOCK_N] score tile), so each K/V element is read from memory once per group. The sequence axis of row
b is cut at run time, on the device, from the row's own length: its n positions make cdiv(n, BLOCK_N)
blocks, dealt to S = min(MAX_SPLITS, blocks) splits of the same number of blocks (empty trailing splits
dropped); programs with a split index >= S exit at once. So a 512-token row in a 4096-slot cache keeps all
its splits busy, and nothing about the launch depends on the values in seqlens (CUDA-graph safe).

With S == 1 the program normalises and writes o directly. Otherwise split s writes its partials over its
positions J_s in fp32,

    m_s = max_{j in J_s} t[j],   l_s = sum_{j in J_s} exp2(t[j] - m_s),
    acc_s = sum_{j in J_s} exp2(t[j] - m_s) * v[j]

and takes a ticket from the (b, g) counter of a preallocated workspace (kernels/_workspace.py); the S-th
arrival combines, per head of the group,

    M = max_s m_s,  w_s = exp2(m_s - M),  o = sum_s w_s acc_s / sum_s w_s l_s

and resets the counter, so there is no second launch and nothing to allocate per call.

MAX_SPLITS depends only on shapes (batch, max_seq, n_kv_heads) and the GPU's SM count: about one wave of
programs when the row is long. Positions at or beyond seqlens[b] are never read (masked loads), so
garbage/NaN there cannot leak. seqlens[b] == 0 is not allowed by callers; such a row gets output exactly 0
(finite, no crash). seqlens[b] is clamped to [0, max_seq].

Cache rows: by default query row b reads cache row b. With `rows` (a serving engine whose requests
occupy arbitrary rows of one static cache), query row b reads cache row rows[b] of a cache with at
least that many rows; the indirection is one scalar load per program, so it costs nothing, and the
map is a device tensor, so a captured graph replays correctly whatever rows hold. Values outside
[0, cache rows) are clamped into range (a bad map reads the wrong row, never out of bounds).

Grid axes: axis 0 allows 2**31 - 1 programs and axis 1 (<= MAX_SPLITS) stays far below CUDA's 65535
(the launcher still checks axis 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DEFAULT_CAPABILITY,
    DEFAULT_NUM_SMS,
    check_grid_dim,
    check_last_dim_contiguous,
    check_row_map,
    check_same_device,
    check_scalar,
    check_tensor,
    device_properties,
    output_like,
)
from ._workspace import arrive_last, workspace
from .attention import LOG2E, _block_d, _mma

MAX_SPLITS = 64


@triton.jit
def _decode_kernel(
    Q,  # q [B, H, D], last dim contiguous
    K, V,  # caches [rows, MAXS, Hkv, D], last dim contiguous
    O,  # o [B, H, D], last dim contiguous
    SEQLENS,  # int32 [B]: valid cache positions per row
    ROWS,  # int32/int64 [B]: cache row of each query row (only read when HAS_ROWS)
    M_WS, L_WS,  # fp32 workspace [B, H, MAX_SPLITS], contiguous: per-split row max / sum (log2 domain)
    ACC_WS,  # fp32 workspace [B, H, MAX_SPLITS, D], contiguous: per-split unnormalised output
    COUNTERS,  # int32 [B * Hkv], zero between launches: arrivals per (row, kv head)
    stride_qb, stride_qh,  # q strides (elements)
    stride_kb, stride_ks, stride_kh,  # k_cache strides for row, position, head
    stride_vb, stride_vs, stride_vh,  # v_cache strides
    stride_ob, stride_oh,  # o strides
    max_seq,  # cache capacity MAXS; seqlens are clamped to it
    cache_rows,  # rows in the cache (>= B without HAS_ROWS); the row map is clamped to it
    n_kv_heads,  # Hkv; program_id(0) = b * Hkv + g
    group,  # H // Hkv query heads per kv head (<= BLOCK_G)
    max_splits,  # MAX_SPLITS = grid dim 1
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # true head dim D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_G: tl.constexpr,  # group padded to a power of two >= 16 (tl.dot needs M >= 16)
    BLOCK_N: tl.constexpr,  # cache positions per inner-loop step
    BLOCK_S: tl.constexpr,  # MAX_SPLITS padded to a power of two: the combine's tile
    HAS_ROWS: tl.constexpr,  # read cache row ROWS[b] instead of row b
):
    pid_bg = tl.program_id(0)
    split = tl.program_id(1)
    off_b = pid_bg // n_kv_heads
    off_g = pid_bg % n_kv_heads
    n_heads = n_kv_heads * group

    seqlen = tl.load(SEQLENS + off_b)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), max_seq)  # never read past the cache, whatever the caller says
    # This row's split of its own length (module docstring): every program computes the same numbers.
    n_blocks = tl.cdiv(seqlen, BLOCK_N)
    n_splits = tl.maximum(tl.minimum(max_splits, n_blocks), 1)
    per_split = tl.maximum(tl.cdiv(n_blocks, n_splits), 1)
    n_splits = tl.maximum(tl.cdiv(n_blocks, per_split), 1)  # drop splits that rounding left empty
    if split < n_splits:
        if HAS_ROWS:
            cache_b = tl.load(ROWS + off_b).to(tl.int64)
            cache_b = tl.minimum(tl.maximum(cache_b, 0), cache_rows - 1)
        else:
            cache_b = off_b.to(tl.int64)
        start = split * per_split * BLOCK_N
        end = tl.minimum(start + per_split * BLOCK_N, seqlen)

        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < group
        mask_d = offs_d < HEAD_DIM
        heads = off_g * group + offs_g  # the query heads of this kv group

        # Batch/head offsets in int64: a cache of B * MAXS * Hkv * D elements can exceed 2**31.
        q = tl.load(Q + off_b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        # Scalar bases plus int32 tile offsets rebuilt each step: a loop-carried [BLOCK_N, BLOCK_D]
        # tensor of 64-bit pointers would pin 2 registers per element and spill.
        k_base = K + cache_b * stride_kb + off_g.to(tl.int64) * stride_kh
        v_base = V + cache_b * stride_vb + off_g.to(tl.int64) * stride_vh

        # GROUP is 1..8 for Llama-family models, but tl.dot needs M >= 16, so the group axis is padded to
        # BLOCK_G >= 16 with zero rows. Decode is bound by memory bandwidth (every K/V byte is used
        # GROUP times at most), so the wasted tensor-core work is free, while the alternative --
        # broadcast q[G, 1, D] * k[1, N, D] and sum over D -- materialises a [G, N, D] fp32 tile
        # (4 x 64 x 128 = 128 registers/thread at 4 warps) and spills.
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            pos = start_n + offs_n
            valid = pos < end
            k = tl.load(k_base + pos[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                        other=0.0)
            qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)) * qk_scale
            qk = tl.where(valid[None, :], qk, float("-inf"))
            # Every step has >= 1 valid position, so m_new is finite: no -inf - -inf here.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                        other=0.0)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        o_rows = O + off_b.to(tl.int64) * stride_ob + heads.to(tl.int64) * stride_oh
        if n_splits == 1:
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seqlen 0: l = 0, acc = 0 -> o = 0
            tl.store(o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty),
                     mask=mask_g[:, None] & mask_d[None, :])
        else:
            # Workspace rows are (b * H + head) * MAX_SPLITS + split.
            ws_heads = (off_b * n_heads + heads).to(tl.int64) * max_splits
            tl.store(M_WS + ws_heads + split, m_i, mask=mask_g)
            tl.store(L_WS + ws_heads + split, l_i, mask=mask_g)
            tl.store(ACC_WS + (ws_heads + split)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=mask_g[:, None] & mask_d[None, :])
            if arrive_last(COUNTERS + pid_bg, n_splits):
                offs_s = tl.arange(0, BLOCK_S)
                mask_s = offs_s < n_splits
                for i in range(0, group):  # one [splits, D] tile per head of the group
                    head = off_g * group + i
                    ws = (off_b * n_heads + head).to(tl.int64) * max_splits + offs_s
                    m = tl.load(M_WS + ws, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
                    l = tl.load(L_WS + ws, mask=mask_s, other=0.0, cache_modifier=".cg")
                    part = tl.load(ACC_WS + ws[:, None] * HEAD_DIM + offs_d[None, :],
                                   mask=mask_s[:, None] & mask_d[None, :], other=0.0, cache_modifier=".cg")
                    m_max = tl.max(m, 0)  # finite: split 0 holds >= 1 position when n_splits > 1
                    w = tl.math.exp2(m - m_max)  # 0 for the masked splits
                    o = tl.sum(w[:, None] * part, 0) / tl.sum(w * l, 0)
                    tl.store(O + off_b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_d,
                             o.to(O.dtype.element_ty), mask=mask_d)


def decode_attention_launch_config(
    batch: int,
    max_seq: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    capability: tuple[int, int] = DEFAULT_CAPABILITY,
    num_sms: int = DEFAULT_NUM_SMS,
) -> dict:
    """Launch settings for `_decode_kernel`, from shapes only (never from seqlens values).

    Upper-case keys are the kernel's tl.constexpr parameters ({"HEAD_DIM", "BLOCK_D", "BLOCK_G", "BLOCK_N",
    "BLOCK_S"}) plus "num_warps"/"num_stages"; lower-case "max_splits" (grid dim 1, the most splits a row of
    max_seq positions is cut into; the kernel cuts each row by its own length) is a runtime launch value.
    """
    block_d = _block_d("decode_attention", head_dim)
    if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    block_g = max(16, triton.next_power_of_2(n_heads // n_kv_heads))
    if dtype == torch.float32:
        block_n = 16  # exact fp32 products run on CUDA cores with whole tiles in registers
    elif block_d > 128:
        block_n = 32  # keeps the d=256 K/V tiles small
    else:
        block_n = 64  # 64 x 128 fp16 = 16 KiB per K or V tile
    stages = 2 if tuple(capability) < (8, 0) else 3
    # Splits: enough programs for about one wave over the SMs when batch * n_kv_heads is small
    # (batch 1, 8 kv heads on 132 SMs -> 16 splits = 128 programs), a power of two, never more splits
    # than BLOCK_N-sized pieces of the cache.
    programs = max(1, batch * n_kv_heads)
    want = max(1, num_sms // programs)
    splits = 1 << (want.bit_length() - 1)
    splits = max(1, min(splits, MAX_SPLITS, triton.cdiv(max_seq, block_n)))
    block_s = max(2, triton.next_power_of_2(splits))
    return {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_S": block_s,
            "num_warps": 4, "num_stages": stages, "max_splits": splits}


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over the first seqlens[b] cache positions.

    q [batch, n_heads, head_dim]; k_cache, v_cache [batch, max_seq, n_kv_heads, head_dim];
    seqlens int32 [batch], each in 1..max_seq (0 gives a zero row; values are clamped to [0, max_seq]).
    rows (optional, int32/int64 [batch]): query row b attends over cache row rows[b]; the caches may
    then hold any number of rows (values are clamped into range, not checked: that would sync).
    scale, when given, must be a finite Python number. Returns o [batch, n_heads, head_dim]
    in q's dtype (written into `out` when given). Strided inputs need a contiguous last dim.
    """
    check_tensor("q", q, ndim=3)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    check_tensor("seqlens", seqlens, ndim=1, dtypes=(torch.int32,))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, n_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    cb, max_seq, n_kv_heads, cd = k_cache.shape
    if rows is None and cb != batch:
        raise ValueError(f"k_cache batch {cb} != q batch {batch} (pass rows= to map query rows onto cache rows)")
    if rows is not None:
        rows = check_row_map(rows, batch, k_cache, "cache")
        if cb == 0:
            raise ValueError(f"empty decode attention: k_cache {tuple(k_cache.shape)} has no rows")
    if cd != head_dim:
        raise ValueError(f"k_cache head_dim {cd} != q head_dim {head_dim}")
    if seqlens.shape[0] != batch:
        raise ValueError(f"seqlens must have shape [{batch}] (one length per batch row), got {tuple(seqlens.shape)}")
    if batch == 0 or max_seq == 0 or n_heads == 0:
        raise ValueError(f"empty decode attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    if seqlens.stride(0) != 1 and batch > 1:
        seqlens = seqlens.contiguous()
    check_grid_dim("batch * n_kv_heads", batch * n_kv_heads, axis=0)
    scale = head_dim ** -0.5 if scale is None else check_scalar("scale", scale)
    out = output_like(q, out)

    capability, num_sms = device_properties(q.device)
    # n_heads % n_kv_heads is checked here, so the error names the tensors' head counts.
    cfg = decode_attention_launch_config(batch, max_seq, n_heads, n_kv_heads, head_dim, q.dtype, capability, num_sms)
    max_splits = cfg.pop("max_splits")
    # Made once per shape and device (kernels/_workspace.py): partials are written before they are read,
    # the counters are zero between launches.
    m_ws = workspace("decode_attention.m", (batch, n_heads, max_splits), torch.float32, q.device)
    l_ws = workspace("decode_attention.l", (batch, n_heads, max_splits), torch.float32, q.device)
    acc_ws = workspace("decode_attention.acc", (batch, n_heads, max_splits, head_dim), torch.float32, q.device)
    counters = workspace("decode_attention.counters", (batch * n_kv_heads,), torch.int32, q.device)

    _decode_kernel[(batch * n_kv_heads, max_splits)](
        q, k_cache, v_cache, out, seqlens, rows if rows is not None else seqlens, m_ws, l_ws, acc_ws, counters,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        max_seq, cb, n_kv_heads, n_heads // n_kv_heads, max_splits, scale * LOG2E,
        HAS_ROWS=rows is not None, **cfg,
    )
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch attention of each row's query over its first seqlens[b] cache positions (fp32 math, fp64 for
    fp64 inputs). Vectorised with a mask, no host sync, so it is graph-safe like the kernel; slots at or
    beyond seqlens[b] are never let into the result, even when they hold NaN. With `rows`, query row b
    reads cache row rows[b] (gathered, clamped into range as the kernel does).

    On a CPU the batch's longest seqlens is read (host memory: no sync) and only that many positions are
    gathered and multiplied, so a decode step costs what the used cache costs, not the whole cache; on
    CUDA (the reference engine, perhaps inside a captured graph) it walks every position."""
    max_seq = k_cache.shape[1]
    if not q.is_cuda and not seqlens.is_cuda:
        used = int(seqlens.max().clamp(0, max_seq)) if seqlens.numel() else 0
        k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]
    if rows is not None:
        rows = rows.to(k_cache.device).long().clamp(0, k_cache.shape[0] - 1)
        k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    batch, n_heads, head_dim = q.shape
    span, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    if scale is None:
        scale = head_dim ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    valid = torch.arange(span, device=q.device)[None, :] < seqlens.to(q.device)[:, None]  # [b, span]
    qg = q.to(ct).view(batch, n_kv_heads, group, head_dim)
    # A NaN key only makes a NaN score, which the mask then overwrites; a NaN value would survive 0 * NaN.
    v = torch.where(valid[:, :, None, None], v_cache.to(ct), 0.0)
    s = torch.einsum("bkgd,bskd->bkgs", qg, k_cache.to(ct)) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with seqlens 0 gives 0, as the kernel
    out = torch.einsum("bkgs,bskd->bkgd", p, v)
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)
