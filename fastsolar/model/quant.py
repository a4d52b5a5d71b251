"""Weight-only quantisation: int8 or FP8 (e4m3) linear weights with one fp32 scale per output channel, or int4
weights with a scale and zero point per group of 128 inputs.

Per-output-channel absmax ("per channel", as llm-compressor's FP8_DYNAMIC and torchao's weight-only
configs do it): row n of a weight W [N, K] gets

    scale[n] = max_k |W[n, k]| / QMAX       (QMAX = 127 for int8, 448 for float8_e4m3fn, its largest finite)
    q[n, k]  = round(W[n, k] / scale[n])    int8: to the nearest integer in [-127, 127] (symmetric, no -128)
                                            fp8:  to the nearest e4m3 value (3 mantissa bits)
    W ~ scale[:, None] * q

An all-zero row gets scale 1 and q = 0 (exactly zero back). A row's largest value maps to +-QMAX exactly,
so nothing clips; int8's rounding error is at most scale/2 everywhere, fp8's about 2**-4 relative.

int4 ("int4"): group-wise asymmetric round-to-nearest (the RTN baseline GPTQ and AWQ start from), per group of
GROUP_SIZE = 128 consecutive inputs of a row (the last group of a row may be shorter):

    lo = min(0, min w), hi = max(0, max w)       (0 inside the range: a weight of 0 comes back exactly 0)
    scale = fp16((hi - lo) / 15)                 (at least 2**-24, fp16's least subnormal: never 0)
    zero  = round(-lo / scale) in 0..15          q = round(w / scale) + zero, clamped to 0..15
    W ~ (q - zero) * scale                       error <= scale / 2, plus fp16's rounding of the scale
                                                 (15 * 2**-11 * scale) at the clamped ends

stored in the packed layout of kernels/_int4.py (int32 [N, K / 8] along K, fp16 scales and uint8 zeros [N, G]),
the layout GPTQ and AWQ checkpoints are converted to: 0.27x the bytes of bf16 with the scales and zeros.

The model's representation: `QuantLinear`, a drop-in for the bias-free `nn.Linear` layers (qkv, o, gate_up,
down, lm_head) holding `weight` (int8 or float8_e4m3fn, [out, in]) and `weight_scale` (fp32, [out]) as
frozen parameters (int4: `weight` int32 [out, in / 8] packed, `weight_scale` fp16 [out, G] and `weight_zeros`
uint8 [out, G], plus its `group_size`); its forward is `ops.linear(x, weight, **kernel_args())`, the seam that picks the Triton
kernel or the torch reference. Embeddings and norms stay in the model's dtype. A tied lm_head stays the
embedding table (quantising it would need a second copy of the table).

`quantize(model, mode)` converts a loaded model in place; `quantized_copy(model, mode)` makes a second
model that shares everything but the quantised linears with the first (the benchmark's engines);
`fastsolar.checkpoint.loader` quantises each weight as it streams from the checkpoint (see `Solar.from_pretrained`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fastsolar import ops
from fastsolar.kernels import dequantize, dequantize_int4  # the references' dequantisations
from fastsolar.kernels import pack_int4, unpack_int4

logger = logging.getLogger(__name__)

MODES = ("fp8", "int8", "int4")
STORAGE_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.int32}  # int4: 8 per int32
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 15.0}
MODE_OF_DTYPE = {dtype: mode for mode, dtype in STORAGE_DTYPE.items()}
# Oldest GPU generation each mode runs on: e4m3 conversions need Ada/Hopper (sm_89+); int8 and int4 run on Ampere.
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0), "int4": (8, 0)}
GROUP_SIZE = 128  # int4's inputs per scale and zero point
INT4_SCALE_DTYPE = torch.float16  # as GPTQ and AWQ store them
_MIN_INT4_SCALE = 2.0**-24  # fp16's least subnormal

# Rows quantised per pass when converting a weight: bounds the fp32 temporaries to ~64 MiB per chunk
# (a 32000 x 4096 lm_head would otherwise need 0.5 GiB of them next to the model).
_CHUNK_ELEMENTS = 1 << 24


def check_mode(quantize: str | None) -> str | None:
    """The normalised mode ("fp8", "int8") or None; ValueError for anything else (checked before any load)."""
    if quantize is None:
        return None
    mode = str(quantize).lower() if isinstance(quantize, str) else None
    if mode not in MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; use one of {', '.join(map(repr, MODES))} or None")
    return mode


def _cuda_device_capability(device: torch.device) -> tuple[tuple[int, int], str]:
    """(compute capability, card name) of a CUDA device (tests replace this to fake a card)."""
    return torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)


def check_device(mode: str | None, device: torch.device) -> None:
    """Refuse a mode the card cannot run, naming the card. CPU is allowed: the torch reference (or the
    Triton interpreter) runs there."""
    if mode is None or device.type != "cuda":
        return
    capability, name = _cuda_device_capability(device)
    need = MIN_CAPABILITY[mode]
    if tuple(capability) < need:
        int8_ok = mode == "fp8" and tuple(capability) >= MIN_CAPABILITY["int8"]
        hint = " (quantize='int8' runs on sm_80+)" if int8_ok else ""
        raise ValueError(
            f"quantize={mode!r} needs a GPU of compute capability {need[0]}.{need[1]} or newer; {name} on {device} "
            f"is sm_{capability[0]}{capability[1]}{hint}"
        )


def int4_groups(k: int, group_size: int = GROUP_SIZE) -> int:
    """int4 groups per row of K inputs."""
    return -(-k // group_size)


def _quantize_rows_int4(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
                        zeros_out: torch.Tensor) -> torch.Tensor:
    """One chunk of rows, fp32 on the output device, quantised by int4 RTN (module docstring); whether finite."""
    n, k = w.shape
    groups = int4_groups(k)
    padded = torch.nn.functional.pad(w, (0, groups * GROUP_SIZE - k)).view(n, groups, GROUP_SIZE)  # pads with 0:
    lo = padded.amin(dim=2).clamp_(max=0.0)  # harmless, 0 is in every group's range anyway
    hi = padded.amax(dim=2).clamp_(min=0.0)
    finite = torch.isfinite(lo).all() & torch.isfinite(hi).all()
    scale = ((hi - lo) / QMAX["int4"]).clamp_(min=_MIN_INT4_SCALE).to(INT4_SCALE_DTYPE)
    finite &= torch.isfinite(scale).all()  # a range past fp16's 65504 * 15 overflows
    s = scale.float()
    zero = (-lo / s).round_().clamp_(0, QMAX["int4"])
    q = (padded / s[:, :, None]).round_().add_(zero[:, :, None]).clamp_(0, QMAX["int4"])
    q_out.copy_(pack_int4(q.view(n, -1)[:, :k].to(torch.uint8), check_range=False))
    scale_out.copy_(scale)
    zeros_out.copy_(zero.to(torch.uint8))
    return finite


def quantize_rows(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
                  zeros_out: torch.Tensor | None = None, row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantise `weight` [N, K] (any float dtype, any device) per output row into `q_out` [N, K] (int8 or
    float8_e4m3fn; the mode follows its dtype) and `scale_out` [N] (fp32), a chunk of rows at a time, on
    q_out's device; int4 (q_out int32 [N, K / 8]) into scale_out [N, G] (fp16) and zeros_out [N, G] (uint8).
    8-bit `row_absmax` [N]: each row's absmax when `weight` holds only some of its columns (a tensor-parallel
    rank's slice, fastsolar.parallel), so the slice gets the whole row's scale.
    Views (a row slice of a fused parameter) are written in place. No host sync: returns a 0-d bool tensor on
    q_out's device, whether every value was finite (rows that were not are garbage)."""
    mode = MODE_OF_DTYPE[q_out.dtype]
    qmax = QMAX[mode]
    n, k = weight.shape
    finite = torch.ones((), dtype=torch.bool, device=q_out.device)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        w = weight[start:start + step].to(device=q_out.device, dtype=torch.float32)
        if mode == "int4":
            end = start + w.shape[0]
            finite &= _quantize_rows_int4(w, q_out[start:end], scale_out[start:end], zeros_out[start:end])
            continue
        absmax = w.abs().amax(dim=1) if k else torch.zeros(w.shape[0], device=w.device)
        if row_absmax is not None:
            absmax = torch.maximum(absmax, row_absmax[start:start + step].to(absmax.device, torch.float32))
        finite &= torch.isfinite(absmax).all()  # amax propagates NaN
        scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        scaled = w / scale[:, None]
        if mode == "int8":
            q = scaled.round_().clamp_(-qmax, qmax)
        else:  # the clamp only guards the rounding of absmax / scale; conversion rounds to nearest even
            q = scaled.clamp_(-qmax, qmax)
        q_out[start:start + step].copy_(q)
        scale_out[start:start + step].copy_(scale)
    return finite


