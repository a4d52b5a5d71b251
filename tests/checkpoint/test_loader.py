"""fastsolar.checkpoint.loader: strict, safetensors-only loading of Hugging Face checkpoints into fused parameters."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import hf_fixtures as F
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsolar import Solar, memory
from fastsolar.checkpoint import hf_keys, loader
from fastsolar.checkpoint.loader import load_model, resolve_dtype
from fastsolar.config import SolarConfig

# Exercises no device code: CI covers it; bench/gpu_check.sh deselects it (tests/conftest.py).
pytestmark = pytest.mark.cpu_only

LAYERS = 2


@pytest.fixture(scope="module")
def hf_llama():
    return F.build_hf_model(num_hidden_layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def sharded_dir(hf_llama, tmp_path_factory):
    d = F.save(hf_llama, tmp_path_factory.mktemp("loader") / "sharded", max_shard_size="60KB")
    assert len(F.shard_files(d)) > 3
    return d


@pytest.fixture
def work_dir(sharded_dir, tmp_path):
    """A private copy of the sharded checkpoint that a test may damage."""
    return Path(shutil.copytree(sharded_dir, tmp_path / "ckpt"))


INDEX = "model.safetensors.index.json"


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def edit_shard(d: Path, key: str, edit) -> Path:
    """Rewrite the shard holding `key` after `edit(tensors_dict)`; keeps the index in step."""
    index = _index(d)
    shard = d / index["weight_map"][key]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    wm = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    wm.update({k: shard.name for k in tensors})
    index["weight_map"] = wm
    (d / INDEX).write_text(json.dumps(index))
    return shard


def rewrite_config(d: Path, **changes) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def assert_matches_hf(model: Solar, hf, dtype=torch.float32) -> None:
    sd = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    assert torch.equal(model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(model.norm, sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wqkv = layer.attention.wqkv.weight
        assert torch.equal(wqkv[:q], sd[p + "self_attn.q_proj.weight"])
        assert torch.equal(wqkv[q:q + kv], sd[p + "self_attn.k_proj.weight"])
        assert torch.equal(wqkv[q + kv:], sd[p + "self_attn.v_proj.weight"])
        assert torch.equal(layer.attention.wo.weight, sd[p + "self_attn.o_proj.weight"])
        gu = layer.feed_forward.w_gate_up.weight
        assert torch.equal(gu[:c.intermediate_size], sd[p + "mlp.gate_proj.weight"])
        assert torch.equal(gu[c.intermediate_size:], sd[p + "mlp.up_proj.weight"])
        assert torch.equal(layer.feed_forward.w_down.weight, sd[p + "mlp.down_proj.weight"])
        assert torch.equal(layer.attention_norm, sd[p + "input_layernorm.weight"])
        assert torch.equal(layer.ffn_norm, sd[p + "post_attention_layernorm.weight"])


def test_sharded_load_exact(sharded_dir, hf_llama):
    model = Solar.from_pretrained(sharded_dir, device="cpu")
    assert_matches_hf(model, hf_llama)
    assert not model.training
    params = list(model.parameters())
    assert all(not p.requires_grad and p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert sum(p.numel() for p in params) == model.config.num_parameters()


def test_key_map_covers_every_hf_parameter(hf_llama):
    names = set(hf_llama.state_dict())
    config = SolarConfig.from_hf_dict(hf_llama.config.to_dict())
    assert set(hf_keys.expected_keys(config)) == names
    assert all(hf_keys.map_key(n) is not None for n in names)


def test_missing_shard(work_dir):
    victim = F.shard_files(work_dir)[2]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Solar.from_pretrained(work_dir, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.9, 20])
def test_truncated_shard(work_dir, keep):
    victim = F.shard_files(work_dir)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=victim.name) as e:
        Solar.from_pretrained(work_dir, device="cpu")
    assert "truncated" in str(e.value)  # caught from the header, before any parameter is allocated


@pytest.mark.parametrize("header", [b"{not json", b'{"w": {"dtype": "F32", "shape": [4]}}',
                                    b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}'])
def test_corrupt_header_names_the_shard(work_dir, header):
    victim = F.shard_files(work_dir)[1]
    victim.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match=rf"cannot read checkpoint shard .*{victim.name}"):
        Solar.from_pretrained(work_dir, device="cpu")


def test_keys_stored_twice_listed_together(work_dir):
    keys = ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
    copy = work_dir / "copy.safetensors"
    save_file({k: torch.ones(64) for k in keys}, copy, metadata={"format": "pt"})
    index = _index(work_dir)
    index["weight_map"]["model.extra"] = copy.name  # the copy is one of the shards
    (work_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"2 keys stored twice: ") as e:
        Solar.from_pretrained(work_dir, device="cpu")
    assert all(f"{k} (in copy.safetensors and model-" in str(e.value) for k in keys)


def test_index_names_the_wrong_shard(work_dir):
    index = _index(work_dir)
    key = "model.norm.weight"
    other = next(n for n in sorted(set(index["weight_map"].values())) if n != index["weight_map"][key])
    index["weight_map"][key] = other
    (work_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"listed in the index but not in their shard: {key} \(index says {other}\)"):
        Solar.from_pretrained(work_dir, device="cpu")


def test_unexpected_key(work_dir):
    extra = "model.layers.0.self_attn.q_norm.weight"
    edit_shard(work_dir, "model.norm.weight", lambda t: t.update({extra: torch.ones(16)}))
    with pytest.raises(ValueError, match=r"1 unexpected keys: model\.layers\.0\.self_attn\.q_norm\.weight"):
        Solar.from_pretrained(work_dir, device="cpu")


def test_ignored_inv_freq_key(work_dir, hf_llama):
    key = "model.layers.1.self_attn.rotary_emb.inv_freq"
    edit_shard(work_dir, "model.norm.weight", lambda t: t.update({key: torch.ones(8)}))
    assert_matches_hf(Solar.from_pretrained(work_dir, device="cpu"), hf_llama)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_missing_key(work_dir, key):
    edit_shard(work_dir, key, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"1 missing keys: {key.replace('.', '[.]')}"):
        Solar.from_pretrained(work_dir, device="cpu")


def test_misshaped_key(work_dir):
    key = "model.layers.0.self_attn.v_proj.weight"
    edit_shard(work_dir, key, lambda t: t.update({key: torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"v_proj\.weight \(expected \(32, 64\), found \(16, 64\)\)"):
        Solar.from_pretrained(work_dir, device="cpu")


def _one_short_line(error: pytest.ExceptionInfo) -> str:
    """A config/weights mismatch is one short line naming at most 3 checkpoint keys."""
    text = str(error.value)
    assert "\n" not in text and len(text) < 400, text
    assert text.count("model.") + text.count("lm_head.") <= 3, text
    return text


@pytest.mark.parametrize("changes, start, end", [
    (dict(num_hidden_layers=4), "num_hidden_layers 4 (weights: 2); 18 missing keys: model.layers.2.input_layernorm"
                                ".weight, ", ", ... and 15 more"),
    (dict(num_hidden_layers=1), "num_hidden_layers 1 (weights: 2); 9 unexpected keys: model.layers.1.",
     ", ... and 6 more"),
    (dict(hidden_size=128, head_dim=32), "hidden_size 128 (weights: 64); 21 keys with the wrong shape: "
                                         "model.embed_tokens.weight (expected (997, 128), found (997, 64)), ",
     ", ... and 18 more"),
    # The three names go to the missing keys; the wrong shapes (embedding, lm_head) are counted.
    (dict(vocab_size=1000, num_hidden_layers=3), "vocab_size 1000 (weights: 997), num_hidden_layers 3 (weights: "
                                                 "2); 9 missing keys: model.layers.2.",
     ", ... and 6 more; 2 keys with the wrong shape"),
], ids=["more-layers", "fewer-layers", "hidden-size", "vocab-and-layers"])
def test_config_disagreeing_with_the_weights(work_dir, changes, start, end):
    rewrite_config(work_dir, **changes)
    with pytest.raises(ValueError) as e:
        Solar.from_pretrained(work_dir, device="cpu")
    text = _one_short_line(e)
    assert text.startswith("config.json disagrees with the weights: " + start) and text.endswith(end), text


def test_mismatch_the_config_does_not_explain(work_dir):
    """A wrong tensor whose config values agree: the config is summed up, the key named with both shapes."""
    key = "model.layers.1.mlp.down_proj.weight"
    edit_shard(work_dir, key, lambda t: t.update({key: torch.zeros(64, 8)}))
    with pytest.raises(ValueError) as e:
        Solar.from_pretrained(work_dir, device="cpu")
    assert _one_short_line(e) == (
        "checkpoint does not match its config (2 layers, hidden 64, vocab 997); 1 keys with the wrong shape: "
        "model.layers.1.mlp.down_proj.weight (expected (64, 160), found (64, 8))")


def test_bin_only_refused(tmp_path, sharded_dir):
    shutil.copy(sharded_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pickle.*pytorch_model\.bin.*[Cc]onvert them to safetensors"):
        Solar.from_pretrained(tmp_path, device="cpu")


def test_no_weights(tmp_path, sharded_dir):
    shutil.copy(sharded_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Solar.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_dtype_conversion(sharded_dir, hf_llama, dtype, expected):
    model = load_model(Solar, sharded_dir, device="cpu", dtype=dtype)
    assert all(p.dtype == expected for p in model.parameters())
    assert model.dtype == expected
    assert_matches_hf(model, hf_llama, dtype=expected)


def test_default_dtype_from_config(work_dir):
    rewrite_config(work_dir, dtype="bfloat16")
    assert Solar.from_pretrained(work_dir, device="cpu").dtype == torch.bfloat16


def test_bad_dtype():
    assert resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype(torch.int8)


def test_single_file_checkpoint(hf_llama, tmp_path):
    d = F.save(hf_llama, tmp_path / "single", max_shard_size="1GB")
    assert [p.name for p in F.shard_files(d)] == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()
    assert_matches_hf(Solar.from_pretrained(d, device="cpu"), hf_llama)


def test_tied_embeddings(tmp_path):
    hf = F.build_hf_model(num_hidden_layers=1, tie_word_embeddings=True, seed=5)
    d = F.save(hf, tmp_path / "tied")
    keys = set()
    for f in F.shard_files(d):
        keys |= set(load_file(f))
    assert "lm_head.weight" not in keys
    model = Solar.from_pretrained(d, device="cpu")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight
    assert_matches_hf(model, hf)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


# -- what the streaming reader places, bit for bit ----------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(hf_llama, tmp_path_factory):
    """The same weights saved in every dtype, sharded (small shards) and as one file."""
    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for dtype in DTYPES:
        model = F.build_hf_model(num_hidden_layers=LAYERS, seed=3).to(dtype)
        name = str(dtype).removeprefix("torch.")
        out[dtype, "sharded"] = F.save(model, root / f"{name}-sharded", max_shard_size="60KB")
        out[dtype, "single"] = F.save(model, root / f"{name}-single", max_shard_size="1GB")
    return out


def reference_load(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The loader as it was before streaming: safetensors' own tensors copied into the fused parameters."""
    config = SolarConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = Solar(config)
    params = {n: torch.empty(p.shape, dtype=dtype) for n, p in meta.named_parameters()}
    parts = hf_keys.fused_parts(config)
    for f in F.shard_files(model_dir):
        for key, tensor in load_file(f).items():
            name, pattern, part = hf_keys.map_key(key)
            target = params[name]
            if part is not None:
                start = sum(parts[pattern][:part])
                target = target[start:start + parts[pattern][part]]
            target.copy_(tensor)
    return params


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("layout", ["sharded", "single"])
@pytest.mark.parametrize("stored", DTYPES, ids=lambda d: f"stored-{str(d)[6:]}")
@pytest.mark.parametrize("target", DTYPES, ids=lambda d: f"as-{str(d)[6:]}")
def test_bit_identical_to_safetensors(checkpoints, monkeypatch, layout, stored, target):
    """Straight reads (same dtype) and staged conversions, with chunks far smaller than the tensors and
    the page cache dropped behind the reader, place exactly the bits a plain safetensors copy gives."""
    from fastsolar.checkpoint import shards

    monkeypatch.setattr(shards, "CHUNK_BYTES", 4096)
    if layout == "sharded":  # the shards look cold, so they are dropped from the page cache behind the reader
        monkeypatch.setattr(shards, "resident_bytes", lambda path: 0)
    d = checkpoints[stored, layout]
    model = load_model(Solar, d, device="cpu", dtype=target)
    expected = reference_load(d, target)
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name].dtype == target
        assert torch.equal(bits(got[name]), bits(ref)), name


