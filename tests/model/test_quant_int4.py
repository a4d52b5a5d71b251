"""int4 weight-only quantisation (quantize="int4"): the group-wise round-to-nearest quantiser, QuantLinear's int4
layers, how fastsolar.ops routes their products, the whole model against its dequantised twin, and loading.

Kernel results are compared with the float64 run of the dequantise-then-matmul reference (gemv_ref with the
packed weight, kernels/_int4.py), allowing at most 2x the error that reference makes at the input dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_fixtures as F
from fastsolar import Solar, SolarConfig, gemv_choice, memory, ops, quant
from fastsolar.kernels import dequantize_int4, unpack_int4
from fastsolar.kernels.gemv import gemv_ref
from helpers import DEVICE, ULP, assert_close, channel_weights, left_pad, randn

G = quant.GROUP_SIZE


def _rtn_weight() -> torch.Tensor:
    """[6, 296]: three groups per row (128, 128 and a partial 40), rows of very different sizes, a zero row,
    a group of one negative value repeated, a group that is all positive, exact zeros sprinkled in."""
    w = channel_weights(6, 296, seed=11)
    w[2] = 0.0
    w[3, :G] = -0.37
    w[4, G:2 * G] = w[4, G:2 * G].abs() + 0.01
    w[5, ::7] = 0.0
    return w


def test_int4_quantiser_rounds_to_nearest_per_group():
    w = _rtn_weight()
    q, s, z = quant.quantize_weight_int4(w)
    assert q.dtype == torch.int32 and q.shape == (6, 37)
    assert s.dtype == torch.float16 and s.shape == (6, 3) and z.dtype == torch.uint8 and z.shape == (6, 3)
    assert int(z.max()) <= 15
    d = dequantize_int4(q, s, z, G, torch.float64)
    step = s.double().repeat_interleave(G, dim=1)[:, :296]
    err = (d - w.double()).abs()
    assert (err <= step * (0.5 + 15 * 2.0**-11)).all(), float((err / step).max())
    assert (d[w == 0] == 0).all(), "a weight of 0 must come back exactly 0"
    # Each group's range maps onto the 16 levels: its extreme values use level 0 or 15.
    levels = unpack_int4(q).view(-1)[: 6 * 296].view(6, 296).long()
    for r, g in ((0, 0), (1, 2), (4, 1), (5, 0)):
        grp = levels[r, g * G:(g + 1) * G]
        assert int(grp.min()) == 0 or int(grp.max()) == 15, (r, g)
    # The step is the group's range (with 0 in it) / 15, not the row's.
    lo = torch.clamp(w[1, 2 * G:].min(), max=0.0)
    hi = torch.clamp(w[1, 2 * G:].max(), min=0.0)
    assert s[1, 2] == ((hi - lo) / 15).half()
    assert (d[3, :G] == d[3, 0]).all() and abs(float(d[3, 0]) + 0.37) <= 0.37 * 2.0**-10


def test_int4_quantiser_chunks_dtypes_and_fused_slices(monkeypatch):
    w = _rtn_weight()
    q, s, z = quant.quantize_weight_int4(w)
    qb, sb, zb = quant.quantize_weight_int4(w.to(torch.bfloat16))
    q16, s16, z16 = quant.quantize_weight_int4(w.to(torch.bfloat16).float())
    assert torch.equal(qb, q16) and torch.equal(sb, s16) and torch.equal(zb, z16)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 600)  # 2 rows per chunk
    qc, sc, zc = quant.quantize_weight_int4(w)
    assert torch.equal(qc, q) and torch.equal(sc, s) and torch.equal(zc, z)
    fq = torch.zeros(9, 37, dtype=torch.int32, device=DEVICE)
    fs = torch.full((9, 3), float("nan"), dtype=torch.float16, device=DEVICE)
    fz = torch.full((9, 3), 99, dtype=torch.uint8, device=DEVICE)
    quant.quantize_into(w, fq[3:], fs[3:], fz[3:])
    assert torch.equal(fq[3:], q) and torch.equal(fs[3:], s) and torch.equal(fz[3:], z)
    assert fs[:3].isnan().all() and (fz[:3] == 99).all()


def test_int4_quantiser_refuses_non_finite_and_bad_shapes():
    w = channel_weights(4, 16, seed=3)
    w[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(row 1 of 4\)"):
        quant.quantize_weight_int4(w)
    with pytest.raises(ValueError, match="in_features must be a multiple of 8, got 12"):
        quant.QuantLinear(12, 4, "int4")
    with pytest.raises(ValueError, match="int4: quantize_weight_int4"):
        quant.quantize_weight(w, "int4")


def test_int4_quant_linear_and_conversion():
    net = nn.Sequential(nn.Linear(296, 24, bias=False), nn.Linear(24, 16, bias=False)).to(DEVICE)
    w0 = net[0].weight.detach().clone()
    quant.quantize(net, "int4")
    layer = net[0]
    assert isinstance(layer, quant.QuantLinear) and layer.mode == "int4" and "group_size=128" in repr(layer)
    q, s, z = quant.quantize_weight_int4(w0)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, s) and torch.equal(layer.weight_zeros, z)
    assert net[1].weight_scale.shape == (16, 1), "K = 24 < 128: one (partial) group per row"
    x = randn(3, 296)
    assert_close(layer(x), x.double() @ layer.dequantized(torch.float64).T, rtol=1e-5, atol=1e-6)
    net.to(torch.float16)
    assert layer.weight.dtype == torch.int32 and layer.weight_scale.dtype == torch.float16
    assert layer.weight_zeros.dtype == torch.uint8 and torch.equal(layer.weight_scale, s)


@pytest.mark.parametrize("gemv", ["triton", "cublas"])
@pytest.mark.parametrize("rows", [3, 12], ids=["decode", "prefill"])
def test_ops_route_int4_products(monkeypatch, rows, gemv):
    """Up to 8 rows: the fused GEMV reads the packed weight (or cuBLAS gets it dequantised); more rows: the
    quantised GEMM kernel. Each route equals the reference within the error rule."""
    from fastsolar import kernels as K

    calls = []
    for name in ("gemv", "quant_matmul", "dequantize_int4"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    w = channel_weights(21, 160, seed=8)
    q, s, z = quant.quantize_weight_int4(w)
    args = dict(scale=s, zeros=z, group_size=G)
    x, res, g = randn(rows, 160, dtype=torch.float16), randn(rows, 21, dtype=torch.float16), randn(160) + 1.0
    gate_up = randn(rows, 320, dtype=torch.float16)
    cases = {"linear": (x, dict(residual=res)), "norm_linear": (x, dict(norm_weight=g.half(), eps=1e-5)),
             "swiglu_linear": (gate_up, dict(swiglu=True))}
    with ops.force_kernels(True), gemv_choice.force_gemv(gemv):
        got = {"linear": ops.linear(x, q, residual=res, **args),
               "norm_linear": ops.norm_linear(x, g.half(), 1e-5, q, **args),
               "swiglu_linear": ops.swiglu_linear(gate_up, q, **args)}
    for op, (x_in, kw) in cases.items():
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        assert_close(got[op], gemv_ref(x_in.double(), q, **args, **kw64), baseline=gemv_ref(x_in, q, **args, **kw),
                     rtol=ULP[x_in.dtype], msg=f"{op} rows={rows} {gemv}")
    expected = "quant_matmul" if rows > 8 else {"triton": "gemv", "cublas": "dequantize_int4"}[gemv]
    assert calls == [expected] * 3, calls
    with ops.force_kernels(False):
        assert torch.equal(ops.linear(x, q, **args), gemv_ref(x, q, **args))


# ------------------------------------------------------------------------------------------------ model

# Inputs of 144 and 264: two groups per row, the second partial (16 and 8 of 128).
SMALL = SolarConfig(
    vocab_size=97, hidden_size=144, intermediate_size=264, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, torch_dtype="float32",
)


def _dequantised_twin(model: Solar) -> Solar:
    """The unquantised model whose linear weights are exactly `model`'s dequantised int4 weights (fp32)."""
    twin = Solar(model.config).to(DEVICE).eval()
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            state[f"{name}.weight"] = m.dequantized(torch.float32)
    for name, p in model.named_parameters():
        if not isinstance(model.get_submodule(name.rpartition(".")[0]), quant.QuantLinear):
            state[name] = p
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.fixture(scope="module")
def int4_model() -> tuple[Solar, Solar]:
    torch.manual_seed(3)
    base = Solar(SMALL).to(DEVICE).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 2:
                p.copy_(channel_weights(*p.shape, seed=len(name)) * (4.0 if name == "lm_head.weight" else 1.0))
    return base, quant.quantized_copy(base, "int4")


