"""How quantised weights enter a model at load time (used by fastsolar.checkpoint.loader).

Two ways in:

- `quantize="fp8" | "int8" | "int4"` on an ordinary bf16/fp16/fp32 checkpoint: every quantisable linear becomes a
  `QuantLinear` before anything is allocated, and each checkpoint tensor is quantised on the target device
  as its bytes stream in (`QuantizingCopy`, which the loader hands each chunk the shard reader delivers):
  every complete row is quantised as soon as it is in, a row cut by a chunk boundary waits for the rest.
  Fused q/k/v and gate/up are quantised part by part: the scales (and int4's zeros) are per output row, so
  a part's rows do not depend on the other parts. An int4 layer's packed weight is [rows, K / 8] int32, so
  the loader checks the checkpoint's [rows, K] against `logical_shape`. Peak device memory is the quantised model plus a chunk in flight and its
  fp32 temporaries; host memory is the reader's staging buffers.
- a checkpoint quantised elsewhere in the layout llm-compressor writes and vLLM reads (`read_quantization`):
  config.json's `quantization_config` with quant_method "compressed-tensors", format "float-quantized" or
  "naive-quantized", 8-bit float weights (strategy "channel" or "tensor", symmetric, static), activations
  unquantised or dynamic. Each such layer stores `weight` in float8_e4m3fn and `weight_scale`, [rows, 1] per
  channel or [] / [1] per tensor; both are copied as stored, a per-tensor scale repeated over its rows
  (exact, and it lets a fused layer's parts keep different per-tensor scales). Layers the config's `ignore`
  list leaves unquantised (usually lm_head) are stored in bf16 and stay so: which layers are quantised is
  read from the stored dtypes, and `quantized_layers` checks that every one has its scale (`placement`
  spreads a per-tensor scale over its rows). Dynamic
  activation quantisation is not replayed: activations stay in the model's dtype (weight-only, which is
  at least as accurate), and activation scales (`input_scale`) are skipped.

- a 4-bit GPTQ or AWQ checkpoint (quant_method "gptq": AutoGPTQ's / GPTQModel's packing, v1 or v2 zeros,
  act-order or not; "awq": AutoAWQ's GEMM packing), read as stored: the config's `group_size` (-1: one group per row)
  builds int4 `QuantLinear` layers, each layer's `qweight` / `scales` / `qzeros` go to its `weight` /
  `weight_scale` / `weight_zeros` (renamed by `int4_keys`, so the key map and the plan treat them as one more
  quantised layout) and are converted to fastsolar's layout (fastsolar.checkpoint.int4_formats) by a
  `StoredInt4` sink once each tensor has arrived: a transpose for GPTQ's qweight and every scale, nibbles
  re-ordered for AWQ's qweight and every qzeros. A tensor's own bytes are held once on the device meanwhile;
  nothing is widened. GPTQ's `g_idx` is not read without act-order (desc_act false: it is k // group_size);
  with act-order it becomes the layer's `weight_perm` (`ActOrder`: the inputs sorted by group, stably, so
  each group is contiguous; the parts of a fused layer must agree), and once everything is in, each such
  layer's packed weight is reordered to it (`QuantLinear.permute_inputs_`); the ops gather x to match.

Anything else in `quantization_config` (bitsandbytes, EXL2, GGUF, GPTQ of other bit widths, AWQ's
other packings, int4 or int8 compressed-tensors, static activation scales, block or group scales, a quantised
KV cache, ...) is refused by name before any tensor is read, and so are quantised tensors in a checkpoint
that declares no quantisation: nothing quantised is ever loaded as if it were bf16.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fastsolar.checkpoint import hf_keys, int4_formats
from fastsolar.model.quant import INT4_SCALE_DTYPE, MODE_OF_DTYPE, STORAGE_DTYPE, quantize_rows

_PACKED = STORAGE_DTYPE["int4"]  # int4 weights hold 8 inputs per element

logger = logging.getLogger(__name__)

# The quantization_config this module reads: compressed-tensors, 8-bit float weights stored as float8_e4m3fn.
QUANT_METHOD = "compressed-tensors"
FORMATS = ("float-quantized", "naive-quantized")
WEIGHT_STRATEGIES = ("channel", "tensor")
STORED_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_SCALE_DTYPES = ("F32", "F16", "BF16")
_8BIT_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "U8")  # what a quantised weight is stored as


INT4_METHODS = ("gptq", "awq")
INT4_SUFFIXES = {"qweight": "weight", "scales": "weight_scale", "qzeros": "weight_zeros"}  # stored -> ours
# quant_method values (and bitsandbytes' flags) of formats fastsolar does not read, named in the refusal.
NAMED_FORMATS = {
    "bitsandbytes": "bitsandbytes (nf4 / fp4 / LLM.int8)", "exl2": "EXL2 (exllamav2)", "gguf": "GGUF",
    "hqq": "HQQ", "aqlm": "AQLM", "eetq": "EETQ", "quanto": "quanto", "torchao": "torchao",
}


@dataclass(frozen=True)
class StoredQuantization:
    """What a supported `quantization_config` declares."""

    mode: str  # "fp8" (compressed-tensors) or "int4" (GPTQ, AWQ)
    strategies: tuple[str, ...]  # weight scale strategies used by its groups ("channel", "tensor")
    dynamic_activations: bool  # the checkpoint asks for dynamic activation quantisation (not replayed)
    ignore: tuple[str, ...]  # layers its author left unquantised (informational: stored dtypes decide)
    method: str = "compressed-tensors"  # or "gptq", "awq"
    group_size: int | None = None  # int4: inputs per group, -1 for one group per row
    zero_offset: int = 0  # int4: added to every stored zero point (GPTQ's v1 format stores zero - 1)
    symmetric: bool | None = None  # int4: what the config says (the stored zeros are used either way)
    act_order: bool = False  # GPTQ's desc_act: g_idx orders the inputs

    def describe(self) -> str:
        if self.mode == "int4":
            groups = "one group per row" if self.group_size == -1 else f"groups of {self.group_size}"
            zeros = {True: ", symmetric", False: ", asymmetric", None: ""}[self.symmetric]
            order = ", act-order" if self.act_order else ""
            return f"{self.method.upper()} 4-bit weights, {groups}{zeros}{order}"
        acts = ", dynamic activations (run unquantised)" if self.dynamic_activations else ""
        return f"compressed-tensors FP8 weights, per {'/'.join(self.strategies)} scales{acts}"


def _refuse(what: str) -> ValueError:
    return ValueError(
        f"config.json: {what}. fastsolar loads pre-quantised checkpoints only as compressed-tensors FP8 "
        "(llm-compressor's FP8 / FP8_DYNAMIC: format 'float-quantized' or 'naive-quantized', 8-bit float weights, "
        "per-channel or per-tensor scales, no static activation scales), 4-bit GPTQ, or 4-bit "
        "AWQ in its GEMM packing; for anything else, load the original "
        "bf16 checkpoint with quantize='fp8' or quantize='int8' (half the bytes), or quantize='int4' (a quarter)"
    )


def _check_weight_args(group: str, w: Any) -> str:
    if not isinstance(w, dict):
        raise _refuse(f"quantization_config group {group!r} quantises no weights ({w!r})")
    num_bits, kind = w.get("num_bits"), w.get("type")
    if num_bits != 8 or kind != "float":
        raise _refuse(f"quantization_config group {group!r} has {num_bits}-bit {kind} weights "
                      "(only 8-bit float is supported)")
    strategy = w.get("strategy")
    if strategy not in WEIGHT_STRATEGIES:
        raise _refuse(f"quantization_config group {group!r} has weight strategy {strategy!r} "
                      f"(supported: {', '.join(WEIGHT_STRATEGIES)})")
    for key, allowed in (("symmetric", (True, None)), ("dynamic", (False, None)), ("group_size", (None,)),
                         ("block_structure", (None,)), ("actorder", (None, False))):
        if w.get(key) not in allowed:
            raise _refuse(f"quantization_config group {group!r} has weights {key}={w.get(key)!r}")
    return strategy


def read_quantization(raw_config: dict[str, Any]) -> StoredQuantization | None:
    """The supported quantisation a Hugging Face config dict declares, None when it declares none;
    ValueError naming the unsupported part otherwise."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _refuse(f"quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if isinstance(method, str) and method.lower() in INT4_METHODS:
        return _read_int4(method.lower(), qc)
    if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        method = "bitsandbytes"
    if isinstance(method, str) and method.lower() in NAMED_FORMATS:
        raise _refuse(f"quantization_config is {NAMED_FORMATS[method.lower()]} (quant_method {method!r}), which "
                      "fastsolar does not read")
    if method != QUANT_METHOD:
        raise _refuse(f"quantization_config has quant_method {method!r}")
    fmt = qc.get("format")
    if fmt not in FORMATS:
        raise _refuse(f"quantization_config has format {fmt!r} (supported: {', '.join(FORMATS)})")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(f"quantization_config has quantization_status {status!r}: weights are not stored quantised")
    if qc.get("kv_cache_scheme"):
        raise _refuse(f"quantization_config quantises the KV cache ({qc['kv_cache_scheme']!r})")
    sparsity = qc.get("sparsity_config")
    if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense"):
        raise _refuse(f"quantization_config has a sparsity_config ({sparsity!r})")
    if qc.get("transform_config"):
        raise _refuse("quantization_config has a transform_config (rotations such as QuIP/SpinQuant)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(f"quantization_config has no config_groups ({groups!r})")
    strategies, dynamic = set(), False
    for name, g in groups.items():
        if not isinstance(g, dict):
            raise _refuse(f"quantization_config group {name!r} is not an object")
        if g.get("format") not in (None, *FORMATS):
            raise _refuse(f"quantization_config group {name!r} has format {g.get('format')!r}")
        strategies.add(_check_weight_args(name, g.get("weights")))
        acts = g.get("input_activations")
        if acts:
            if acts.get("dynamic") is not True:
                raise _refuse(f"quantization_config group {name!r} quantises input activations statically "
                              f"(dynamic={acts.get('dynamic')!r}, strategy {acts.get('strategy')!r}); fastsolar "
                              "quantises weights only")
            dynamic = True
        if g.get("output_activations"):
            raise _refuse(f"quantization_config group {name!r} quantises output activations")
    ignore = qc.get("ignore") or []
    return StoredQuantization("fp8", tuple(sorted(strategies)), dynamic, tuple(ignore))


def _read_int4(method: str, qc: dict[str, Any]) -> StoredQuantization:
    """A GPTQ / AWQ quantization_config, checked (module docstring)."""
    name = method.upper()
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise _refuse(f"quantization_config is {name} with {bits}-bit weights (fastsolar reads 4-bit)")
    group = qc.get("group_size", qc.get("q_group_size"))
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or (group > 0 and group % 16 == 0)):
        raise _refuse(f"quantization_config is {name} with group_size {group!r} (fastsolar reads -1 or a "
                      "multiple of 16)")
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(f"quantization_config is GPTQ in checkpoint_format {fmt!r} (fastsolar reads 'gptq', "
                          "'gptq_v2')")
        offset, sym = (1 if fmt == "gptq" else 0), qc.get("sym")
    else:
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(f"quantization_config is AWQ version {version!r} (fastsolar reads AutoAWQ's 'gemm' packing)")
        if qc.get("zero_point", True) is not True:
            raise _refuse("quantization_config is AWQ without zero points (zero_point=false)")
        offset, sym = 0, False
    ignore = tuple(qc.get("modules_to_not_convert") or ())
    return StoredQuantization("int4", (), False, ignore, method=method, group_size=group, zero_offset=offset,
                              symmetric=sym, act_order=method == "gptq" and bool(qc.get("desc_act")))


