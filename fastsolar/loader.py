"""Load a Hugging Face safetensors checkpoint (sharded or single file) straight into a fastsolar model.

The model is built on the meta device, every parameter is allocated once on the target device in the
target dtype, and each checkpoint tensor is copied into it (fused q/k/v and gate/up into their row
slices) shard by shard, so a 10.7B model reaches a GPU without a second full copy in host memory.
Before anything is allocated, the headers of all shards are read and checked strictly against the
config: unknown, missing and mis-shaped keys are reported together in one ValueError.
Pickle checkpoints (`*.bin`) are refused: unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fastsolar import hf_keys
from fastsolar.config import SolarConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_MAX_LISTED = 20

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
    model: nn.Module, config: SolarConfig, headers: dict[str, tuple[Path, tuple[int, ...]]]
) -> dict[Path, list[tuple[str, str, slice | None]]]:
    """Per shard, the (hf_key, param_name, row_slice) copies to make; raises one ValueError for every problem."""
    params = dict(model.named_parameters())
    parts = hf_keys.fused_parts(config)
    plan: dict[Path, list[tuple[str, str, slice | None]]] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    for key, (path, shape) in headers.items():
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
        if tuple(shape) != expected:
            bad_shape.append(f"{key} (expected {expected}, found {tuple(shape)})")
            continue
        plan.setdefault(path, []).append((key, name, rows))
    missing = [k for k in hf_keys.expected_keys(config) if k not in headers]
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


def _read_headers(shards: list[Path], weight_map: dict[str, Path] | None) -> dict[str, tuple[Path, tuple[int, ...]]]:
    headers: dict[str, tuple[Path, tuple[int, ...]]] = {}
    duplicates: list[str] = []
    for path in shards:
        with _open(path, "cpu") as f:
            try:
                for key in f.keys():
                    if key in headers:
                        duplicates.append(f"{key} (in {headers[key][0].name} and {path.name})")
                    headers[key] = (path, tuple(f.get_slice(key).get_shape()))
            except Exception as e:
                raise ValueError(f"cannot read checkpoint shard {path}: {e}") from e
    problems = []
    if duplicates:
        problems.append(_listing("keys stored twice", duplicates))
    if weight_map is not None:
        astray = [f"{k} (index says {p.name})" for k, p in weight_map.items() if headers.get(k, (p,))[0] != p]
        absent = [f"{k} (index says {p.name})" for k, p in weight_map.items() if k not in headers]
        if astray or absent:
            problems.append(_listing("keys listed in the index but not in their shard", absent + astray))
    if problems:
        raise ValueError("inconsistent checkpoint: " + "; ".join(problems))
    return headers


def _allocate(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every meta parameter by an uninitialised one on `device`, keeping tied parameters tied."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
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
) -> M:
    """Build `cls(config)` from a Hugging Face checkpoint directory; eval mode, no gradients, no cache.

    `device` defaults to CUDA when available, else CPU; `dtype` defaults to the config's torch_dtype.
    """
    model_dir = Path(model_dir)
    config = SolarConfig.from_pretrained(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)
    shards, weight_map = checkpoint_files(model_dir)
    headers = _read_headers(shards, weight_map)

    with torch.device("meta"):
        model = cls(config)
    plan = _plan(model, config, headers)
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
                    target = params[name] if rows is None else params[name][rows]
                    target.copy_(tensor)
                    del tensor
    model.eval()
    model.requires_grad_(False)
    model.cache = None
    logger.info(
        "loaded %s (%d layers, %.2fB parameters) from %d shard(s) onto %s as %s",
        model_dir, config.num_hidden_layers, config.num_parameters() / 1e9, len(shards), device, dtype,
    )
    return model