# -- refusing what does not fit, before allocating ----------------------------------------------------------

def test_refuses_what_does_not_fit_before_allocating(sharded_dir, monkeypatch):
    free = 3 * 10**6
    monkeypatch.setattr(memory, "free_memory", lambda device: (free, "faked for the test"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were allocated or read before the memory check")

    monkeypatch.setattr(loader, "_allocate", must_not_run)
    monkeypatch.setattr(loader, "read_tensors", must_not_run)
    config = SolarConfig.from_pretrained(sharded_dir)
    weights = config.num_parameters() * 4
    need = weights + memory.margin_bytes(weights)
    with pytest.raises(memory.InsufficientMemoryError) as e:
        load_model(Solar, sharded_dir, device="cpu", dtype="float32")
    msg = str(e.value)
    assert isinstance(e.value, MemoryError)
    assert f"checkpoint {sharded_dir} does not fit on cpu" in msg
    assert f"it takes {weights / 1e6:.2f} MB as float32 ({need / 1e9:.2f} GB with a" in msg
    assert "only 3.00 MB is free (faked for the test)" in msg
    assert f"as bfloat16 its weights take {weights / 2e6:.2f} MB" in msg
    assert "quantise it" in msg and "a machine with more memory" in msg


def test_loads_when_it_fits(sharded_dir, hf_llama, monkeypatch):
    config = SolarConfig.from_pretrained(sharded_dir)
    weights = config.num_parameters() * 2
    monkeypatch.setattr(memory, "free_memory", lambda device: (weights + memory.margin_bytes(weights), "exact"))
    assert_matches_hf(load_model(Solar, sharded_dir, device="cpu", dtype="bf16"), hf_llama, dtype=torch.bfloat16)
    monkeypatch.setattr(memory, "free_memory", lambda device: None)  # cannot tell: loads without a check
    load_model(Solar, sharded_dir, device="cpu", dtype="bf16")


def test_weight_bytes_takes_a_per_tensor_size():
    """The size function the loader checks with; a quantised load passes its own per-tensor size."""
    config = SolarConfig.preset("solar-10.7b")
    with torch.device("meta"):
        meta = Solar(config)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    assert memory.weight_bytes(shapes, torch.bfloat16) == config.num_parameters() * 2
    assert memory.weight_bytes(shapes, torch.float32) == config.num_parameters() * 4

    def int8_linear(name, shape):  # int8 weights with one float32 scale per output row; the rest default
        return shape[0] * shape[1] + 4 * shape[0] if len(shape) == 2 and "layers." in name else None

    linear = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and "layers." in n)
    rows = sum(s[0] for n, s in shapes.items() if len(s) == 2 and "layers." in n)
    expected = (config.num_parameters() - linear) * 2 + linear + 4 * rows
    assert memory.weight_bytes(shapes, torch.bfloat16, int8_linear) == expected


def test_weights_are_advised_onto_huge_pages(sharded_dir, monkeypatch):
    """Every host parameter the loader allocates is advised onto transparent huge pages before its first write
    (a CPU load on a VM is bound by faulting fresh memory in 4 KiB pages), and the advice itself is exact:
    only the 2 MiB-aligned pages inside the tensor, nothing off Linux or off the host."""
    advised = []
    real = memory.advise_huge_pages
    monkeypatch.setattr(memory, "advise_huge_pages", lambda t: advised.append(t.data_ptr()) or real(t))
    model = load_model(Solar, sharded_dir, device="cpu", dtype=torch.float32)
    assert sorted(advised) == sorted({p.data_ptr() for p in model.parameters()})

    calls = []

    class FakeLibc:
        def madvise(self, addr, length, advice):
            calls.append((addr.value, length.value, advice))
            return 0

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a, **k: FakeLibc())
    monkeypatch.setattr(memory.sys, "platform", "linux")
    big = torch.empty(3 * memory.HUGE_PAGE + 12345, dtype=torch.uint8)
    assert memory.advise_huge_pages(big)
    (addr, length, advice), = calls
    start, end = big.data_ptr(), big.data_ptr() + big.numel()
    assert advice == 14 and addr % memory.HUGE_PAGE == 0 and length % memory.HUGE_PAGE == 0
    assert start <= addr and addr + length <= end and length >= 2 * memory.HUGE_PAGE
    assert not memory.advise_huge_pages(torch.empty(1000, dtype=torch.uint8)) and len(calls) == 1  # < 2 MiB
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert not memory.advise_huge_pages(big) and len(calls) == 1


