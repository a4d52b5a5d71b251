"""rms_norm / add_rms_norm (kernels/rms_norm.py) against the float64 run of their torch reference.

Every kernel result may be at most 2x as wrong as torch itself at the input dtype (helpers.assert_close with
`baseline=`). Outputs are passed in NaN-poisoned so an element the kernel skips fails the comparison, and
inputs are checked to be untouched. Same code runs under the interpreter (CPU) and compiled (CUDA).
"""
from __future__ import annotations

import pytest
import torch

from fastsolar.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_launch_config,
    rms_norm_ref,
)
from helpers import DEVICE, FLOAT_DTYPES, FLOAT_IDS, assert_close, poison, randn

EPS = 1e-5


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.double()


def _weight(n: int, dtype: torch.dtype) -> torch.Tensor:
    # Around 1 like trained norm weights, but not all ones so a skipped multiply shows.
    return (1.0 + 0.5 * randn(n, dtype=torch.float32)).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


# Row RMS ~1e-2, as real embeddings have: the mean square (1e-4) is then only 10x SOLAR's eps (1e-5), so eps moves
# y by ~5%, far beyond the tolerance; at the RMS of 3 used above a dropped or misplaced eps changes nothing visible.
SMALL_RMS = 1e-2
SOLAR_EPS = 1e-5


def _eps_matters(x: torch.Tensor, w: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor) -> None:
    """The check below fails for a kernel without eps: the same comparison rejects the eps-less reference."""
    with pytest.raises(AssertionError, match="not close"):
        assert_close(rms_norm_ref(_d(x), _d(w), 0.0).to(x.dtype), expected, baseline=baseline)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
@pytest.mark.parametrize("shape", [(5, 1000), (3, 123)], ids=str)
def test_rms_norm_realistic_magnitudes(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=SMALL_RMS)
    w = _weight(shape[-1], dtype)
    x0 = x.clone()
    y = rms_norm(x, w, SOLAR_EPS, out=poison(torch.empty_like(x)))
    expected, baseline = rms_norm_ref(_d(x), _d(w), SOLAR_EPS), rms_norm_ref(x, w, SOLAR_EPS)
    assert_close(y, expected, baseline=baseline, msg=f"rms_norm at row RMS {SMALL_RMS} {shape} {dtype}")
    _eps_matters(x, w, expected, baseline)
    assert torch.equal(x, x0), "input modified"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
def test_add_rms_norm_realistic_magnitudes(dtype):
    x = randn(7, 300, dtype=dtype, scale=SMALL_RMS / 2)
    r = randn(7, 300, dtype=dtype, scale=SMALL_RMS)
    w = _weight(300, dtype)
    y, h = add_rms_norm(x, r, w, SOLAR_EPS, out=poison(torch.empty_like(x)), out_h=poison(torch.empty_like(x)))
    y_base, h_base = add_rms_norm_ref(x, r, w, SOLAR_EPS)
    y_exp, _ = add_rms_norm_ref(_d(x), _d(r), _d(w), SOLAR_EPS)
    assert torch.equal(h, h_base), "h differs from torch's x + residual"
    assert_close(y, y_exp, baseline=y_base, msg=f"add_rms_norm at row RMS ~{SMALL_RMS} {dtype}")
    _eps_matters(h_base, w, y_exp, y_base)


def test_add_rms_norm_contiguous_inputs_strided_outs():
    """Contiguous x and residual, y and h written into column slices of wider NaN-poisoned buffers: only the
    slices change, each row lands at its own row stride."""
    x, r = randn(2, 3, 123), randn(2, 3, 123)
    w = _weight(123, torch.float32)
    big_y = poison(torch.empty(2, 3, 300, device=DEVICE))
    big_h = poison(torch.empty(2, 3, 200, device=DEVICE))
    add_rms_norm(x, r, w, EPS, out=big_y[..., 100:223], out_h=big_h[..., 50:173])
    y_base, h_base = add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(big_h[..., 50:173], h_base)
    assert_close(big_y[..., 100:223], add_rms_norm_ref(_d(x), _d(r), _d(w), EPS)[0], baseline=y_base)
    assert big_y[..., :100].isnan().all() and big_y[..., 223:].isnan().all(), "y written outside its view"
    assert big_h[..., :50].isnan().all() and big_h[..., 173:].isnan().all(), "h written outside its view"
