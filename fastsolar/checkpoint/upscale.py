"""Depth Up-Scaling (DUS): how SOLAR-10.7B was made from Mistral-7B.

Take a base decoder of n layers, keep two copies, drop the last `drop` layers of the first copy and
the first `drop` layers of the second, and stack them: the new model has 2 * (n - drop) layers,

    new layer i <- base layer i                     for i <  n - drop
    new layer i <- base layer i - (n - drop) + drop for i >= n - drop

with the embeddings, the final norm and the lm_head unchanged. Mistral-7B (n=32) with drop=8 gives
SOLAR's 48 layers: new 0..23 <- base 0..23, new 24..47 <- base 8..31.

`upscale(base_dir, out_dir, drop=8)` writes the result as a Hugging Face checkpoint directory:
- `config.json`: the base config with the new `num_hidden_layers` (and a per-layer `layer_types` list
  remapped, if the base has one); every other field, and the key order, kept as the base had it.
- safetensors shards `model-0000i-of-0000N.safetensors` of at most `max_shard_size` bytes each plus
  `model.safetensors.index.json` (`metadata.total_size` = sum of tensor bytes, `weight_map`); a
  result that fits in one shard is written as a single `model.safetensors` without an index, which is
  what transformers' `save_pretrained` does too.
- every other top-level file of the base that is not weights (tokenizer.model, tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, generation_config.json, chat templates, README...)
  copied verbatim.

Memory stays bounded by a few staging buffers (about 100 MB): the base tensors are streamed in output
order by `fastsolar.checkpoint.shards.read_tensors` (the loader's reader: sequential reads on a reader thread, no
memory mapping) and appended to their output shard, whose header is computed up front from the base
files' headers (`fastsolar.checkpoint.shards.read_tensor_headers`: shapes and dtypes are known before any data is
read). A base that was not in the page cache is dropped from it behind the reader, each range after
its last use (a repeated layer only after its second read).
Nothing is unpickled: a `.bin` (pickle) base is refused. The work happens in a hidden temporary
directory next to `out_dir` that is renamed into place at the end, so a failure never leaves a
half-written checkpoint behind.

Every check runs before anything is written: `drop` in range, `out_dir` absent or empty, the base
config a Llama/Mistral one that fastsolar supports (`SolarConfig.from_hf_dict`), the weights present
and consistent with the config (every layer 0..n-1 present with the same tensor names).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsolar.checkpoint.loader import INDEX_FILE, SINGLE_FILE, checkpoint_files
from fastsolar.checkpoint.shards import TensorHeader, read_tensor_headers, read_tensors
from fastsolar.config import SolarConfig, read_config_json

logger = logging.getLogger(__name__)

#: Per-layer tensor names in a Hugging Face Llama/Mistral checkpoint: `model.layers.{i}.<rest>`.
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: Like transformers' `save_pretrained` default ("5GB" = 5 * 10**9 bytes).
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Files of a model directory that hold weights (in any format); everything else at the top level is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


# --------------------------------------------------------------------------------------------------
# Pure parts: the layer map and the config
# --------------------------------------------------------------------------------------------------

def layer_map(num_layers: int, drop: int = 8) -> list[int]:
    """`result[new_layer] = base_layer` for Depth Up-Scaling a base of `num_layers` layers."""
    if isinstance(drop, bool) or not isinstance(drop, int):
        raise TypeError(f"drop must be an integer, got {drop!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"the base model must have a positive number of layers, got {num_layers!r}")
    if drop < 1:
        raise ValueError(f"drop must be at least 1, got {drop}")
    if 2 * drop > num_layers:
        raise ValueError(
            f"drop={drop} is too large for a base of {num_layers} layers: dropping {drop} layers from each "
            f"copy needs 2*drop <= num_layers ({2 * drop} > {num_layers}); use drop <= {num_layers // 2}"
        )
    keep = num_layers - drop
    return list(range(keep)) + list(range(drop, num_layers))


def upscale_config(base_config: Mapping[str, Any], drop: int = 8) -> tuple[dict[str, Any], list[int]]:
    """Map a base Hugging Face config dict to the up-scaled one; returns `(new_config, layer_map)`.

    The base must be a Llama/Mistral config fastsolar supports (checked with `SolarConfig.from_hf_dict`,
    ValueError otherwise). The new config is a deep copy of the base with `num_hidden_layers` changed
    (and a per-layer `layer_types` list remapped through the layer map if the base has one); nothing
    else changes, not even fields fastsolar reads differently (e.g. Mistral's sliding window).
    """
    if not isinstance(base_config, Mapping):
        raise TypeError(f"base_config must be a dict, got {type(base_config).__name__}")
    config_logger = logging.getLogger("fastsolar.config")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)  # validation only: its sliding-window note is about loading
    try:
        SolarConfig.from_hf_dict(dict(base_config))
    except KeyError as e:
        raise ValueError(f"the base config is not a Llama/Mistral config: missing {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"the base config is not an up-scalable Llama/Mistral config: {e}") from None
    finally:
        config_logger.setLevel(level)
    n = base_config["num_hidden_layers"]
    mapping = layer_map(n, drop)
    new = copy.deepcopy(dict(base_config))
    new["num_hidden_layers"] = len(mapping)
    layer_types = new.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n:
        new["layer_types"] = [layer_types[b] for b in mapping]
    return new, mapping


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (GB = 10**9, GiB = 2**30, as in transformers)."""
    if isinstance(size, bool):
        raise TypeError(f"size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise TypeError(f"size must be an int or a string like '5GB', got {type(size).__name__}")
    if value < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Reading the base
# --------------------------------------------------------------------------------------------------

def _check_weights(tensors: Mapping[str, TensorHeader], config: Mapping[str, Any]) -> None:
    """Refuse weights that do not match a Llama/Mistral checkpoint of `config`'s depth."""
    n = config["num_hidden_layers"]
    per_layer: dict[int, set[str]] = {}
    for key in tensors:
        m = LAYER_KEY.match(key)
        if m:
            per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not per_layer:
        raise ValueError("the base weights have no `model.layers.{i}.` tensors: not a Llama/Mistral checkpoint")
    found = sorted(per_layer)
    if found != list(range(n)):
        missing = sorted(set(range(n)) - set(found))
        extra = sorted(set(found) - set(range(n)))
        raise ValueError(
            f"the base weights do not match num_hidden_layers={n} of config.json: "
            + (f"layers missing {missing[:8]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected layers {extra[:8]}" if extra else "")
        )
    names = per_layer[0]
    for i in found:
        if per_layer[i] != names:
            diff = sorted(per_layer[i] ^ names)
            raise ValueError(f"layer {i} has different tensors than layer 0 ({', '.join(diff[:4])})")
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError("the base weights have no model.embed_tokens.weight: not a Llama/Mistral checkpoint")


def _read_base(base_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"base model directory {base} does not exist")
    return base, read_config_json(base)


def _check_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()):
            raise ValueError(f"output directory {out} exists and is not empty; choose a new or empty one")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _plan_shards(items: list[tuple[str, TensorHeader]], max_bytes: int) -> list[list[tuple[str, TensorHeader]]]:
    """Greedy split in order, like transformers: a shard closes when the next tensor would overflow it."""
    shards: list[list[tuple[str, TensorHeader]]] = [[]]
    size = 0
    for item in items:
        nbytes = item[1].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _shard_header(items: list[tuple[str, TensorHeader]]) -> tuple[bytes, list[tuple[str, TensorHeader]]]:
    """The safetensors header for `items` and the order in which their data follows it.

    Wider dtypes first (stable otherwise), so every tensor's data starts at a multiple of its item size.
    """
    ordered = sorted(items, key=lambda it: -it[1].itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in ordered:
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors writer does it
    return struct.pack("<Q", len(raw)) + raw, ordered


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def upscale(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    drop: int = 8,
    dry_run: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> list[int]:
    """Depth-up-scale the Hugging Face checkpoint in `base_dir` into `out_dir`; returns the layer map.

    `result[new_layer] = base_layer`: base layers 0..n-drop-1, then base layers drop..n-1. With
    `dry_run=True` everything is checked and the map is logged and returned, but nothing is written.
    `max_shard_size` is bytes or a string like "5GB"; `progress` shows a tqdm bar (bytes written).

    Raises (before writing anything): ValueError for a bad `drop`, an unsupported or inconsistent base
    (not Llama/Mistral, weights not matching config.json, pickle-only weights); FileNotFoundError for a
    missing base directory, config.json or weights. A non-empty `out_dir` or too little free disk space
    is a ValueError as well.
    """
    base, config = _read_base(base_dir)
    new_config, mapping = upscale_config(config, drop)
    out = Path(out_dir)
    _check_out_dir(out)
    tensors = read_tensor_headers(checkpoint_files(base)[0])
    _check_weights(tensors, config)
    max_bytes = parse_size(max_shard_size)

    # Output tensors: embeddings, the new layer stack, then every other non-layer tensor in base order.
    items: list[tuple[str, TensorHeader]] = []
    others = [k for k in tensors if not LAYER_KEY.match(k)]
    first = [k for k in others if k == "model.embed_tokens.weight"]
    items += [(k, tensors[k]) for k in first]
    layer_keys: dict[int, list[tuple[str, str]]] = {}
    for key in tensors:
        m = LAYER_KEY.match(key)
        if m:
            layer_keys.setdefault(int(m.group(1)), []).append((m.group(2), key))
    for new_i, base_i in enumerate(mapping):
        for rest, key in layer_keys[base_i]:
            items.append((f"model.layers.{new_i}.{rest}", tensors[key]))
    items += [(k, tensors[k]) for k in others if k not in first]
    total = sum(t.nbytes for _, t in items)

    logger.info(
        "upscale %s: %d layers -> %d (drop=%d), %.2f GB", base, len(layer_keys), len(mapping), drop, total / 1e9
    )
    for new_i, base_i in enumerate(mapping):
        logger.info("new %d <- base %d", new_i, base_i)
    if dry_run:
        return mapping

    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if total > free:
        raise ValueError(
            f"not enough disk space in {parent}: the result needs {total / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )

    shards = _plan_shards(items, max_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        _write_all(base, tmp, new_config, shards, total, progress)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%d shard%s)", out, len(shards), "" if len(shards) == 1 else "s")
    return mapping


def _write_all(
    base: Path,
    tmp: Path,
    new_config: dict[str, Any],
    shards: list[list[tuple[str, TensorHeader]]],
    total: int,
    progress: bool,
) -> None:
    from contextlib import ExitStack

    from safetensors import safe_open
    from tqdm.auto import tqdm

    # Non-weight files first: cheap, and the config goes in the same JSON form the base used.
    for entry in sorted(base.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or entry.name == "config.json":
            continue
        if _is_weight_file(entry.name):
            continue
        shutil.copy2(entry, tmp / entry.name)
        logger.info("copied %s", entry.name)
    raw_cfg = (base / "config.json").read_text()
    indent = _json_indent(raw_cfg)
    (tmp / "config.json").write_text(json.dumps(new_config, indent=indent) + ("\n" if raw_cfg.endswith("\n") else ""))

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    # Every output shard is opened with its header written; the data then follows in one stream over all
    # of them, so a base range read twice (the repeated layers) is dropped from the page cache only after
    # its second read.
    stream: list[tuple[int, TensorHeader]] = []
    with ExitStack() as stack, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upscale", disable=not progress
    ) as bar:
        outs = []
        for k, (name, shard) in enumerate(zip(names, shards)):
            header, ordered = _shard_header(shard)
            outs.append(stack.enter_context(open(tmp / name, "wb")))
            outs[-1].write(header)
            stream += [(k, t) for _, t in ordered]

        def write(i: int, start: int, data) -> None:
            outs[stream[i][0]].write(memoryview(data.numpy()))

        read_tensors([t for _, t in stream], write, progress=bar.update)
    # Each shard must read back as a valid safetensors file with exactly the planned tensors.
    for name, shard in zip(names, shards):
        with safe_open(str(tmp / name), framework="pt", device="cpu") as f:
            if set(f.keys()) != {k for k, _ in shard}:
                raise RuntimeError(f"{name} does not hold the planned tensors")
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, shard in zip(names, shards) for k, _ in sorted(shard)},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _json_indent(text: str) -> int | None:
    """The indent a JSON document was written with (None for a one-line document)."""
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped:
            return len(line) - len(stripped) or None
    return None


__all__ = ["upscale", "upscale_config", "layer_map", "parse_size"]
