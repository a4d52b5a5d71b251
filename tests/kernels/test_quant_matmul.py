"""quant_matmul (kernels/quant_matmul.py), the quantised prefill product, against the float64 run of the
dequantise-then-matmul reference (gemv_ref with scale=, the one reference of both quantised kernels).

At most 2x the error that reference makes at the input dtype (helpers.assert_close with `baseline=`) plus one
ulp of the output; outputs are NaN-poisoned, inputs checked untouched. Shapes are odd on purpose: N and K not
multiples of any tile, K not a multiple of BLOCK_K, M just past the GEMV's 8 rows (small-M tiles) and prefill
sizes. bf16 activations need a GPU (the interpreter's bf16 tl.dot is garbage); int8 and fp8 weights load fine
under it.
"""
from __future__ import annotations

import pytest
import torch

from fastsolar.kernels.gemv import gemv_ref
from fastsolar.kernels.quant_matmul import quant_matmul, quant_matmul_launch_config
from helpers import DEVICE, ON_GPU, ULP, assert_close, int4_weights, poison, quantized_weights, randn

MODES = ("int8", "fp8")
X_DTYPES = [torch.float32, torch.float16]
X_IDS = ["fp32", "fp16"]
FP8_OK = not ON_GPU or torch.cuda.get_device_capability() >= (8, 9)
SHAPES = [(9, 97, 67), (13, 33, 257), (16, 64, 512), (11, 1, 130), (17, 97, 300), (113, 45, 64)]


@pytest.mark.parametrize("dtype", X_DTYPES, ids=X_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quant_matmul_matches_reference(shape, mode, dtype):
    m, n, k = shape
    x = randn(m, k, dtype=dtype)
    q, s = quantized_weights(n, k, mode)
    x0, q0, s0 = x.clone(), q.clone(), s.clone()
    out = poison(torch.empty(m, n, dtype=dtype, device=DEVICE))
    y = quant_matmul(x, q, s, out=out)
    assert y is out
    assert_close(y, gemv_ref(x.double(), q, scale=s), baseline=gemv_ref(x, q, scale=s), rtol=ULP[dtype],
                 msg=f"quant_matmul {shape} {mode} {dtype}")
    assert torch.equal(x, x0) and torch.equal(q.float(), q0.float()) and torch.equal(s, s0), "inputs modified"


@pytest.mark.parametrize("mode", MODES)
def test_quant_matmul_leading_dims_and_strided_rows(mode):
    q, s = quantized_weights(19, 70, mode, seed=4)
    wide = randn(2, 5, 100)
    x = wide[..., 10:80]  # rows of a wider tensor: a row stride, no copy
    y = quant_matmul(x, q, s)
    assert y.shape == (2, 5, 19)
    assert_close(y, gemv_ref(x.double(), q, scale=s), baseline=gemv_ref(x, q, scale=s))


@pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter")
@pytest.mark.parametrize("mode", [m for m in MODES if m == "int8" or FP8_OK])
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (8, 6144, 4096), (77, 1000, 14336), (512, 4096, 4096)], ids=str)
def test_quant_matmul_bf16_on_gpu(shape, mode):
    m, n, k = shape
    x = randn(m, k, dtype=torch.bfloat16)
    q, s = quantized_weights(n, k, mode)
    out = poison(torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE))
    quant_matmul(x, q, s, out=out)
    assert_close(out, gemv_ref(x.double(), q, scale=s), baseline=gemv_ref(x, q, scale=s))


INT4_CASES = [
    # m, n, k, group size, symmetric, scale dtype
    (9, 97, 200, 64, False, torch.float16),  # K past the last full group and not a multiple of BLOCK_K
    (13, 33, 256, 32, True, torch.bfloat16),
    (17, 45, 136, 136, False, torch.float32),  # per channel: one group covers K = 8 * 17
    (113, 64, 384, 128, False, torch.float16),  # prefill tiles (BLOCK_M 128)
]


@pytest.mark.parametrize("dtype", X_DTYPES, ids=X_IDS)
@pytest.mark.parametrize("m, n, k, group, sym, sdtype", INT4_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_quant_matmul_int4_matches_reference(m, n, k, group, sym, sdtype, dtype):
    """Packed int4 (kernels/_int4.py): the tile dequantised per group in registers, the same values as the
    reference's dequantised weight."""
    x = randn(m, k, dtype=dtype, scale=0.05)
    p = int4_weights(n, k, group, scale_dtype=sdtype, symmetric=sym)
    w = p.pop("weight")
    saved = [x.clone(), w.clone(), p["scale"].clone(), p["zeros"].clone()]
    out = poison(torch.empty(m, n, dtype=dtype, device=DEVICE))
    y = quant_matmul(x, w, p["scale"], out=out, zeros=p["zeros"], group_size=group)
    assert y is out
    assert_close(y, gemv_ref(x.double(), w, **p), baseline=gemv_ref(x, w, **p), rtol=ULP[dtype],
                 msg=f"int4 {m}x{n}x{k} g{group} sym={sym} {dtype}")
    assert all(torch.equal(a, b) for a, b in zip(saved, (x, w, p["scale"], p["zeros"]))), "inputs modified"


@pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter")
@pytest.mark.parametrize("shape", [(9, 4096, 4096), (77, 1000, 14336), (512, 4096, 4096)], ids=str)
def test_quant_matmul_int4_bf16_on_gpu(shape):
    m, n, k = shape
    x = randn(m, k, dtype=torch.bfloat16)
    p = int4_weights(n, k, 128)
    w = p.pop("weight")
    out = poison(torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE))
    quant_matmul(x, w, p["scale"], out=out, zeros=p["zeros"], group_size=128)
    assert_close(out, gemv_ref(x.double(), w, **p), baseline=gemv_ref(x, w, **p), rtol=ULP[torch.bfloat16])