def int4_keys(headers: dict[str, Any], stored: StoredQuantization | None) -> dict[str, Any]:
    """A GPTQ / AWQ checkpoint's headers under fastsolar's names: `<layer>.qweight` / `.scales` / `.qzeros` as
    `<layer>.weight` / `.weight_scale` / `.weight_zeros` (the tensors keep their own keys for messages), GPTQ's
    `.g_idx` dropped (k // group_size without act-order). Other checkpoints' headers come back unchanged."""
    if stored is None or stored.mode != "int4":
        return headers
    out: dict[str, Any] = {}
    for key, h in headers.items():
        base, _, suffix = key.rpartition(".")
        known = hf_keys.map_key(base + ".weight") is not None
        if known and suffix == "g_idx" and stored.method == "gptq":
            if not stored.act_order:
                continue
            key = f"{base}.weight_perm"
        if known and suffix in INT4_SUFFIXES:
            key = f"{base}.{INT4_SUFFIXES[suffix]}"
        out[key] = h
    return out


def stored_key(key: str, stored: StoredQuantization | None) -> str:
    """The checkpoint's own name of a key `int4_keys` renamed (for messages)."""
    if stored is None or stored.mode != "int4":
        return key
    base, _, suffix = key.rpartition(".")
    back = {ours: theirs for theirs, ours in INT4_SUFFIXES.items()} | {"weight_perm": "g_idx"}
    return f"{base}.{back[suffix]}" if suffix in back else key


