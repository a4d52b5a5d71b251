"""Depth Up-Scaling (fastsolar.checkpoint.upscale): layer map, config mapping, checkpoint writing, refusals."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsolar.checkpoint.upscale import (
    layer_map,
    parse_size,
    upscale,
    upscale_config,
)
from fastsolar.config import SolarConfig

# Exercises no device code: CI covers it; bench/gpu_check.sh deselects it (tests/conftest.py).
pytestmark = pytest.mark.cpu_only

N_BASE, DROP = 8, 2
EXTRA_FILES = {
    "tokenizer.model": b"\x00\x01sentencepiece-ish\xff",
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": b'{"bos_token": "<s>", "eos_token": "</s>"}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>"}\n',
    "README.md": b"# tiny base\n",
}

# mistralai/Mistral-7B-v0.1 config.json, as published.
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def _tiny_llama(num_layers: int = N_BASE, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every tensor distinct, norms not all ones
            scale, shift = (0.3, 1.0) if name.endswith("norm.weight") else (0.1, 0.0)
            p.copy_(shift + scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 8-layer Llama saved in several safetensors shards, with tokenizer files and a decoy .bin."""
    d = tmp_path_factory.mktemp("base")
    model = _tiny_llama()
    model.save_pretrained(d, max_shard_size="60KB")
    assert (d / "model.safetensors.index.json").is_file()
    for name, data in EXTRA_FILES.items():
        (d / name).write_bytes(data)
    (d / "pytorch_model.bin").write_bytes(b"not to be copied (weights)")
    return model, d


@pytest.fixture(scope="module")
def upscaled(base, tmp_path_factory):
    _, d = base
    out = tmp_path_factory.mktemp("up") / "solar-tiny"
    mapping = upscale(d, out, drop=DROP, max_shard_size="100KB", progress=False)
    return mapping, out


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_layer_map():
    assert layer_map(8, 2) == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    m = layer_map(32, 8)
    assert len(m) == 48 and m[:24] == list(range(24)) and m[24:] == list(range(8, 32))
    assert layer_map(2, 1) == [0, 1]


def test_mistral_7b_maps_to_solar_preset_shape():
    new, mapping = upscale_config(MISTRAL_7B, drop=8)
    assert mapping == list(range(24)) + list(range(8, 32))
    assert dict(new, num_hidden_layers=32) == MISTRAL_7B and list(new) == list(MISTRAL_7B)
    assert new["num_hidden_layers"] == 48
    got, want = SolarConfig.from_hf_dict(new), SolarConfig.preset("solar-10.7b")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(got, f) == getattr(want, f), f
    assert got.num_parameters() == want.num_parameters() == 10_731_524_096


