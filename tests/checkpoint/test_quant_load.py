"""Loading quantised: `quantize=` on an ordinary checkpoint, checkpoints quantised elsewhere (the layout
llm-compressor writes, written here with safetensors), and every refusal, each before any weight is read."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import hf_fixtures as F
import pytest
import torch
from helpers import assert_close
from safetensors.torch import save_file

from fastsolar import Solar, SolarConfig, memory
from fastsolar.checkpoint import loader
from fastsolar.model import quant

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def hf_model():
    return F.build_hf_model(num_hidden_layers=2, seed=7)


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory) -> Path:
    return F.save(hf_model, tmp_path_factory.mktemp("quant") / "fp32", max_shard_size="60KB")


def _refuse_reads(monkeypatch) -> None:
    """Fail the test if any parameter is allocated or any tensor data is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were allocated or read before the error")

    monkeypatch.setattr(loader, "_allocate", refuse)
    monkeypatch.setattr(loader, "read_tensors", refuse)


@pytest.fixture
def no_weight_reads(monkeypatch):
    _refuse_reads(monkeypatch)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------- quantize at load time


@pytest.mark.parametrize("mode, chunk", [("int8", None), ("fp8", None), ("int8", 1000)],
                         ids=["int8", "fp8", "int8-chunks-cut-rows"])
def test_quantize_at_load_equals_quantising_the_loaded_model(ckpt, monkeypatch, mode, chunk):
    """Streaming quantisation, part by part into the fused q/k/v and gate/up rows, gives exactly the
    weights and scales of quantising the whole loaded model; nothing unquantised is left behind. With
    1000-byte chunks (250 fp32 elements: every row boundary falls inside a chunk) rows are carried over."""
    from fastsolar.checkpoint import shards

    if chunk is not None:
        monkeypatch.setattr(shards, "CHUNK_BYTES", chunk)
    model = Solar.from_pretrained(ckpt, device="cpu", quantize=mode.upper())
    want = quant.quantize(Solar.from_pretrained(ckpt, device="cpu"), mode)
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for k in got_sd:
        assert got_sd[k].dtype == want_sd[k].dtype and torch.equal(got_sd[k].float(), want_sd[k].float()), k
    layers = [model.layers[0].attention.wqkv, model.layers[1].feed_forward.w_down, model.lm_head]
    assert all(isinstance(m, quant.QuantLinear) and m.mode == mode for m in layers)
    assert model.embed_tokens.weight.dtype == torch.float32 and model.norm.dtype == torch.float32
    assert quant.parameter_bytes(model) == quant.parameter_bytes(want)
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())


def test_non_finite_weight_is_named(hf_model, tmp_path):
    bad = copy.deepcopy(hf_model)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    d = F.save(bad, tmp_path / "nan", max_shard_size="60KB")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has non-finite values"):
        Solar.from_pretrained(d, device="cpu", quantize="int8")


def test_memory_check_counts_the_quantised_bytes(ckpt, monkeypatch):
    """Free memory between the two sizes: the unquantised load is refused before anything is allocated,
    the FP8 one fits and loads."""
    with torch.device("meta"):
        meta = Solar(SolarConfig.from_pretrained(ckpt))
    full = quant.parameter_bytes(meta)
    small = quant.parameter_bytes(quant.quantize(meta, "fp8"))
    free = (small + memory.margin_bytes(small) + full + memory.margin_bytes(full)) // 2
    monkeypatch.setattr(memory, "free_memory", lambda device: (free, "faked for the test"))
    with pytest.raises(memory.InsufficientMemoryError, match="does not fit"):
        Solar.from_pretrained(ckpt, device="cpu", dtype="float32")
    model = Solar.from_pretrained(ckpt, device="cpu", dtype="float32", quantize="fp8")
    assert quant.parameter_bytes(model) == small


