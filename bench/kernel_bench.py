"""Microbenchmarks of fastsolar's Triton kernels at SOLAR-10.7B sizes, on one CUDA GPU.

What it measures (all bf16, batch 1 unless said, inputs laid out as fastsolar/model.py lays them out):

* the card's copy bandwidth: a device-to-device copy of a large buffer, GB/s counting bytes read
  plus bytes written. It is the ceiling the memory-bound ops are compared with ("% copy");
* memory_ops: rms_norm, add_rms_norm, apply_rotary, swiglu at 1, 16 and 4096 tokens: time, GB/s (the
  fewest bytes the op must move: each input read once, each output written once) and % of copy, for
  the Triton kernel and for torch eager (the op's *_ref at bf16);
* attention (prefill, causal, 32/8 heads, head_dim 128) at 512, 2048 and 4096 tokens: TFLOP/s
  counting causal FLOPs as 4*b*h*s*s*d/2, against torch's scaled_dot_product_attention;
* decode: decode_attention (one launch) at batch 1 and 8 with 512..4096 cached tokens in a 4096-slot
  cache: µs and GB/s of K/V read, against SDPA over the cache's first L slots (the padded cache cut
  to the longest row: all rows hold L tokens here);
* gemv: every decode product of a SOLAR layer and the lm_head at batch 1 and 8, fused in Triton
  (norm / SwiGLU prologue, residual epilogue, one launch) against cuBLAS plus the separate small
  kernels fastsolar runs otherwise, for bf16, int8, (sm_89+) FP8 and int4 weights (groups of 128: GB/s
  counts the packed bytes with their scales and zeros); GB/s of the fewest bytes (weights once,
  activations) and the pick fastsolar.ops.gemv_choice makes timing the same inputs;
* rotary_cache: one decode step's fused rotary + KV-cache write (through a row map) against
  apply_rotary plus two indexed copies, the three launches it replaced;
* quant_gemm: the prefill products of a layer (512 tokens) with int8, (sm_89+) FP8 and int4 weights, the
  quantised GEMM (kernels/quant_matmul.py: one byte per weight read, tiles dequantised in registers)
  against what cuBLAS needs for them (the weight widened to bf16 with its scale, then the matmul): ms and
  TFLOP/s.

How: the copy bandwidth is measured first, as the ceiling the memory-bound ops are held against.
Every case is checked for correctness before it is timed: against its torch reference in fp32
(relative L2 error, NaN-poisoned outputs where the op takes `out=`), on fresh random data; then
timed with triton.testing.do_bench (CUDA events, warm-up excluded, L2 flushed before every call,
median of the repeats), twice, keeping the faster median and reporting the spread of the two.
Times include the Python launch path (argument checks, allocation) unless --cuda-graph is given,
which replays a CUDA graph instead (do_bench_cudagraph: no launch gaps, but no L2 flush either, so
cases whose bytes fit in the L2 cache are marked "L2": they read from L2, not from memory). A case
that raises is recorded with its error and the run goes on.

The SDPA baseline runs two ways, K/V expanded to 32 heads beforehand (so the flash backend is
eligible) and with enable_gqa=True where torch has it; the faster one is reported and named.

Results come as they are measured: each row is printed as one line and the JSON (--json) is rewritten
after every row; each section's markdown table is printed when the section ends, and all tables again
at the end. A section is a generator in SECTIONS (`fn(bench) -> rows`); a new kernel's benchmark is one
more generator there, with an optional table in TABLES (otherwise a generic table shows its rows).

    python bench/kernel_bench.py                       # full run, markdown tables on stdout
    python bench/kernel_bench.py --cuda-graph --json out.json   # what bench/gpu_check.sh runs
    python bench/kernel_bench.py --quick               # fewer sizes, shorter timing (smoke test)
    python bench/kernel_bench.py --rehearse            # CPU, Triton interpreter, tiny shapes: the code paths only
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from common import copy_bandwidth, device_info, do_bench_ms, host_ms, import_fastsolar, markdown_table, write_json

EPS, THETA = 1e-5, 10000.0
BF16_TOL = 1e-2  # relative L2 error of bf16 operands against an fp32 reference: 1e-3 .. 1e-2


@dataclass(frozen=True)
class Sizes:
    """Model dimensions and the case lists of each section."""

    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    max_seq: int  # the decode cache's slots
    tokens: tuple[int, ...]  # memory_ops
    seqs: tuple[int, ...]  # attention (prefill)
    batches: tuple[int, ...]  # decode, and the rows of the decode GEMVs and the rotary + cache write
    cached: tuple[int, ...]  # decode
    vocab: int = 32000  # the lm_head GEMV
    prefill: int = 512  # the tokens of the quantised prefill GEMMs (bench/run.py's prompt)


SOLAR = Sizes(4096, 32, 8, 128, 14336, 4096, tokens=(1, 16, 4096), seqs=(512, 2048, 4096), batches=(1, 8),
              cached=(512, 1024, 2048, 4096))
QUICK = replace(SOLAR, tokens=(16,), seqs=(512,), batches=(1,), cached=(1024,))
# The CPU rehearsal: odd, tiny shapes the Triton interpreter runs in seconds (same code paths as on a GPU).
REHEARSAL = Sizes(96, 4, 2, 16, 80, 48, tokens=(5,), seqs=(17,), batches=(2,), cached=(33,), vocab=97, prefill=13)


# ----------------------------------------------------------------------------------------------
# setup, timing and checking
# ----------------------------------------------------------------------------------------------
class Bench:
    """Where and how the sections run: sizes, device, dtype, timing settings, the kernels, the copy ceiling."""

    def __init__(self, sizes: Sizes, device: str, dtype: str, timing: dict[str, Any], l2_bytes: int | None) -> None:
        import torch

        self.torch = torch
        self.S = sizes
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.timing = timing
        self.l2_bytes = l2_bytes
        self.copy_gbs: float | None = None
        import_fastsolar("bench/kernel_bench.py")
        names = ("rms_norm", "rotary", "swiglu", "attention", "decode_attention", "gemv", "quant_matmul")
        self.K = types.SimpleNamespace(**{n: importlib.import_module(f"fastsolar.kernels.{n}") for n in names})

    def time_ms(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(median ms, spread %) of fn: do_bench (or CUDA-graph replay) on CUDA, the host clock elsewhere."""
        if self.device == "cuda":
            return do_bench_ms(fn, **self.timing)
        return host_ms(fn, warmup=1, samples=self.timing.get("samples", 3), repeats=self.timing["repeats"])

    def randn(self, *shape: int, dtype=None, scale: float = 1.0):
        torch = self.torch
        return (torch.randn(*shape, device=self.device, dtype=torch.float32) * scale).to(dtype or self.dtype)

    def poisoned(self, t):
        return self.torch.full_like(t, float("nan"))

    def empty_cache(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def pct_copy(self, gbs: float) -> float | None:
        return 100 * gbs / self.copy_gbs if self.copy_gbs else None

    def cache_note(self, nbytes: int) -> str:
        """'L2' when a CUDA-graph-timed case's bytes fit in L2 (then it is timed from L2, not from memory)."""
        return "L2" if self.timing.get("graph") and self.l2_bytes and nbytes <= self.l2_bytes else ""


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere in out gives inf."""
    import torch

    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return math.inf
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))


def _check(errs: list[float]) -> str:
    worst = max(errs)
    return "ok" if worst <= BF16_TOL else f"BAD ({worst:.1e})"


def _error(e: BaseException) -> str:
    return f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _best_of(b: Bench, variants: dict[str, Callable[[], Any]]) -> tuple[str, float, float]:
    """(name, ms, spread) of the fastest variant."""
    best = None
    for name, f in variants.items():
        t, sp = b.time_ms(f)
        if best is None or t < best[1]:
            best = (name, t, sp)
    return best


# ----------------------------------------------------------------------------------------------
# the sections: generators of result rows
# ----------------------------------------------------------------------------------------------
def _mem_cases(b: Bench, tokens: int):
    """(op, kernel fn, reference fn, fp32 check fn, bytes moved) for one token count."""
    torch, K, S, T = b.torch, b.K, b.S, tokens
    x, res = b.randn(T, S.hidden), b.randn(T, S.hidden)
    w = b.randn(S.hidden, scale=0.1) + 1.0
    qkv = b.randn(1, T, S.n_heads + 2 * S.n_kv, S.head_dim)
    q, k, _ = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
    pos = torch.arange(T, device=b.device)[None] + 7
    gate, up = b.randn(T, 2 * S.inter).split(S.inter, dim=-1)
    e = x.element_size()

    def check_rms():
        out = K.rms_norm.rms_norm(x, w, EPS, out=b.poisoned(x))
        return [rel_err(out, K.rms_norm.rms_norm_ref(x.float(), w.float(), EPS))]

    def check_add():
        y, h = K.rms_norm.add_rms_norm(x, res, w, EPS, out=b.poisoned(x), out_h=b.poisoned(x))
        y_ref, h_ref = K.rms_norm.add_rms_norm_ref(x.float(), res.float(), w.float(), EPS)
        return [rel_err(y, y_ref), rel_err(h, h_ref)]

    def check_rot():
        qo, ko = K.rotary.apply_rotary(q, k, pos, THETA, q_out=b.poisoned(q.contiguous()),
                                       k_out=b.poisoned(k.contiguous()))
        qr, kr = K.rotary.apply_rotary_ref(q.float(), k.float(), pos, THETA)
        return [rel_err(qo, qr), rel_err(ko, kr)]

    def check_swiglu():
        out = K.swiglu.swiglu(gate, up, out=b.poisoned(gate.contiguous()))
        return [rel_err(out, K.swiglu.swiglu_ref(gate.float(), up.float()))]

    qk_elems = T * (S.n_heads + S.n_kv) * S.head_dim
    return [
        ("rms_norm", lambda: K.rms_norm.rms_norm(x, w, EPS), lambda: K.rms_norm.rms_norm_ref(x, w, EPS),
         check_rms, (2 * T * S.hidden + S.hidden) * e),
        ("add_rms_norm", lambda: K.rms_norm.add_rms_norm(x, res, w, EPS),
         lambda: K.rms_norm.add_rms_norm_ref(x, res, w, EPS), check_add, (4 * T * S.hidden + S.hidden) * e),
        ("apply_rotary", lambda: K.rotary.apply_rotary(q, k, pos, THETA),
         lambda: K.rotary.apply_rotary_ref(q, k, pos, THETA), check_rot,
         2 * qk_elems * e + T * pos.element_size() + S.head_dim // 2 * 4),
        ("swiglu", lambda: K.swiglu.swiglu(gate, up), lambda: K.swiglu.swiglu_ref(gate, up),
         check_swiglu, 3 * T * S.inter * e),
    ]


def memory_ops(b: Bench) -> Iterator[dict]:
    """GB/s of the memory-bound ops (kernel and torch eager) per token count; % of the copy bandwidth."""
    for T in b.S.tokens:
        for op, fn, ref, check, nbytes in _mem_cases(b, T):
            try:
                status = _check(check())
            except Exception as e:  # noqa: BLE001 - recorded in the row; the other cases still run
                yield {"op": op, "tokens": T, "impl": "triton", "bytes": nbytes, "check": _error(e)}
                continue
            for impl, f in (("triton", fn), ("torch", ref)):
                try:
                    ms, spread = b.time_ms(f)
                except Exception as e:  # noqa: BLE001
                    yield {"op": op, "tokens": T, "impl": impl, "bytes": nbytes, "check": _error(e)}
                    continue
                gbs = nbytes / ms / 1e6
                yield {"op": op, "tokens": T, "impl": impl, "bytes": nbytes, "us": ms * 1e3, "spread_pct": spread,
                       "gbs": gbs, "pct_copy": b.pct_copy(gbs), "cache": b.cache_note(nbytes),
                       "check": status if impl == "triton" else ""}


def _sdpa_variants(q, k, v, causal: bool) -> dict[str, Callable[[], Any]]:
    """SDPA callables over [b, s, h, d] tensors: expanded K/V, and enable_gqa where available."""
    import torch

    F = torch.nn.functional
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ke = kt.repeat_interleave(group, dim=1)
    ve = vt.repeat_interleave(group, dim=1)
    out = {"sdpa(expanded kv)": lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=causal)}
    try:
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
        out["sdpa(enable_gqa)"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        pass
    return out


def attention(b: Bench) -> Iterator[dict]:
    """Prefill attention TFLOP/s (causal FLOPs 4*b*h*s*s*d/2) for the kernel and the faster SDPA."""
    K, S = b.K, b.S
    for s in S.seqs:
        qkv = b.randn(1, s, S.n_heads + 2 * S.n_kv, S.head_dim)
        q, k, v = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
        q, k = q.contiguous(), k.contiguous()  # as apply_rotary hands them over; v stays a qkv view
        flops = 4 * 1 * S.n_heads * s * s * S.head_dim / 2
        try:
            out = K.attention.attention(q, k, v, causal=True, out=b.poisoned(q))
            status = _check([rel_err(out, K.attention.attention_ref(q.float(), k.float(), v.float(), causal=True))])
            ms, spread = b.time_ms(lambda: K.attention.attention(q, k, v, causal=True))
            yield {"op": "attention", "seq": s, "impl": "triton", "ms": ms, "spread_pct": spread,
                   "tflops": flops / ms / 1e9, "check": status}
        except Exception as e:  # noqa: BLE001
            yield {"op": "attention", "seq": s, "impl": "triton", "check": _error(e)}
        name, ms, spread = _best_of(b, _sdpa_variants(q, k, v, causal=True))
        yield {"op": "attention", "seq": s, "impl": name, "ms": ms, "spread_pct": spread,
               "tflops": flops / ms / 1e9, "check": ""}
        del qkv, q, k, v
        b.empty_cache()


def decode(b: Bench) -> Iterator[dict]:
    """decode_attention µs (one query token per row, L cached tokens in a max_seq-slot cache) vs SDPA over the
    first L cache slots; GB/s counts the K/V bytes read (b * L * kv * d * 2 tensors * element size)."""
    torch, K, S = b.torch, b.K, b.S
    e = torch.empty((), dtype=b.dtype).element_size()
    for bs in S.batches:
        kc = b.randn(bs, S.max_seq, S.n_kv, S.head_dim)
        vc = b.randn(bs, S.max_seq, S.n_kv, S.head_dim)
        for L in S.cached:
            q = b.randn(bs, S.n_heads, S.head_dim)
            seqlens = torch.full((bs,), L, dtype=torch.int32, device=b.device)
            nbytes = 2 * bs * L * S.n_kv * S.head_dim * e + 2 * bs * S.n_heads * S.head_dim * e
            row = {"op": "decode_attention", "batch": bs, "cached": L, "bytes": nbytes}
            try:
                out = K.decode_attention.decode_attention(q, kc, vc, seqlens, out=b.poisoned(q))
                ref = K.decode_attention.decode_attention_ref(q.float(), kc.float(), vc.float(), seqlens)
                status = _check([rel_err(out, ref)])
                ms, spread = b.time_ms(lambda: K.decode_attention.decode_attention(q, kc, vc, seqlens))
                gbs = nbytes / ms / 1e6
                yield {**row, "impl": "triton", "us": ms * 1e3, "spread_pct": spread, "gbs": gbs,
                       "pct_copy": b.pct_copy(gbs), "cache": b.cache_note(nbytes), "check": status}
            except Exception as e:  # noqa: BLE001
                yield {**row, "impl": "triton", "check": _error(e)}
            name, ms, spread = _best_of(b, _sdpa_variants(q[:, None], kc[:, :L], vc[:, :L], causal=False))
            gbs = nbytes / ms / 1e6
            yield {**row, "impl": name, "us": ms * 1e3, "spread_pct": spread, "gbs": gbs,
                   "pct_copy": b.pct_copy(gbs), "cache": b.cache_note(nbytes), "check": ""}
        del kc, vc
        b.empty_cache()


def _gemv_shapes(S: Sizes) -> dict[str, tuple[int, int, str, bool]]:
    """name: (N, K, prologue, residual) for every decode product of a layer, and the lm_head."""
    return {
        "qkv (rmsnorm)": ((S.n_heads + 2 * S.n_kv) * S.head_dim, S.hidden, "norm", False),
        "o (+residual)": (S.hidden, S.n_heads * S.head_dim, "plain", True),
        "gate_up (rmsnorm)": (2 * S.inter, S.hidden, "norm", False),
        "down (swiglu, +residual)": (S.hidden, S.inter, "swiglu", True),
        "lm_head (rmsnorm)": (S.vocab, S.hidden, "norm", False),
    }


def _gemv_weight_dtypes(b: Bench) -> list[str]:
    """The activation dtype's weights, int8, FP8 where the card converts it (sm_89+; any CPU), and int4."""
    out = [str(b.dtype).replace("torch.", ""), "int8"]
    if b.device != "cuda" or b.torch.cuda.get_device_capability() >= (8, 9):
        out.append("float8_e4m3fn")
    return out + ["int4"]


def _weight(b: Bench, n: int, k: int, wdtype: str):
    """(weight [n, k] in `wdtype`, the kernels' quantisation arguments: {} / {"scale"} / int4's {"scale", "zeros",
    "group_size"}), quantised as fastsolar does (fastsolar.model.quant: per-channel absmax; int4 per group of 128)."""
    torch = b.torch
    w = b.randn(n, k, scale=k ** -0.5, dtype=torch.float32)
    quant = importlib.import_module("fastsolar.model.quant")
    if wdtype == "int4":
        q, scale, zeros = quant.quantize_weight_int4(w)
        return q, {"scale": scale, "zeros": zeros, "group_size": quant.GROUP_SIZE}
    if wdtype in ("int8", "float8_e4m3fn"):
        q, scale = quant.quantize_weight(w, quant.MODE_OF_DTYPE[getattr(torch, wdtype)])
        return q, {"scale": scale}
    return w.to(getattr(torch, wdtype)), {}


def _quant_args(kw: dict) -> dict:
    """The quantisation arguments among a gemv case's keyword arguments."""
    return {a: kw[a] for a in ("scale", "zeros", "group_size") if a in kw}


def _gemv_case(b: Bench, n: int, k: int, prologue: str, residual: bool, m: int, wdtype: str):
    """x, weight and gemv keyword arguments for one product at m rows (8-bit weights: per-channel absmax scale)."""
    x = b.randn(m, 1, 2 * k if prologue == "swiglu" else k)
    w, qkw = _weight(b, n, k, wdtype)
    kw: dict[str, Any] = dict(qkw)
    if prologue == "norm":
        kw.update(norm_weight=b.randn(k, scale=0.1) + 1.0, eps=EPS)
    elif prologue == "swiglu":
        kw["swiglu"] = True
    if residual:
        kw["residual"] = b.randn(m, 1, n)
    return x, w, kw


def _gemv_unfused(b: Bench, ops, x, w, kw):
    """What fastsolar.ops runs instead of the fused kernel: cuBLAS plus the separate small kernels."""
    K, qkw, res = b.K, _quant_args(kw), kw.get("residual")
    if "norm_weight" in kw:
        return ops._cublas(K.rms_norm.rms_norm(x, kw["norm_weight"], EPS), w, **qkw)
    a = K.swiglu.swiglu(*x.chunk(2, dim=-1)) if kw.get("swiglu") else x
    y = ops._cublas(a, w, **qkw)
    return y if res is None else res + y


def _gemv_pick(ops, choice, x, w, kw) -> str:
    """The self-selection run for real on these inputs (a fresh choice cache, restored afterwards)."""
    saved = dict(choice._choices)
    choice._choices.clear()
    try:
        with choice.force_gemv(None), ops.force_kernels(True):
            qkw, res = _quant_args(kw), kw.get("residual")
            if "norm_weight" in kw:
                ops.norm_linear(x, kw["norm_weight"], EPS, w, **qkw)
            elif kw.get("swiglu"):
                ops.swiglu_linear(x, w, residual=res, **qkw)
            else:
                ops.linear(x, w, residual=res, **qkw)
        picked = list(choice.choices().values())
    finally:
        choice._choices.clear()
        choice._choices.update(saved)
    return picked[0] if picked else "untimed"


def gemv(b: Bench) -> Iterator[dict]:
    """Each decode GEMV fused in Triton (one launch) and as cuBLAS + the separate small kernels, µs and GB/s
    of the fewest bytes (weights once, x, y, residual); then fastsolar.ops.gemv_choice's pick on the same inputs
    ("untimed" on a CPU, where nothing is timed and cuBLAS/the reference is the default)."""
    torch, G = b.torch, b.K.gemv
    ops = importlib.import_module("fastsolar.ops")
    choice = importlib.import_module("fastsolar.ops.gemv_choice")
    for name, (n, k, prologue, residual) in _gemv_shapes(b.S).items():
        for wdtype in _gemv_weight_dtypes(b):
            for m in b.S.batches:
                row = {"op": "gemv", "shape": name, "batch": m, "weight": wdtype, "N": n, "K": k}
                try:
                    x, w, kw = _gemv_case(b, n, k, prologue, residual, m, wdtype)
                    y = G.gemv(x, w, out=b.poisoned(torch.empty(m, 1, n, dtype=x.dtype, device=b.device)), **kw)
                    kw32 = {a: (v.float() if isinstance(v, torch.Tensor) and a in ("norm_weight", "residual") else v)
                            for a, v in kw.items()}
                    status = _check([rel_err(y, G.gemv_ref(x.float(), w, **kw32))])
                    groups = [kw[a] for a in ("scale", "zeros") if wdtype == "int4"]  # int4 reads them per tile
                    nbytes = (sum(t.numel() * t.element_size() for t in (w, *groups)) + x.numel() * x.element_size()
                              + m * n * x.element_size() * (2 if residual else 1))
                    picked = _gemv_pick(ops, choice, x, w, kw)
                except Exception as e:  # noqa: BLE001 - recorded in the row; the other cases still run
                    yield {**row, "impl": "triton", "check": _error(e)}
                    continue
                for impl, fn in (("triton", lambda: G.gemv(x, w, **kw)), ("cublas", lambda: _gemv_unfused(b, ops, x, w, kw))):
                    try:
                        ms, spread = b.time_ms(fn)
                    except Exception as e:  # noqa: BLE001
                        yield {**row, "impl": impl, "check": _error(e)}
                        continue
                    gbs = nbytes / ms / 1e6
                    yield {**row, "impl": impl, "bytes": nbytes, "us": ms * 1e3, "spread_pct": spread, "gbs": gbs,
                           "pct_copy": b.pct_copy(gbs), "cache": b.cache_note(nbytes), "picked": picked,
                           "check": status if impl == "triton" else ""}
            b.empty_cache()


def rotary_cache(b: Bench) -> Iterator[dict]:
    """One decode step's rotary + KV-cache write for one layer: the fused kernel (one launch) against what it
    replaced (apply_rotary, then two indexed copies into the cache), at per-row positions through a row map.
    GB/s counts q, k, v read, rotated q and the k/v slots written."""
    torch, K, S = b.torch, b.K, b.S
    for bs in S.batches:
        row = {"op": "rotary_cache_write", "batch": bs}
        qkv = b.randn(bs, 1, S.n_heads + 2 * S.n_kv, S.head_dim)
        q, k, v = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
        kc, vc = b.randn(bs + 3, S.max_seq, S.n_kv, S.head_dim), b.randn(bs + 3, S.max_seq, S.n_kv, S.head_dim)
        rows_map = torch.arange(bs, device=b.device).flip(0) + 2
        pos = torch.randint(0, S.max_seq, (bs, 1), device=b.device)
        r = rows_map.long()
        nbytes = bs * (2 * S.n_heads + 4 * S.n_kv) * S.head_dim * q.element_size()
        try:
            qo = K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map, q_out=b.poisoned(q.contiguous()))
            kc_ref, vc_ref = kc.float(), vc.float()
            q_ref = K.rotary.rotary_cache_write_ref(q.float(), k.float(), v.float(), pos, THETA, kc_ref, vc_ref,
                                                    rows=rows_map)
            status = _check([rel_err(qo, q_ref), rel_err(kc[r, pos[:, 0]], kc_ref[r, pos[:, 0]]),
                             rel_err(vc[r, pos[:, 0]], vc_ref[r, pos[:, 0]])])
        except Exception as e:  # noqa: BLE001
            yield {**row, "impl": "fused (1 launch)", "check": _error(e)}
            continue

        def separate():
            qr, kr = K.rotary.apply_rotary(q, k, pos, THETA)
            kc[r, pos[:, 0]] = kr[:, 0]
            vc[r, pos[:, 0]] = v[:, 0]
            return qr

        def fused():
            return K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map)

        for impl, fn in (("fused (1 launch)", fused), ("rotary + 2 index_put (3 launches)", separate)):
            ms, spread = b.time_ms(fn)
            gbs = nbytes / ms / 1e6
            yield {**row, "impl": impl, "bytes": nbytes, "us": ms * 1e3, "spread_pct": spread, "gbs": gbs,
                   "pct_copy": b.pct_copy(gbs), "cache": b.cache_note(nbytes),
                   "check": status if impl.startswith("fused") else ""}
        b.empty_cache()


