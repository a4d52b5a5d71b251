"""The model configuration: one frozen dataclass, exact presets, and a reader for Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SolarConfig:
    """Shape and numerics of a Llama-2-architecture decoder (SOLAR, Llama, Mistral without sliding window)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "llama"
    # Derived from hidden_size / num_attention_heads when the checkpoint does not state it.
    head_dim: int = field(default=0)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_parameters(self) -> int:
        """Exact parameter count (the lm_head counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    @classmethod
    def preset(cls, name: str) -> "SolarConfig":
        """An exact named configuration: "solar-10.7b" or the small "tiny" one for demos and CPU runs."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "SolarConfig":
        """Read `config.json` as SOLAR ships it or as transformers 5 writes it."""
        return cls.from_hf_dict(read_config_json(model_dir))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "SolarConfig":
        """Map a Hugging Face config dict onto SolarConfig, refusing features this runtime does not implement."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        rope_params = raw.get("rope_parameters") or {}
        rope_scaling = raw.get("rope_scaling")
        rope_type = rope_params.get("rope_type", "default")
        if rope_scaling or rope_type != "default":
            raise ValueError(
                f"rope scaling ({rope_scaling or rope_type!r}) is not supported; only default rotary embeddings are"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{flag}=true is not supported: the model has no bias terms")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
        max_pos = raw.get("max_position_embeddings", 4096)
        window = raw.get("sliding_window")
        if window is not None and raw.get("use_sliding_window", True) and window < max_pos:
            # Within the window, sliding-window attention is exactly full attention, so capping the
            # context at the window keeps the model correct instead of silently attending too far.
            logger.warning("sliding_window %d < max_position_embeddings %d: context capped at %d tokens",
                           window, max_pos, window)
            max_pos = window
        theta = rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        kwargs: dict[str, Any] = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            max_position_embeddings=max_pos,
            rope_theta=float(theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""),
            model_type=model_type,
            head_dim=raw.get("head_dim") or 0,
        )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "SolarConfig":
        return dataclasses.replace(self, **changes)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a Hugging Face model directory, with clear errors for a missing or bad file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return raw


PRESETS: dict[str, dict[str, Any]] = {
    # upstage/SOLAR-10.7B-v1.0: 10,731,524,096 parameters.
    "solar-10.7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        torch_dtype="float16",
    ),
    # Same proportions in miniature (GQA 4:1, head_dim 32): runs in about a second per token on a CPU.
    "tiny": dict(
        vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        torch_dtype="float32",
    ),
}