def _int4_layers(headers: dict[str, Any], stored: StoredQuantization) -> tuple[set[str], list[str]]:
    """The layers a GPTQ / AWQ checkpoint stores in int4 (headers under `int4_keys` names) and the keys they need."""
    layers: dict[str, dict[str, str]] = {}  # our layer -> {key: stored dtype}
    for key, h in headers.items():
        mapped = hf_keys.map_key(key)
        if mapped is not None and mapped[1] in hf_keys.LINEAR_WEIGHTS:
            layers.setdefault(mapped[0].removesuffix(".weight"), {})[key] = h.dtype
    quantized, needed = set(), []
    for layer, parts in layers.items():
        kinds = set(parts.values())
        if "I32" not in kinds:
            continue
        if kinds != {"I32"}:
            shown = ", ".join(f"{headers[k].key} {d}" for k, d in parts.items())
            raise ValueError(f"checkpoint layer parts are stored differently ({shown}): fastsolar fuses them into one "
                             f"layer ({layer}) and needs them all {stored.method.upper()} int4 or all unquantised")
        quantized.add(layer)
        extras = ("weight_scale", "weight_zeros", "weight_perm") if stored.act_order else ("weight_scale", "weight_zeros")
        needed.extend(k.removesuffix("weight") + extra for k in parts for extra in extras)
    if not quantized:
        raise ValueError(f"config.json declares {stored.describe()} but no linear layer has a qweight")
    return quantized, needed


