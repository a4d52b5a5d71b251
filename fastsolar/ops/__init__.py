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
(kernels.quant_matmul) instead of cuBLAS. A packed int4 weight (int32 [N, K / 8], kernels/_int4.py) comes
with `scale` [N, G], `zeros` [N, G] and `group_size` and takes the same three paths (cuBLAS gets
kernels.dequantize_int4's widened copy). An act-order int4 weight (GPTQ's desc_act) also has `perm` [K]: its
input k is x's input perm[k], so the product's input is gathered once (`_permuted`, with the RMSNorm weight or
both SwiGLU halves alike: a norm's mean square does not depend on the order) and the kernels see contiguous
groups. Off the kernel path every product is kernels.gemv_ref
(dequantise, then matmul).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

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


Quant = dict[str, Any]  # a quantised weight's other kernel arguments: {} or scale= (8-bit), + zeros=, group_size= (int4)


def _quant(scale: torch.Tensor | None, zeros: torch.Tensor | None, group_size: int | None) -> Quant:
    args = {} if scale is None else {"scale": scale}
    if zeros is not None or group_size is not None:
        args.update(zeros=zeros, group_size=group_size)
    return args


def _cublas(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
            zeros: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """cuBLAS x @ weight.T; a quantised weight is first widened to x's dtype with its scales folded in (the fused
    GEMV's rival for decode-sized products: it reads the weight once and writes and reads a widened copy)."""
    if zeros is not None:
        weight = K.dequantize_int4(weight, scale, zeros, group_size, x.dtype)
    elif scale is not None:
        weight = K.dequantize(weight, scale, x.dtype)
    return torch.nn.functional.linear(x, weight)


def _gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
          zeros: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """A prefill's product (more than K.GEMV_MAX_M rows): cuBLAS, or for a quantised weight the quantised GEMM
    kernel, which reads the packed weight and dequantises its tiles in registers (no widened copy)."""
    if scale is None:
        return torch.nn.functional.linear(x, weight)
    return K.quant_matmul(x, weight, scale, **_quant(None, zeros, group_size))


Matmul = Callable[..., torch.Tensor]  # (x, weight, **Quant) -> x @ W.T


def _permuted(x: torch.Tensor, perm: torch.Tensor | None, *, halves: bool = False) -> torch.Tensor:
    """x's last dim gathered by `perm` (each half alike with `halves`: SwiGLU's [gate | up]); x when perm is None."""
    if perm is None:
        return x
    if halves:
        gate, up = x.chunk(2, dim=-1)
        return torch.cat((gate.index_select(-1, perm), up.index_select(-1, perm)), dim=-1)
    return x.index_select(-1, perm)


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
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """rms_norm(x, norm_weight, eps) @ weight.T (the qkv, gate_up and lm_head products)."""
    q = _quant(scale, zeros, group_size)
    x, norm_weight = _permuted(x, perm), _permuted(norm_weight, perm)
    if not use_kernels(x):
        return K.gemv_ref(x, weight, norm_weight=norm_weight, eps=eps, **q)
    return _fused(
        "norm", x, weight,
        lambda: K.gemv(x, weight, norm_weight=norm_weight, eps=eps, **q),
        lambda matmul: matmul(K.rms_norm(x, norm_weight, eps), weight, **q),
    )


def swiglu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(gate) * up @ weight.T (+ residual), gate and up the two halves of `gate_up`'s last dim (down)."""
    q = _quant(scale, zeros, group_size)
    gate_up = _permuted(gate_up, perm, halves=True)
    if not use_kernels(gate_up):
        return K.gemv_ref(gate_up, weight, swiglu=True, residual=residual, **q)

    def unfused(matmul: Matmul) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        y = matmul(K.swiglu(gate, up), weight, **q)
        return y if residual is None else residual + y

    return _fused("swiglu" if residual is None else "swiglu+res", gate_up, weight,
                  lambda: K.gemv(gate_up, weight, swiglu=True, residual=residual, **q), unfused)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ residual) (the o projection)."""
    q = _quant(scale, zeros, group_size)
    x = _permuted(x, perm)
    if not use_kernels(x):
        return K.gemv_ref(x, weight, residual=residual, **q)

    def unfused(matmul: Matmul) -> torch.Tensor:
        y = matmul(x, weight, **q)
        return y if residual is None else residual + y

    return _fused("plain" if residual is None else "plain+res", x, weight,
                  lambda: K.gemv(x, weight, residual=residual, **q), unfused)
