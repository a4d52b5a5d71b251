"""Rotary position embedding (RoPE) for q and k in one launch, Hugging Face half-rotation layout.

For a head vector x of even length d, split into halves x1 = x[:d/2], x2 = x[d/2:], and a token
at integer position p:

    inv_freq_j = 1 / theta^(2j / d)                 j = 0 .. d/2-1, fp32, computed by torch
    a_j        = fp32(p) * inv_freq_j                one fp32 multiply, as transformers does
    out1_j     = x1_j * cos(a_j) - x2_j * sin(a_j)
    out2_j     = x2_j * cos(a_j) + x1_j * sin(a_j)

i.e. out = x * cos + rotate_half(x) * sin with cos/sin repeated over both halves. The kernel
keeps cos/sin and the products in fp32 and rounds once to the input dtype; transformers rounds
cos/sin to the input dtype first, so in fp16/bf16 the kernel is the more accurate of the two.

cos(a)/sin(a) come from `_sincos`, plain fp32 arithmetic rather than tl.cos/tl.sin. Those lower
to libdevice __nv_cosf/__nv_sinf, whose large-argument (Payne-Hanek) path keeps a 28-byte array
in local memory: with the ptxas of triton <= 3.6 that is a 32 B stack frame and ~40 LDL/STL per
kernel, which the compile check (tests/test_compile.py) rejects. `_sincos` needs no local memory
and no libdevice, and computes the same in the interpreter as compiled (up to FMA contraction in
the polynomials):

    j   = trunc(|a| * 2/pi + 0.5)                    nearest quadrant, |a| >= 0
    r   = |a| - j*C1 - j*C2 - j*C3 - j*C4            Cody-Waite: C1 + .. + C4 = pi/2 to ~2^-55;
                                                     C1..C3 have <= 8 significant bits, so for
                                                     j < 2^16 each j*Ci is exact in fp32 (with or
                                                     without FMA) and |a| - j*C1 is exact
    s, c = Cephes sinf / cosf minimax polynomials in r, |r| <= pi/4 (+ a rounding slack)
    (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s) for j mod 4 = 0, 1, 2, 3; sin takes a's sign

Supported angles: |a| < 2^16 (here a = p * inv_freq with inv_freq <= 1, so positions below
65536). There sin/cos are within 1e-7 absolute (< 2 fp32 ulps of 1) of the exact sin/cos of the
fp32 angle; torch's fp32 sin/cos are within 3.6e-8 (tested against fp64 up to the bound). The
reduction stays exact up to |a| < 2^17 (j*C1 is a multiple of 2^-7 below 2^17); past that j*C1
itself rounds and the error jumps to ~1e-2, so the bound keeps a 2x margin.

Grid: (seq, q-head blocks + k-head blocks, batch). A program handles BLOCK_H heads of one token;
programs whose head-block index is past the q blocks rotate k, so q and k share one launch and
one position load per program.

`rotary_cache_write` fuses the KV-cache write into the same launch (decode and prefill): the k-block
programs rotate k and store it, together with the matching heads of v, straight into the cache slot
of their token, and the q-block programs write rotated q to its own output:

    q_out[b, t]                       = rotate(q[b, t], positions[b, t])
    k_cache[rows[b], positions[b, t]] = rotate(k[b, t], positions[b, t])
    v_cache[rows[b], positions[b, t]] = v[b, t]

rows (a device tensor, default b) is the serving engine's cache-row map. A token whose position lies
outside [0, max_seq), or whose row lies outside the cache, writes nothing to the cache (a bad map or
position never writes out of bounds, and never into another row): nothing is checked on the host,
since that would sync and break CUDA-graph capture.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_grid_dim,
    check_last_dim_contiguous,
    check_row_map,
    check_same_device,
    check_scalar,
    check_tensor,
    output_like,
)
from ._rounding import cast_rtne

MAX_HEAD_DIM = 256

_INV_FREQ_CACHE: dict[tuple[float, int, torch.device], torch.Tensor] = {}


@triton.jit
def _sincos(x):
    """(sin(x), cos(x)) of fp32 x without libdevice or local memory; accurate for |x| < 2^16.

    Cody-Waite reduction by pi/2 then Cephes sinf/cosf polynomials (module docstring).
    """
    ax = tl.abs(x)
    # nearest multiple of pi/2 (ax >= 0, so truncation of +0.5 rounds to nearest); an off-by-one
    # at a half-way point only leaves |r| a hair above pi/4, where the polynomials still hold
    j = (ax * 0.6366197723675814 + 0.5).to(tl.int32)
    jf = j.to(tl.float32)
    # pi/2 = C1 + C2 + C3 + C4: C1 = 0x1.92p+0, C2 = 0x1.fcp-12, C3 = -0x1.58p-21 (<= 8 bits each,
    # so jf * Ci is exact for j < 2^16) and C4 = 0x1.10b462p-30 (pi/2 - C1 - C2 - C3, rounded)
    r = ax - jf * 1.5703125
    r = r - jf * 4.84466552734375e-04
    r = r + jf * 6.407499313354492e-07
    r = r - jf * 9.92093629470503e-10
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    q = j & 3
    odd = (q & 1) != 0
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, s, c)
    sin = tl.where((q & 2) != 0, -sin, sin)
    cos = tl.where(((q + 1) & 2) != 0, -cos, cos)
    sin = tl.where(x < 0, -sin, sin)
    return sin, cos


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr,  # base pointers of this token's heads in the input / output
    stride_xh, stride_oh,  # elements between consecutive heads
    head0, n_heads,  # first head this program rotates, heads in the tensor
    cos, sin,  # [1, BLOCK_HALF] fp32 rotation for this token
    HALF: tl.constexpr,  # head_dim // 2: offset of the second half
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF (lanes past HALF are masked)
    BLOCK_H: tl.constexpr,  # heads per program
):
    """Rotate heads [head0, head0 + BLOCK_H) of one token, rounding once to the output dtype."""
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    x_off = heads * stride_xh + cols
    o_off = heads * stride_oh + cols
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(o_ptr + o_off, cast_rtne(out1, o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + o_off + HALF, cast_rtne(out2, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # *T, q [b, s, n_heads, d], last dim contiguous (may be a view into fused qkv)
    k_ptr,  # *T, k [b, s, n_kv_heads, d], last dim contiguous
    qo_ptr,  # *T, rotated q output, same layout rules
    ko_ptr,  # *T, rotated k output
    pos_ptr,  # *int32|int64, positions [b, s]
    inv_freq_ptr,  # *fp32, [HALF] inverse frequencies computed by torch
    stride_qb, stride_qs, stride_qh,  # q strides (elements) for batch, seq, head
    stride_kb, stride_ks, stride_kh,  # k strides
    stride_qob, stride_qos, stride_qoh,  # q output strides
    stride_kob, stride_kos, stride_koh,  # k output strides
    stride_pb, stride_ps,  # positions strides
    n_heads,  # q heads
    n_kv_heads,  # k heads
    n_q_blocks,  # cdiv(n_heads, BLOCK_H): head-block index where k starts
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_H: tl.constexpr,  # heads per program
):
    # int64 batch/seq offsets: a long prefill's q can pass 2**31 elements
    s = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # fp32(pos) * inv_freq in fp32 is exactly transformers' `position_ids.float() * inv_freq`
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.float32)
    cols = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < HALF, other=0.0)
    angle = (pos * inv_freq)[None, :]
    sin, cos = _sincos(angle)

    if hb < n_q_blocks:
        _rotate_heads(
            q_ptr + b * stride_qb + s * stride_qs, qo_ptr + b * stride_qob + s * stride_qos,
            stride_qh, stride_qoh, hb * BLOCK_H, n_heads, cos, sin,
            HALF, BLOCK_HALF, BLOCK_H,
        )
    else:
        _rotate_heads(
            k_ptr + b * stride_kb + s * stride_ks, ko_ptr + b * stride_kob + s * stride_kos,
            stride_kh, stride_koh, (hb - n_q_blocks) * BLOCK_H, n_kv_heads, cos, sin,
            HALF, BLOCK_HALF, BLOCK_H,
        )


@triton.jit
def _rotary_cache_kernel(
    q_ptr,  # *T, q [b, s, n_heads, d], last dim contiguous (a view into fused qkv)
    k_ptr,  # *T, k [b, s, n_kv_heads, d], last dim contiguous
    v_ptr,  # *T, v [b, s, n_kv_heads, d], last dim contiguous
    qo_ptr,  # *T, rotated q output [b, s, n_heads, d]
    kc_ptr,  # *T, k cache [cache_rows, max_seq, n_kv_heads, d], last dim contiguous
    vc_ptr,  # *T, v cache, same shape
    pos_ptr,  # *int32|int64, positions [b, s]: the rotation angle and the cache slot
    rows_ptr,  # *int32|int64, [b] cache row of each batch row (only read when HAS_ROWS)
    inv_freq_ptr,  # *fp32, [HALF] inverse frequencies computed by torch
    stride_qb, stride_qs, stride_qh,  # q strides (elements) for batch, seq, head
    stride_kb, stride_ks, stride_kh,  # k strides
    stride_vb, stride_vs, stride_vh,  # v strides
    stride_qob, stride_qos, stride_qoh,  # q output strides
    stride_kcb, stride_kcs, stride_kch,  # k cache strides for row, position, head
    stride_vcb, stride_vcs, stride_vch,  # v cache strides
    stride_pb, stride_ps,  # positions strides
    n_heads,  # q heads
    n_kv_heads,  # k / v heads
    n_q_blocks,  # cdiv(n_heads, BLOCK_H): head-block index where k starts
    cache_rows,  # rows in the cache
    max_seq,  # cache positions per row
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_H: tl.constexpr,  # heads per program
    HAS_ROWS: tl.constexpr,  # map batch row b onto cache row ROWS[b]
):
    s = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    pos_i = tl.load(pos_ptr + b * stride_pb + s * stride_ps)
    cols = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < HALF, other=0.0)
    angle = (pos_i.to(tl.float32) * inv_freq)[None, :]
    sin, cos = _sincos(angle)

    if hb < n_q_blocks:
        _rotate_heads(
            q_ptr + b * stride_qb + s * stride_qs, qo_ptr + b * stride_qob + s * stride_qos,
            stride_qh, stride_qoh, hb * BLOCK_H, n_heads, cos, sin,
            HALF, BLOCK_HALF, BLOCK_H,
        )
    else:
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b
        slot = pos_i.to(tl.int64)
        # Out-of-range slots write nothing: the store mask is all false (one scalar test per program).
        n_valid = tl.where((row >= 0) & (row < cache_rows) & (slot >= 0) & (slot < max_seq), n_kv_heads, 0)
        row = tl.minimum(tl.maximum(row, 0), cache_rows - 1)  # keep even masked addresses in bounds
        slot = tl.minimum(tl.maximum(slot, 0), max_seq - 1)
        head0 = (hb - n_q_blocks) * BLOCK_H
        _rotate_heads(
            k_ptr + b * stride_kb + s * stride_ks, kc_ptr + row * stride_kcb + slot * stride_kcs,
            stride_kh, stride_kch, head0, n_valid, cos, sin,
            HALF, BLOCK_HALF, BLOCK_H,
        )
        # v is copied unrotated: the same heads, the same slot.
        heads = head0 + tl.arange(0, BLOCK_H)[:, None]
        full = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (heads < n_valid) & (full < 2 * HALF)
        v = tl.load(v_ptr + b * stride_vb + s * stride_vs + heads * stride_vh + full, mask=mask)
        tl.store(vc_ptr + row * stride_vcb + slot * stride_vcs + heads * stride_vch + full, v, mask=mask)


def rotary_launch_config(n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, int]:
    """Constexprs and warps for apply_rotary (pure; used by the compile check).

    The one check of head_dim: apply_rotary relies on it (ValueError unless even and in [2, MAX_HEAD_DIM])."""
    if head_dim < 2 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"apply_rotary: head_dim must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # Size the head block by the smaller head count so k programs (few kv heads under GQA) are
    # not mostly masked, and cap it so a program moves at most ~2K elements per tensor.
    block_h = min(triton.next_power_of_2(max(1, min(n_heads, n_kv_heads))), 8, max(1, 1024 // block_half))
    elems = block_h * block_half * 2
    return {
        "HALF": half,
        "BLOCK_HALF": block_half,
        "BLOCK_H": block_h,
        "num_warps": 4 if elems <= 1024 else 8,
        "num_stages": 1,  # no loop to pipeline
    }


def rotary_inv_freq(theta: float, head_dim: int, device: torch.device) -> torch.Tensor:
    """transformers' default-RoPE inverse frequencies, fp32 [head_dim // 2], cached per (theta, d, device)."""
    key = (float(theta), int(head_dim), torch.device(device))
    inv = _INV_FREQ_CACHE.get(key)
    if inv is None:
        # Computed on the CPU then moved, exactly as transformers builds its buffer.
        inv = 1.0 / (key[0] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv = inv.to(device)
        _INV_FREQ_CACHE[key] = inv
    return inv


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, n_heads, d] and k [b, s, n_kv_heads, d] by `positions` [b, s]; returns new tensors.

    q and k may be strided views (e.g. slices of a fused qkv projection) as long as their last dim
    is contiguous; a strided last dim is copied once. `q_out` / `k_out` optionally receive the
    results (same shape/dtype as q / k, last dim contiguous); passing q_out=q rotates in place.
    Positions must be below 65536 (angles < 2^16, the bound of the kernel's sin/cos; not checked,
    that would need a device sync).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int32, torch.int64))
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    b, s, n_heads, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k must have shape [{b}, {s}, n_kv_heads, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(positions.shape) != (b, s):
        raise ValueError(f"positions must have shape [{b}, {s}] (q's batch and seq), got {tuple(positions.shape)}")
    n_kv_heads = k.shape[2]
    cfg = rotary_launch_config(n_heads, n_kv_heads, d)  # checks head_dim
    theta = check_scalar("theta", theta, positive=True)
    outs = {k_: v for k_, v in (("q_out", q_out), ("k_out", k_out)) if v is not None}
    check_same_device(q=q, k=k, positions=positions, **outs)
    n_q_blocks = triton.cdiv(n_heads, cfg["BLOCK_H"])
    n_k_blocks = triton.cdiv(n_kv_heads, cfg["BLOCK_H"])
    check_grid_dim("seq", s, axis=0)
    check_grid_dim("q + k head blocks", n_q_blocks + n_k_blocks, axis=1)
    if b > 65535:
        raise ValueError(f"batch must be <= 65535 (grid dim 2 limit), got {b}")

    # Documented copy: a strided head dim would need a gather per element.
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_out = output_like(q, q_out, "q_out")
    k_out = output_like(k, k_out, "k_out")
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out

    inv_freq = rotary_inv_freq(theta, d, q.device)
    grid = (s, n_q_blocks + n_k_blocks, b)
    _rotary_kernel[grid](
        q, k, q_out, k_out, positions, inv_freq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        positions.stride(0), positions.stride(1),
        n_heads, n_kv_heads, n_q_blocks,
        HALF=cfg["HALF"], BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return q_out, k_out


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k by `positions` and write rotated k and v into the cache, in one launch; returns rotated q.

    q [b, s, n_heads, d], k and v [b, s, n_kv_heads, d] (views of a fused qkv projection are fine, last dim
    contiguous), positions int32/int64 [b, s]; k_cache / v_cache [cache_rows, max_seq, n_kv_heads, d] (one
    layer's cache, last dim contiguous). Token (i, t) goes to cache slot (rows[i], positions[i, t]); rows
    (int32/int64 [b], default 0..b-1, which then needs cache_rows >= b) is not checked on the host: a row or
    position out of range writes nothing (module docstring). `q_out` optionally receives rotated q.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int32, torch.int64))
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    b, s, n_heads, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k and v must both have shape [{b}, {s}, n_kv_heads, {d}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    n_kv_heads = k.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[2] != n_kv_heads or k_cache.shape[3] != d:
        raise ValueError(f"k_cache and v_cache must both have shape [rows, max_seq, {n_kv_heads}, {d}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    cache_rows, max_seq = k_cache.shape[0], k_cache.shape[1]
    if tuple(positions.shape) != (b, s):
        raise ValueError(f"positions must have shape [{b}, {s}] (q's batch and seq), got {tuple(positions.shape)}")
    if rows is None:
        if cache_rows < b:
            raise ValueError(f"the cache has {cache_rows} rows, fewer than the batch of {b} (pass rows= to map rows)")
    else:
        rows = check_row_map(rows, b, k_cache, "cache")
    if cache_rows == 0 or max_seq == 0:
        raise ValueError(f"empty cache: k_cache has shape {tuple(k_cache.shape)}")
    cfg = rotary_launch_config(n_heads, n_kv_heads, d)  # checks head_dim
    theta = check_scalar("theta", theta, positive=True)
    extra = {"rows": rows} if rows is not None else {}
    check_same_device(q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache, **extra)
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    n_q_blocks = triton.cdiv(n_heads, cfg["BLOCK_H"])
    n_k_blocks = triton.cdiv(n_kv_heads, cfg["BLOCK_H"])
    check_grid_dim("seq", s, axis=0)
    check_grid_dim("q + k head blocks", n_q_blocks + n_k_blocks, axis=1)
    check_grid_dim("batch", b, axis=2)
    q_out = output_like(q, q_out, "q_out")
    if q.numel() == 0:
        return q_out

    inv_freq = rotary_inv_freq(theta, d, q.device)
    _rotary_cache_kernel[(s, n_q_blocks + n_k_blocks, b)](
        q, k, v, q_out, k_cache, v_cache, positions, rows if rows is not None else positions, inv_freq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        positions.stride(0), positions.stride(1),
        n_heads, n_kv_heads, n_q_blocks, cache_rows, max_seq,
        HALF=cfg["HALF"], BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_H=cfg["BLOCK_H"], HAS_ROWS=rows is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return q_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb for [b, s, heads, d] tensors.

    Angles are fp32 as in transformers; cos/sin are evaluated in fp32 then cast to q's dtype, and
    the rotation runs in q's dtype. For fp64 input cos/sin are evaluated in fp64 (of the same fp32
    angles) so the tests can use this function as their high-precision reference.
    """
    d = q.shape[-1]
    inv_freq = rotary_inv_freq(theta, d, q.device)
    freqs = positions[..., None].float() * inv_freq.float()  # [b, s, d/2], fp32
    emb = torch.cat((freqs, freqs), dim=-1).to(torch.promote_types(q.dtype, torch.float32))
    cos = emb.cos().to(q.dtype)[:, :, None, :]  # unsqueeze the heads dim of [b, s, h, d]
    sin = emb.sin().to(q.dtype)[:, :, None, :]
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


def rotary_cache_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference for rotary_cache_write: apply_rotary_ref, then an indexed write of k and v into cache
    slots (rows[i], positions[i, t]), graph-safe like the kernel (no host sync). Rows and positions must be in
    range here (index_put raises on a CPU, asserts on a GPU); the kernel's skipping of bad slots is tested
    against an explicit expectation instead."""
    q_rot, k_rot = apply_rotary_ref(q, k, positions, theta)
    b, s = positions.shape
    row = torch.arange(b, device=q.device) if rows is None else rows.to(q.device).long()
    slot = positions.to(q.device).long()
    k_cache[row[:, None].expand(b, s), slot] = k_rot.to(k_cache.dtype)
    v_cache[row[:, None].expand(b, s), slot] = v.to(v_cache.dtype)
    return q_rot


__all__ = ["apply_rotary", "apply_rotary_ref", "rotary_cache_write", "rotary_cache_write_ref", "rotary_launch_config",
           "rotary_inv_freq"]