def resolve_mode(quantize: str | None, stored: StoredQuantization | None, model_dir: Any) -> str | None:
    """The mode the model is built in: the checkpoint's own, or `quantize` for an unquantised one."""
    if stored is None:
        return quantize
    if quantize not in (None, stored.mode):
        raise ValueError(f"{model_dir} is already quantised ({stored.describe()}); re-quantising it to "
                         f"{quantize!r} is not supported: load it with quantize=None or quantize={stored.mode!r}")
    logger.info("%s holds %s", model_dir, stored.describe())
    return stored.mode


def quantized_layers(headers: dict[str, Any], stored: StoredQuantization | None) -> tuple[set[str], list[str]]:
    """From the checkpoint's tensor headers: the names of our layers stored quantised, and the scale keys
    those layers need. Refuses quantised tensors without a supported quantization_config, quantised
    embeddings or norms, and fused layers whose parts are stored differently (before any tensor is read).
    Other dtypes that are no float at all are left to the loader, which lists them with its other checks.
    A GPTQ / AWQ checkpoint's headers come under `int4_keys` names."""
    if stored is not None and stored.mode == "int4":
        return _int4_layers(headers, stored)
    dtypes: dict[str, dict[str, str]] = {}  # our layer -> {hf weight key: stored dtype}
    for key, h in headers.items():
        mapped = hf_keys.map_key(key)
        if stored is not None and hf_keys.is_activation_scale(key):
            continue
        is_scale = key.endswith(".weight_scale")
        if is_scale and stored is None:
            raise ValueError(f"checkpoint has quantisation scales ({key}) but config.json declares no supported "
                             "quantization_config")
        if mapped is not None and mapped[1] in hf_keys.LINEAR_WEIGHTS:
            dtypes.setdefault(mapped[0].removesuffix(".weight"), {})[key] = h.dtype
        elif is_scale and h.dtype not in _SCALE_DTYPES:
            raise ValueError(f"checkpoint tensor {key} is stored as {h.dtype} (a quantised linear's scale); "
                             f"fastsolar reads {'/'.join(_SCALE_DTYPES)} there")
        elif not is_scale and h.dtype in _8BIT_DTYPES:
            raise ValueError(f"checkpoint tensor {key} is stored as {h.dtype} (not a quantisable linear weight); "
                             f"fastsolar reads {'/'.join(_FLOAT_DTYPES)} there")
    quantized: set[str] = set()
    scales: list[str] = []
    for layer, parts in dtypes.items():
        kinds = set(parts.values())
        if not kinds & set(_8BIT_DTYPES):
            continue
        if stored is None:
            shown = ", ".join(f"{k} {d}" for k, d in parts.items() if d in _8BIT_DTYPES)
            raise ValueError(f"checkpoint stores quantised weights ({shown}) but config.json declares no supported "
                             "quantization_config; fastsolar will not load them as if they were unquantised")
        if kinds != {STORED_DTYPE}:
            shown = ", ".join(f"{k} {d}" for k, d in parts.items())
            raise ValueError(f"checkpoint layer parts are stored differently ({shown}): fastsolar fuses them into "
                             f"one layer ({layer}) and needs them all {STORED_DTYPE} or all unquantised")
        quantized.add(layer)
        scales.extend(hf_keys.scale_key(k) for k in parts)
    if stored is not None and not quantized:
        raise ValueError(f"config.json declares {stored.describe()} but no linear weight is stored as {STORED_DTYPE}")
    return quantized, scales


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The [rows, K] a checkpoint stores for `param`: its shape, or [rows, 8 * words] for packed int4."""
    if param.dtype == _PACKED:
        return (param.shape[0], param.shape[1] * 8)
    return tuple(param.shape)


def int4_stored_ok(params: dict[str, torch.nn.Parameter], name: str, shape: tuple[int, ...], rows: int,
                   stored: StoredQuantization | None) -> bool:
    """Whether a GPTQ / AWQ tensor of `shape` fits `rows` rows of int4 parameter `name` (stored layout)."""
    if stored is None or stored.mode != "int4":
        return False
    kind = name.rpartition(".")[2]
    weight = params.get(name.removesuffix(kind) + "weight")
    if weight is None or weight.dtype != _PACKED:
        return False
    if kind == "weight_perm":
        return tuple(shape) == (weight.shape[1] * 8,)
    if kind not in INT4_SUFFIXES.values():
        return False
    k, groups = weight.shape[1] * 8, params[name.removesuffix(kind) + "weight_scale"].shape[1]
    return tuple(shape) == int4_formats.logical_stored_shape(stored.method, kind, rows, k, groups)


def scale_shape_ok(param_name: str, shape: tuple[int, ...], rows: int) -> bool:
    """Whether a stored scale of `shape` fits `rows` rows of `param_name`: per channel [rows, 1] or [rows],
    per tensor [] or [1]."""
    return param_name.endswith(".weight_scale") and tuple(shape) in ((rows, 1), (rows,), (), (1,))


class Sink(Protocol):
    """Where the loader puts one checkpoint tensor that is not a plain copy of its elements."""

    def __call__(self, first: int, src: torch.Tensor) -> None:
        """The tensor's elements first .. first + src.numel() (1-D, stored dtype, on the parameter's device);
        chunks come in order."""

    def finish(self) -> None:
        """After the last chunk, once the device has finished: raise if what arrived cannot be used."""


class QuantizingCopy:
    """Quantises a float checkpoint tensor [rows, K] into its rows of a quantised layer as its chunks arrive.

    Chunks end anywhere: the elements of a row cut by a chunk boundary wait on the device for the rest of the
    row, every complete row is quantised at once (`quantize_rows`, per row, so the result is the same as
    quantising the whole tensor). Nothing syncs with the host until `finish`, which checks that every value
    was finite (the error names the checkpoint key).
    """

    def __init__(self, key: str, q: torch.Tensor, scale: torch.Tensor, k: int,
                 zeros: torch.Tensor | None = None) -> None:
        self.key, self.q, self.scale, self.zeros = key, q, scale, zeros
        self.k = k  # the checkpoint's row length (q's for 8-bit, 8 x q's for packed int4)
        self.row = 0  # rows quantised so far
        self.carry: torch.Tensor | None = None  # elements of the next row that arrived already
        self.finite: torch.Tensor | None = None

    def __call__(self, first: int, src: torch.Tensor) -> None:
        held = 0 if self.carry is None else self.carry.numel()
        if first != self.row * self.k + held:
            raise RuntimeError(f"{self.key}: chunk at element {first} out of order")
        if self.carry is not None:
            src = torch.cat((self.carry, src))
        rows = src.numel() // self.k
        if rows:
            end = self.row + rows
            zeros = self.zeros[self.row:end] if self.zeros is not None else None
            ok = quantize_rows(src[: rows * self.k].view(rows, self.k), self.q[self.row:end], self.scale[self.row:end],
                               zeros)
            self.finite = ok if self.finite is None else self.finite & ok
            self.row = end
        rest = src[rows * self.k:]
        self.carry = rest.clone() if rest.numel() else None  # src may be a staging buffer the reader reuses

    def finish(self) -> None:
        if self.carry is not None or self.row != self.q.shape[0]:
            raise RuntimeError(f"{self.key}: {self.row} of {self.q.shape[0]} rows arrived")
        if self.finite is not None and not bool(self.finite):
            raise ValueError(f"checkpoint tensor {self.key} has non-finite values (inf or NaN): it cannot be quantised")


class StoredInt4:
    """Collects one stored GPTQ / AWQ tensor on the device as it arrives and, once complete, writes its
    conversion to fastsolar's layout (fastsolar.checkpoint.int4_formats) into the target and frees it."""

    def __init__(self, key: str, target: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 convert: Any) -> None:
        self.key, self.target, self.shape, self.convert = key, target, shape, convert
        self.buf: torch.Tensor | None = torch.empty(math.prod(shape), dtype=dtype, device=target.device)
        self.got = 0

    def __call__(self, first: int, src: torch.Tensor) -> None:
        if self.buf is None or first != self.got:
            raise RuntimeError(f"{self.key}: chunk at element {first} out of order")
        self.buf[first:first + src.numel()].copy_(src)
        self.got += src.numel()
        if self.got == self.buf.numel():
            self.target.copy_(self.convert(self.buf.view(self.shape)))
            self.buf = None

    def finish(self) -> None:
        if self.buf is not None:
            raise RuntimeError(f"{self.key}: {self.got} of {self.buf.numel()} elements arrived")