def test_int4_model_equals_its_dequantised_twin(int4_model):
    """Reference path: the int4 model's logits are the dequantised model's, bit for bit; every linear is int4."""
    base, model = int4_model
    assert all(m.mode == "int4" for m in model.modules() if isinstance(m, quant.QuantLinear))
    twin = _dequantised_twin(model)
    ids = torch.randint(3, SMALL.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.inference_mode(), ops.force_kernels(False):
        got, want, fp32 = model(ids).logits, twin(ids).logits, base(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, fp32), "the int4 model must differ from the unquantised one"


@pytest.mark.parametrize("gemv", ["triton", "cublas"])
def test_int4_kernel_path_equals_reference_path(int4_model, gemv):
    """Logits of a forward (prefill: quant_matmul) and batched left-padded greedy decoding (M = 3: the fused
    GEMVs on the packed weights, or cuBLAS on the dequantised ones) equal the reference path."""
    _, model = int4_model
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, SMALL.vocab_size, (n,), generator=g) for n in (9, 4, 1)]
    ids, mask = left_pad(rows, pad_id=0)
    kw = dict(max_new_tokens=3, attention_mask=mask, eos_token_id=[])
    with torch.inference_mode():
        with ops.force_kernels(False):
            ref_logits, ref_tokens = model(ids).logits, model.generate(ids, **kw)
        with ops.force_kernels(True), gemv_choice.force_gemv(gemv):
            fast_logits, fast_tokens = model(ids).logits, model.generate(ids, **kw)
    assert_close(fast_logits, ref_logits, atol=2e-4, rtol=1e-4, msg=f"int4 kernel-path logits ({gemv})")
    assert torch.equal(fast_tokens, ref_tokens), f"{fast_tokens.tolist()} != {ref_tokens.tolist()}"


