"""swiglu (kernels/swiglu.py) against the float64 run of its torch reference.

Every kernel result may be at most 2x as wrong as torch itself at the input dtype (helpers.assert_close with
`baseline=`). Outputs are passed in NaN-poisoned so an element the kernel skips fails the comparison, and
inputs are checked to be untouched. Same code runs under the interpreter (CPU) and compiled (CUDA).
"""
from __future__ import annotations

import pytest
import torch

from fastsolar.kernels.swiglu import swiglu, swiglu_launch_config, swiglu_ref
from helpers import DEVICE, FLOAT_DTYPES, FLOAT_IDS, assert_close, poison, randn


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.double()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=FLOAT_IDS)
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


def test_swiglu_contiguous_inputs_strided_out():
    """Contiguous gate and up, the output a column slice of a wider NaN-poisoned buffer: the kernel must address
    the output by rows (its row stride is not the inputs') and write only the slice."""
    g, u = randn(5, 300, scale=3.0), randn(5, 300)
    big = poison(torch.empty(5, 500, device=DEVICE))
    swiglu(g, u, out=big[:, 100:400])
    assert_close(big[:, 100:400], swiglu_ref(_d(g), _d(u)), baseline=swiglu_ref(g, u))
    assert big[:, :100].isnan().all() and big[:, 400:].isnan().all(), "wrote outside the out view"