class ActOrder:
    """A GPTQ act-order layer's g_idx [K] (group of each input) into its `weight_perm`: the inputs sorted by
    group, stably. `finish` checks that the sorted groups are each `group_size` consecutive inputs (a g_idx
    GPTQ writes), and that every part of a fused layer left the same order."""

    def __init__(self, key: str, target: torch.Tensor, group_size: int) -> None:
        self.key, self.target, self.group_size = key, target, group_size
        self.buf = torch.empty(target.shape[0], dtype=torch.int64, device=target.device)
        self.got = 0
        self.perm: torch.Tensor | None = None
        self.ok: torch.Tensor | None = None

    def __call__(self, first: int, src: torch.Tensor) -> None:
        self.buf[first:first + src.numel()].copy_(src)
        self.got += src.numel()
        if self.got == self.buf.numel():
            self.perm = torch.sort(self.buf, stable=True).indices
            k = self.buf.numel()
            want = torch.arange(k, device=self.buf.device) // self.group_size
            self.ok = (self.buf[self.perm] == want).all()
            self.target.copy_(self.perm)

    def finish(self) -> None:
        if self.perm is None:
            raise RuntimeError(f"{self.key}: {self.got} of {self.buf.numel()} elements arrived")
        if not bool(self.ok):
            raise ValueError(f"checkpoint tensor {self.key} is no GPTQ g_idx for groups of {self.group_size}: sorted, "
                             "its groups must each cover group_size consecutive inputs")
        if not torch.equal(self.perm, self.target):
            raise ValueError(f"checkpoint tensor {self.key} orders the inputs differently from the other parts of the "
                             "layer fastsolar fuses it into (q/k/v or gate/up); they must share one g_idx")


