"""Load a Hugging Face safetensors checkpoint (sharded or single file) straight into a fastsolar model.

The model is built on the meta device, every parameter is allocated once on the target device in the
target dtype, and each checkpoint tensor is copied into it (fused q/k/v and gate/up into their row
slices) shard by shard, so a 10.7B model reaches a GPU without a second full copy in host memory.
Before anything is allocated, the headers of all shards are read (`read_tensor_headers`, which
`fastsolar.upscale` uses too) and checked strictly against the config: unknown, missing and mis-shaped
keys are reported together in one ValueError.
Pickle checkpoints (`*.bin`) are refused: unpickling can run arbitrary code.
With `quantize`, or for a checkpoint quantised elsewhere, the linear layers are built quantised and each
tensor is quantised (or its scale spread over its rows) as it is copied: fastsolar.quant_load says how.
"""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fastsolar import hf_keys, quant, quant_load
from fastsolar.config import SolarConfig, read_config_json

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_MAX_LISTED = 20
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# Bytes per element of the safetensors dtypes a checkpoint may hold (others are read without a size check).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1}

M = TypeVar("M", bound=nn.Module)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a torch dtype or a name such as "bfloat16", "bf16", "fp16", "float32"."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors shards of a checkpoint directory and, when sharded, the index's key -> file map."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = {key: model_dir / name for key, name in weight_map.items()}
        shards = sorted(set(files.values()))
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) named in {index} not found: {', '.join(missing)}")
        return shards, files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single], None
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.bin.index.json"))
    if pickles:
        raise ValueError(
            f"{model_dir} holds only PyTorch pickle checkpoints ({', '.join(pickles)}); fastsolar never unpickles "
            "weights because that can run arbitrary code. Convert them to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)` with transformers."
        )
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file as its header describes it (no data is read)."""

    file: Path
    key: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int

    @property
    def itemsize(self) -> int:
        numel = math.prod(self.shape)
        return self.nbytes // numel if numel else 1


def _read_header(path: Path) -> list[TensorHeader]:
    """The tensors of one safetensors file: 8-byte little-endian header length, JSON header, then the data.

    Raises ValueError naming the file for a corrupt header or a file shorter than its header says.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"cannot read checkpoint shard {path}: {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise bad(f"not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise bad(f"not a safetensors file (header of {n} bytes)")
        if 8 + n > size:
            raise bad(f"truncated: the header needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file: the header is not a JSON object")
    tensors = []
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed header entry for {key}: {info!r}") from None
        ints = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
        if not (isinstance(dtype, str) and ints and start <= end):
            raise bad(f"malformed header entry for {key}: {info!r}")
        if dtype in _ITEMSIZE and end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"{key} is {dtype} {list(shape)} but its data_offsets span {end - start} bytes")
        tensors.append(TensorHeader(path, key, dtype, shape, end - start))
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise bad(f"truncated: the header declares {8 + n + data_end} bytes, the file has {size}")
    return tensors


def read_tensor_headers(shards: Iterable[Path]) -> dict[str, TensorHeader]:
    """Key -> TensorHeader for every tensor in the safetensors `shards`, read from the headers alone.

    ValueError naming the file for a corrupt or truncated shard, and one ValueError listing every key
    stored in more than one shard.
    """
    headers: dict[str, TensorHeader] = {}
    duplicates: list[str] = []
    for path in shards:
        for t in _read_header(Path(path)):
            if t.key in headers:
                duplicates.append(f"{t.key} (in {headers[t.key].file.name} and {t.file.name})")
            headers[t.key] = t
    if duplicates:
        raise ValueError("inconsistent checkpoint: " + _listing("keys stored twice", duplicates))
    return headers


def _open(path: Path, device: str):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise ValueError(f"cannot read checkpoint shard {path}: {e}") from e


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f", ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{len(items)} {title}: {', '.join(shown)}{more}"


