"""Weight-only quantisation: the per-channel quantiser, QuantLinear, and how fastsolar.ops routes quantised
products (decode: the fused GEMVs, tests/kernels/test_gemv.py; prefill: quant_matmul,
tests/kernels/test_quant_matmul.py).

Kernel results are compared with the float64 run of the dequantise-then-matmul reference (gemv_ref with
scale=, the one reference of both kernels), allowing at most 2x the error that reference makes at the input
dtype (helpers.assert_close with `baseline=`).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsolar import gemv_choice, ops, quant
from fastsolar.kernels.gemv import gemv_ref
from fastsolar.kernels.quant_matmul import quant_matmul
from helpers import DEVICE, ULP, assert_close, channel_weights, quantized_weights, randn

MODES = ("int8", "fp8")


# ------------------------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("mode", MODES)
def test_quantiser_scales_and_rounding(mode):
    w = channel_weights(7, 301, seed=1)
    w[3] = 0.0  # an all-zero row
    w[5, 17] = -w[5].abs().max() * 3  # a negative absmax
    q, s = quant.quantize_weight(w, mode)
    assert q.dtype == quant.STORAGE_DTYPE[mode] and s.dtype == torch.float32 and s.shape == (7,)
    qmax = quant.QMAX[mode]
    qa = q.float().abs().amax(dim=1)
    live = torch.arange(7, device=DEVICE) != 3
    assert torch.equal(qa[live], torch.full_like(qa[live], qmax)), qa  # each row's absmax lands on +-QMAX
    assert q.float()[5, 17] == -qmax
    assert s[3] == 1.0 and (q[3].float() == 0).all()
    assert_close(s[live], (w.abs().amax(dim=1) / qmax)[live], rtol=1e-7, atol=0.0)
    d = quant.dequantize(q, s, torch.float64)
    err = (d - w.double()).abs()
    assert (d[3] == 0).all()
    if mode == "int8":
        assert q.min() >= -127, "symmetric int8: -128 is never used"
        assert (err <= s.double()[:, None] * (0.5 + 1e-6)).all()  # half a step, everywhere
    else:
        v = (w.double() / s.double()[:, None]).abs()
        normal = v >= 2.0**-6  # e4m3's smallest normal
        assert (err[normal] <= 2.0**-4 * w.double().abs()[normal] * (1 + 1e-6)).all()  # 3 mantissa bits
        assert (err[~normal] <= 2.0**-10 * s.double()[:, None].expand_as(err)[~normal] * (1 + 1e-6)).all()


@pytest.mark.parametrize("mode", MODES)
def test_quantiser_chunks_and_dtypes_agree(mode, monkeypatch):
    w = channel_weights(37, 50, seed=2)
    q, s = quant.quantize_weight(w, mode)
    qb, sb = quant.quantize_weight(w.to(torch.bfloat16), mode)
    q16, s16 = quant.quantize_weight(w.to(torch.bfloat16).float(), mode)
    assert torch.equal(qb.float(), q16.float()) and torch.equal(sb, s16), "bf16 input must quantise like its fp32 value"
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 128)  # 2 rows per chunk
    qc, sc = quant.quantize_weight(w, mode)
    assert torch.equal(qc.float(), q.float()) and torch.equal(sc, s)
    # Into row slices of a fused parameter, as the loader writes each part.
    fused_q = torch.empty(40, 50, dtype=q.dtype, device=DEVICE)
    fused_s = torch.full((40,), float("nan"), device=DEVICE)
    quant.quantize_into(w, fused_q[3:], fused_s[3:])
    assert torch.equal(fused_q[3:].float(), q.float()) and torch.equal(fused_s[3:], s) and fused_s[:3].isnan().all()


def test_quantiser_refuses_non_finite_and_bad_modes():
    w = channel_weights(4, 8, seed=3)
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite values \\(row 2 of 4\\)"):
        quant.quantize_weight(w, "int8")
    assert quant.check_mode("FP8") == "fp8" and quant.check_mode(None) is None
    for bad in ("int3", "nf4", "bf16", "", 8, True):
        with pytest.raises(ValueError, match="quantize=.* is not supported; use one of 'fp8', 'int8', 'int4' or None"):
            quant.check_mode(bad)


@pytest.mark.parametrize("mode", MODES)
def test_quant_linear_and_model_conversion(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(11, 16)
            self.a = nn.Linear(16, 24, bias=False)
            self.b = nn.Sequential(nn.Linear(24, 16, bias=False))
            self.lm_head = nn.Linear(16, 11, bias=False)
            self.lm_head.weight = self.embed_tokens.weight  # tied: stays the embedding table
            self.bias = nn.Linear(16, 4)  # not a model linear: has a bias

    net = Net().to(DEVICE)
    w_a = net.a.weight.detach().clone()
    assert quant.quantizable_linears(net) == ["a", "b.0"]
    quant.quantize(net, mode)
    assert isinstance(net.a, quant.QuantLinear) and isinstance(net.b[0], quant.QuantLinear)
    assert isinstance(net.lm_head, nn.Linear) and net.lm_head.weight is net.embed_tokens.weight
    assert isinstance(net.bias, nn.Linear)
    q, s = quant.quantize_weight(w_a, mode)
    assert torch.equal(net.a.weight.float(), q.float()) and torch.equal(net.a.weight_scale, s)
    assert not net.a.weight.requires_grad and net.a.mode == mode and f"mode={mode}" in repr(net.a)
    x = randn(3, 16)
    assert_close(net.a(x), x.double() @ quant.dequantize(q, s, torch.float64).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not quantisable"):
        quant.quantize(Net(), mode, only=["lm_head"])
    # .to(dtype) changes the rest of the model, never the storage dtypes.
    net.to(torch.float16)
    assert net.a.weight.dtype == quant.STORAGE_DTYPE[mode] and net.a.weight_scale.dtype == torch.float32
    assert torch.equal(net.a.weight_scale, s) and net.embed_tokens.weight.dtype == torch.float16


def test_quantized_copy_shares_everything_else():
    from fastsolar import Solar, SolarConfig

    cfg = SolarConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, torch_dtype="float32")
    base = Solar(cfg).to(DEVICE).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    twin = quant.quantized_copy(base, "int8")
    assert twin.embed_tokens.weight is base.embed_tokens.weight and twin.norm is base.norm
    assert twin.layers[1].ffn_norm is base.layers[1].ffn_norm
    assert isinstance(twin.lm_head, quant.QuantLinear) and isinstance(base.lm_head, nn.Linear)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items()), "the source model changed"
    assert not any(p.is_meta for p in twin.parameters())
    assert quant.parameter_bytes(twin) < quant.parameter_bytes(base)


# ------------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("mode", MODES)
def test_ops_linear_routes_prefill_to_quant_matmul(mode):
    """ops.linear with 10 rows (prefill) runs the quant_matmul kernel when forced and the reference otherwise."""
    q, s = quantized_weights(19, 70, mode, seed=4)
    x = randn(2, 5, 100)[..., 10:80]
    y = quant_matmul(x, q, s)
    with ops.force_kernels(True):
        assert_close(ops.linear(x, q, scale=s), y.double(), atol=0.0)
    with ops.force_kernels(False):
        assert torch.equal(ops.linear(x, q, scale=s), gemv_ref(x, q, scale=s))
        w = randn(19, 70)
        assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("gemv", ["triton", "cublas"])
@pytest.mark.parametrize("rows", [3, 12], ids=["decode", "prefill"])
def test_ops_route_quantised_products(monkeypatch, rows, gemv):
    """Up to 8 rows: the fused GEMV reads the 8-bit weight (or cuBLAS gets it widened); more rows: the
    quantised GEMM kernel, never a widened weight. Each route equals the reference within the error rule."""
    from fastsolar import kernels as K

    calls = []
    for name in ("gemv", "quant_matmul", "dequantize"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    q, s = quantized_weights(21, 40, "fp8", seed=8)
    x, res, g = randn(rows, 40, dtype=torch.float16), randn(rows, 21, dtype=torch.float16), randn(40) + 1.0
    gate_up = randn(rows, 80, dtype=torch.float16)
    cases = {"linear": (x, dict(residual=res)), "norm_linear": (x, dict(norm_weight=g.half(), eps=1e-5)),
             "swiglu_linear": (gate_up, dict(swiglu=True))}
    with ops.force_kernels(True), gemv_choice.force_gemv(gemv):
        got = {"linear": ops.linear(x, q, scale=s, residual=res),
               "norm_linear": ops.norm_linear(x, g.half(), 1e-5, q, scale=s),
               "swiglu_linear": ops.swiglu_linear(gate_up, q, scale=s)}
    for op, (x_in, kw) in cases.items():
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        assert_close(got[op], gemv_ref(x_in.double(), q, scale=s, **kw64), baseline=gemv_ref(x_in, q, scale=s, **kw),
                     rtol=ULP[x_in.dtype], msg=f"{op} rows={rows} {gemv}")
    expected = "quant_matmul" if rows > 8 else {"triton": "gemv", "cublas": "dequantize"}[gemv]
    assert calls == [expected] * 3, calls