def quantize_into(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor,
                  zeros_out: torch.Tensor | None = None, row_absmax: torch.Tensor | None = None) -> None:
    """`quantize_rows`, then ValueError for non-finite weights (a host sync: converting, not the hot path)."""
    if not bool(quantize_rows(weight, q_out, scale_out, zeros_out, row_absmax)):
        bad = int((~torch.isfinite(weight).all(dim=1)).nonzero()[0])
        raise ValueError(f"cannot quantise a weight with non-finite values (row {bad} of {weight.shape[0]})")


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] in the mode's storage dtype, scale [N] fp32) for `weight` [N, K], on weight's device."""
    mode = check_mode(mode)
    if mode is None or mode == "int4" or weight.dim() != 2:
        raise ValueError(f"quantize_weight needs mode 'fp8' or 'int8' (int4: quantize_weight_int4) and a 2-D weight, "
                         f"got {mode!r} and shape {tuple(weight.shape)}")
    q = torch.empty(weight.shape, dtype=STORAGE_DTYPE[mode], device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    quantize_into(weight, q, scale)
    return q, scale


def quantize_weight_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [N, K / 8] packed, scale fp16 [N, G], zeros uint8 [N, G]) for `weight` [N, K] by int4 RTN with
    groups of GROUP_SIZE (module docstring), on weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight_int4 needs a 2-D weight, got shape {tuple(weight.shape)}")
    layer = QuantLinear(weight.shape[1], weight.shape[0], "int4", device=weight.device)
    quantize_into(weight, layer.weight.data, layer.weight_scale.data, layer.weight_zeros.data)
    return layer.weight.data, layer.weight_scale.data, layer.weight_zeros.data


class QuantLinear(nn.Module):
    """y = x @ W.T: a bias-free linear layer with quantised weights, W = weight_scale[:, None] * weight (8-bit)
    or the dequantised packed int4 weight (kernels/_int4.py).

    8-bit: `weight` [out_features, in_features] is int8 or float8_e4m3fn, `weight_scale` [out_features] fp32.
    int4: `weight` int32 [out_features, in_features / 8] packed along the inputs, `weight_scale` fp16 and
    `weight_zeros` uint8 [out_features, G] per group of `group_size` inputs. All are frozen parameters (so
    parameter counts, byte counts and `.to(device)` see them). `.to(dtype)` / `.half()` on a model leave them
    in their storage dtypes and change only the rest of the model.
    """

    def __init__(self, in_features: int, out_features: int, mode: str, *, device: torch.device | str | None = None,
                 group_size: int = GROUP_SIZE, act_order: bool = False):
        """group_size: int4's inputs per group (a checkpoint's; -1: one group per row). act_order: int4 inputs
        in GPTQ's act-order, `weight_perm` [in_features]: input k of the packed weight is x's input perm[k]."""
        super().__init__()
        mode = check_mode(mode)
        self.in_features, self.out_features = in_features, out_features
        self.group_size: int | None = None

        def frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        if mode == "int4":
            if in_features % 8:
                raise ValueError(f"int4 packs 8 inputs per int32: in_features must be a multiple of 8, got {in_features}")
            self.group_size = in_features if group_size == -1 else group_size
            groups = int4_groups(in_features, self.group_size)
            self.weight = frozen(out_features, in_features // 8, dtype=STORAGE_DTYPE[mode])
            self.weight_scale = frozen(out_features, groups, dtype=INT4_SCALE_DTYPE)
            self.weight_zeros = frozen(out_features, groups, dtype=torch.uint8)
            if act_order:
                self.weight_perm = frozen(in_features, dtype=torch.int64)
        elif act_order:
            raise ValueError("act_order is a property of int4 weights")
        else:
            self.weight = frozen(out_features, in_features, dtype=STORAGE_DTYPE[mode])
            self.weight_scale = frozen(out_features, dtype=torch.float32)

    @property
    def mode(self) -> str:
        return MODE_OF_DTYPE[self.weight.dtype]

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = GROUP_SIZE,
                    act_order: bool = False, row_absmax: torch.Tensor | None = None) -> "QuantLinear":
        """Quantise an existing bias-free nn.Linear (on its device; a meta one gives an empty meta layer, of
        `group_size` and `act_order` for int4: what a loader fills from a GPTQ / AWQ checkpoint); `row_absmax`:
        quantize_rows'."""
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias; the model's linear layers are bias-free")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, mode, device=w.device, group_size=group_size,
                    act_order=act_order)
        if not w.is_meta:
            if layer.group_size not in (None, GROUP_SIZE) or act_order:
                raise ValueError(f"int4 round-to-nearest uses groups of {GROUP_SIZE} in input order, not "
                                 f"group_size={group_size}, act_order={act_order}")
            with torch.no_grad():
                zeros = layer.weight_zeros.data if layer.group_size is not None else None
                quantize_into(w.detach(), layer.weight.data, layer.weight_scale.data, zeros, row_absmax)
        return layer

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every float tensor, FP8 included, and would round the fp32 scales too: a
        # quantised layer only moves. (fn(t) is computed to learn the target device, then dropped.)
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(move_only, recurse)

    def kernel_args(self) -> dict:
        """What the ops take beside the weight: scale=, and for int4 zeros= and group_size=."""
        if self.group_size is None:
            return {"scale": self.weight_scale}
        args = {"scale": self.weight_scale, "zeros": self.weight_zeros, "group_size": self.group_size}
        perm = getattr(self, "weight_perm", None)
        return args if perm is None else {**args, "perm": perm}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W of y = x @ W.T in `dtype` (columns in x's order, also for act-order int4)."""
        if self.group_size is None:
            return dequantize(self.weight, self.weight_scale, dtype)
        w = dequantize_int4(self.weight, self.weight_scale, self.weight_zeros, self.group_size, dtype)
        perm = getattr(self, "weight_perm", None)
        return w if perm is None else torch.empty_like(w).index_copy_(1, perm, w)

    def permute_inputs_(self) -> None:
        """Reorder the packed weight's inputs by `weight_perm` (in place): a loader writes an act-order checkpoint's
        weight in its stored input order, then calls this once the permutation is in."""
        q = unpack_int4(self.weight).index_select(1, self.weight_perm)
        self.weight.data.copy_(pack_int4(q, check_range=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, **self.kernel_args())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers quantisation converts: every bias-free nn.Linear except an lm_head tied
    to the embedding table (embeddings stay as they are)."""
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.bias is None and m.weight is not embed]


def quantize(model: nn.Module, mode: str, *, only: Iterable[str] | None = None,
             group_size: int = GROUP_SIZE, act_order: bool = False,
             row_absmax: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None) -> nn.Module:
    """Replace the model's linear layers (all of `quantizable_linears`, or the names in `only`) by QuantLinear
    layers of `mode`, in place, quantising their weights one by one (a meta model gets empty meta layers,
    which is how the loader prepares a model it then fills). `row_absmax(name, weight)`: the whole rows' absmax
    for a layer holding a slice of their columns, else None (quantize_rows). Returns the model."""
    mode = check_mode(mode)
    if mode is None:
        raise ValueError("quantize(model, mode) needs mode 'fp8', 'int8' or 'int4'")
    names = quantizable_linears(model)
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ValueError(f"cannot quantise {unknown}: not quantisable linear layers of this model")
        names = [n for n in names if n in wanted]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        absmax = None if row_absmax is None else row_absmax(name, linear.weight)
        setattr(parent, attr, QuantLinear.from_linear(linear, mode, group_size, act_order, absmax))
    if names:
        logger.debug("quantised %d linear layers to %s", len(names), mode)
    return model


def quantized_copy(model: nn.Module, mode: str) -> nn.Module:
    """A second model of the same class and config whose quantisable linears are quantised from `model`'s
    and whose other parameters (embeddings, norms, a tied lm_head) are `model`'s own tensors: one extra
    quantised copy of the linear weights, nothing else. `model` is left unchanged."""
    with torch.device("meta"):
        twin = type(model)(model.config)
    names = set(quantizable_linears(model))
    for name, src in model.named_modules():
        if name in names:
            parent_name, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, QuantLinear.from_linear(src, mode))
        elif not any(name.startswith(n + ".") for n in names):
            dst = twin.get_submodule(name) if name else twin
            for key, p in src._parameters.items():
                dst._parameters[key] = p  # the same tensor: shared, and a tied lm_head stays tied
    return twin.eval().requires_grad_(False)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (tied ones counted once), in their storage dtypes; works on meta models."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


__all__ = ["GROUP_SIZE", "MODES", "QuantLinear", "check_device", "check_mode", "dequantize", "dequantize_int4",
           "parameter_bytes", "quantize", "quantize_into", "quantize_rows", "quantize_weight", "quantize_weight_int4",
           "quantized_copy", "quantizable_linears"]
