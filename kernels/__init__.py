"""fastsolar.kernels: hand-written Triton kernels for Llama-family inference, each beside its torch reference.

    rms_norm(x, weight, eps) -> y                     add_rms_norm(x, residual, weight, eps) -> (y, h)
    apply_rotary(q, k, positions, theta) -> (q, k)    swiglu(gate, up) -> silu(gate) * up
    attention(q, k, v, *, causal=True, scale=None)    decode_attention(q, k_cache, v_cache, seqlens, *, scale=None)
    quant_matmul(x, weight, scale) -> x @ (scale[:, None] * weight).T   (int8 / float8_e4m3fn weights)

Every op has a `*_ref` torch twin that the tests and benchmarks compare against.
"""
from .attention import attention, attention_ref
from .decode_attention import decode_attention, decode_attention_ref
from .quant_matmul import quant_matmul, quant_matmul_ref
from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "add_rms_norm", "add_rms_norm_ref", "apply_rotary", "apply_rotary_ref", "attention", "attention_ref",
    "decode_attention", "decode_attention_ref", "quant_matmul", "quant_matmul_ref", "rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref",
]
