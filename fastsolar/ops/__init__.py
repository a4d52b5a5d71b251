"""The one seam between the model and the kernels.

Every op the model needs goes through this module. On CUDA tensors it runs the Triton kernels; elsewhere
it runs their torch references (`*_ref`, written beside each kernel), so the same model runs on a CPU.
`force_kernels(True)` (or `FASTSOLAR_KERNELS=1`) sends CPU tensors to the kernels as well, which is how
the test suite runs the whole kernel path of a tiny model under the Triton interpreter;
`force_kernels(False)` keeps a CUDA model on the torch references (the benchmark's reference engine).

The matrix products come with their neighbours: `norm_linear` (RMSNorm then x @ W.T), `swiglu_linear`
(SwiGLU of a fused gate|up row then x @ W.T, plus a residual) and `linear` (x @ W.T plus a residual). On the
kernel path, up to `K.GEMV_MAX_M` rows (decode) run either the fused Triton GEMV (one launch) or cuBLAS
with the separate small kernels, whichever fastsolar.ops.gemv_choice found faster for the shape; more rows
(prefill) take cuBLAS. `scale` (fp32 [N]) is the per-output-channel scale of an int8/fp8 weight
(fastsolar.model.quant): the GEMV reads the 8-bit weight as it is, cuBLAS gets it widened to the activations'
dtype with the scale folded in (kernels.dequantize), and prefill runs the quantised GEMM kernel
(kernels.quant_matmul) instead of cuBLAS. Off the kernel path every product is kernels.gemv_ref
(dequantise, then matmul).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from fastsolar import kernels as K
from fastsolar.ops import gemv_choice

_forced: bool | None = {"1": True, "0": False}.get(os.environ.get("FASTSOLAR_KERNELS", ""))


@contextlib.contextmanager
def force_kernels(enabled: bool | None) -> Iterator[None]:
    """Within the block, use the kernels always (True), never (False) or on CUDA only (None)."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernel rather than the torch reference."""
    return t.is_cuda if _forced is None else _forced


def mode() -> tuple:
    """Every host-side switch of this seam (kernels forced or not, GEMV forced or not): what a captured
    CUDA graph bakes in, so part of its key."""
    return (_forced, gemv_choice.forced())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (K.rms_norm if use_kernels(x) else K.rms_norm_ref)(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (K.add_rms_norm if use_kernels(x) else K.add_rms_norm_ref)(x, residual, weight, eps)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (K.apply_rotary if use_kernels(q) else K.apply_rotary_ref)(q, k, positions, theta)


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated q; rotated k and v written into their cache slots (rows[i], positions[i, t])."""
    fn = K.rotary_cache_write if use_kernels(q) else K.rotary_cache_write_ref
    return fn(q, k, v, positions, theta, k_cache, v_cache, rows=rows)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (K.swiglu if use_kernels(gate) else K.swiglu_ref)(gate, up)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    return (K.attention if use_kernels(q) else K.attention_ref)(q, k, v, causal=causal, scale=scale, rows=rows)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    fn = K.decode_attention if use_kernels(q) else K.decode_attention_ref
    return fn(q, k_cache, v_cache, seqlens, rows=rows)


def _cublas(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """cuBLAS x @ weight.T; an 8-bit weight is first widened to x's dtype with its scale folded in (the fused
    GEMV's rival for decode-sized products: it reads the weight once and writes and reads a widened copy)."""
    return torch.nn.functional.linear(x, weight if scale is None else K.dequantize(weight, scale, x.dtype))


def _gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A prefill's product (more than K.GEMV_MAX_M rows): cuBLAS, or for an 8-bit weight the quantised GEMM
    kernel, which reads one byte per weight and dequantises its tiles in registers (no widened copy)."""
    return torch.nn.functional.linear(x, weight) if scale is None else K.quant_matmul(x, weight, scale)


Matmul = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _fused(
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    fused: Callable[[], torch.Tensor],
    unfused: Callable[[Matmul], torch.Tensor],
) -> torch.Tensor:
    """`fused()`: the op in one GEMV launch; `unfused(matmul)`: the op with its product done by `matmul` and its
    neighbours by their own kernels. Prefill-sized x takes `_gemm`; decode-sized x the faster of the fused
    GEMV and cuBLAS (gemv_choice)."""
    rows = x.numel() // x.shape[-1]
    if rows > K.GEMV_MAX_M:
        return unfused(_gemm)
    key = (kind, str(x.device), x.dtype, weight.dtype, rows, *weight.shape)
    pick = gemv_choice.choose(key, x.device, {"triton": fused, "cublas": lambda: unfused(_cublas)})
    return fused() if pick == "triton" else unfused(_cublas)


def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, *, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """rms_norm(x, norm_weight, eps) @ weight.T (the qkv, gate_up and lm_head products)."""
    if not use_kernels(x):
        return K.gemv_ref(x, weight, scale=scale, norm_weight=norm_weight, eps=eps)
    return _fused(
        "norm", x, weight,
        lambda: K.gemv(x, weight, scale=scale, norm_weight=norm_weight, eps=eps),
        lambda matmul: matmul(K.rms_norm(x, norm_weight, eps), weight, scale),
    )


def swiglu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(gate) * up @ weight.T (+ residual), gate and up the two halves of `gate_up`'s last dim (down)."""
    if not use_kernels(gate_up):
        return K.gemv_ref(gate_up, weight, scale=scale, swiglu=True, residual=residual)

    def unfused(matmul: Matmul) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        y = matmul(K.swiglu(gate, up), weight, scale)
        return y if residual is None else residual + y

    return _fused("swiglu" if residual is None else "swiglu+res", gate_up, weight,
                  lambda: K.gemv(gate_up, weight, scale=scale, swiglu=True, residual=residual), unfused)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ residual) (the o projection)."""
    if not use_kernels(x):
        return K.gemv_ref(x, weight, scale=scale, residual=residual)

    def unfused(matmul: Matmul) -> torch.Tensor:
        y = matmul(x, weight, scale)
        return y if residual is None else residual + y

    return _fused("plain" if residual is None else "plain+res", x, weight,
                  lambda: K.gemv(x, weight, scale=scale, residual=residual), unfused)
