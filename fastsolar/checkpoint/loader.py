"""Load a Hugging Face safetensors checkpoint (sharded or single file) straight into a fastsolar model.

The model is built on the meta device; the headers of all shards are read (`fastsolar.checkpoint.shards`, which
`fastsolar.checkpoint.upscale` uses too) and checked strictly against the config: unknown, missing, mis-shaped and
non-float keys are reported together in one ValueError. Then, still before anything is allocated, the
bytes the weights need on the target device (`fastsolar.memory.weight_bytes`) are compared with what is
free there, and a checkpoint that does not fit is refused (InsufficientMemoryError naming the sizes).
Only then is every parameter allocated once, on the target device in the target dtype, and filled from
the checkpoint at disk speed: each shard is read sequentially by `fastsolar.checkpoint.shards.read_tensors` on a
reader thread while the previous chunk is placed into its (fused q/k/v, gate/up) row slice. On a CPU, a
tensor already in the target dtype is read straight into its parameter; otherwise chunks are staged and
converted, and on CUDA they are uploaded from pinned buffers with non-blocking copies on a side stream, so
the disk read, the PCIe copy and the placement overlap. Nothing is memory-mapped, so resident memory never
holds a shard's pages, and a shard that was not in the page cache is dropped from it as it is read (one
that was stays cached for the next start). A progress bar counts bytes (GB, GB/s) on a terminal.
Pickle checkpoints (`*.bin`) are refused: unpickling can run arbitrary code.
With `quantize`, or for a checkpoint quantised elsewhere, the linear layers are built quantised (int8/FP8
weights and fp32 scales, or packed int4 with fp16 group scales and uint8 zeros: the memory check counts those
bytes) and each weight is quantised on the target
device as its chunks arrive, so the device never holds more than the quantised model plus a chunk in
flight; fastsolar.checkpoint.quant_load says how (and which quantised checkpoints it reads).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fastsolar import memory
from fastsolar.checkpoint import hf_keys, quant_load
from fastsolar.checkpoint.shards import TensorHeader, listing, read_tensor_headers, read_tensors
from fastsolar.config import SolarConfig, read_config_json
from fastsolar.devices import resolve_device
from fastsolar.model import quant

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

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
    ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
    if ggufs:
        raise ValueError(f"{model_dir} holds GGUF files ({', '.join(ggufs)}), llama.cpp's format, which fastsolar does "
                         "not read; load the original safetensors checkpoint (quantize='int4' for 4-bit weights)")
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.bin.index.json"))
    if pickles:
        raise ValueError(
            f"{model_dir} holds only PyTorch pickle checkpoints ({', '.join(pickles)}); fastsolar never unpickles "
            "weights because that can run arbitrary code. Convert them to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)` with transformers."
        )
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}")


@dataclass(frozen=True)
class _Copy:
    """One checkpoint tensor and where it goes: parameter `name`, or the `rows` of it for a fused part."""

    header: TensorHeader
    name: str
    rows: slice | None


# F8_E4M3 reaches here only for the layers of a compressed-tensors FP8 checkpoint (quant_load checks that first).
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3")
# A GPTQ / AWQ layer's tensors: int32 qweight and qzeros, scales in a float dtype.
_INT4_DTYPES = ("I32", "F16", "BF16", "F32")


def _plan(
    model: nn.Module, config: SolarConfig, headers: dict[str, TensorHeader], scale_keys: Iterable[str] = (),
    stored: quant_load.StoredQuantization | None = None,
) -> list[_Copy]:
    """The copies to make, in file order (shard by shard, each front to back); one ValueError for every problem.
    `scale_keys`: the scales (and int4 zeros) a quantised checkpoint must hold on top of the usual keys;
    `stored`: its quantization_config (a GPTQ / AWQ layer's tensors have their own shapes and dtypes)."""
    params = dict(model.named_parameters())
    parts = hf_keys.fused_parts(config)
    plan: list[_Copy] = []
    unexpected: list[str] = []
    bad_shape: list[str] = []
    bad_dtype: list[str] = []
    for key, header in headers.items():
        shape = header.shape
        if hf_keys.is_ignored(key):
            logger.debug("ignoring checkpoint key %s", key)
            continue
        mapped = hf_keys.map_key(key)
        if mapped is not None and key == hf_keys.LM_HEAD and config.tie_word_embeddings:
            logger.info("tie_word_embeddings: using embed_tokens for the lm_head; %s in the checkpoint is unused", key)
            continue
        if mapped is None or mapped[0] not in params:
            unexpected.append(header.key)  # the checkpoint's own name (int4_keys may have renamed it)
            continue
        name, pattern, part = mapped
        full = quant_load.logical_shape(params[name])
        rows = None
        if part is None:
            expected = full
        else:
            sizes = parts[pattern]
            start = sum(sizes[:part])
            rows = slice(start, start + sizes[part])
            expected = (sizes[part], *full[1:])
        int4 = quant_load.int4_stored_ok(params, name, shape, expected[0], stored)
        if tuple(shape) != expected and not int4 and not quant_load.scale_shape_ok(name, shape, expected[0]):
            bad_shape.append(f"{header.key} (expected {expected}, found {tuple(shape)})")
            continue
        if header.dtype not in (_INT4_DTYPES if int4 else _FLOAT_DTYPES):
            bad_dtype.append(f"{header.key} ({header.dtype} in {header.file.name})")
            continue
        plan.append(_Copy(header, name, rows))
    missing = [quant_load.stored_key(k, stored) for k in [*hf_keys.expected_keys(config), *scale_keys]
               if k not in headers]
    groups = [
        ("missing keys", missing),
        ("unexpected keys", sorted(unexpected)),
        ("keys with the wrong shape", bad_shape),
        (f"keys not stored as floats ({', '.join(_FLOAT_DTYPES)})", bad_dtype),
    ]
    if any(items for _, items in groups):
        raise ValueError(_mismatch_message(config, headers, groups))
    return sorted(plan, key=lambda c: (c.header.file, c.header.offset))


#: Checkpoint keys a config/weights mismatch names, across all its kinds; the rest are counted, so the error
#: stays one short line however many keys a wrong config.json value touches.
_NAMED_KEYS = 3


def _mismatch_message(
    config: SolarConfig, headers: dict[str, TensorHeader], groups: list[tuple[str, list[str]]]
) -> str:
    """One line: the config.json values the shapes contradict, then each kind of problem counted, the first
    `_NAMED_KEYS` keys named (with expected and found shapes)."""
    # Only unquantised tensors tell config values: a stored int4 or 8-bit tensor has its format's own shape.
    found = hf_keys.config_from_shapes({k: tuple(h.shape) for k, h in headers.items() if h.dtype in _FLOAT_DTYPES})
    wrong = [f"{k} {getattr(config, k)} (weights: {v})" for k, v in found.items() if getattr(config, k) != v]
    head = f"config.json disagrees with the weights: {', '.join(wrong)}" if wrong else (
        f"checkpoint does not match its config ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size})"
    )
    parts, budget = [], _NAMED_KEYS
    for title, items in groups:
        if items:
            parts.append(listing(title, items, limit=budget))
            budget -= min(budget, len(items))
    return f"{head}; " + "; ".join(parts)


def _check_index(headers: dict[str, TensorHeader], weight_map: dict[str, Path]) -> None:
    """Every key the index lists must be in the shard the index names."""
    astray = [f"{k} (index says {p.name})" for k, p in weight_map.items() if k in headers and headers[k].file != p]
    absent = [f"{k} (index says {p.name})" for k, p in weight_map.items() if k not in headers]
    if astray or absent:
        raise ValueError(
            "inconsistent checkpoint: " + listing("keys listed in the index but not in their shard", absent + astray)
        )


def checkpoint_headers(model_dir: Path) -> tuple[list[Path], dict[str, TensorHeader]]:
    """The shards of a checkpoint directory and every tensor's header, checked against the index (if any)."""
    shards, weight_map = checkpoint_files(model_dir)
    headers = read_tensor_headers(shards)
    if weight_map is not None:
        _check_index(headers, weight_map)
    return shards, headers


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips `torch.nn.init` on meta tensors while the model is built there: there are no values to initialise,
    and torch's meta `normal_` imports torch._dynamo on first use, seconds of every process's first load."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _keeps_dtype(module: nn.Module) -> bool:
    """Whether a module's parameters keep their own dtypes whatever the model's: a quantised layer's int8 /
    float8_e4m3fn weight and fp32 scale."""
    return isinstance(module, quant.QuantLinear)


def _allocate(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every meta parameter by an uninitialised one on `device`, keeping tied parameters tied;
    quantised layers keep their storage dtypes."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        keep = _keeps_dtype(module)
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                t = torch.empty(p.shape, device=device, dtype=p.dtype if keep else dtype)
                memory.advise_huge_pages(t)  # before the first write: fresh pages fault in 2 MiB at a time
                new[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[key] = new[id(p)]
    for name, b in model.named_buffers():
        if b is not None and b.is_meta:
            raise RuntimeError(f"buffer {name} has no value after loading; the loader only fills parameters")


class _Placer:
    """Copies staged chunks of checkpoint bytes into their parameter slices, converting the dtype, or hands
    them to the copy's `quant_load.Sink` (quantising a weight as it arrives, spreading a per-tensor scale).

    On CUDA the chunks come from pinned buffers and are copied with
    `non_blocking=True` on a side stream, so the upload of one chunk overlaps the disk read of the next and
    the calling thread never waits for the GPU; a dtype change (or a quantisation) happens on the GPU, after
    the raw upload. The event returned for each chunk tells the reader when its staging buffer may be
    refilled. `finish()` waits for the last copy, orders the caller's stream after the side stream and
    lets every sink check what it received.
    """

    def __init__(self, device: torch.device, targets: list[torch.Tensor], dtypes: list[torch.dtype],
                 sinks: list[quant_load.Sink | None]) -> None:
        self.targets, self.dtypes = targets, dtypes  # flat parameter slices, and the dtype each chunk arrives in
        self.sinks = sinks
        self.device = device
        self.stream = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            # Parameters may reuse memory that kernels on the caller's stream still read.
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def __call__(self, i: int, start: int, data: torch.Tensor) -> torch.cuda.Event | None:
        src = data.view(self.dtypes[i])
        first = start // src.element_size()
        sink = self.sinks[i]
        if self.stream is None:
            if sink is None:
                self.targets[i][first:first + src.numel()].copy_(src)
            else:
                sink(first, src)
            return None
        with torch.cuda.stream(self.stream):
            if sink is None:
                dst = self.targets[i][first:first + src.numel()]
                dst.copy_(src if src.dtype == dst.dtype else src.to(dst.device, non_blocking=True), non_blocking=True)
            else:
                sink(first, src.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        for sink in self.sinks:
            if sink is not None:
                sink.finish()


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="loading", unit="B", unit_scale=True, unit_divisor=1000,
                disable=not sys.stderr.isatty())


def _check_memory(model_dir: Path, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """InsufficientMemoryError when the weights, on `device` in `dtype` (quantised layers in their storage
    dtypes), do not fit in what is free there."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied parameters once
    kept = {f"{prefix}.{key}": p.numel() * p.element_size() for prefix, m in model.named_modules() if _keeps_dtype(m)
            for key, p in m.named_parameters(recurse=False)}

    def size(name: str, shape: tuple[int, ...]) -> int | None:
        return kept.get(name)

    weights = memory.weight_bytes(shapes, dtype, size)
    smaller = {"bfloat16": memory.weight_bytes(shapes, torch.bfloat16, size)} if dtype.itemsize > 2 else {}
    memory.check_fits(f"checkpoint {model_dir}", device, dtype, weights, smaller=smaller)


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
    defaults to the config's torch_dtype. `quantize` ("fp8", "int8", "int4"; default None) quantises the linear
    layers as they load; a checkpoint quantised elsewhere loads quantised as stored. Bad `quantize` values, a
    card that cannot run the mode and unsupported quantised checkpoints are refused before anything else.
    Raises ValueError for a checkpoint that does not match its config (or a corrupt or truncated shard,
    naming the file), FileNotFoundError for missing files, InsufficientMemoryError (a MemoryError) when
    the weights do not fit in the memory free on `device`; all before any parameter is allocated.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    quantize = quant.check_mode(quantize)
    model_dir = Path(model_dir)
    config = SolarConfig.from_pretrained(model_dir)
    stored = quant_load.read_quantization(read_config_json(model_dir))
    mode = quant_load.resolve_mode(quantize, stored, model_dir)
    quant.check_device(mode, device)
    dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)
    shards, headers = checkpoint_headers(model_dir)
    headers = quant_load.int4_keys(headers, stored)
    stored_layers, scale_keys = quant_load.quantized_layers(headers, stored)
    if stored is not None:  # activation scales belong to activation quantisation, which is not replayed
        headers = {k: h for k, h in headers.items() if not hf_keys.is_activation_scale(k)}

    with torch.device("meta"), _SkipInitOnMeta():
        model = cls(config)
    if mode is not None:
        int4 = stored is not None and stored.mode == "int4"
        quant.quantize(model, mode, only=stored_layers if stored is not None else None,
                       group_size=stored.group_size if int4 else quant.GROUP_SIZE, act_order=int4 and stored.act_order)
    plan = _plan(model, config, headers, scale_keys, stored)
    _check_memory(model_dir, model, device, dtype)
    _allocate(model, device, dtype)

    params = dict(model.named_parameters())
    targets = [(params[c.name] if c.rows is None else params[c.name][c.rows]).view(-1) for c in plan]
    sources = [c.header.torch_dtype for c in plan]
    sinks = [quant_load.placement(params, c.name, c.rows, c.header.key, c.header.shape, c.header.torch_dtype, stored)
             for c in plan]
    direct = device.type == "cpu"

    def into(i: int) -> torch.Tensor | None:  # a CPU parameter already in the checkpoint's dtype: read into it
        plain = direct and sinks[i] is None and sources[i] == targets[i].dtype
        return targets[i].view(torch.uint8) if plain else None

    total = sum(c.header.nbytes for c in plan)
    placer = _Placer(device, targets, sources, sinks)
    with torch.no_grad(), _progress_bar(total) as bar:
        read_tensors([c.header for c in plan], placer, into=into, pin_memory=device.type == "cuda",
                     progress=bar.update)
        placer.finish()
        for m in model.modules():  # act-order int4: the packed inputs into the order the checkpoint's g_idx gives
            if isinstance(m, quant.QuantLinear) and hasattr(m, "weight_perm"):
                m.permute_inputs_()
    model.eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - t0
    logger.info(
        "loaded %s (%d layers, %.2fB parameters, %.2f GB read from %d shard(s)) onto %s as %s%s in %.1f s "
        "(%.2f GB/s)", model_dir, config.num_hidden_layers, config.num_parameters() / 1e9, total / 1e9, len(shards),
        device, dtype, f" with {mode} weights ({quant.parameter_bytes(model) / 1e9:.2f} GB)" if mode else "",
        seconds, total / 1e9 / seconds,
    )
    return model
