"""fastsolar: a lean, fast runtime for SOLAR-10.7B and its Llama-2 / Mistral relatives.

    from fastsolar import Solar, Tokenizer
    model = Solar.from_pretrained("SOLAR-10.7B-Instruct-v1.0")
    tok = Tokenizer.from_pretrained("SOLAR-10.7B-Instruct-v1.0")

Model-card code written for transformers runs with one changed import:

    from fastsolar import AutoModelForCausalLM, AutoTokenizer   # from_pretrained gives a Solar / Tokenizer

The names below are imported on first use (PEP 562), so `import fastsolar` (and `fastsolar --help`) loads
neither torch nor triton. The package map and the import direction are in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "AutoModelForCausalLM": "fastsolar.api",
    "AutoTokenizer": "fastsolar.api",
    "BatchEncoding": "fastsolar.hf.compat",
    "DecodeSession": "fastsolar.decoding.session",
    "GenerationConfig": "fastsolar.hf.generation_config",
    "KVCache": "fastsolar.model.transformer",
    "Solar": "fastsolar.api",
    "SolarConfig": "fastsolar.config",
    "Tokenizer": "fastsolar.api",
    "TokenizerFast": "fastsolar.api",
    "patch_hf": "fastsolar.hf.patch",
    "pipeline": "fastsolar.pipelines",
    "upscale": "fastsolar.checkpoint.upscale",
}
# modules that moved into subpackages, still reachable as attributes (`from fastsolar import quant`)
_MOVED = {
    "gemv_choice": "fastsolar.ops.gemv_choice",
    "quant": "fastsolar.model.quant",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MOVED:
        value = importlib.import_module(_MOVED[name])
    else:
        raise AttributeError(f"module 'fastsolar' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MOVED))