def test_host_free_memory_is_asked():
    free = memory.free_memory(torch.device("cpu"))
    if free is None:
        pytest.skip("this OS does not say how much memory is available")
    available, source = free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available <= total and source


@pytest.mark.gpu("the pinned-buffer upload needs CUDA")
@pytest.mark.parametrize("target", DTYPES, ids=lambda d: str(d)[6:])
def test_cuda_load_bit_identical_to_cpu(checkpoints, monkeypatch, target):
    """The pinned-buffer, side-stream upload (with GPU-side dtype conversion) places the CPU loader's bits."""
    from fastsolar.checkpoint import shards

    monkeypatch.setattr(shards, "CHUNK_BYTES", 4096)  # many chunks through the pinned ring
    d = checkpoints[torch.bfloat16, "sharded"]
    on_cpu = dict(load_model(Solar, d, device="cpu", dtype=target).named_parameters())
    on_gpu = dict(load_model(Solar, d, device="cuda", dtype=target).named_parameters())
    for name, ref in on_cpu.items():
        assert on_gpu[name].is_cuda and torch.equal(bits(on_gpu[name].cpu()), bits(ref)), name


def test_meta_build_skips_init_only_on_meta():
    """Building on meta skips torch.nn.init (no values there; torch's meta normal_ costs seconds the first time)."""
    real = torch.ones(4, 3)
    with torch.device("meta"), loader._SkipInitOnMeta():
        emb = torch.nn.Embedding(10, 4)
        torch.nn.init.normal_(real)  # a real tensor is still initialised
    assert emb.weight.is_meta and emb.weight.shape == (10, 4)
    assert not torch.equal(real, torch.ones(4, 3))
