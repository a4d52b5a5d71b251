"""The fused skinny-GEMM family (kernels/gemv.py) against its float64 reference.

Each case: fresh random inputs, a NaN-poisoned output, inputs checked unchanged, and an error of at most
~2x torch's own at the same dtype (helpers.assert_close with baseline=) plus one ulp of the result (the
kernel rounds y once from fp32, torch may round an intermediate too). Under the interpreter bf16 is only
run where no tl.dot is involved (M == 1); M >= 2 runs fp16/fp32 there and bf16 on CUDA.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fastsolar import quant
from fastsolar.kernels._workspace import workspace
from fastsolar.kernels.gemv import MAX_M, gemv, gemv_launch_config, gemv_ref
from helpers import DEVICE, ULP, assert_close, int4_weights, poison, randn
EPS = 1e-5


def _inputs(m, n, k, dtype, wdtype, prologue, residual):
    kx = 2 * k if prologue == "swiglu" else k
    x = randn(m, kx, dtype=dtype)
    w = randn(n, k, scale=k ** -0.5)
    scale = None
    kw = {}
    if wdtype == "int4":  # packed, group 128
        kw = int4_weights(n, k, 128)
        w = kw.pop("weight")
    elif wdtype in (torch.int8, torch.float8_e4m3fn):
        w, kw["scale"] = quant.quantize_weight(w, quant.MODE_OF_DTYPE[wdtype])  # per channel: w ~= scale[:, None] * q
    else:
        w = w.to(wdtype)
        kw["scale"] = None
    if prologue == "norm":
        kw.update(norm_weight=(1.0 + 0.5 * randn(k)).to(dtype), eps=EPS)
    elif prologue == "swiglu":
        kw["swiglu"] = True
    if residual:
        kw["residual"] = randn(m, n, dtype=dtype)
    return x, w, kw


def _check(x, w, kw, msg):
    saved = [t.clone() for t in (x, w, *(v for v in kw.values() if isinstance(v, torch.Tensor)))]
    out = poison(torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=DEVICE))
    y = gemv(x, w, out=out, **kw)
    assert y is out
    now = [x, w, *(v for v in kw.values() if isinstance(v, torch.Tensor))]
    assert all(torch.equal(a, b) for a, b in zip(saved, now)), "an input was modified"
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scale" else v)
            for k, v in kw.items()}
    truth = gemv_ref(x.double(), w, **kw64)
    assert_close(y, truth, baseline=gemv_ref(x, w, **kw), rtol=ULP[x.dtype], msg=msg)
    return y


BF16_DOT = pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter")
CASES = [
    # m, n, k, x dtype, weight dtype, prologue, residual
    pytest.param(1, 37, 123, torch.float32, torch.float32, "plain", False, id="m1-n37-k123-fp32"),
    pytest.param(1, 50, 3000, torch.bfloat16, torch.bfloat16, "swiglu", False, id="m1-swiglu-k3000-bf16-splitk"),
    pytest.param(1, 40, 3000, torch.float16, torch.float16, "norm", True, id="m1-norm-res-k3000-fp16-splitk"),
    pytest.param(1, 17, 300, torch.bfloat16, torch.float8_e4m3fn, "plain", True, id="m1-fp8-res-bf16"),
    pytest.param(1, 123, 123, torch.bfloat16, torch.int8, "norm", False, id="m1-int8-norm-bf16"),
    pytest.param(2, 123, 123, torch.float16, torch.float16, "norm", True, id="m2-norm-res-fp16"),
    pytest.param(3, 37, 123, torch.float32, torch.float32, "swiglu", False, id="m3-swiglu-fp32"),
    pytest.param(5, 17, 300, torch.float16, torch.int8, "plain", False, id="m5-int8-fp16"),
    pytest.param(7, 33, 3000, torch.float16, torch.float8_e4m3fn, "plain", True, id="m7-fp8-res-k3000-splitk"),
    pytest.param(8, 64, 1500, torch.float16, torch.float16, "plain", True, id="m8-res-k1500-splitk"),
    pytest.param(4, 31, 200, torch.bfloat16, torch.bfloat16, "norm", True, marks=[BF16_DOT],
                 id="m4-norm-bf16"),
]


@pytest.mark.parametrize("m, n, k, dtype, wdtype, prologue, residual", CASES)
def test_gemv_matches_reference(m, n, k, dtype, wdtype, prologue, residual):
    x, w, kw = _inputs(m, n, k, dtype, wdtype, prologue, residual)
    _check(x, w, kw, f"m{m} n{n} k{k} {dtype} {wdtype} {prologue} res={residual}")


INT4_CASES = [
    # m, n, k, group size, x dtype, scale dtype, prologue, residual, symmetric zeros
    pytest.param(1, 37, 200, 64, torch.float32, torch.float16, "plain", False, False, id="m1-k200-g64-partial-fp32"),
    pytest.param(1, 50, 3000, 128, torch.bfloat16, torch.bfloat16, "swiglu", True, False, id="m1-swiglu-res-k3000-splitk"),
    pytest.param(1, 17, 136, 136, torch.float16, torch.float32, "norm", False, True, id="m1-norm-per-channel-sym"),
    pytest.param(3, 33, 248, 32, torch.float16, torch.float16, "norm", True, False, id="m3-norm-res-g32"),
    pytest.param(8, 19, 1400, 128, torch.float32, torch.float16, "plain", True, True, id="m8-res-k1400-splitk-sym"),
    pytest.param(5, 64, 192, 64, torch.float16, torch.bfloat16, "swiglu", False, False, id="m5-swiglu-g64"),
    pytest.param(4, 31, 256, 128, torch.bfloat16, torch.float16, "norm", True, False, marks=[BF16_DOT], id="m4-bf16"),
]


@pytest.mark.parametrize("m, n, k, group, dtype, sdtype, prologue, residual, sym", INT4_CASES)
def test_gemv_int4_matches_reference(m, n, k, group, dtype, sdtype, prologue, residual, sym):
    """Packed int4 weights (kernels/_int4.py): group scales and zeros applied per k, partial last groups, odd N."""
    x, _, kw = _inputs(m, n, k, dtype, dtype, prologue, residual)
    kw.pop("scale")
    kw.update(int4_weights(n, k, group, scale_dtype=sdtype, symmetric=sym))
    _check(x, kw.pop("weight"), kw, f"int4 m{m} n{n} k{k} g{group} {dtype} {sdtype} {prologue} res={residual}")


def test_gemv_int4_realistic_magnitudes_and_bad_inputs():
    """Row RMS 1e-2 activations through the norm prologue; a zero point or group taken from the wrong column
    would be far off. Bad int4 arguments are refused by name."""
    x = randn(2, 96, dtype=torch.float16, scale=1e-2)
    p = int4_weights(21, 96, 32)
    w = p.pop("weight")
    _check(x, w, {**p, "norm_weight": (1.0 + 0.5 * randn(96)).to(torch.float16), "eps": EPS}, "int4 rms 1e-2")
    with pytest.raises(ValueError, match="needs its group scale, zeros and group_size"):
        gemv(x, w, scale=p["scale"], group_size=32)
    with pytest.raises(ValueError, match=r"scales must have shape \[21, 3\]"):
        gemv(x, w, scale=p["scale"][:, :2], zeros=p["zeros"], group_size=32)
    with pytest.raises(ValueError, match="zeros and group_size belong to packed int4"):
        gemv(x, randn(21, 96, dtype=torch.float16), zeros=p["zeros"], group_size=32)
    with pytest.raises(ValueError, match="x's last dim must be K = 96"):
        gemv(randn(2, 12, dtype=torch.float16), w, **p)


@pytest.mark.gpu("SOLAR-sized products: too slow for the Triton interpreter")
@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn, "int4"],
                         ids=["bf16", "int8", "fp8", "int4"])
def test_gemv_solar_shapes_on_cuda(m, wdtype):
    """Every decode product of a SOLAR layer at its real size, compiled, bf16 activations."""
    for n, k, prologue, residual in ((6144, 4096, "norm", False), (4096, 4096, "plain", True),
                                     (28672, 4096, "norm", False), (4096, 14336, "swiglu", True)):
        x, w, kw = _inputs(m, n, k, torch.bfloat16, wdtype, prologue, residual)
        _check(x, w, kw, f"SOLAR m{m} {n}x{k} {prologue} {wdtype}")


def test_gemv_fp8_bit_decode_before_sm89(monkeypatch):
    """On an A100 (sm_80: no fp8 conversion) the e4m3 bytes are decoded with integer ops: every one of the
    256 byte values (NaNs aside) must give the value torch gives, through the whole kernel."""
    gemv_mod = importlib.import_module("fastsolar.kernels.gemv")
    monkeypatch.setattr(gemv_mod, "device_properties", lambda device: ((8, 0), 108))
    assert gemv_mod.gemv_launch_config(1, 16, 256, torch.float8_e4m3fn, (8, 0))["W_E4M3_BITS"]
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # drop the two NaN codes
    w = codes[torch.randperm(codes.numel())][: 16 * 15].view(16, 15).view(torch.float8_e4m3fn).to(DEVICE)
    x = torch.zeros(1, 15, device=DEVICE)
    for j in range(15):  # y[n] = w[n, j]: each column alone, so every byte is compared exactly
        x.zero_()
        x[0, j] = 1.0
        y = gemv(x, w, scale=torch.ones(16, device=DEVICE))
        assert torch.equal(y[0], w[:, j].float()), f"column {j}"
    x, w, kw = _inputs(3, 37, 300, torch.float16, torch.float8_e4m3fn, "norm", True)
    _check(x, w, kw, "fp8 bits, M 3")


def test_gemv_strided_rows_and_leading_dims():
    """Decode passes [b, 1, K] rows, and gate|up as one fused [b, 1, 2K] projection output; x rows may be a
    slice of a wider buffer (row stride > K)."""
    wide = randn(3, 1, 400, dtype=torch.float16)
    x = wide[..., 10:133]  # [3, 1, 123], row stride 400
    w = randn(29, 123, dtype=torch.float16, scale=0.1)
    res = randn(3, 1, 29, dtype=torch.float16)
    y = _check(x, w, {"residual": res}, "strided rows")
    assert y.shape == (3, 1, 29)


def test_gemv_split_k_workspace_is_reset_and_poison_safe():
    """Split-K writes every partial before the last program reads it (the workspace is NaN-poisoned here) and
    leaves its counters at 0, so the next launch (or graph replay) over the same workspace is right too."""
    m, n, k = 1, 50, 3000
    cfg = gemv_launch_config(m, n, k, torch.float32)
    assert cfg["SPLIT_K"] > 1
    part = workspace("gemv.partials", (cfg["SPLIT_K"], m, n), torch.float32, DEVICE)
    counters = workspace("gemv.counters", (-(-n // cfg["BLOCK_N"]),), torch.int32, DEVICE)
    for _ in range(2):
        poison(part)
        x, w, kw = _inputs(m, n, k, torch.float32, torch.float32, "plain", True)
        _check(x, w, kw, "split-K")
        assert (counters == 0).all()


def test_gemv_launch_config():
    for m in range(1, MAX_M + 1):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (32000, 4096), (37, 123)):
            for wdt in (torch.bfloat16, torch.int8, torch.float8_e4m3fn, torch.float32):
                c = gemv_launch_config(m, n, k, wdt, (9, 0), 132)
                assert c["BLOCK_M"] == (1 if m == 1 else 16)
                split, per = c["SPLIT_K"], c["k_per_split"]
                assert split >= 1 and (split - 1) * per < k <= split * per
                assert c["k_per_split"] % c["BLOCK_K"] == 0
    # SOLAR's o-proj at batch 1 (N = 4096): 128 output blocks for 132 SMs, so K is split.
    assert gemv_launch_config(1, 4096, 4096, torch.bfloat16, (9, 0), 132)["SPLIT_K"] > 1
    # gate_up (N = 28672) fills the GPU without a split.
    assert gemv_launch_config(1, 28672, 4096, torch.bfloat16, (9, 0), 132)["SPLIT_K"] == 1


def test_gemv_int4_tiles_stay_in_one_group():
    """Each int4 tile reads one scale and zero per row, so BLOCK_K divides the group (or one group covers K);
    groups that are not multiples of 16 are refused by name."""
    for m in (1, 4):
        for k, group in ((4096, 128), (14336, 32), (4096, 64), (14336, 14336), (200, 64), (136, 136)):
            c = gemv_launch_config(m, 4096, k, torch.int32, (9, 0), 132, group_size=group)
            assert group >= k or group % c["BLOCK_K"] == 0, (m, k, group, c)
            assert c["W_INT4"] and c["k_per_split"] % c["BLOCK_K"] == 0
    with pytest.raises(ValueError, match="group_size must be a multiple of 16 .* got 24"):
        gemv_launch_config(1, 64, 96, torch.int32, group_size=24)


def test_gemv_bad_inputs():
    x, w = randn(2, 64), randn(16, 64)
    with pytest.raises(ValueError, match=r"gemv takes 1..8 rows .* got 9"):
        gemv(randn(9, 64), w)
    with pytest.raises(ValueError, match=r"x's last dim must be K = 64"):
        gemv(randn(2, 63), w)
    with pytest.raises(ValueError, match=r"2 \* K \(gate \| up\) = 128"):
        gemv(x, w, swiglu=True)
    with pytest.raises(ValueError, match="needs its per-output-channel scale"):
        gemv(x, w.to(torch.int8))
    with pytest.raises(ValueError, match=r"scale must have shape \[16\]"):
        gemv(x, w.to(torch.int8), scale=torch.ones(15, device=DEVICE))
    with pytest.raises(TypeError, match="scale has dtype float16"):
        gemv(x, w, scale=torch.ones(16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[64\]"):
        gemv(x, w, norm_weight=torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="either an RMSNorm or a SwiGLU"):
        gemv(randn(2, 128), w, swiglu=True, norm_weight=torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 16\)"):
        gemv(x, w, residual=randn(2, 15))
    with pytest.raises(TypeError, match="residual has dtype float16"):
        gemv(x, w, residual=randn(2, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight has dtype int64"):
        gemv(x, w.long())
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv(x, randn(64, 16).t())


@pytest.mark.parametrize("m, k, dtype", [(1, 3000, torch.bfloat16), (3, 123, torch.float16), (2, 200, torch.float32)],
                         ids=["m1-k3000-bf16-splitk", "m3-k123-fp16", "m2-k200-fp32"])
def test_gemv_norm_prologue_realistic_magnitudes(m, k, dtype):
    """x at row RMS ~1e-2, as real embeddings have: the mean square (1e-4) is then only 10x SOLAR's eps (1e-5), so
    a prologue that drops eps, or adds it anywhere but to the mean square, is ~5% off; the eps-less reference is
    checked to fail the same comparison."""
    eps = 1e-5
    x = randn(m, k, dtype=dtype, scale=1e-2)
    w = randn(37, k, dtype=dtype, scale=k ** -0.5)
    g = (1.0 + 0.5 * randn(k)).to(dtype)
    y = _check(x, w, {"norm_weight": g, "eps": eps}, f"norm prologue at row RMS 1e-2, m{m} k{k} {dtype}")
    truth = gemv_ref(x.double(), w, norm_weight=g.double(), eps=eps)
    baseline = gemv_ref(x, w, norm_weight=g, eps=eps)
    with pytest.raises(AssertionError, match="not close"):
        assert_close(gemv_ref(x.double(), w, norm_weight=g.double(), eps=0.0).to(dtype), truth, baseline=baseline,
                     rtol=ULP[dtype])
    assert_close(y, truth, baseline=baseline, rtol=ULP[dtype])


def test_gemv_contiguous_inputs_strided_out():
    """Contiguous x and residual, y written into a column slice of a wider NaN-poisoned buffer (row stride 100,
    not N): only the slice changes. Both inner products (M 1 and M >= 2) and the split-K combine."""
    for m, k in ((1, 3000), (3, 123)):
        x, res = randn(m, k, dtype=torch.float16), randn(m, 29, dtype=torch.float16)
        w = randn(29, k, dtype=torch.float16, scale=k ** -0.5)
        big = poison(torch.empty(m, 100, dtype=torch.float16, device=DEVICE))
        y = gemv(x, w, residual=res, out=big[:, 40:69])
        assert_close(y, gemv_ref(x.double(), w.double(), residual=res.double()), baseline=gemv_ref(x, w, residual=res),
                     rtol=ULP[torch.float16], msg=f"m{m} k{k}")
        assert big[:, :40].isnan().all() and big[:, 69:].isnan().all(), f"m{m}: wrote outside the out view"


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
def test_gemv_ref_few_rows_against_a_big_weight(rows):
    """gemv_ref's CPU layout for a decode batch against a weight larger than the caches ((W @ x.T).T for 1..8 rows,
    kernels/gemv.py `_linear`) is the same product: fp64 truth, fp32 F.linear's error as the baseline."""
    from fastsolar.kernels.gemv import _CPU_BIG_WEIGHT

    w = randn(8209, 257, seed=1, scale=0.05)  # odd sizes, above the big-weight bound
    assert w.numel() * w.element_size() >= _CPU_BIG_WEIGHT
    x, res = randn(rows, 1, 257, seed=2), randn(rows, 1, 8209, seed=3)
    got = gemv_ref(x, w, residual=res)
    assert got.shape == (rows, 1, 8209) and got.is_contiguous()
    truth = res.double() + torch.nn.functional.linear(x.double(), w.double())
    assert_close(got, truth, baseline=res + torch.nn.functional.linear(x, w))