def _plan(
    model: nn.Module, config: SolarConfig, headers: dict[str, TensorHeader], scale_keys: Iterable[str] = ()
) -> dict[Path, list[tuple[str, str, slice | None]]]:
    """Per shard, the (hf_key, param_name, row_slice) copies to make; raises one ValueError for every problem.
    `scale_keys`: the scales a quantised checkpoint must hold on top of the usual keys."""
    params = dict(model.named_parameters())
    parts = hf_keys.fused_parts(config)
    plan: dict[Path, list[tuple[str, str, slice | None]]] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    for key, header in headers.items():
        path, shape = header.file, header.shape
        if hf_keys.is_ignored(key):
            logger.debug("ignoring checkpoint key %s", key)
            continue
        mapped = hf_keys.map_key(key)
        if mapped is not None and key == hf_keys.LM_HEAD and config.tie_word_embeddings:
            logger.info("tie_word_embeddings: using embed_tokens for the lm_head; %s in the checkpoint is unused", key)
            continue
        if mapped is None or mapped[0] not in params:
            unexpected.append(key)
            continue
        name, pattern, part = mapped
        full = tuple(params[name].shape)
        rows = None
        if part is None:
            expected = full
        else:
            sizes = parts[pattern]
            start = sum(sizes[:part])
            rows = slice(start, start + sizes[part])
            expected = (sizes[part], *full[1:])
        if tuple(shape) != expected and not quant_load.scale_shape_ok(name, shape, expected[0]):
            bad_shape.append(f"{key} (expected {expected}, found {tuple(shape)})")
            continue
        plan.setdefault(path, []).append((key, name, rows))
    missing = [k for k in [*hf_keys.expected_keys(config), *scale_keys] if k not in headers]
    problems = []
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", sorted(unexpected)))
    if bad_shape:
        problems.append(_listing("keys with the wrong shape", bad_shape))
    if problems:
        raise ValueError(
            f"checkpoint does not match its config ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}): " + "; ".join(problems)
        )
    return plan


def _check_index(headers: dict[str, TensorHeader], weight_map: dict[str, Path]) -> None:
    """Every key the index lists must be in the shard the index names."""
    astray = [f"{k} (index says {p.name})" for k, p in weight_map.items() if k in headers and headers[k].file != p]
    absent = [f"{k} (index says {p.name})" for k, p in weight_map.items() if k not in headers]
    if astray or absent:
        raise ValueError(
            "inconsistent checkpoint: " + _listing("keys listed in the index but not in their shard", absent + astray)
        )


def _allocate(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every meta parameter by an uninitialised one on `device`, keeping tied parameters tied.
    Quantised layers keep their storage dtypes (int8 / float8_e4m3fn weights, fp32 scales)."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                keep = isinstance(module, quant.QuantLinear)
                new[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=p.dtype if keep else dtype),
                                          requires_grad=False)
            module._parameters[key] = new[id(p)]
    for name, b in model.named_buffers():
        if b is not None and b.is_meta:
            raise RuntimeError(f"buffer {name} has no value after loading; the loader only fills parameters")


def _progress(shards: list[Path]) -> Iterable[Path]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return shards
    disable = len(shards) < 2 or not sys.stderr.isatty()
    return tqdm(shards, desc="loading shards", unit="shard", disable=disable)


def load_model(
    cls: type[M],
    model_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> M:
    """Build `cls(config)` from a Hugging Face checkpoint directory; eval mode, no gradients, no cache.

    `device` defaults to CUDA when available, else CPU; `dtype` (of activations, embeddings and norms)
    defaults to the config's torch_dtype. `quantize` ("fp8", "int8"; default None) quantises the linear
    layers as they load; a checkpoint quantised elsewhere loads quantised as stored. Bad values, a card
    that cannot run the mode and unsupported quantised checkpoints are refused before any weight is read.
    """
    quantize = quant.check_mode(quantize)
    model_dir = Path(model_dir)
    config = SolarConfig.from_pretrained(model_dir)
    stored = quant_load.read_quantization(read_config_json(model_dir))
    mode = quant_load.resolve_mode(quantize, stored, model_dir)
    device = resolve_device(device)
    quant.check_device(mode, device)
    dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)
    shards, weight_map = checkpoint_files(model_dir)
    headers = read_tensor_headers(shards)
    if weight_map is not None:
        _check_index(headers, weight_map)
    stored_layers, scale_keys = quant_load.quantized_layers(headers, stored)
    if stored is not None:  # activation scales belong to activation quantisation, which is not replayed
        headers = {k: h for k, h in headers.items() if not hf_keys.is_activation_scale(k)}

    with torch.device("meta"):
        model = cls(config)
    if mode is not None:
        quant.quantize(model, mode, only=stored_layers if stored is not None else None)
    plan = _plan(model, config, headers, scale_keys)
    _allocate(model, device, dtype)
    params = dict(model.named_parameters())

    read_device = str(device)
    with torch.no_grad():
        for path in _progress(shards):
            copies = plan.get(path, [])
            if not copies:
                continue
            with _open(path, read_device) as f:
                for key, name, rows in copies:
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"cannot read {key} from checkpoint shard {path}: {e}") from e
                    quant_load.copy_into(params, name, rows, tensor)
                    del tensor
    model.eval()
    model.requires_grad_(False)
    model.cache = None
    logger.info(
        "loaded %s (%d layers, %.2fB parameters, %.2f GB) from %d shard(s) onto %s as %s%s",
        model_dir, config.num_hidden_layers, config.num_parameters() / 1e9, quant.parameter_bytes(model) / 1e9,
        len(shards), device, dtype, f" with {mode} weights" if mode else "",
    )
    return model