def test_solar_fp8_is_checked_at_its_quantised_size(monkeypatch):
    """SOLAR-10.7B on a card with 16 GB free: refused in bf16 (21.5 GB), accepted with FP8 (10.9 GB)."""
    seen = []

    def fake_fits(what, device, dtype, weights, *, smaller=None):
        seen.append(weights)
        if weights + memory.margin_bytes(weights) > 16e9:
            raise memory.InsufficientMemoryError(f"{weights}")

    monkeypatch.setattr(memory, "check_fits", fake_fits)
    with torch.device("meta"):
        model = Solar(SolarConfig.preset("solar-10.7b"))
    with pytest.raises(memory.InsufficientMemoryError):
        loader._check_memory(Path("solar"), model, torch.device("cuda", 0), torch.bfloat16)
    loader._check_memory(Path("solar"), quant.quantize(model, "fp8"), torch.device("cuda", 0), torch.bfloat16)
    bf16, fp8 = seen
    assert 21.3e9 < bf16 < 21.6e9 and 10.8e9 < fp8 < 11.0e9, seen


@pytest.mark.gpu("the CUDA path of the loader: pinned staging, side-stream uploads, quantised on the device")
def test_quantised_load_on_cuda_peaks_at_the_quantised_size(tmp_path):
    """24 layers of bf16 weights streamed onto the GPU (FP8 where the card has it, else int8): the same bits as
    quantising on the CPU, and peak device memory the quantised model plus one tensor's temporaries, far
    below the bf16 model."""
    mode = "fp8" if torch.cuda.get_device_capability() >= (8, 9) else "int8"
    hf = F.build_hf_model(num_hidden_layers=24, hidden_size=512, intermediate_size=1408, seed=9).to(torch.bfloat16)
    d = F.save(hf, tmp_path / "bf16", max_shard_size="40MB")
    bf16_bytes = sum(p.numel() * 2 for p in hf.parameters())
    largest = max(p.numel() for p in hf.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = Solar.from_pretrained(d, device="cuda", quantize=mode)
    peak = torch.cuda.max_memory_allocated() - before
    size = quant.parameter_bytes(model)
    print(f"\n{mode}: peak {peak / 1e6:.1f} MB, quantised model {size / 1e6:.1f} MB, bf16 {bf16_bytes / 1e6:.1f} MB")
    assert peak <= size + 16 * largest + 2**22, (peak, size, largest)
    assert peak < 0.75 * bf16_bytes
    want = Solar.from_pretrained(d, device="cpu", quantize=mode).state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == want[k].dtype and torch.equal(v.cpu().float(), want[k].float()), k


def test_quantize_through_the_transformers_surface(ckpt):
    from fastsolar import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype="float32", device_map="cpu", quantize="int8")
    assert model.layers[0].attention.wo.weight.dtype == torch.int8
    with pytest.raises(ValueError, match="quantization_config=.* quantize='fp8' or quantize='int8'"):
        AutoModelForCausalLM.from_pretrained(ckpt, quantization_config={"load_in_4bit": True})


# --------------------------------------------------------------------- checkpoints quantised elsewhere


