"""GPTQ and AWQ checkpoints (4-bit), written by tests/int4_checkpoints.py with the published packing loops, load
as stored into int4 QuantLinear layers and equal their dequantised references exactly; the formats fastsolar
does not read are refused by name before a weight is read (tests/test_quant_load.py has the config refusals)."""
from __future__ import annotations

import json

import pytest
import torch

import hf_fixtures as F
import int4_checkpoints as C
from fastsolar import Solar, SolarConfig, ops, quant
from fastsolar.checkpoint import hf_keys, loader
from helpers import assert_close


@pytest.fixture(scope="module")
def hf_model():
    # K = 64 (hidden) and 160 (intermediate): 128-groups leave a partial last group of 32.
    return F.build_hf_model(num_hidden_layers=2, seed=7)


CASES = [
    pytest.param("gptq", 32, True, "gptq", None, id="gptq-sym-g32"),
    pytest.param("gptq", 32, True, "gptq-act", None, id="gptq-act-order-sym-g32"),
    pytest.param("gptq", 64, False, "gptq-act", 1000, id="gptq-act-order-asym-g64-chunks"),
    pytest.param("gptq", 128, False, "gptq", 1000, id="gptq-asym-g128-partial-chunks"),
    pytest.param("gptq", -1, False, "gptq", None, id="gptq-asym-per-channel"),
    pytest.param("gptq", 64, False, "gptq_v2", None, id="gptq-v2-asym-g64"),
    pytest.param("awq", 32, False, "gptq", None, id="awq-g32"),
    pytest.param("awq", 32, False, "gptq", 1000, id="awq-g32-chunks"),
]


@pytest.mark.parametrize("method, group, sym, fmt, chunk", CASES)
def test_stored_int4_loads_as_stored(hf_model, tmp_path, monkeypatch, method, group, sym, fmt, chunk):
    from fastsolar.checkpoint import shards

    act = fmt.endswith("-act")
    d, want = C.write(hf_model, tmp_path / method, method, group, sym=sym, fmt=fmt.removesuffix("-act"), act_order=act)
    if chunk is not None:
        monkeypatch.setattr(shards, "CHUNK_BYTES", chunk)
    model = Solar.from_pretrained(d, device="cpu")
    config = SolarConfig.from_pretrained(d)
    parts = hf_keys.fused_parts(config)
    for key, w in want.items():
        name, pattern, part = hf_keys.map_key(key)
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, quant.QuantLinear) and layer.mode == "int4", key
        assert layer.group_size == (layer.in_features if group == -1 else group)
        assert hasattr(layer, "weight_perm") == act
        got = layer.dequantized(torch.float64)
        if part is not None:
            start = sum(parts[pattern][:part])
            got = got[start:start + parts[pattern][part]]
        assert torch.equal(got, w), f"{key}: max diff {(got - w).abs().max():.3e}"
    assert isinstance(model.lm_head, torch.nn.Linear), "lm_head is stored unquantised and stays so"
    # The model's logits (reference path) are those of the unquantised model holding the dequantised weights.
    twin = F.build_hf_model(num_hidden_layers=2, seed=7)
    state = twin.state_dict()
    state.update({k: w.float() for k, w in want.items()})
    twin.load_state_dict(state)
    twin_model = Solar.from_pretrained(F.save(twin, tmp_path / "twin"), device="cpu")
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), ops.force_kernels(False):
        got, ref = model(ids).logits, twin_model(ids).logits
    if act:  # the products sum the inputs in the act-order: fp32 rounding apart, the same logits
        assert_close(got, ref.double(), atol=1e-4, rtol=1e-5)
        assert not torch.equal(model.layers[0].feed_forward.w_down.weight_perm.cpu(), torch.arange(160))
    else:
        assert torch.equal(got, ref)


