"""Tests for the elementwise kernels: rms_norm / add_rms_norm, apply_rotary, swiglu.

Every kernel result is compared with the float64 run of its torch reference, allowing at most
2x the error torch itself makes at the input dtype (helpers.assert_close with `baseline=`).
Outputs are passed in NaN-poisoned so an element the kernel skips fails the comparison, and
inputs are checked to be untouched. Same code runs under the interpreter (CPU) and compiled (CUDA).
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fastsolar.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_launch_config,
    rms_norm_ref,
)
from fastsolar.kernels.rotary import (
    _sincos,
    apply_rotary,
    apply_rotary_ref,
    rotary_cache_write,
    rotary_cache_write_ref,
    rotary_inv_freq,
    rotary_launch_config,
)
from fastsolar.kernels.swiglu import swiglu, swiglu_launch_config, swiglu_ref
from helpers import DEVICE, assert_close, poison, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
EPS = 1e-5
THETA = 10000.0


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.double()


def _weight(n: int, dtype: torch.dtype) -> torch.Tensor:
    # Around 1 like trained norm weights, but not all ones so a skipped multiply shows.
    return (1.0 + 0.5 * randn(n, dtype=torch.float32)).to(dtype)


# ----------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1, 4096), (113, 4096), (17, 3000), (2, 3, 123), (123,)], ids=str)
def test_rms_norm(shape, dtype):
    n = shape[-1]
    x = randn(*shape, dtype=dtype, scale=3.0)
    w = _weight(n, dtype)
    x0, w0 = x.clone(), w.clone()
    out = poison(torch.empty_like(x))
    y = rms_norm(x, w, EPS, out=out)
    assert y is out and y.dtype == dtype
    assert_close(y, rms_norm_ref(_d(x), _d(w), EPS), baseline=rms_norm_ref(x, w, EPS), msg=f"rms_norm {shape} {dtype}")
    assert torch.equal(x, x0) and torch.equal(w, w0), "inputs modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rms_norm_strided_rows(dtype):
    # Rows that are a slice of a wider tensor: a row stride, no copy needed.
    wide = randn(2, 5, 200, dtype=dtype)
    x = wide[..., 30:153]
    w = _weight(123, dtype)
    wide0 = wide.clone()
    y = rms_norm(x, w, EPS)
    assert y.is_contiguous()
    assert_close(y, rms_norm_ref(_d(x), _d(w), EPS), baseline=rms_norm_ref(x, w, EPS))
    # A transposed (strided last dim) input takes the documented copy path.
    xt = randn(123, 7, dtype=dtype).t()
    assert_close(rms_norm(xt, w, EPS), rms_norm_ref(_d(xt), _d(w), EPS), baseline=rms_norm_ref(xt, w, EPS))
    assert torch.equal(wide, wide0)


def test_rms_norm_strided_out():
    x = randn(3, 123)
    w = _weight(123, torch.float32)
    big = poison(torch.empty(3, 300, device=DEVICE))
    out = big[:, 100:223]
    rms_norm(x, w, EPS, out=out)
    assert_close(out, rms_norm_ref(_d(x), _d(w), EPS), baseline=rms_norm_ref(x, w, EPS))
    assert big[:, :100].isnan().all() and big[:, 223:].isnan().all(), "wrote outside the out view"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (1, 17, 3000), (3, 123)], ids=str)
def test_add_rms_norm(shape, dtype):
    n = shape[-1]
    x = randn(*shape, dtype=dtype)
    r = randn(*shape, dtype=dtype, scale=4.0)
    w = _weight(n, dtype)
    x0, r0, w0 = x.clone(), r.clone(), w.clone()
    out, out_h = poison(torch.empty_like(x)), poison(torch.empty_like(x))
    y, h = add_rms_norm(x, r, w, EPS, out=out, out_h=out_h)
    assert y is out and h is out_h
    y_base, h_base = add_rms_norm_ref(x, r, w, EPS)
    y_exp, h_exp = add_rms_norm_ref(_d(x), _d(r), _d(w), EPS)
    # One fp32 add rounded to T is exactly torch's T add: h must match bit for bit.
    assert torch.equal(h, h_base), "h differs from torch's x + residual"
    assert_close(y, y_exp, baseline=y_base, msg=f"add_rms_norm {shape} {dtype}")
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(w, w0), "inputs modified"


def test_add_rms_norm_in_place_residual_and_strided():
    # The documented in-place use, out_h=residual (the model itself lets add_rms_norm allocate h),
    # must be safe: each program reads its whole row before writing it. x is a strided row view.
    wide = randn(2, 9, 1000, dtype=torch.float16)
    x = wide[..., 100:223]
    r = randn(2, 9, 123, dtype=torch.float16)
    w = _weight(123, torch.float16)
    wide0 = wide.clone()
    y_base, h_base = add_rms_norm_ref(x, r, w, EPS)
    y_exp, _ = add_rms_norm_ref(_d(x), _d(r), _d(w), EPS)
    out = poison(torch.empty_like(r))
    y, h = add_rms_norm(x, r, w, EPS, out=out, out_h=r)
    assert y is out and h is r and torch.equal(r, h_base)
    assert_close(y, y_exp, baseline=y_base)
    assert torch.equal(wide, wide0), "x's base tensor modified"


def test_rms_norm_bad_inputs():
    x = randn(4, 64)
    w = _weight(64, torch.float32)
    with pytest.raises(TypeError, match="x has dtype int64"):
        rms_norm(torch.ones(4, 64, dtype=torch.int64, device=DEVICE), w, EPS)
    with pytest.raises(TypeError, match="weight has dtype int32"):
        rms_norm(x, torch.ones(64, dtype=torch.int32, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="weight has 63 elements but x's last dim is 64"):
        rms_norm(x, _weight(63, torch.float32), EPS)
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        rms_norm(x, w[None], EPS)
    with pytest.raises(ValueError, match=r"hidden size\) must be in \[1, 65536\]"):
        rms_norm(randn(1, 65537), _weight(65537, torch.float32), EPS)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(TypeError, match="eps must be a Python int or float, got Tensor"):
        rms_norm(x, w, torch.tensor(EPS, device=DEVICE))  # a 0-d tensor would sync with the device
    with pytest.raises(TypeError, match="eps must be a Python int or float"):
        add_rms_norm(x, x, w, torch.tensor(EPS))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 64\)"):
        rms_norm(x, w, EPS, out=torch.empty(4, 65, device=DEVICE))
    with pytest.raises(TypeError, match="out has dtype float16"):
        rms_norm(x, w, EPS, out=torch.empty(4, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        add_rms_norm(x, randn(4, 1, 64), w, EPS)
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but x has torch.float32"):
        add_rms_norm(x, randn(4, 64, dtype=torch.float16), w, EPS)
    with pytest.raises(ValueError, match="out_h must have a contiguous last dimension"):
        add_rms_norm(x, x, w, EPS, out_h=torch.empty(64, 4, device=DEVICE).t())


def test_rms_norm_launch_config():
    assert rms_norm_launch_config(4096) == {"BLOCK": 4096, "num_warps": 8, "num_stages": 1}
    assert rms_norm_launch_config(123)["BLOCK"] == 128
    assert rms_norm_launch_config(16384)["num_warps"] == 16
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm_launch_config(0)


# ------------------------------------------------------------------------------------- rotary


def _positions(b: int, s: int, starts: list[int], dtype: torch.dtype) -> torch.Tensor:
    # Each row continues from its own cached length, as in batched decode / chunked prefill.
    return (torch.tensor(starts)[:, None] + torch.arange(s)[None, :]).to(dtype=dtype, device=DEVICE)


def _fused_qkv(b: int, s: int, nh: int, nkv: int, d: int, dtype: torch.dtype):
    """q and k as strided views into a fused qkv projection output, exactly as the model calls us."""
    qkv = randn(b, s, (nh + 2 * nkv) * d, dtype=dtype)
    q = qkv[..., : nh * d].view(b, s, nh, d)
    k = qkv[..., nh * d : (nh + nkv) * d].view(b, s, nkv, d)
    return qkv, q, k


ROTARY_CASES = [
    # b, s, nh, nkv, d, per-row start positions
    (1, 1, 32, 8, 128, [4000]),  # SOLAR decode, deep into the sequence
    (2, 17, 4, 1, 64, [0, 513]),  # chunked prefill, rows at different offsets
    (1, 113, 4, 1, 64, [7]),
    (2, 3, 3, 2, 96, [1, 2047]),  # non-power-of-two half (48) and head counts
    (2, 4, 2, 1, 128, [65532, 40000]),  # up to the documented angle bound (position 65535 < 2^16)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}kv{c[3]}d{c[4]}")
def test_apply_rotary_fused_qkv_views(case, dtype):
    b, s, nh, nkv, d, starts = case
    qkv, q, k = _fused_qkv(b, s, nh, nkv, d, dtype)
    pos = _positions(b, s, starts, torch.int64 if b == 1 else torch.int32)
    qkv0 = qkv.clone()
    q_out = poison(torch.empty(b, s, nh, d, dtype=dtype, device=DEVICE))
    k_out = poison(torch.empty(b, s, nkv, d, dtype=dtype, device=DEVICE))
    qo, ko = apply_rotary(q, k, pos, THETA, q_out=q_out, k_out=k_out)
    assert qo is q_out and ko is k_out
    q_base, k_base = apply_rotary_ref(q, k, pos, THETA)
    q_exp, k_exp = apply_rotary_ref(_d(q), _d(k), pos, THETA)
    assert_close(qo, q_exp, baseline=q_base, msg=f"q {case} {dtype}")
    assert_close(ko, k_exp, baseline=k_base, msg=f"k {case} {dtype}")
    assert torch.equal(qkv, qkv0), "inputs modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_apply_rotary_contiguous_new_outputs(dtype):
    b, s, nh, nkv, d = 2, 5, 4, 2, 128
    q = randn(b, s, nh, d, dtype=dtype)
    k = randn(b, s, nkv, d, dtype=dtype)
    pos = _positions(b, s, [100, 31], torch.int64)
    q0, k0 = q.clone(), k.clone()
    qo, ko = apply_rotary(q, k, pos, THETA)
    assert qo.data_ptr() != q.data_ptr() and ko.data_ptr() != k.data_ptr()
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    q_base, k_base = apply_rotary_ref(q, k, pos, THETA)
    q_exp, k_exp = apply_rotary_ref(_d(q), _d(k), pos, THETA)
    assert_close(qo, q_exp, baseline=q_base)
    assert_close(ko, k_exp, baseline=k_base)
    assert torch.equal(q, q0) and torch.equal(k, k0), "inputs modified"


def test_apply_rotary_in_place_into_qkv():
    # Rotating straight back into the fused buffer (q_out=q) leaves v untouched.
    b, s, nh, nkv, d = 1, 4, 4, 1, 64
    qkv, q, k = _fused_qkv(b, s, nh, nkv, d, torch.float32)
    v0 = qkv[..., (nh + nkv) * d :].clone()
    pos = _positions(b, s, [9], torch.int32)
    q_exp, k_exp = apply_rotary_ref(_d(q), _d(k), pos, THETA)
    q_base, k_base = apply_rotary_ref(q, k, pos, THETA)
    apply_rotary(q, k, pos, THETA, q_out=q, k_out=k)
    assert_close(q, q_exp, baseline=q_base)
    assert_close(k, k_exp, baseline=k_base)
    assert torch.equal(qkv[..., (nh + nkv) * d :], v0)


_DECODE_CACHE_CASES = [
    # b, s, nh, nkv, d, per-row start positions, cache rows, row map (None: rows 0..b-1)
    (1, 1, 8, 8, 64, [40], 1, None),  # decode, GQA group 1 (MHA)
    (3, 1, 16, 4, 32, [0, 17, 62], 5, [4, 0, 2]),  # batched decode through a row map, group 4
    (2, 3, 3, 3, 96, [5, 60], 2, None),  # odd head count, non-power-of-two half
]
ROTARY_CACHE_CASES = [
    *[pytest.param(c, dt, id=f"decode-b{c[0]}s{c[1]}h{c[2]}kv{c[3]}d{c[4]}r{c[7]}-{i}")
      for c in _DECODE_CACHE_CASES for dt, i in zip(DTYPES, DT_IDS)],
    # Prefills (the interpreter runs one program per token and head block: one dtype each).
    pytest.param((1, 17, 8, 1, 64, [0], 2, None), torch.bfloat16, id="prefill-s17-gqa8-bf16"),
    pytest.param((1, 113, 2, 2, 32, [0], 3, [1]), torch.float16, id="prefill-s113-mapped-fp16"),
]


@pytest.mark.parametrize("case, dtype", ROTARY_CACHE_CASES)
def test_rotary_cache_write(case, dtype):
    """q rotated into its output; k rotated and v copied into their cache slots, every other slot untouched
    (the cache is NaN-poisoned; q, k, v are views of one fused qkv buffer, as the model passes them)."""
    b, s, nh, nkv, d, starts, cache_rows, rows = case
    max_seq = 64 if s < 64 else 128
    qkv = randn(b, s, (nh + 2 * nkv) * d, dtype=dtype)
    q, k, v = qkv.view(b, s, nh + 2 * nkv, d).split([nh, nkv, nkv], dim=2)
    pos = _positions(b, s, starts, torch.int32 if b % 2 else torch.int64)
    rows_t = None if rows is None else torch.tensor(rows, device=DEVICE)
    k_cache = poison(torch.empty(cache_rows, max_seq, nkv, d, dtype=dtype, device=DEVICE))
    v_cache = poison(torch.empty_like(k_cache))
    qkv0 = qkv.clone()
    q_out = poison(torch.empty(b, s, nh, d, dtype=dtype, device=DEVICE))
    got_q = rotary_cache_write(q, k, v, pos, THETA, k_cache, v_cache, rows=rows_t, q_out=q_out)
    assert got_q is q_out and torch.equal(qkv, qkv0), "inputs modified"

    k_exp = poison(torch.empty_like(k_cache, dtype=torch.float64))
    v_exp = poison(torch.empty_like(v_cache, dtype=torch.float64))
    q_exp = rotary_cache_write_ref(_d(q), _d(k), _d(v), pos, THETA, k_exp, v_exp, rows=rows_t)
    k_base, v_base = poison(torch.empty_like(k_cache)), poison(torch.empty_like(v_cache))
    q_base = rotary_cache_write_ref(q, k, v, pos, THETA, k_base, v_base, rows=rows_t)
    assert_close(got_q, q_exp, baseline=q_base, msg=f"q {case} {dtype}")
    assert_close(k_cache, k_exp, baseline=k_base, msg=f"k cache {case} {dtype}")  # NaN where nothing was written
    assert torch.equal(v_cache.nan_to_num(7.0), v_exp.to(dtype).nan_to_num(7.0)), "v is copied exactly"
    written = ~torch.isnan(k_exp[..., 0, 0])
    assert int(written.sum()) == b * s and torch.isnan(k_cache[~written]).all()


def test_rotary_cache_write_skips_out_of_range_slots():
    """Documented: a row or position outside the cache writes nothing (nothing is checked on the host, so a
    graph-captured step with a bad map cannot write out of bounds or into a row it does not own)."""
    b, nh, nkv, d, max_seq = 4, 4, 2, 32, 16
    q, k, v = randn(b, 1, nh, d), randn(b, 1, nkv, d), randn(b, 1, nkv, d)
    pos = torch.tensor([[3], [16], [-1], [5]], device=DEVICE)  # 16 and -1 are outside [0, 16)
    rows = torch.tensor([0, 1, 1, 7], device=DEVICE)  # 7 is outside [0, 3)
    k_cache = poison(torch.empty(3, max_seq, nkv, d, device=DEVICE))
    v_cache = poison(torch.empty_like(k_cache))
    got_q = rotary_cache_write(q, k, v, pos, THETA, k_cache, v_cache, rows=rows)
    assert_close(got_q, apply_rotary_ref(_d(q), _d(k), pos, THETA)[0], baseline=apply_rotary_ref(q, k, pos, THETA)[0])
    written = ~torch.isnan(k_cache[..., 0, 0])
    assert written.nonzero().tolist() == [[0, 3]], "only token 0 is in range"
    assert torch.equal(v_cache[0, 3], v[0, 0])


def test_rotary_cache_write_bad_inputs():
    q, k, v = randn(2, 1, 4, 32), randn(2, 1, 2, 32), randn(2, 1, 2, 32)
    pos = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    kc, vc = randn(2, 8, 2, 32), randn(2, 8, 2, 32)
    with pytest.raises(ValueError, match="fewer than the batch of 2"):
        rotary_cache_write(q, k, v, pos, THETA, kc[:1], vc[:1])
    with pytest.raises(ValueError, match=r"rows must have shape \[2\]"):
        rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="v has dtype torch.float16 but q has torch.float32"):
        rotary_cache_write(q, k, v.half(), pos, THETA, kc, vc)
    with pytest.raises(ValueError, match=r"k_cache and v_cache must both have shape \[rows, max_seq, 2, 32\]"):
        rotary_cache_write(q, k, v, pos, THETA, randn(2, 8, 1, 32), vc)
    with pytest.raises(ValueError, match="k and v must both have shape"):
        rotary_cache_write(q, k, v[:, :, :1], pos, THETA, kc, vc)
    with pytest.raises(TypeError, match="rows has dtype float32"):
        rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=torch.zeros(2, device=DEVICE))


def test_apply_rotary_ref_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                   rope_theta=THETA, max_position_embeddings=4096)
    rope = LlamaRotaryEmbedding(cfg).to(DEVICE)
    b, s, d = 2, 6, 64
    for dtype in DTYPES:
        q = randn(b, s, 4, d, dtype=dtype)
        k = randn(b, s, 1, d, dtype=dtype)
        pos = _positions(b, s, [3, 1000], torch.int64)
        cos, sin = rope(q, pos)
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q_ref, k_ref = apply_rotary_ref(q, k, pos, THETA)
        assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf), dtype


def test_apply_rotary_bad_inputs():
    q = randn(1, 2, 4, 64)
    k = randn(1, 2, 1, 64)
    pos = _positions(1, 2, [0], torch.int64)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rotary(randn(1, 2, 4, 63), randn(1, 2, 1, 63), pos, THETA)
    with pytest.raises(ValueError, match=r"head_dim must be even and in \[2, 256\], got 512"):
        apply_rotary(randn(1, 2, 1, 512), randn(1, 2, 1, 512), pos, THETA)
    with pytest.raises(TypeError, match="positions has dtype float32"):
        apply_rotary(q, k, pos.float(), THETA)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        apply_rotary(q, k.half(), pos, THETA)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        apply_rotary(q[0], k, pos, THETA)
    with pytest.raises(ValueError, match=r"k must have shape \[1, 2, n_kv_heads, 64\]"):
        apply_rotary(q, randn(1, 3, 1, 64), pos, THETA)
    with pytest.raises(ValueError, match=r"positions must have shape \[1, 2\]"):
        apply_rotary(q, k, pos[:, :1], THETA)
    with pytest.raises(ValueError, match="positions must have 2 dimensions"):
        apply_rotary(q, k, pos[0], THETA)
    with pytest.raises(ValueError, match=r"q_out must have shape \(1, 2, 4, 64\)"):
        apply_rotary(q, k, pos, THETA, q_out=torch.empty(1, 2, 1, 64, device=DEVICE))
    with pytest.raises(TypeError, match="theta must be a Python int or float, got Tensor"):
        apply_rotary(q, k, pos, torch.tensor(THETA, device=DEVICE))
    with pytest.raises(ValueError, match="theta must be a finite number > 0, got 0.0"):
        apply_rotary(q, k, pos, 0)
    with pytest.raises(ValueError, match="theta must be a finite number > 0, got inf"):
        apply_rotary(q, k, pos, float("inf"))
    # 65535 q heads + 1 kv head in blocks of 1 head: 65536 programs on grid axis 1 (CUDA's limit 65535).
    with pytest.raises(ValueError, match="head blocks = 65536 exceeds the CUDA grid limit of 65535"):
        apply_rotary(randn(1, 1, 65535, 2), randn(1, 1, 1, 2), _positions(1, 1, [0], torch.int64), THETA)


SINCOS_BOUND = 2.0**16  # kernels/rotary.py: _sincos is accurate for |angle| < 2^16


@triton.jit
def _sincos_test_kernel(x_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sin, cos = _sincos(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(sin_ptr + offs, sin, mask=mask)
    tl.store(cos_ptr + offs, cos, mask=mask)


def _sincos_angles() -> torch.Tensor:
    """fp32 angles in (-2^16, 2^16): every RoPE angle of SOLAR (d=128) for positions 0..65535 in
    steps of 5, a uniform sample, and the hard spots of the pi/2 reduction (fp32 neighbours of
    k*pi/2, where the reduced angle cancels to ~0, and of k*pi/2 + pi/4, the quadrant boundary)."""
    g = torch.Generator().manual_seed(0)
    rope = torch.arange(0, 65536, 5, dtype=torch.float32)[:, None] * rotary_inv_freq(THETA, 128, torch.device("cpu"))
    uniform = torch.rand(1 << 18, generator=g) * SINCOS_BOUND
    k = torch.arange(0, math.ceil(SINCOS_BOUND / (math.pi / 2)), dtype=torch.float64) * (math.pi / 2)
    hard = torch.cat([k, k + math.pi / 4]).float()
    hard = torch.cat([hard, torch.nextafter(hard, torch.tensor(math.inf)), torch.nextafter(hard, torch.tensor(-math.inf))])
    x = torch.cat([rope.flatten(), uniform, hard, -uniform[:4096], torch.tensor([0.0, -0.0, 65535.99])])
    return x[x.abs() < SINCOS_BOUND].contiguous()


def test_rotary_sincos_accuracy():
    # The rotary kernel's own sin/cos (no libdevice) against fp64 sin/cos of the same fp32 angles,
    # up to the supported bound: within ~2-3 fp32 ulps of 1 and comparable to torch's fp32 sin/cos.
    x = _sincos_angles()
    n = x.numel()
    xs = x.to(DEVICE)
    sin, cos = poison(torch.empty_like(xs)), poison(torch.empty_like(xs))
    block = 1 << 14
    _sincos_test_kernel[(triton.cdiv(n, block),)](xs, sin, cos, n, BLOCK=block)
    xd = x.double()
    for name, got, exact, torch32 in (("sin", sin, xd.sin(), x.sin()), ("cos", cos, xd.cos(), x.cos())):
        err = (got.cpu().double() - exact).abs()
        torch_err = (torch32.double() - exact).abs().max().item()
        worst = int(err.argmax())
        detail = f"{name}: max err {err.max().item():.3e} at x={x[worst].item()!r} (torch fp32 {torch_err:.3e})"
        assert bool(torch.isfinite(err).all()), detail
        assert err.max().item() <= 4e-7, detail
        assert err.max().item() <= 2 * torch_err + 1e-7, detail


def test_rotary_launch_config():
    cfg = rotary_launch_config(32, 8, 128)
    assert cfg["HALF"] == 64 and cfg["BLOCK_HALF"] == 64 and cfg["BLOCK_H"] == 8
    assert rotary_launch_config(3, 2, 96)["BLOCK_HALF"] == 64
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary_launch_config(4, 1, 7)


# ------------------------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1, 14336), (17, 3000), (2, 3, 123), (5,)], ids=str)
def test_swiglu(shape, dtype):
    g = randn(*shape, dtype=dtype, scale=4.0)  # wide enough to reach silu's saturated tails
    u = randn(*shape, dtype=dtype)
    g0, u0 = g.clone(), u.clone()
    out = poison(torch.empty_like(g))
    y = swiglu(g, u, out=out)
    assert y is out
    assert_close(y, swiglu_ref(_d(g), _d(u)), baseline=swiglu_ref(g, u), msg=f"swiglu {shape} {dtype}")
    assert torch.equal(g, g0) and torch.equal(u, u0), "inputs modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_swiglu_fused_gate_up_views(dtype):
    # gate and up as the halves of one [tokens, 2 * I] projection output: strided rows, no copy.
    gu = randn(2, 7, 2 * 300, dtype=dtype, scale=3.0)
    g, u = gu[..., :300], gu[..., 300:]
    gu0 = gu.clone()
    y = swiglu(g, u)
    assert y.shape == g.shape and y.is_contiguous()
    assert_close(y, swiglu_ref(_d(g), _d(u)), baseline=swiglu_ref(g, u))
    # A strided output view and a transposed (copied) input as well.
    big = poison(torch.empty(2, 7, 500, dtype=dtype, device=DEVICE))
    swiglu(g, u, out=big[..., 100:400])
    assert_close(big[..., 100:400], swiglu_ref(_d(g), _d(u)), baseline=swiglu_ref(g, u))
    assert big[..., :100].isnan().all() and big[..., 400:].isnan().all()
    gt = randn(33, 9, dtype=dtype).t()
    ut = randn(9, 33, dtype=dtype)
    assert_close(swiglu(gt, ut), swiglu_ref(_d(gt), _d(ut)), baseline=swiglu_ref(gt, ut))
    assert torch.equal(gu, gu0)


def test_swiglu_bad_inputs():
    g = randn(4, 8)
    with pytest.raises(ValueError, match=r"up must have gate's shape \(4, 8\)"):
        swiglu(g, randn(4, 9))
    with pytest.raises(TypeError, match="up has dtype torch.bfloat16 but gate has torch.float32"):
        swiglu(g, randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="gate has dtype int64"):
        swiglu(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), g)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 8\)"):
        swiglu(g, g, out=torch.empty(8, 4, device=DEVICE))
    with pytest.raises(ValueError, match="out must have a contiguous last dimension"):
        swiglu(g, g, out=torch.empty(8, 4, device=DEVICE).t())


def test_swiglu_launch_config():
    cfg = swiglu_launch_config()
    assert set(cfg) == {"BLOCK", "num_warps", "num_stages"} and cfg["BLOCK"] % 128 == 0