def ct_config(strategy: str = "channel", *, activations: dict | None = None, fmt: str = "float-quantized", **extra):
    """quantization_config as llm-compressor writes it for FP8_DYNAMIC (channel) or FP8 weights-only (tensor)."""
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": strategy,
                    "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                    "observer_kwargs": {}},
        "input_activations": activations,
        "output_activations": None,
    }
    cfg = {"config_groups": {"group_0": group}, "quant_method": "compressed-tensors", "format": fmt,
           "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ["lm_head"],
           "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}, "version": "0.10.2"}
    cfg.update(extra)
    return cfg


DYNAMIC_TOKENS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                  "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {}}


def write_fp8_checkpoint(hf_model, out: Path, strategy: str, *, edit=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save `hf_model` in the compressed-tensors FP8 layout: each layer's linear weights as float8_e4m3fn with
    `weight_scale` ([rows, 1] in bf16 per channel; per tensor alternately [] and [1] in fp32), an unused
    `input_scale` on one layer, lm_head and everything else unquantised; two shards and an index.
    Returns the directory and the dequantised fp32 weight of every quantised layer."""
    out.mkdir(parents=True)
    hf_model.config.save_pretrained(out)
    tensors, dequantised = {}, {}
    for i, (key, w) in enumerate(hf_model.state_dict().items()):
        layer = key.removesuffix(".weight")
        if not any(layer.endswith(name) for name in LINEARS):
            tensors[key] = w.clone()
            continue
        if strategy == "channel":
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
        else:
            scale = (w.abs().max() / 448.0).reshape(() if i % 2 else (1,))
        s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
        q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[key], tensors[layer + ".weight_scale"] = q, scale
        dequantised[key] = q.float() * s
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.tensor([0.02])
    if edit is not None:
        edit(tensors)
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: tensors[k].contiguous() for k in part}, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / loader.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((out / "config.json").read_text())
    acts = DYNAMIC_TOKENS if strategy == "channel" else None
    fmt = "float-quantized" if acts else "naive-quantized"
    cfg["quantization_config"] = ct_config(strategy, activations=acts, fmt=fmt)
    (out / "config.json").write_text(json.dumps(cfg))
    return out, dequantised


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_llm_compressor_fp8_checkpoint_loads_as_stored(hf_model, tmp_path, strategy):
    d, dequantised = write_fp8_checkpoint(hf_model, tmp_path / "fp8", strategy)
    model = Solar.from_pretrained(d, device="cpu", dtype="float32")
    assert Solar.from_pretrained(d, device="cpu", dtype="float32", quantize="fp8").state_dict().keys() == \
        model.state_dict().keys()
    wqkv = model.layers[1].attention.wqkv
    assert isinstance(wqkv, quant.QuantLinear) and wqkv.weight.dtype == torch.float8_e4m3fn
    assert isinstance(model.lm_head, torch.nn.Linear), "lm_head is in the checkpoint's ignore list"
    # The stored bits, not a re-quantisation: dequantised they are exactly the checkpoint's weights.
    c = model.config
    q_rows = c.num_attention_heads * c.head_dim
    assert torch.equal(wqkv.dequantized()[:q_rows], dequantised["model.layers.1.self_attn.q_proj.weight"])
    down = model.layers[0].feed_forward.w_down
    assert torch.equal(down.dequantized(), dequantised["model.layers.0.mlp.down_proj.weight"])
    # Logits equal the unquantised model carrying the dequantised weights.
    ref_hf = copy.deepcopy(hf_model)
    with torch.no_grad():
        for key, w in dequantised.items():
            ref_hf.get_parameter(key).copy_(w)
    ids = _ids(c.vocab_size)
    with torch.no_grad():
        assert_close(model(ids).logits, ref_hf(ids).logits, atol=1e-4, rtol=1e-5, msg=f"fp8 {strategy} checkpoint")


def test_stored_checkpoint_is_not_requantised(hf_model, tmp_path):
    d, _ = write_fp8_checkpoint(hf_model, tmp_path / "fp8", "channel")
    with pytest.raises(ValueError, match="already quantised .* re-quantising it to 'int8' is not supported"):
        Solar.from_pretrained(d, device="cpu", quantize="int8")


K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"),
         r"1 missing keys: model\.layers\.1\.mlp\.up_proj\.weight_scale"),
        (lambda t: t.__setitem__(K_PROJ, t[K_PROJ].float()),
         r"parts are stored differently \(.*k_proj\.weight F32, .*\): .* \(layers\.0\.attention\.wqkv\)"),
        (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight_scale", torch.ones(64, 2)),
         r"wrong shape: model\.layers\.0\.mlp\.down_proj\.weight_scale \(expected \(64,\), found \(64, 2\)\)"),
        (lambda t: t.__setitem__("model.embed_tokens.weight", t["model.embed_tokens.weight"].to(torch.float8_e4m3fn)),
         r"model\.embed_tokens\.weight is stored as F8_E4M3 \(not a quantisable linear weight\)"),
        (lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(1)), r"unexpected keys: lm_head\.weight_scale"),
    ],
    ids=["missing-scale", "mixed-fused-parts", "bad-scale-shape", "quantised-embedding", "scale-of-unquantised"],
)
def test_broken_fp8_checkpoints_are_refused(hf_model, tmp_path, monkeypatch, edit, message):
    d, _ = write_fp8_checkpoint(hf_model, tmp_path / "fp8", "channel", edit=edit)
    _refuse_reads(monkeypatch)
    with pytest.raises(ValueError, match=message):
        Solar.from_pretrained(d, device="cpu")


# ---------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "GPTQ with 8-bit weights"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "GPTQ with group_size 100"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
         "checkpoint_format 'marlin'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "AWQ without zero points"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, r"bitsandbytes \(nf4 / fp4 / LLM.int8\)"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, r"bitsandbytes \(nf4"),
        ({"quant_method": "exl2", "bits": 4.65}, r"EXL2 \(exllamav2\)"),
        ({"quant_method": "gguf"}, "GGUF"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
         "quant_method 'fp8'"),
        (ct_config(fmt="pack-quantized"), "format 'pack-quantized'"),
        (ct_config(fmt="int-quantized"), "format 'int-quantized'"),
        ({**ct_config(), "config_groups": {"g": {**ct_config()["config_groups"]["group_0"],
                                                 "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                             "group_size": 128, "symmetric": True}}}},
         "4-bit int weights"),
        (ct_config("block", block_structure=None), "weight strategy 'block'"),
        (ct_config("tensor", activations={**DYNAMIC_TOKENS, "dynamic": False, "strategy": "tensor"}),
         "quantises input activations statically"),
        (ct_config(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}), "quantises the KV cache"),
        (ct_config(quantization_status="frozen"), "quantization_status 'frozen'"),
        (ct_config(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    ],
    ids=["gptq-8bit", "gptq-group100", "gptq-marlin", "awq-gemv", "awq-no-zeros", "bnb", "bnb-flags",
         "exl2", "gguf", "hf-fp8-block", "int4-packed", "int8-w8a8", "int4-group", "fp8-block", "static-acts",
         "kv-cache", "frozen", "sparse"],
)
def test_unsupported_quantization_config_refused_before_loading(ckpt, tmp_path, no_weight_reads, qc, message):
    d = Path(shutil.copytree(ckpt, tmp_path / "q"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as err:
        Solar.from_pretrained(d, device="cpu")
    assert "quantize='fp8' or quantize='int8'" in str(err.value), "the error should say what works instead"


def test_quantised_tensors_without_config_refused(hf_model, tmp_path, no_weight_reads):
    d, _ = write_fp8_checkpoint(hf_model, tmp_path / "fp8", "channel")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantisation scales .* but config.json declares no supported"):
        Solar.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("bad", ["int3", "nf4", "fp16", 8])
def test_unknown_quantize_refused_first(ckpt, no_weight_reads, bad):
    with pytest.raises(ValueError, match=r"quantize=.* is not supported; use one of 'fp8', 'int8', 'int4' or None"):
        Solar.from_pretrained(ckpt, device="cpu", quantize=bad)
    with pytest.raises(ValueError, match="is not supported"):  # before the directory is even looked at
        Solar.from_pretrained("/nonexistent", quantize=bad)


@pytest.mark.parametrize(
    "card, capability, mode, message",
    [
        ("NVIDIA A100-SXM4-80GB", (8, 0), "fp8", r"quantize='fp8' needs .* 8\.9 or newer; NVIDIA A100-SXM4-80GB on "
                                                 r"cuda:0 is sm_80 \(quantize='int8' runs on sm_80\+\)"),
        ("Tesla T4", (7, 5), "int8", r"quantize='int8' needs .* 8\.0 or newer; Tesla T4 on cuda:0 is sm_75"),
        ("Tesla T4", (7, 5), "fp8", r"quantize='fp8' needs .* 8\.9 or newer; Tesla T4 on cuda:0 is sm_75$"),
    ],
)
def test_card_without_the_mode_refused(ckpt, monkeypatch, no_weight_reads, one_gpu, card, capability, mode, message):
    monkeypatch.setattr(quant, "_cuda_device_capability", lambda device: (capability, card))
    with pytest.raises(ValueError, match=message):
        Solar.from_pretrained(ckpt, device="cuda:0", quantize=mode)


def test_stored_fp8_on_a100_refused(hf_model, tmp_path, monkeypatch, no_weight_reads, one_gpu):
    d, _ = write_fp8_checkpoint(hf_model, tmp_path / "fp8", "tensor")
    monkeypatch.setattr(quant, "_cuda_device_capability", lambda device: ((8, 0), "NVIDIA A100-SXM4-40GB"))
    with pytest.raises(ValueError, match="quantize='fp8' needs .* NVIDIA A100-SXM4-40GB"):
        Solar.from_pretrained(d, device="cuda:0")