# -------------------------------------------------------------------------------------------------- load


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = F.build_hf_model(num_hidden_layers=2, seed=7, hidden_size=136, intermediate_size=264,
                          num_attention_heads=4, num_key_value_heads=2)
    return F.save(hf, tmp_path_factory.mktemp("int4") / "fp32", max_shard_size="60KB")


@pytest.mark.parametrize("chunk", [None, 1000], ids=["whole", "chunks-cut-rows"])
def test_quantize_int4_at_load_equals_quantising_the_loaded_model(ckpt, monkeypatch, chunk):
    """Streaming int4 quantisation into the fused q/k/v and gate/up rows gives exactly the packed weights,
    scales and zeros of quantising the loaded model; rows cut by 1000-byte chunks are carried over."""
    from fastsolar.checkpoint import shards

    if chunk is not None:
        monkeypatch.setattr(shards, "CHUNK_BYTES", chunk)
    model = Solar.from_pretrained(ckpt, device="cpu", quantize="INT4")
    want = quant.quantize(Solar.from_pretrained(ckpt, device="cpu"), "int4")
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys() and any(k.endswith("weight_zeros") for k in got_sd)
    for k in got_sd:
        assert got_sd[k].dtype == want_sd[k].dtype and torch.equal(got_sd[k], want_sd[k]), k
    assert model.layers[0].attention.wqkv.mode == "int4" and model.lm_head.mode == "int4"
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())


def test_int4_memory_check_counts_the_packed_bytes(ckpt, monkeypatch):
    """Free memory between the int8 and int4 sizes: int8 is refused before anything is allocated, int4 loads."""
    with torch.device("meta"):
        meta = Solar(SolarConfig.from_pretrained(ckpt))
    int8 = quant.parameter_bytes(quant.quantize(copy.deepcopy(meta), "int8"))
    int4 = quant.parameter_bytes(quant.quantize(meta, "int4"))
    assert int4 < int8
    free = (int4 + memory.margin_bytes(int4) + int8 + memory.margin_bytes(int8)) // 2
    monkeypatch.setattr(memory, "free_memory", lambda device: (free, "faked for the test"))
    with pytest.raises(memory.InsufficientMemoryError, match="does not fit"):
        Solar.from_pretrained(ckpt, device="cpu", dtype="float32", quantize="int8")
    model = Solar.from_pretrained(ckpt, device="cpu", dtype="float32", quantize="int4")
    assert quant.parameter_bytes(model) == int4
