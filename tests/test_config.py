"""SolarConfig: exact presets, both config.json forms, refusals, immutability."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fastsolar.config import SolarConfig

# Exercises no device code: CI covers it; bench/gpu_check.sh deselects it (tests/conftest.py).
pytestmark = pytest.mark.cpu_only

# upstage/SOLAR-10.7B-v1.0 config.json as published (transformers 4.35 form).
SOLAR_CONFIG_JSON = {
    "_name_or_path": "upstage/SOLAR-10.7B-v1.0",
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.35.2",
    "use_cache": False,
    "vocab_size": 32000,
}


def modern_form(legacy: dict) -> dict:
    """The same config as transformers 5 writes it: rope_parameters, dtype, head_dim."""
    d = dict(legacy)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    d.pop("rope_scaling")
    d["dtype"] = d.pop("torch_dtype")
    d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    d["transformers_version"] = "5.24.0"
    return d


def test_solar_preset_exact():
    c = SolarConfig.preset("solar-10.7b")
    assert c.num_parameters() == 10_731_524_096
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 48)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 32000)
    assert c.max_position_embeddings == 4096
    assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id, c.eos_token_ids) == (1, 2, (2,))
    assert c.head_dim == 128 and c.queries_per_kv == 4
    assert c.model_type == "llama"


def test_preset_equals_published_config():
    assert SolarConfig.from_hf_dict(SOLAR_CONFIG_JSON) == SolarConfig.preset("solar-10.7b")


def test_tiny_preset_builds():
    c = SolarConfig.preset("tiny")
    assert c.queries_per_kv == 4 and c.head_dim == 32


def test_both_forms_parse_equal(tmp_path):
    legacy, modern = tmp_path / "legacy", tmp_path / "modern"
    legacy.mkdir(), modern.mkdir()
    (legacy / "config.json").write_text(json.dumps(SOLAR_CONFIG_JSON))
    (modern / "config.json").write_text(json.dumps(modern_form(SOLAR_CONFIG_JSON)))
    a, b = SolarConfig.from_pretrained(legacy), SolarConfig.from_pretrained(modern)
    assert a == b == SolarConfig.preset("solar-10.7b")


def test_transformers_written_config_parses(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{k: v for k, v in SOLAR_CONFIG_JSON.items()
                                      if not k.startswith("_") and k not in ("architectures", "transformers_version")})
    cfg.save_pretrained(tmp_path)
    parsed = SolarConfig.from_pretrained(tmp_path)
    assert parsed.replace(torch_dtype="float16") == SolarConfig.preset("solar-10.7b")


def test_eos_list_and_head_dim():
    d = modern_form(SOLAR_CONFIG_JSON)
    d["eos_token_id"] = [2, 7]
    c = SolarConfig.from_hf_dict(d)
    assert c.eos_token_ids == (2, 7)
    hash(c)  # tuple, not list: the config stays hashable


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ],
)
def test_unsupported_refused(change, message):
    d = dict(SOLAR_CONFIG_JSON)
    d.update(change)
    with pytest.raises(ValueError, match=message):
        SolarConfig.from_hf_dict(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'solar-70b'.*solar-10.7b"):
        SolarConfig.preset("solar-70b")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SolarConfig.from_pretrained(tmp_path)


def test_frozen():
    c = SolarConfig.preset("solar-10.7b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 8  # type: ignore[misc]
    assert c.replace(num_hidden_layers=2).num_hidden_layers == 2 and c.num_hidden_layers == 48


def test_sliding_window_caps_the_context(caplog):
    """Mistral-7B-v0.1 attends over a 4096-token window with 32768 positions: within the window that is
    exactly full attention, so the context is capped at the window (and said so), never silently widened."""
    mistral = dict(SOLAR_CONFIG_JSON, model_type="mistral", max_position_embeddings=32768, sliding_window=4096)
    with caplog.at_level("WARNING", logger="fastsolar.config"):
        config = SolarConfig.from_hf_dict(mistral)
    assert config.max_position_embeddings == 4096
    assert "sliding_window 4096 < max_position_embeddings 32768: context capped at 4096 tokens" in caplog.text
    unused = dict(mistral, use_sliding_window=False)  # Qwen2-style flag: the window is off
    assert SolarConfig.from_hf_dict(unused).max_position_embeddings == 32768