class SpreadScale:
    """A per-tensor scale ([] or [1]) written to every row of its (part of a) per-channel scale: exact."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, first: int, src: torch.Tensor) -> None:
        self.target.copy_(src.reshape(()).expand(self.target.shape))

    def finish(self) -> None:
        pass


def placement(params: dict[str, torch.nn.Parameter], name: str, rows: slice | None, key: str,
              shape: tuple[int, ...], dtype: torch.dtype, stored: StoredQuantization | None = None) -> Sink | None:
    """How checkpoint tensor `key` (`shape`, stored as `dtype`) goes into parameter `name` (its `rows` of a
    fused parameter): a Sink that quantises a float weight into a quantised layer (and writes its scales) or
    spreads a per-tensor scale over its rows; None for a plain (casting) copy of its elements."""
    param = params[name]
    target = param if rows is None else param[rows]
    if int4_stored_ok(params, name, shape, target.shape[0], stored):
        method, kind = stored.method, name.rpartition(".")[2]
        if kind == "weight_perm":
            k = target.shape[0]
            return ActOrder(key, target, k if stored.group_size == -1 else stored.group_size)
        convert = {"weight": lambda t: int4_formats.qweight(method, t),
                   "weight_scale": lambda t: int4_formats.scales(t).to(INT4_SCALE_DTYPE),
                   "weight_zeros": lambda t: int4_formats.qzeros(method, t, stored.zero_offset)}[kind]
        return StoredInt4(key, target, tuple(shape), dtype, convert)
    if param.dtype in MODE_OF_DTYPE and dtype not in MODE_OF_DTYPE:
        scale = params[name.removesuffix("weight") + "weight_scale"]
        zeros = params.get(name.removesuffix("weight") + "weight_zeros")
        if zeros is not None and rows is not None:
            zeros = zeros[rows]
        return QuantizingCopy(key, target, scale if rows is None else scale[rows], shape[-1], zeros)
    if name.endswith(".weight_scale") and math.prod(shape) == 1 and target.numel() != 1:
        return SpreadScale(target)
    return None