def quant_gemm(b: Bench) -> Iterator[dict]:
    """A layer's prefill products (S.prefill tokens) with int8 / FP8 / int4 weights: kernels/quant_matmul.py against
    cuBLAS on the weight widened to the activations' dtype with its scale (fastsolar.ops' route without the
    kernel), ms and TFLOP/s (2*M*N*K); checked against gemv_ref (dequantise, then matmul) in fp32."""
    torch, S = b.torch, b.S
    ops = importlib.import_module("fastsolar.ops")
    # A prefill's lm_head sees only each prompt's last row: a GEMV, not this.
    shapes = {name.split(" (")[0]: (n, k) for name, (n, k, _, _) in _gemv_shapes(S).items()
              if not name.startswith("lm_head")}
    for name, (n, k) in shapes.items():
        for wdtype in _gemv_weight_dtypes(b)[1:]:  # the quantised ones
            row = {"op": "quant_gemm", "shape": name, "tokens": S.prefill, "weight": wdtype, "N": n, "K": k}
            flops = 2 * S.prefill * n * k
            try:
                x = b.randn(S.prefill, k)
                w, qkw = _weight(b, n, k, wdtype)
                y = b.K.quant_matmul.quant_matmul(x, w, out=b.poisoned(torch.empty(S.prefill, n, dtype=x.dtype,
                                                                                   device=b.device)), **qkw)
                status = _check([rel_err(y, b.K.gemv.gemv_ref(x.float(), w, **qkw))])
            except Exception as e:  # noqa: BLE001 - recorded in the row; the other cases still run
                yield {**row, "impl": "triton", "check": _error(e)}
                continue
            for impl, fn in (("triton", lambda: b.K.quant_matmul.quant_matmul(x, w, **qkw)),
                             ("cublas", lambda: ops._cublas(x, w, **qkw))):
                try:
                    ms, spread = b.time_ms(fn)
                except Exception as e:  # noqa: BLE001
                    yield {**row, "impl": impl, "check": _error(e)}
                    continue
                yield {**row, "impl": impl, "ms": ms, "spread_pct": spread, "tflops": flops / ms / 1e9,
                       "check": status if impl == "triton" else ""}
            del x, w, qkw
            b.empty_cache()