def test_upscale_config_remaps_layer_types_and_keeps_input():
    cfg = dict(MISTRAL_7B, num_hidden_layers=4, layer_types=["a", "b", "c", "d"])
    before = copy.deepcopy(cfg)
    new, mapping = upscale_config(cfg, drop=1)
    assert mapping == [0, 1, 2, 1, 2, 3]
    assert new["layer_types"] == ["a", "b", "c", "b", "c", "d"] and new["num_hidden_layers"] == 6
    assert cfg == before


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000 and parse_size(1234) == 1234 and parse_size("1.5MB") == 1_500_000
    for bad in ("5 parsecs", "", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_upscaled_weights_are_the_mapped_base_layers(base, upscaled):
    _, d = base
    mapping, out = upscaled
    assert mapping == layer_map(N_BASE, DROP)
    src, dst = _tensors(d), _tensors(out)
    per_layer = sorted(k.split(".", 3)[3] for k in src if k.startswith("model.layers.0."))
    assert len(per_layer) == 9  # q k v o, gate up down, two norms
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{rest}" for i in range(len(mapping)) for rest in per_layer}
    assert set(dst) == expected
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(dst[name], src[name]), name
    for new_i, base_i in enumerate(mapping):
        for rest in per_layer:
            a, b = dst[f"model.layers.{new_i}.{rest}"], src[f"model.layers.{base_i}.{rest}"]
            assert a.dtype == b.dtype and torch.equal(a, b), (new_i, base_i, rest)


def test_upscaled_config_index_and_files(base, upscaled):
    _, d = base
    mapping, out = upscaled
    base_cfg = json.loads((d / "config.json").read_text())
    new_cfg = json.loads((out / "config.json").read_text())
    assert new_cfg["num_hidden_layers"] == len(mapping) == 12
    assert {k: v for k, v in new_cfg.items() if k != "num_hidden_layers"} == {
        k: v for k, v in base_cfg.items() if k != "num_hidden_layers"
    }
    assert list(new_cfg) == list(base_cfg)  # same key order: the same JSON form
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as h:
            keys = set(h.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            sizes = {k: h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in keys}
        shard_bytes = sum(sizes.values())
        if any(size > 100_000 for size in sizes.values()):  # a tensor larger than a shard stands alone
            assert len(keys) == 1, sizes
        else:
            assert shard_bytes <= 100_000, sizes
        total += shard_bytes
    assert index["metadata"]["total_size"] == total
    for name, data in EXTRA_FILES.items():
        assert (out / name).read_bytes() == data, name
    assert (out / "generation_config.json").read_bytes() == (d / "generation_config.json").read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary dir left behind


def test_transformers_and_fastsolar_load_the_result(base, upscaled):
    import transformers

    model, _ = base
    mapping, out = upscaled
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "LlamaForCausalLM" and len(hf.model.layers) == 12
    # Reference: the base model with its decoder layers re-stacked by the map.
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList(copy.deepcopy(model.model.layers[b]) for b in mapping)
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = i
    ref.config.num_hidden_layers = len(mapping)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = hf(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    from fastsolar import Solar

    solar = Solar.from_pretrained(out, dtype=torch.float32)
    assert solar.config.num_hidden_layers == 12
    with torch.no_grad():
        logits = solar(ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_unknown_keys_carried_over_and_single_file(base, tmp_path):
    """A key that is neither per-layer nor known is copied unchanged; a small result is one model.safetensors."""
    _, d = base
    src = tmp_path / "base"
    src.mkdir()
    for f in d.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    extra = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    save_file({"model.some_buffer": extra}, str(src / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.some_buffer"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    upscale(src, out, drop=4, max_shard_size="5GB", progress=False)
    assert not (out / "model.safetensors.index.json").exists()
    got = _tensors(out)
    assert torch.equal(got["model.some_buffer"], extra)
    assert sum(1 for k in got if k.endswith(".self_attn.q_proj.weight")) == 8


def test_dry_run_writes_nothing(base, tmp_path, caplog):
    _, d = base
    out = tmp_path / "never"
    with caplog.at_level(logging.INFO, logger="fastsolar.checkpoint.upscale"):
        mapping = upscale(d, out, drop=DROP, dry_run=True, progress=False)
    assert mapping == layer_map(N_BASE, DROP)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "new 6 <- base 2" in caplog.text


def test_cli_prints_map(base, tmp_path, capsys):
    from fastsolar import cli

    _, d = base
    out = tmp_path / "never"
    assert cli.main(["upscale", str(d), str(out), "--drop", str(DROP), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    map_lines = [ln for ln in lines if ln.startswith("new ")]
    assert map_lines == [f"new {i} <- base {b}" for i, b in enumerate(layer_map(N_BASE, DROP))]
    assert not out.exists()
    # a refusal is one line on stderr and exit status 2, as for every fastsolar command
    assert cli.main(["upscale", str(d), str(out), "--drop", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsolar: error: drop=5 is too large") and not out.exists()


@pytest.mark.parametrize(
    "drop, match",
    [
        (0, "drop must be at least 1, got 0"),
        (-3, "at least 1"),
        (5, r"drop=5 is too large for a base of 8 layers.*10 > 8"),
    ],
)
def test_refuses_bad_drop(base, tmp_path, drop, match):
    _, d = base
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        upscale(d, out, drop=drop, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_nonempty_out_dir(base, tmp_path):
    _, d = base
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        upscale(d, out, drop=DROP, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_empty_out_dir_is_fine(base, tmp_path):
    _, d = base
    out = tmp_path / "out"
    out.mkdir()
    upscale(d, out, drop=4, progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8


def test_refuses_bad_base(base, tmp_path):
    _, d = base
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upscale(tmp_path / "missing", out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        upscale(empty, out, progress=False)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((d / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json or model.safetensors"):
        upscale(no_weights, out, drop=DROP, progress=False)
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        upscale(no_weights, out, drop=DROP, progress=False)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    with pytest.raises(ValueError, match="gpt2"):
        upscale(gpt2, out, progress=False)
    # weights that do not match config.json: claims 10 layers, has 8
    liar = tmp_path / "liar"
    liar.mkdir()
    for f in d.iterdir():
        (liar / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    (liar / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=10)))
    with pytest.raises(ValueError, match=r"num_hidden_layers=10.*missing \[8, 9\]"):
        upscale(liar, out, drop=DROP, progress=False)
    assert not out.exists()


def test_refuses_truncated_or_twice_stored_weights(base, tmp_path):
    """Bad base shards are refused from their headers (the loader's reader), before anything is written."""
    _, d = base
    out = tmp_path / "out"
    src = tmp_path / "base"
    src.mkdir()
    for f in d.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = src / sorted(set(index["weight_map"].values()))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{victim.name}: truncated"):
        upscale(src, out, drop=DROP, progress=False)
    victim.write_bytes(data)
    save_file({"model.norm.weight": torch.ones(64)}, str(src / "extra.safetensors"), metadata={"format": "pt"})
    index["weight_map"]["model.extra"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    twice = r"1 keys stored twice: model\.norm\.weight \(in extra\.safetensors and model-"
    with pytest.raises(ValueError, match=twice):
        upscale(src, out, drop=DROP, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
