"""apply_rotary and rotary_cache_write (kernels/rotary.py) against the float64 run of their torch reference,
and the kernel's own sin/cos against fp64.

Every kernel result may be at most 2x as wrong as torch itself at the input dtype (helpers.assert_close with
`baseline=`). Outputs and caches are passed in NaN-poisoned so an element the kernel skips fails the
comparison, and inputs are checked to be untouched. Same code runs under the interpreter (CPU) and compiled (CUDA).
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fastsolar.kernels.rotary import (
    _sincos,
    apply_rotary,
    apply_rotary_ref,
    rotary_cache_write,
    rotary_cache_write_ref,
    rotary_inv_freq,
    rotary_launch_config,
)
from helpers import DEVICE, FLOAT_DTYPES, FLOAT_IDS, assert_close, poison, randn

THETA = 10000.0


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.double()


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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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
      for c in _DECODE_CACHE_CASES for dt, i in zip(FLOAT_DTYPES, FLOAT_IDS)],
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
    for dtype in FLOAT_DTYPES:
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


def test_apply_rotary_contiguous_inputs_strided_outs():
    """Contiguous q and k rotated into head slices of wider NaN-poisoned buffers (strides not q's or k's): each
    output at its own strides, nothing written outside the slices."""
    b, s, nh, nkv, d = 2, 5, 4, 2, 64
    q, k = randn(b, s, nh, d), randn(b, s, nkv, d)
    pos = _positions(b, s, [3, 700], torch.int64)
    q_big = poison(torch.empty(b, s, nh + 2, d, device=DEVICE))
    k_big = poison(torch.empty(b, s, nkv + 3, d, device=DEVICE))
    apply_rotary(q, k, pos, THETA, q_out=q_big[:, :, 1:nh + 1], k_out=k_big[:, :, 2:nkv + 2])
    q_exp, k_exp = apply_rotary_ref(_d(q), _d(k), pos, THETA)
    q_base, k_base = apply_rotary_ref(q, k, pos, THETA)
    assert_close(q_big[:, :, 1:nh + 1], q_exp, baseline=q_base)
    assert_close(k_big[:, :, 2:nkv + 2], k_exp, baseline=k_base)
    assert q_big[:, :, [0, nh + 1]].isnan().all() and k_big[:, :, [0, 1, nkv + 2]].isnan().all(), \
        "wrote outside the out views"


def test_rotary_cache_write_contiguous_inputs_strided_q_out():
    """Contiguous q, k, v; rotated q into a head slice of a wider NaN-poisoned buffer (strides not q's), k and v
    into their cache slots: nothing written outside the q_out view."""
    b, s, nh, nkv, d, max_seq = 2, 3, 4, 2, 32, 8
    q, k, v = randn(b, s, nh, d), randn(b, s, nkv, d), randn(b, s, nkv, d)
    pos = _positions(b, s, [0, 4], torch.int32)

    def caches(dtype: torch.dtype) -> list[torch.Tensor]:
        return [poison(torch.empty(b, max_seq, nkv, d, dtype=dtype, device=DEVICE)) for _ in range(2)]

    (k_got, v_got), (k_exp, v_exp) = caches(torch.float32), caches(torch.float64)
    k_base, v_base = caches(torch.float32)
    q_big = poison(torch.empty(b, s, nh + 1, d, device=DEVICE))
    rotary_cache_write(q, k, v, pos, THETA, k_got, v_got, q_out=q_big[:, :, 1:])
    q_exp = rotary_cache_write_ref(_d(q), _d(k), _d(v), pos, THETA, k_exp, v_exp)
    q_base = rotary_cache_write_ref(q, k, v, pos, THETA, k_base, v_base)
    assert_close(q_big[:, :, 1:], q_exp, baseline=q_base)
    assert q_big[:, :, 0].isnan().all(), "wrote outside the q_out view"
    assert_close(k_got, k_exp, baseline=k_base)  # NaN where nothing was written
    assert torch.equal(v_got.nan_to_num(7.0), v_base.nan_to_num(7.0)), "v is copied exactly"