#: The benchmark sections, in run order: name -> generator of row dicts. Add a kernel's benchmark here.
SECTIONS: dict[str, Callable[[Bench], Iterator[dict]]] = {"memory_ops": memory_ops, "attention": attention,
                                                           "decode": decode, "gemv": gemv,
                                                           "rotary_cache": rotary_cache, "quant_gemm": quant_gemm}


def run(sizes: Sizes, *, device: str = "cuda", dtype: str = "bfloat16", timing: dict[str, Any] | None = None,
        copy_gib: float = 1.0, sections: list[str] | None = None,
        on_row: Callable[[dict, str, dict], None] | None = None) -> dict:
    """Everything, in one dict (what --json writes); `on_row(result, section, row)` after every row."""
    import torch

    torch.manual_seed(0)
    timing = dict(timing or {"warmup": 25, "rep": 100, "graph": False, "repeats": 2})
    info = device_info(device)
    l2 = int(info["l2_mib"] * 2**20) if info.get("l2_mib") else None
    b = Bench(sizes, device, dtype, timing, l2)
    res: dict[str, Any] = {"complete": False, "device": info, "dtype": dtype, "sizes": asdict(sizes),
                           "timing": timing, "copy": None}
    copy_kw = timing if device == "cuda" else {}
    res["copy"] = copy_bandwidth(device, copy_gib, **copy_kw)
    b.copy_gbs = res["copy"]["gbs"]
    for name in sections or list(SECTIONS):
        res[name] = []
        for row in SECTIONS[name](b):
            res[name].append(row)
            if on_row:
                on_row(res, name, row)
    res["complete"] = True
    return res


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _pct(x: Any) -> str:
    return "" if x is None else f"{x:.0f}%"