def test_quant_matmul_int4_bad_inputs():
    p = int4_weights(9, 64, 32, seed=3)
    x = randn(10, 64)
    with pytest.raises(ValueError, match="needs its group scale, zeros and group_size"):
        quant_matmul(x, p["weight"], p["scale"], group_size=32)
    with pytest.raises(ValueError, match=r"zeros must have shape \[9, 2\]"):
        quant_matmul(x, p["weight"], p["scale"], zeros=p["zeros"][:, :1], group_size=32)
    with pytest.raises(ValueError, match="x must have last dimension 64"):
        quant_matmul(randn(10, 60), p["weight"], p["scale"], zeros=p["zeros"], group_size=32)
    q, s = quantized_weights(9, 64, "int8", seed=5)
    with pytest.raises(ValueError, match="zeros and group_size belong to packed int4"):
        quant_matmul(x, q, s, zeros=p["zeros"], group_size=32)


def test_quant_matmul_launch_configs():
    """Tiles are powers of two >= 16 (tl.dot), short prefills get the small-M tiles, EVEN_K is exact."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m in (1, 8, 16, 17, 64, 65, 4096):
            for k in (64, 100, 4096, 14336):
                cfg = quant_matmul_launch_config(m, k, dtype)
                for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (key, cfg)
                assert cfg["EVEN_K"] == (k % cfg["BLOCK_K"] == 0)
                smem = cfg["num_stages"] * cfg["BLOCK_K"] * (cfg["BLOCK_M"] * dtype.itemsize + cfg["BLOCK_N"])
                assert smem <= 164 * 1024, (cfg, smem)  # sm_80's opt-in limit
    for m in (9, 32, 512):  # int4: every tile within one group (one scale and zero per row per tile)
        for k, group in ((4096, 128), (14336, 32), (14336, 14336), (200, 64), (136, 136)):
            cfg = quant_matmul_launch_config(m, k, torch.bfloat16, group)
            assert group >= k or group % cfg["BLOCK_K"] == 0, (m, k, group, cfg)
            assert cfg["BLOCK_K"] >= 16 and cfg["EVEN_K"] == (k % cfg["BLOCK_K"] == 0)
    with pytest.raises(ValueError, match="group_size must be a multiple of 16"):
        quant_matmul_launch_config(32, 4096, torch.bfloat16, 40)
    assert quant_matmul_launch_config(1, 4096, torch.bfloat16)["BLOCK_M"] == 16
    assert quant_matmul_launch_config(512, 4096, torch.bfloat16)["BLOCK_M"] == 128


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, q, s: (x, q.float(), s), TypeError, "weight has dtype float32; supported: int8, float8_e4m3fn"),
        (lambda x, q, s: (x, q, s[:-1]), ValueError, r"scale must have shape \[9\] .* got \(8,\)"),
        (lambda x, q, s: (x, q, s.half()), TypeError, "scale has dtype float16; supported: float32"),
        (lambda x, q, s: (x[:, :-1], q, s), ValueError, r"x must have last dimension 12 .* got shape \(3, 11\)"),
        (lambda x, q, s: (x, q[None], s), ValueError, "weight must have 2 dimensions"),
        (lambda x, q, s: (x.int(), q, s), TypeError, "x has dtype int32"),
        (lambda x, q, s: (x.to("meta"), q, s), ValueError, "x is on meta; Triton kernels need a CUDA tensor"),
        (lambda x, q, s: (x, q.T.contiguous().T, s), ValueError, "weight must have a contiguous last dimension"),
    ],
    ids=["weight-dtype", "scale-shape", "scale-dtype", "k-mismatch", "weight-3d", "x-dtype", "device", "col-major"],
)
def test_quant_matmul_refuses_bad_input(make, error, message):
    x = randn(3, 12)
    q, s = quantized_weights(9, 12, "int8", seed=5)
    with pytest.raises(error, match=message):
        quant_matmul(*make(x, q, s))


def test_quant_matmul_out_and_empty():
    q, s = quantized_weights(9, 12, "fp8", seed=6)
    x = randn(3, 12)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 9\)"):
        quant_matmul(x, q, s, out=torch.empty(3, 8, device=DEVICE))
    with pytest.raises(TypeError, match="out has dtype float16"):
        quant_matmul(x, q, s, out=torch.empty(3, 9, dtype=torch.float16, device=DEVICE))
    assert quant_matmul(randn(0, 12), q, s).shape == (0, 9)


@pytest.mark.parametrize("mode", MODES)
def test_quant_matmul_contiguous_input_strided_out(mode):
    """Contiguous x, the output a column slice of a wider NaN-poisoned buffer (row stride 60, not N): only the
    slice is written, every row at the output's own stride."""
    q, s = quantized_weights(45, 64, mode, seed=9)
    x = randn(17, 64)
    big = poison(torch.empty(17, 60, device=DEVICE))
    y = quant_matmul(x, q, s, out=big[:, 10:55])
    assert_close(y, gemv_ref(x.double(), q, scale=s), baseline=gemv_ref(x, q, scale=s), rtol=ULP[torch.float32])
    assert big[:, :10].isnan().all() and big[:, 55:].isnan().all(), "wrote outside the out view"


def test_quant_matmul_empty_reduction_writes_zeros():
    """K = 0: every output is an empty sum, 0, written into a NaN-poisoned out (no kernel launch needed)."""
    q, s = quantized_weights(9, 0, "int8", seed=7)
    out = poison(torch.empty(3, 9, device=DEVICE))
    assert quant_matmul(randn(3, 0), q, s, out=out) is out
    assert torch.equal(out, torch.zeros(3, 9, device=DEVICE))