def test_stored_int4_is_not_widened(hf_model, tmp_path, monkeypatch):
    """Every int4 layer holds its packed bytes only: no float weight of the layer's shape exists at any point of
    the load, and the memory check counts the packed size."""
    d, _ = C.write(hf_model, tmp_path / "gptq", "gptq", 32)
    sizes = []
    real = loader.memory.check_fits
    monkeypatch.setattr(loader.memory, "check_fits", lambda what, device, dtype, weights, **kw:
                        sizes.append(weights) or real(what, device, dtype, weights, **kw))
    model = Solar.from_pretrained(d, device="cpu")
    assert sizes == [quant.parameter_bytes(model)]
    for m in model.modules():
        if isinstance(m, quant.QuantLinear):
            assert {p.dtype for p in m.parameters()} == {torch.int32, torch.float16, torch.uint8}


def test_stored_int4_refusals_name_the_problem(hf_model, tmp_path):
    d, _ = C.write(hf_model, tmp_path / "gptq", "gptq", 32)
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ValueError, match="already quantised .*GPTQ 4-bit weights, groups of 32"):
        Solar.from_pretrained(d, device="cpu", quantize="int8")
    cfg["quantization_config"]["group_size"] = 64  # the stored scales have groups of 32
    (d / "config.json").write_text(json.dumps(cfg))
    # Every layer's scales and zeros (2 layers x 7 products x 2) have groups of 32, not 64; the packed shapes say
    # nothing of config.json's values, so none is blamed.
    with pytest.raises(ValueError, match=r"^checkpoint does not match its config \(2 layers, hidden 64, vocab 997\); "
                                         r"28 keys with the wrong shape: model\.layers\.0\.mlp\.down_proj\.qzeros "):
        Solar.from_pretrained(d, device="cpu")
    cfg["quantization_config"] = None
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    # Without quantization_config the packed tensors are foreign: 2 layers x 7 products x 4 (qweight, qzeros, scales,
    # g_idx) unexpected, and each product's weight missing.
    with pytest.raises(ValueError, match=r"14 missing keys: model\.layers\.0\.self_attn\.q_proj\.weight, .*; "
                                         r"56 unexpected keys$"):
        Solar.from_pretrained(d, device="cpu")


def test_gguf_directory_refused_by_name(hf_model, tmp_path):
    d = F.save(hf_model, tmp_path / "gguf")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    (d / "solar-10.7b.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"GGUF files \(solar-10.7b.Q4_K_M.gguf\).*quantize='int4'"):
        Solar.from_pretrained(d, device="cpu")


def test_act_order_parts_must_agree(hf_model, tmp_path):
    """q/k/v with different g_idx cannot share one fused layer: refused naming a tensor."""
    from safetensors.torch import load_file, save_file

    d, _ = C.write(hf_model, tmp_path / "gptq", "gptq", 32, act_order=True)
    (path,) = list(d.glob("*.safetensors"))
    state = load_file(path)
    key = "model.layers.1.self_attn.v_proj.g_idx"
    state[key] = state[key].flip(0).contiguous()  # a valid g_idx, another input order
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"g_idx.*orders the inputs differently|orders the inputs differently"):
        Solar.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("gemv", ["triton", "cublas"])
def test_act_order_kernel_path_equals_reference_path(hf_model, tmp_path, gemv):
    """An act-order GPTQ model through the kernels (prefill: quant_matmul; 3-row decode: the fused GEMVs or cuBLAS
    on the dequantised weight) gives the reference path's logits and greedy tokens."""
    from fastsolar.ops.gemv_choice import force_gemv
    from helpers import left_pad

    d, _ = C.write(hf_model, tmp_path / "gptq", "gptq", 32, act_order=True)
    model = Solar.from_pretrained(d, device="cpu")
    g = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(3, 997, (n,), generator=g) for n in (9, 4, 1)], pad_id=0)
    kw = dict(max_new_tokens=3, attention_mask=mask, eos_token_id=[])
    with torch.inference_mode():
        with ops.force_kernels(False):
            ref_logits, ref_tokens = model(ids).logits, model.generate(ids, **kw)
        with ops.force_kernels(True), force_gemv(gemv):
            logits, tokens = model(ids).logits, model.generate(ids, **kw)
    assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