def _pairs(rows: list[dict], key: Callable[[dict], tuple]) -> dict[tuple, tuple[dict, dict]]:
    """Rows grouped by `key` as (triton row, baseline row); a missing side is an empty dict."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        pair = out.setdefault(key(r), [{}, {}])
        pair[0 if r.get("impl") == "triton" else 1] = r
    return {k: (t, e) for k, (t, e) in out.items()}


def _speedup(t: dict, e: dict, field: str) -> str:
    return f"{e[field] / t[field]:.2f}x" if t.get(field) and e.get(field) else "n/a"


def _spread(t: dict, e: dict) -> str:
    vals = [r["spread_pct"] for r in (t, e) if r.get("spread_pct") is not None]
    return f"{max(vals):.1f}%" if vals else "n/a"


def _memory_table(rows: list[dict], res: dict) -> str:
    table = []
    for (op, T), (t, e) in _pairs(rows, lambda r: (r["op"], r["tokens"])).items():
        nbytes = (t or e).get("bytes")
        table.append([op, T, _f(nbytes / 1e6 if nbytes else None, ".2f"), _f(t.get("us"), ".1f"),
                      _f(t.get("gbs"), ".0f"), _pct(t.get("pct_copy")), _f(e.get("us"), ".1f"), _f(e.get("gbs"), ".0f"),
                      _pct(e.get("pct_copy")), _speedup(t, e, "us"), _spread(t, e), t.get("cache") or e.get("cache", ""),
                      t.get("check", "")])
    return ("Memory-bound ops (GB/s = fewest bytes / time):\n\n"
            + markdown_table(["op", "tokens", "MB", "triton µs", "GB/s", "% copy", "torch µs", "GB/s", "% copy",
                              "speedup", "spread", "cache", "check"], table))


def _attention_table(rows: list[dict], res: dict) -> str:
    S = res["sizes"]
    table = []
    for (s,), (t, e) in _pairs(rows, lambda r: (r["seq"],)).items():
        table.append([s, _f(t.get("ms"), ".3f"), _f(t.get("tflops"), ".0f"), _f(e.get("ms"), ".3f"),
                      _f(e.get("tflops"), ".0f"), e.get("impl", ""), _speedup(t, e, "ms"), _spread(t, e),
                      t.get("check", "")])
    return (f"Prefill attention (batch 1, {S['n_heads']}/{S['n_kv']} heads, d {S['head_dim']}, causal; "
            "FLOPs 4*h*s*s*d/2):\n\n"
            + markdown_table(["seq", "triton ms", "TFLOP/s", "sdpa ms", "TFLOP/s", "sdpa variant", "speedup", "spread",
                              "check"], table))


def _decode_table(rows: list[dict], res: dict) -> str:
    table = []
    for (bs, L), (t, e) in _pairs(rows, lambda r: (r["batch"], r["cached"])).items():
        table.append([bs, L, _f(t.get("us"), ".1f"), _f(t.get("gbs"), ".0f"), _pct(t.get("pct_copy")),
                      _f(e.get("us"), ".1f"), _f(e.get("gbs"), ".0f"), e.get("impl", ""), _speedup(t, e, "us"),
                      _spread(t, e), t.get("cache") or e.get("cache", ""), t.get("check", "")])
    return (f"Decode attention ({res['sizes']['max_seq']}-slot cache, GB/s of K/V read):\n\n"
            + markdown_table(["batch", "cached", "triton µs", "GB/s", "% copy", "sdpa µs", "GB/s", "sdpa variant",
                              "speedup", "spread", "cache", "check"], table))


def _generic_table(rows: list[dict], res: dict) -> str:
    """Any section without its own table: one column per key, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    cells = [[_f(r.get(k), ".4g") if isinstance(r.get(k), float) else r.get(k, "") for k in keys] for r in rows]
    return markdown_table(keys, cells)


