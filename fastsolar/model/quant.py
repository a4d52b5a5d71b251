"""Weight-only quantisation: int8 or FP8 (e4m3) linear weights with one fp32 scale per output channel.

Per-output-channel absmax ("per channel", as llm-compressor's FP8_DYNAMIC and torchao's weight-only
configs do it): row n of a weight W [N, K] gets

    scale[n] = max_k |W[n, k]| / QMAX       (QMAX = 127 for int8, 448 for float8_e4m3fn, its largest finite)
    q[n, k]  = round(W[n, k] / scale[n])    int8: to the nearest integer in [-127, 127] (symmetric, no -128)
                                            fp8:  to the nearest e4m3 value (3 mantissa bits)
    W ~ scale[:, None] * q

An all-zero row gets scale 1 and q = 0 (exactly zero back). A row's largest value maps to +-QMAX exactly,
so nothing clips; int8's rounding error is at most scale/2 everywhere, fp8's about 2**-4 relative.

The model's representation: `QuantLinear`, a drop-in for the bias-free `nn.Linear` layers (qkv, o, gate_up,
down, lm_head) holding `weight` (int8 or float8_e4m3fn, [out, in]) and `weight_scale` (fp32, [out]) as
frozen parameters; its forward is `ops.linear(x, weight, scale=weight_scale)`, the seam that picks the Triton
kernel or the torch reference. Embeddings and norms stay in the model's dtype. A tied lm_head stays the
embedding table (quantising it would need a second copy of the table).

`quantize(model, mode)` converts a loaded model in place; `quantized_copy(model, mode)` makes a second
model that shares everything but the quantised linears with the first (the benchmark's engines);
`fastsolar.checkpoint.loader` quantises each weight as it streams from the checkpoint (see `Solar.from_pretrained`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from fastsolar import ops
from fastsolar.kernels import dequantize  # scale[:, None] * q in a dtype: the one the references use

logger = logging.getLogger(__name__)

MODES = ("fp8", "int8")
STORAGE_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}
MODE_OF_DTYPE = {dtype: mode for mode, dtype in STORAGE_DTYPE.items()}
# Oldest GPU generation each mode runs on: e4m3 conversions need Ada/Hopper (sm_89+); int8 runs on Ampere.
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0)}

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


def quantize_rows(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor:
    """Quantise `weight` [N, K] (any float dtype, any device) per output row into `q_out` [N, K] (int8 or
    float8_e4m3fn; the mode follows its dtype) and `scale_out` [N] (fp32), a chunk of rows at a time, on
    q_out's device. Views (a row slice of a fused parameter) are written in place. No host sync: returns a
    0-d bool tensor on q_out's device, whether every value was finite (rows that were not are garbage)."""
    mode = MODE_OF_DTYPE[q_out.dtype]
    qmax = QMAX[mode]
    n, k = weight.shape
    finite = torch.ones((), dtype=torch.bool, device=q_out.device)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        w = weight[start:start + step].to(device=q_out.device, dtype=torch.float32)
        absmax = w.abs().amax(dim=1) if k else torch.zeros(w.shape[0], device=w.device)
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


def quantize_into(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """`quantize_rows`, then ValueError for non-finite weights (a host sync: converting, not the hot path)."""
    if not bool(quantize_rows(weight, q_out, scale_out)):
        bad = int((~torch.isfinite(weight).all(dim=1)).nonzero()[0])
        raise ValueError(f"cannot quantise a weight with non-finite values (row {bad} of {weight.shape[0]})")


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] in the mode's storage dtype, scale [N] fp32) for `weight` [N, K], on weight's device."""
    mode = check_mode(mode)
    if mode is None or weight.dim() != 2:
        raise ValueError(f"quantize_weight needs a mode and a 2-D weight, got {mode!r} and shape {tuple(weight.shape)}")
    q = torch.empty(weight.shape, dtype=STORAGE_DTYPE[mode], device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    quantize_into(weight, q, scale)
    return q, scale


class QuantLinear(nn.Module):
    """y = x @ (weight_scale[:, None] * weight).T: a bias-free linear layer with quantised weights.

    `weight` [out_features, in_features] is int8 or float8_e4m3fn, `weight_scale` [out_features] fp32; both
    are frozen parameters (so parameter counts, byte counts and `.to(device)` see them). `.to(dtype)` /
    `.half()` on a model leave them in their storage dtypes and change only the rest of the model.
    """

    def __init__(self, in_features: int, out_features: int, mode: str, *, device: torch.device | str | None = None):
        super().__init__()
        mode = check_mode(mode)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=STORAGE_DTYPE[mode], device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)

    @property
    def mode(self) -> str:
        return MODE_OF_DTYPE[self.weight.dtype]

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> "QuantLinear":
        """Quantise an existing bias-free nn.Linear (on its device; a meta one gives an empty meta layer)."""
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias; the model's linear layers are bias-free")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, mode, device=w.device)
        if not w.is_meta:
            with torch.no_grad():
                quantize_into(w.detach(), layer.weight.data, layer.weight_scale.data)
        return layer

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every float tensor, FP8 included, and would round the fp32 scales too: a
        # quantised layer only moves. (fn(t) is computed to learn the target device, then dropped.)
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(move_only, recurse)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, scale=self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers quantisation converts: every bias-free nn.Linear except an lm_head tied
    to the embedding table (embeddings stay as they are)."""
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.bias is None and m.weight is not embed]


def quantize(model: nn.Module, mode: str, *, only: Iterable[str] | None = None) -> nn.Module:
    """Replace the model's linear layers (all of `quantizable_linears`, or the names in `only`) by QuantLinear
    layers of `mode`, in place, quantising their weights one by one (a meta model gets empty meta layers,
    which is how the loader prepares a model it then fills). Returns the model."""
    mode = check_mode(mode)
    if mode is None:
        raise ValueError("quantize(model, mode) needs mode 'fp8' or 'int8'")
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
        setattr(parent, attr, QuantLinear.from_linear(getattr(parent, attr), mode))
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


__all__ = ["MODES", "QuantLinear", "check_device", "check_mode", "dequantize", "parameter_bytes", "quantize",
           "quantize_into", "quantize_rows", "quantize_weight", "quantized_copy", "quantizable_linears"]
