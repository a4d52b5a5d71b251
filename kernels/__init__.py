"""fastsolar.kernels: hand-written Triton kernels for Llama-family inference, each beside its torch reference.

    rms_norm(x, weight, eps) -> y                     add_rms_norm(x, residual, weight, eps) -> (y, h)
    apply_rotary(q, k, positions, theta) -> (q, k)    swiglu(gate, up) -> silu(gate) * up
    rotary_cache_write(q, k, v, positions, theta, k_cache, v_cache, *, rows=None) -> q rotated (k, v into the cache)
    attention(q, k, v, *, causal=True, scale=None, rows=None)
    decode_attention(q, k_cache, v_cache, seqlens, *, rows=None, scale=None)
    gemv(x, weight, *, scale=None, norm_weight=None, eps=1e-6, swiglu=False, residual=None) -> y  (1..8 rows)
    quant_matmul(x, weight, scale) -> x @ (scale[:, None] * weight).T   (int8 / float8_e4m3fn weights; prefill;
        packed int4 with zeros=, group_size= as well)
    dequantize(weight, scale, dtype) -> scale[:, None] * weight in dtype
    dequantize_int4(qweight, scales, zeros, group_size, dtype) -> W   (packed int4, kernels/_int4.py's layout;
        gemv and gemv_ref take it as weight=qweight, scale=scales, zeros=zeros, group_size=group_size)

Every op has a `*_ref` torch twin that the tests and benchmarks compare against; quant_matmul's is
gemv_ref(x, weight, scale=scale), the same product (dequantise, then matmul) for any number of rows.

Only `fastsolar.kernels` is this package (pip install -e . maps kernels/ there). With the repo root on
sys.path (`python -c`, a REPL or a notebook started there) a bare `import kernels` finds this folder first, but
that top-level name belongs to Hugging Face's `kernels` distribution, which transformers imports: so under any
other name this file hands the import on to whatever the rest of sys.path holds by that name. When nothing does,
the module stays what a folder without __init__.py would give, an empty namespace (no __file__, no version,
nothing exported, triton not imported): transformers < 5.25 imports `kernels` whenever `find_spec` finds this
folder, reads that shape as "not installed", and would fail on a ModuleNotFoundError instead.
"""
if __name__ != "fastsolar.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _elsewhere(name: str) -> bool:
        """Import `name` from sys.path without the folder this file sits in, into sys.modules[name]; False when
        nothing else on sys.path has that name."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds once this file has run
        spec.loader.exec_module(module)
        return True

    if not _elsewhere(__name__):
        __all__: list[str] = []
        del __file__, _elsewhere, importlib, os, sys
else:
    from .attention import attention, attention_ref
    from .decode_attention import decode_attention, decode_attention_ref
    from .gemv import MAX_M as GEMV_MAX_M
    from .gemv import dequantize, gemv, gemv_ref
    from ._int4 import dequantize_int4, pack_int4, unpack_int4
    from .quant_matmul import quant_matmul
    from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
    from .rotary import apply_rotary, apply_rotary_ref, rotary_cache_write, rotary_cache_write_ref
    from .swiglu import swiglu, swiglu_ref

    __all__ = [
        "GEMV_MAX_M", "add_rms_norm", "add_rms_norm_ref", "apply_rotary", "apply_rotary_ref", "attention", "attention_ref",
        "decode_attention", "decode_attention_ref", "dequantize", "dequantize_int4", "gemv", "gemv_ref", "pack_int4",
        "quant_matmul", "rms_norm", "rms_norm_ref", "rotary_cache_write", "rotary_cache_write_ref", "swiglu",
        "swiglu_ref", "unpack_int4",
    ]