def _gemv_table(rows: list[dict], res: dict) -> str:
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["shape"], r["batch"], r["weight"]), {})[r["impl"]] = r
    table = []
    for (shape, m, wdt), d in by.items():
        t, c = d.get("triton", {}), d.get("cublas", {})
        table.append([shape, m, wdt, _f(t.get("us"), ".1f"), _f(t.get("gbs"), ".0f"), _pct(t.get("pct_copy")),
                      _f(c.get("us"), ".1f"), _f(c.get("gbs"), ".0f"), _pct(c.get("pct_copy")), _speedup(t, c, "us"),
                      t.get("picked", ""), _spread(t, c), t.get("cache") or c.get("cache", ""), t.get("check", "")])
    return ("Decode GEMVs (one launch, norm/SwiGLU/residual fused) vs cuBLAS + separate kernels; GB/s = weights "
            "once + activations / time; `picked` = what fastsolar.ops.gemv_choice chose timing the same inputs:\n\n"
            + markdown_table(["product", "batch", "weights", "triton µs", "GB/s", "% copy", "cublas µs", "GB/s",
                              "% copy", "speedup", "picked", "spread", "cache", "check"], table))


def _rotary_cache_table(rows: list[dict], res: dict) -> str:
    table = [[r["batch"], r["impl"], _f(r.get("us"), ".1f"), _f(r.get("gbs"), ".0f"), _pct(r.get("pct_copy")),
              _f(r.get("spread_pct"), ".1f"), r.get("cache", ""), r.get("check", "")] for r in rows]
    return ("Rotary + KV-cache write of one decode step, one layer (row map, per-row positions):\n\n"
            + markdown_table(["batch", "impl", "µs", "GB/s", "% copy", "spread %", "cache", "check"], table))


