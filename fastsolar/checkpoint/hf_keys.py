"""How Hugging Face Llama/Mistral checkpoint keys map onto fastsolar's parameters (plain data, no torch).

`KEY_MAP` rows are `(hf_pattern, our_pattern, part)`: `{i}` stands for the layer index; `part` is None for a
one-to-one copy, or the index of the row block inside a fused parameter (see `fused_parts`).
`IGNORED` lists the only checkpoint keys that are skipped on purpose; every other unknown key is an error.
Checkpoints quantised elsewhere (compressed-tensors, see fastsolar.checkpoint.quant_load) add a `weight_scale` beside
each quantised linear weight (`SCALE_KEY_MAP`, mapped like the weight) and may carry activation scales
(`ACTIVATION_SCALES`), which fastsolar does not use: it quantises weights only.
"""
from __future__ import annotations

import re
from typing import Any

LAYER = "{i}"

# (hf_name_pattern, our_param_pattern, part_index_or_None)
KEY_MAP: tuple[tuple[str, str, int | None], ...] = (
    ("model.embed_tokens.weight", "embed_tokens.weight", None),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm", None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wqkv.weight", 0),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wqkv.weight", 1),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wqkv.weight", 2),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm", None),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w_gate_up.weight", 0),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w_gate_up.weight", 1),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w_down.weight", None),
    ("model.norm.weight", "norm", None),
    ("lm_head.weight", "lm_head.weight", None),
)

# Our parameters that are weights of linear layers: what weight-only quantisation may quantise.
LINEAR_WEIGHTS: tuple[str, ...] = (
    "layers.{i}.attention.wqkv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w_gate_up.weight",
    "layers.{i}.feed_forward.w_down.weight",
    "lm_head.weight",
)

# A quantised linear's per-channel ([rows, 1]) or per-tensor ([] / [1]) scale, stored as `<layer>.weight_scale`
# beside `<layer>.weight`, goes to `<our layer>.weight_scale`, the same rows of the same fused parameter.
SCALE_KEY_MAP: tuple[tuple[str, str, int | None], ...] = tuple(
    (hf.removesuffix("weight") + "weight_scale", ours.removesuffix("weight") + "weight_scale", part)
    for hf, ours, part in KEY_MAP if ours in LINEAR_WEIGHTS
)

# An int4 layer's zero points (GPTQ's / AWQ's `qzeros`, renamed by fastsolar.checkpoint.quant_load), mapped likewise.
ZEROS_KEY_MAP: tuple[tuple[str, str, int | None], ...] = tuple(
    (hf.removesuffix("weight") + "weight_zeros", ours.removesuffix("weight") + "weight_zeros", part)
    for hf, ours, part in KEY_MAP if ours in LINEAR_WEIGHTS
)

# An act-order int4 layer's input order (GPTQ's `g_idx`, renamed likewise): one per layer, so every part of a
# fused layer maps onto the whole of it (the loader checks the parts agree).
PERM_KEY_MAP: tuple[tuple[str, str, int | None], ...] = tuple(
    (hf.removesuffix("weight") + "weight_perm", ours.removesuffix("weight") + "weight_perm", None)
    for hf, ours, part in KEY_MAP if ours in LINEAR_WEIGHTS
)

# Static activation scales some quantised checkpoints carry beside the weight scale; unused by fastsolar.
ACTIVATION_SCALES: tuple[str, ...] = tuple(
    hf.removesuffix("weight") + "input_scale" for hf, ours, _ in KEY_MAP if ours in LINEAR_WEIGHTS
)

# Keys some checkpoints carry that hold nothing we need: the rotary inverse frequencies that old
# transformers versions saved as persistent buffers (recomputed from rope_theta). Nothing else is ignored.
IGNORED: tuple[str, ...] = (
    "model.layers.{i}.self_attn.rotary_emb.inv_freq",
    "model.rotary_emb.inv_freq",
)

# The key of the output projection, absent from checkpoints with tied embeddings.
LM_HEAD = "lm_head.weight"

_LAYER_INDEX_RE = re.compile(r"model\.layers\.(\d+)\.")


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The config.json values that a checkpoint's tensor shapes fix exactly: vocab_size and hidden_size (the
    embedding), intermediate_size (layer 0's gate projection) and num_hidden_layers (the layer indices)."""
    found: dict[str, int] = {}
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2:
        found["vocab_size"], found["hidden_size"] = embed
    gate = shapes.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and len(gate) == 2:
        found["intermediate_size"] = gate[0]
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_INDEX_RE.match(k))}
    if layers:
        found["num_hidden_layers"] = max(layers) + 1
    return found


def fused_parts(config: Any) -> dict[str, tuple[int, ...]]:
    """Row count of each part of each fused parameter pattern, from a SolarConfig."""
    d = config.head_dim
    parts = {
        "layers.{i}.attention.wqkv.weight": (
            config.num_attention_heads * d,
            config.num_key_value_heads * d,
            config.num_key_value_heads * d,
        ),
        "layers.{i}.feed_forward.w_gate_up.weight": (config.intermediate_size, config.intermediate_size),
    }
    # A quantised layer's scales (and int4 zeros) have one row per weight row: the same parts.
    return parts | {name.removesuffix("weight") + extra: rows for name, rows in parts.items()
                    for extra in ("weight_scale", "weight_zeros")}


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape(LAYER), r"(?P<i>\d+)") + "$")


_MAP_RE = tuple((_compile(hf), ours, part) for hf, ours, part in KEY_MAP + SCALE_KEY_MAP + ZEROS_KEY_MAP + PERM_KEY_MAP)
_IGNORED_RE = tuple(_compile(p) for p in IGNORED)
_ACTIVATION_SCALE_RE = tuple(_compile(p) for p in ACTIVATION_SCALES)


def is_ignored(hf_key: str) -> bool:
    return any(r.match(hf_key) for r in _IGNORED_RE)


def is_activation_scale(hf_key: str) -> bool:
    return any(r.match(hf_key) for r in _ACTIVATION_SCALE_RE)


def scale_key(hf_weight_key: str) -> str:
    """The checkpoint key of a quantised weight's scale."""
    return hf_weight_key.removesuffix("weight") + "weight_scale"


def map_key(hf_key: str) -> tuple[str, str, int | None] | None:
    """`(our_param_name, our_pattern, part)` for a Hugging Face key, or None when it is not a known key."""
    for regex, ours, part in _MAP_RE:
        m = regex.match(hf_key)
        if m:
            name = ours.replace(LAYER, m.group("i")) if "i" in m.groupdict() else ours
            return name, ours, part
    return None


def expected_keys(config: Any) -> list[str]:
    """Every Hugging Face key a checkpoint for `config` must hold (lm_head left out when tied; the scales of
    a quantised checkpoint come on top, fastsolar.checkpoint.quant_load says which)."""
    keys = []
    for hf, _ours, _part in KEY_MAP:
        if hf == LM_HEAD and config.tie_word_embeddings:
            continue
        if LAYER in hf:
            keys.extend(hf.replace(LAYER, str(i)) for i in range(config.num_hidden_layers))
        else:
            keys.append(hf)
    return keys