def _quant_gemm_table(rows: list[dict], res: dict) -> str:
    table = []
    for (shape, wdt), (t, c) in _pairs(rows, lambda r: (r["shape"], r["weight"])).items():
        tokens = (t or c).get("tokens")
        table.append([shape, tokens, wdt, _f(t.get("ms"), ".3f"), _f(t.get("tflops"), ".0f"), _f(c.get("ms"), ".3f"),
                      _f(c.get("tflops"), ".0f"), _speedup(t, c, "ms"), _spread(t, c), t.get("check", "")])
    return ("Quantised prefill GEMMs (one byte per weight, tiles dequantised in registers) vs cuBLAS on the weight "
            "widened to bf16 with its scale:\n\n"
            + markdown_table(["product", "tokens", "weights", "triton ms", "TFLOP/s", "widen+cublas ms", "TFLOP/s",
                              "speedup", "spread", "check"], table))


#: Markdown for each section (sections not listed get _generic_table).
TABLES: dict[str, Callable[[list[dict], dict], str]] = {"memory_ops": _memory_table, "attention": _attention_table,
                                                         "decode": _decode_table, "gemv": _gemv_table,
                                                         "rotary_cache": _rotary_cache_table,
                                                         "quant_gemm": _quant_gemm_table}


def header(res: dict) -> str:
    d, c = res["device"], res.get("copy")
    arch = f"sm_{d['capability'].replace('.', '')}, {d['sms']} SMs, " if d.get("capability") else ""
    if res["timing"].get("graph"):
        mode = "CUDA-graph replay (no launch gaps; no L2 flush: 'L2' rows fit in L2)"
    elif d.get("capability"):
        mode = "do_bench, L2 flushed, launch path included"
    else:
        mode = "host clock (CPU: code paths only, not speed)"
    lines = [f"**{d['card']}** ({arch}{d['memory_gib']} GiB), {res['dtype']}, torch {d['torch']}, triton {d['triton']}, "
             f"CUDA {d['cuda']}, {d['date']}; {mode}; medians."]
    if c:
        lines += ["", f"Copy bandwidth: **{c['gbs']:.0f} GB/s** (read+write of {c['bytes'] / 2**30:.2f} GiB in "
                  f"{c['ms']:.3f} ms, spread {c['spread_pct']:.1f}%)"]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The header and a table per section present (partial results too)."""
    out = [header(res)]
    for name in [n for n in SECTIONS if n in res] + [n for n in res if n not in SECTIONS and isinstance(res[n], list)]:
        if res[name]:
            out += ["", TABLES.get(name, _generic_table)(res[name], res)]
    if not res.get("complete", True):
        out += ["", "INCOMPLETE: the run stopped before every section finished."]
    return "\n".join(out)


def _row_line(section: str, row: dict) -> str:
    keys = [k for k in ("op", "shape", "weight", "tokens", "seq", "batch", "cached", "impl", "picked") if k in row]
    vals = [f"{k}={row[k]}" for k in keys]
    for k, fmt in (("us", ".1f"), ("ms", ".3f"), ("gbs", ".0f"), ("tflops", ".1f"), ("pct_copy", ".0f")):
        if row.get(k) is not None:
            vals.append(f"{k}={row[k]:{fmt}}")
    if row.get("check"):
        vals.append(row["check"])
    return f"[{section}] " + " ".join(vals)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Needs one CUDA GPU (exit status 2 without one), except with --rehearse.")
    ap.add_argument("--json", metavar="PATH", help="write all numbers, card, date and versions as JSON (after every row)")
    ap.add_argument("--tokens", type=_ints, help="token counts for the memory-bound ops (default 1,16,4096)")
    ap.add_argument("--seqs", type=_ints, help="prefill lengths for attention (default 512,2048,4096)")
    ap.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,8)")
    ap.add_argument("--cached", type=_ints, help="decode cached tokens (default 512,1024,2048,4096)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy-bandwidth buffer in GiB (default 1)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repeat time, ms (default 100)")
    ap.add_argument("--repeats", type=int, default=2, help="time each case this many times; the spread is the noise (default 2)")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch gaps, no L2 flush)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one size each, short timing")
    ap.add_argument("--rehearse", action="store_true",
                    help="run on the CPU under the Triton interpreter at tiny shapes in float32: checks this script's "
                         "code paths (no GPU needed), measures nothing meaningful")
    args = ap.parse_args(argv)

    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastsolar (and so triton) is imported
        sizes, device, dtype = REHEARSAL, "cpu", "float32"  # bf16 tl.dot is garbage under the interpreter
        timing = {"warmup": 1, "rep": 1, "graph": False, "repeats": 1, "samples": 1}
        args.copy_gib = min(args.copy_gib, 1 / 64)
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench/kernel_bench.py: no CUDA GPU visible (torch.cuda.is_available() is False); these benchmarks "
                  "need one (--rehearse runs the code paths on a CPU). `--help` lists the options.", file=sys.stderr)
            return 2
        sizes, device, dtype = (QUICK if args.quick else SOLAR), "cuda", "bfloat16"
        timing = {"warmup": args.warmup, "rep": args.rep, "graph": args.cuda_graph, "repeats": max(1, args.repeats)}
        if args.quick:
            timing.update(warmup=5, rep=20, repeats=1)
    overrides = {k: getattr(args, k) for k in ("tokens", "seqs", "batches", "cached") if getattr(args, k)}
    sizes = replace(sizes, **overrides)
    sections = [s for s in (args.sections or "").split(",") if s] or None
    unknown = [s for s in sections or [] if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    t0 = time.perf_counter()
    last_section: list[str] = []

    def on_row(res: dict, section: str, row: dict) -> None:
        if last_section and last_section[-1] != section:
            print("\n" + TABLES.get(last_section[-1], _generic_table)(res[last_section[-1]], res) + "\n", flush=True)
        if not last_section or last_section[-1] != section:
            last_section.append(section)
        print(f"{time.perf_counter() - t0:7.1f}s {_row_line(section, row)}", flush=True)
        if args.json:
            write_json(args.json, res)

    try:
        res = run(sizes, device=device, dtype=dtype, timing=timing, copy_gib=args.copy_gib, sections=sections,
                  on_row=on_row)
    except Exception:
        traceback.print_exc()
        return 1
    if args.json:
        write_json(args.json, res)
    print("\n" + markdown(res), flush=True)
    bad = [r for name in SECTIONS if name in res for r in res[name]
           if str(r.get("check", "")).startswith(("BAD", "ERROR"))]
    if bad:
        print(f"\n{len(bad)} case(s) failed (relative L2 error > {BF16_TOL}, or an error): "
              + ", ".join(f"{r['op']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

