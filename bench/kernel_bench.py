"""Microbenchmarks of fastsolar's Triton kernels at SOLAR-10.7B sizes, on one CUDA GPU.

What it measures (all bf16, batch 1 unless said, inputs laid out as fastsolar/model.py lays them out), in this
order (the decode path first: what a lent GPU's minutes are worth most on):

* gemv: every decode product of a SOLAR layer and the lm_head at batch 1 and 8, fused in Triton
  (norm / SwiGLU prologue, residual epilogue, one launch) against cuBLAS plus the separate small
  kernels fastsolar runs otherwise, for bf16, int8, (sm_89+) FP8 and int4 weights (groups of 128: GB/s
  counts the packed bytes with their scales and zeros); GB/s of the fewest bytes (weights once,
  activations) and the pick fastsolar.ops.gemv_choice makes timing the same inputs;
* decode: decode_attention (one launch) at batch 1 and 8 with 512..4096 cached tokens in a 4096-slot
  cache: µs and GB/s of K/V read, against SDPA over the cache's first L slots (the padded cache cut
  to the longest row: all rows hold L tokens here);
* rotary_cache: one decode step's fused rotary + KV-cache write (through a row map) against
  apply_rotary plus two indexed copies, the three launches it replaced;
* attention (prefill, causal, 32/8 heads, head_dim 128) at 512, 2048 and 4096 tokens: TFLOP/s
  counting causal FLOPs as 4*b*h*s*s*d/2, against torch's scaled_dot_product_attention;
* memory_ops: rms_norm, add_rms_norm, apply_rotary, swiglu at 16 and 4096 tokens: time, GB/s (the fewest bytes
  the op must move: each input read once, each output written once) and % of copy, for the Triton kernel,
  torch eager (the op's *_ref at bf16) and, where Liger-Kernel is importable on CUDA, Liger's RMSNorm, RoPE and
  SwiGLU (a same-run peer; its rows say why they were skipped otherwise);
* quant_gemm: the prefill products of a layer (512 tokens) with int8, (sm_89+) FP8 and int4 weights, the
  quantised GEMM (kernels/quant_matmul.py: one byte per weight read, tiles dequantised in registers)
  against what cuBLAS needs for them (the weight widened to bf16 with its scale, then the matmul): ms and
  TFLOP/s.

How: the copy bandwidth is measured first, as the ceiling the memory-bound ops are held against.
Every case is checked for correctness before it is timed: against its torch reference in fp32
(relative L2 error, NaN-poisoned outputs where the op takes `out=`), on fresh random data. Then it is timed
over a ring of input sets (weights, caches and activations: fresh copies) that together hold more than 3x
the card's L2 (common.ring_size), so every call streams its data from device memory and none replays out of
L2: one lap over the ring is captured in a CUDA graph and replayed (no launch gaps), CUDA events, median of 3
samples (common.graph_ring_ms). The tables show each row's ring and whether it came from memory ("HBM") or,
where the ring hit its cap (RING_MAX input sets), from L2. A case that raises is recorded with its error and
the run goes on.

The SDPA baseline runs two ways, K/V expanded to 32 heads beforehand (so the flash backend is
eligible) and with enable_gqa=True where torch has it; the faster one is reported and named.

`plan(sizes, ...)` lists every row the run will produce, with its timings, compiles, launches and bytes, without
running anything: bench/gpu_plan.py turns it into the phase's time estimate, and the tests hold it equal to the
rows a run produces.

Results come as they are measured: each row is printed as one line and the JSON (--json) is rewritten
after every row; each section's markdown table is printed when the section ends, and all tables again
at the end. A section is a generator in SECTIONS (`fn(bench) -> rows`) with its row list in PLANS; a new kernel's
benchmark is one more of each, with an optional table in TABLES (otherwise a generic table shows its rows).

    python bench/kernel_bench.py --json out.json            # full run, markdown tables on stdout
    python bench/kernel_bench.py --sections gemv,decode     # what bench/gpu_check.sh's kernels phase runs
    python bench/kernel_bench.py --quick                    # fewer sizes (smoke test)
    python bench/kernel_bench.py --rehearse                 # CPU, Triton interpreter, tiny shapes: the code paths only
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from common import (RING_MAX, copy_bandwidth, device_info, from_memory, graph_ring_ms, host_ms, import_fastsolar,
                    markdown_table, ring_size, write_json)

EPS, THETA = 1e-5, 10000.0
INT4_GROUP = 128  # fastsolar.model.quant.GROUP_SIZE, the int4 rows' inputs per scale and zero (the plan counts it
#                   without importing fastsolar)
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


# Memory ops at 16 and 4096 tokens: decode runs none of them alone (they are fused into the GEMVs), and a 1-token
# op's 24 KB would need a ring of more than RING_MAX copies to leave L2.
SOLAR = Sizes(4096, 32, 8, 128, 14336, 4096, tokens=(16, 4096), seqs=(512, 2048, 4096), batches=(1, 8),
              cached=(512, 1024, 2048, 4096))
QUICK = replace(SOLAR, tokens=(16,), seqs=(512,), batches=(1,), cached=(1024,))
# The CPU rehearsal: odd, tiny shapes the Triton interpreter runs in seconds (same code paths as on a GPU).
REHEARSAL = Sizes(96, 4, 2, 16, 80, 48, tokens=(5,), seqs=(17,), batches=(2,), cached=(33,), vocab=97, prefill=13)
# The rehearsal pretends to an L2 of this many bytes, with rings of at most REHEARSAL_RING_MAX sets, so that the
# ring code runs (rings of 2 or 3 sets) at the interpreter's speed.
REHEARSAL_L2, REHEARSAL_RING_MAX = 1024, 3


@dataclass(frozen=True)
class Features:
    """What the card offers the sections: FP8 weights (sm_89+), and Liger-Kernel (None, or why not)."""

    fp8: bool
    liger_missing: str | None


# ----------------------------------------------------------------------------------------------
# setup, timing and checking
# ----------------------------------------------------------------------------------------------
class Bench:
    """Where and how the sections run: sizes, device, dtype, rings, the kernels, the copy ceiling."""

    def __init__(self, sizes: Sizes, device: str, dtype: str, l2_bytes: int | None, ring_max: int,
                 features: Features) -> None:
        import torch

        self.torch = torch
        self.S = sizes
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.l2_bytes = l2_bytes
        self.ring_max = ring_max
        self.features = features
        self.copy_gbs: float | None = None
        import_fastsolar("bench/kernel_bench.py")
        names = ("rms_norm", "rotary", "swiglu", "attention", "decode_attention", "gemv", "quant_matmul")
        self.K = types.SimpleNamespace(**{n: importlib.import_module(f"fastsolar.kernels.{n}") for n in names})

    def timed(self, make: Callable[[], Callable[[], Any]], nbytes: int) -> dict[str, Any]:
        """Time `make()`'s call (each make() builds the call on fresh inputs) over a ring of input sets holding more
        than 3x the L2: us, spread_pct, gbs, pct_copy, ring, ring_MB and from ("HBM", or "L2" for a capped ring)."""
        n = ring_size(nbytes, self.l2_bytes, self.ring_max)
        fns = [make() for _ in range(n)]
        if self.device == "cuda":
            ms, spread = graph_ring_ms(fns)
        else:
            ms, spread = host_ms(lambda: [f() for f in fns], warmup=1, samples=1, repeats=1)
            ms /= n
        gbs = nbytes / ms / 1e6
        return {"us": ms * 1e3, "ms": ms, "spread_pct": spread, "gbs": gbs, "pct_copy": self.pct_copy(gbs),
                "ring": n, "ring_MB": round(n * nbytes / 1e6, 3),
                "from": "HBM" if from_memory(n, nbytes, self.l2_bytes) else "L2"}

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
    """A failed case's check: "ERROR ...", or "skipped: <why>" where the Triton interpreter of this environment
    cannot run loop kernels at all (triton < 3.7 with numpy >= 2.4: fastsolar.versions), which says nothing of
    the kernel."""
    conflict = _interpreter_conflict()
    if conflict and _raised_by_conflict(e):
        return f"skipped: {conflict}"
    return f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _interpreter_conflict() -> str | None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return importlib.import_module("fastsolar.versions").interpreter_numpy_conflict()


def _raised_by_conflict(e: BaseException | None) -> bool:
    needle = importlib.import_module("fastsolar.versions").INTERPRETER_NUMPY_ERROR
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if needle in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# ----------------------------------------------------------------------------------------------
# the plan: every row a run produces, counted without running
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row a section yields: its key, implementation, how many timed rings and cold compiles it costs, the
    kernel launches of one call, the bytes one call must move and its FLOPs."""

    section: str
    key: tuple
    impl: str
    timings: int
    compiles: int
    launches: int
    nbytes: int
    flops: float = 0.0


#: The fields that identify a row of each section (with its implementation).
KEYS = {"gemv": ("shape", "weight", "batch"), "decode": ("batch", "cached"), "rotary_cache": ("batch",),
        "attention": ("seq",), "memory_ops": ("op", "tokens"), "quant_gemm": ("shape", "weight")}
# Kernel launches of one call of each baseline (torch eager ops count one launch each), for the estimate.
TORCH_LAUNCHES = {"rms_norm": 6, "add_rms_norm": 7, "apply_rotary": 14, "swiglu": 3}
SEPARATE_ROTARY_LAUNCHES = 16  # apply_rotary + two index_put (with their index arithmetic)


def row_id(section: str, row: dict) -> tuple:
    """A produced row's identity, comparable with Row: (section, key, implementation; SDPA's variant as 'sdpa')."""
    impl = "sdpa" if str(row["impl"]).startswith("sdpa") else row["impl"]
    return section, tuple(row[k] for k in KEYS[section]), impl


def _gemv_shapes(S: Sizes) -> dict[str, tuple[int, int, str, bool]]:
    """name: (N, K, prologue, residual) for every decode product of a layer, and the lm_head."""
    return {
        "qkv (rmsnorm)": ((S.n_heads + 2 * S.n_kv) * S.head_dim, S.hidden, "norm", False),
        "o (+residual)": (S.hidden, S.n_heads * S.head_dim, "plain", True),
        "gate_up (rmsnorm)": (2 * S.inter, S.hidden, "norm", False),
        "down (swiglu, +residual)": (S.hidden, S.inter, "swiglu", True),
        "lm_head (rmsnorm)": (S.vocab, S.hidden, "norm", False),
    }


def _weight_dtypes(dtype: str, f: Features) -> list[str]:
    """The activation dtype's weights, int8, FP8 where the card converts it (sm_89+; any CPU), and int4."""
    return [dtype, "int8"] + (["float8_e4m3fn"] if f.fp8 else []) + ["int4"]


def _itemsize(dtype: str) -> int:
    return 1 if dtype in ("int8", "float8_e4m3fn") else 4 if dtype == "float32" else 2


def _weight_bytes(n: int, k: int, wdtype: str) -> int:
    """A weight's bytes as the kernels read them: with its fp32 per-channel scale (8-bit), or packed int4 with an
    fp16 scale and a uint8 zero per group of INT4_GROUP."""
    if wdtype == "int4":
        return n * k // 2 + n * -(-k // INT4_GROUP) * 3
    return n * k * _itemsize(wdtype) + (4 * n if _itemsize(wdtype) == 1 else 0)


def _weight(b: Bench, n: int, k: int, wdtype: str):
    """(weight [n, k] in `wdtype`, the kernels' quantisation arguments: {} / {"scale"} / int4's {"scale", "zeros",
    "group_size"}), quantised as fastsolar does (fastsolar.model.quant: per-channel absmax; int4 per group of 128)."""
    torch = b.torch
    w = b.randn(n, k, scale=k ** -0.5, dtype=torch.float32)
    quant = importlib.import_module("fastsolar.model.quant")
    if wdtype == "int4":
        q, scale, zeros = quant.quantize_weight_int4(w)
        return q, {"scale": scale, "zeros": zeros, "group_size": INT4_GROUP}
    if wdtype in ("int8", "float8_e4m3fn"):
        q, scale = quant.quantize_weight(w, quant.MODE_OF_DTYPE[getattr(torch, wdtype)])
        return q, {"scale": scale}
    return w.to(getattr(torch, wdtype)), {}


def _quant_args(kw: dict) -> dict:
    """The quantisation arguments among a gemv case's keyword arguments."""
    return {a: kw[a] for a in ("scale", "zeros", "group_size") if a in kw}


def _gemv_bytes(n: int, k: int, prologue: str, residual: bool, m: int, wdtype: str, e: int) -> int:
    return _weight_bytes(n, k, wdtype) + m * (2 * k if prologue == "swiglu" else k) * e + m * n * e * (2 if residual else 1)


def _plan_gemv(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    e = _itemsize(dtype)
    for name, (n, k, prologue, residual) in _gemv_shapes(S).items():
        for wdtype in _weight_dtypes(dtype, f):
            for m in S.batches:
                nbytes = _gemv_bytes(n, k, prologue, residual, m, wdtype, e)
                widen = 0 if wdtype == dtype else 1  # cuBLAS needs a quantised weight widened first
                # the triton row also runs gemv_choice's pick: both candidates timed once more
                yield Row("gemv", (name, wdtype, m), "triton", 3, 1, 1, nbytes, 2.0 * m * n * k)
                yield Row("gemv", (name, wdtype, m), "cublas", 1, 0, 2 + widen + (prologue == "swiglu") + residual,
                          nbytes, 2.0 * m * n * k)


def _decode_bytes(S: Sizes, bs: int, L: int, e: int) -> int:
    return 2 * bs * L * S.n_kv * S.head_dim * e + 2 * bs * S.n_heads * S.head_dim * e


def _plan_decode(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    for bs in S.batches:
        for L in S.cached:
            nbytes = _decode_bytes(S, bs, L, _itemsize(dtype))
            flops = 4.0 * bs * S.n_heads * L * S.head_dim
            yield Row("decode", (bs, L), "triton", 1, 1, 1, nbytes, flops)
            yield Row("decode", (bs, L), "sdpa", 2, 0, 2, nbytes, flops)


def _rotary_cache_bytes(S: Sizes, bs: int, e: int) -> int:
    return bs * (2 * S.n_heads + 4 * S.n_kv) * S.head_dim * e


def _plan_rotary_cache(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    for bs in S.batches:
        nbytes = _rotary_cache_bytes(S, bs, _itemsize(dtype))
        yield Row("rotary_cache", (bs,), "fused (1 launch)", 1, 1, 1, nbytes)
        yield Row("rotary_cache", (bs,), "rotary + 2 index_put (3 launches)", 1, 0, SEPARATE_ROTARY_LAUNCHES, nbytes)


def _attention_bytes(S: Sizes, s: int, e: int) -> int:
    return 2 * s * (S.n_heads + S.n_kv) * S.head_dim * e


def _plan_attention(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    for s in S.seqs:
        nbytes, flops = _attention_bytes(S, s, _itemsize(dtype)), 4.0 * S.n_heads * s * s * S.head_dim / 2
        yield Row("attention", (s,), "triton", 1, 1, 1, nbytes, flops)
        yield Row("attention", (s,), "sdpa", 2, 0, 1, nbytes, flops)


LIGER_OPS = {"rms_norm", "apply_rotary", "swiglu"}  # the ops Liger-Kernel has a forward for


def _mem_bytes(S: Sizes, op: str, T: int, e: int) -> int:
    qk = T * (S.n_heads + S.n_kv) * S.head_dim
    return {"rms_norm": (2 * T * S.hidden + S.hidden) * e, "add_rms_norm": (4 * T * S.hidden + S.hidden) * e,
            "apply_rotary": 2 * qk * e + T * 8 + S.head_dim // 2 * 4, "swiglu": 3 * T * S.inter * e}[op]


def _plan_memory_ops(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    for T in S.tokens:
        for op in ("rms_norm", "add_rms_norm", "apply_rotary", "swiglu"):
            nbytes = _mem_bytes(S, op, T, _itemsize(dtype))
            yield Row("memory_ops", (op, T), "triton", 1, 1, 1, nbytes)
            yield Row("memory_ops", (op, T), "torch", 1, 0, TORCH_LAUNCHES[op], nbytes)
            if op in LIGER_OPS:
                live = f.liger_missing is None
                yield Row("memory_ops", (op, T), "liger", int(live), int(live), int(live), nbytes)


def _plan_quant_gemm(S: Sizes, dtype: str, f: Features) -> Iterator[Row]:
    e = _itemsize(dtype)
    for name, (n, k, _, _) in _gemv_shapes(S).items():
        if name.startswith("lm_head"):  # a prefill's lm_head sees only each prompt's last row: a GEMV, not this
            continue
        for wdtype in _weight_dtypes(dtype, f)[1:]:
            nbytes = _weight_bytes(n, k, wdtype) + S.prefill * (k + n) * e
            flops = 2.0 * S.prefill * n * k
            yield Row("quant_gemm", (name.split(" (")[0], wdtype), "triton", 1, 1, 1, nbytes, flops)
            yield Row("quant_gemm", (name.split(" (")[0], wdtype), "cublas", 1, 0, 2, nbytes, flops)


PLANS: dict[str, Callable[[Sizes, str, Features], Iterator[Row]]] = {
    "gemv": _plan_gemv, "decode": _plan_decode, "rotary_cache": _plan_rotary_cache, "attention": _plan_attention,
    "memory_ops": _plan_memory_ops, "quant_gemm": _plan_quant_gemm}


def plan(sizes: Sizes, dtype: str, features: Features, sections: list[str] | None = None) -> list[Row]:
    """Every row a run of `sections` (default all, in SECTIONS order) yields, in order, counted without running."""
    return [r for name in sections or list(SECTIONS) for r in PLANS[name](sizes, dtype, features)]


def liger_missing(device: str) -> str | None:
    """None when Liger-Kernel's forward kernels can run here, else why not."""
    if device != "cuda":
        return "Liger-Kernel runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (bench/gpu_check.sh installs bench/wheels/liger_kernel-*.whl)"
    try:
        importlib.import_module("liger_kernel.ops.rms_norm")
    except Exception as e:  # noqa: BLE001 - any import failure: the peer rows say why, the rest still run
        return f"liger_kernel does not import: {type(e).__name__}: {e}"
    return None


def features_of(device: str) -> Features:
    import torch

    fp8 = device != "cuda" or torch.cuda.get_device_capability() >= (8, 9)
    return Features(fp8=fp8, liger_missing=liger_missing(device))


# ----------------------------------------------------------------------------------------------
# the sections: generators of result rows, in the order their PLANS entry lists them
# ----------------------------------------------------------------------------------------------
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
    dtype = str(b.dtype).replace("torch.", "")
    for name, (n, k, prologue, residual) in _gemv_shapes(b.S).items():
        for wdtype in _weight_dtypes(dtype, b.features):
            for m in b.S.batches:
                row = {"op": "gemv", "shape": name, "batch": m, "weight": wdtype, "N": n, "K": k}
                nbytes = _gemv_bytes(n, k, prologue, residual, m, wdtype, _itemsize(dtype))
                try:
                    x, w, kw = _gemv_case(b, n, k, prologue, residual, m, wdtype)
                    y = G.gemv(x, w, out=b.poisoned(torch.empty(m, 1, n, dtype=x.dtype, device=b.device)), **kw)
                    kw32 = {a: (v.float() if isinstance(v, torch.Tensor) and a in ("norm_weight", "residual") else v)
                            for a, v in kw.items()}
                    status = _check([rel_err(y, G.gemv_ref(x.float(), w, **kw32))])
                    picked = _gemv_pick(ops, choice, x, w, kw)
                    del x, w, kw, y
                except Exception as e:  # noqa: BLE001 - recorded in the rows; the other cases still run
                    yield {**row, "impl": "triton", "check": _error(e)}
                    yield {**row, "impl": "cublas", "check": _error(e)}
                    continue

                def fused():
                    x, w, kw = _gemv_case(b, n, k, prologue, residual, m, wdtype)
                    return lambda: G.gemv(x, w, **kw)

                def unfused():
                    x, w, kw = _gemv_case(b, n, k, prologue, residual, m, wdtype)
                    return lambda: _gemv_unfused(b, ops, x, w, kw)

                for impl, make in (("triton", fused), ("cublas", unfused)):
                    try:
                        t = b.timed(make, nbytes)
                    except Exception as e:  # noqa: BLE001
                        yield {**row, "impl": impl, "check": _error(e)}
                        continue
                    yield {**row, "impl": impl, "bytes": nbytes, **t, "picked": picked,
                           "check": status if impl == "triton" else ""}
                b.empty_cache()


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
        F.scaled_dot_product_attention(qt[:, :, :1], kt[:, :, :1], vt[:, :, :1], is_causal=causal, enable_gqa=True)
        out["sdpa(enable_gqa)"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        pass
    return out


def _best_sdpa(b: Bench, build: Callable[[], tuple], causal: bool, nbytes: int) -> dict[str, Any]:
    """The faster SDPA variant over rings of `build()` inputs (q, k, v): its timing and name as `impl`."""
    best: dict[str, Any] | None = None
    for name in _sdpa_variants(*build(), causal=causal):
        t = b.timed(lambda: _sdpa_variants(*build(), causal=causal)[name], nbytes)
        if best is None or t["ms"] < best["ms"]:
            best = {**t, "impl": name}
    return best


def decode(b: Bench) -> Iterator[dict]:
    """decode_attention µs (one query token per row, L cached tokens in a max_seq-slot cache) vs SDPA over the
    first L cache slots; GB/s counts the K/V bytes read (b * L * kv * d * 2 tensors * element size)."""
    torch, K, S = b.torch, b.K, b.S
    e = torch.empty((), dtype=b.dtype).element_size()
    for bs in S.batches:
        for L in S.cached:
            nbytes = _decode_bytes(S, bs, L, e)
            row = {"op": "decode_attention", "batch": bs, "cached": L, "bytes": nbytes}

            def build():
                q = b.randn(bs, S.n_heads, S.head_dim)
                kc = b.randn(bs, S.max_seq, S.n_kv, S.head_dim)
                vc = b.randn(bs, S.max_seq, S.n_kv, S.head_dim)
                return q, kc, vc, torch.full((bs,), L, dtype=torch.int32, device=b.device)

            try:
                q, kc, vc, seqlens = build()
                out = K.decode_attention.decode_attention(q, kc, vc, seqlens, out=b.poisoned(q))
                ref = K.decode_attention.decode_attention_ref(q.float(), kc.float(), vc.float(), seqlens)
                status = _check([rel_err(out, ref)])
                del q, kc, vc, out, ref

                def kernel():
                    q, kc, vc, seqlens = build()
                    return lambda: K.decode_attention.decode_attention(q, kc, vc, seqlens)

                yield {**row, "impl": "triton", **b.timed(kernel, nbytes), "check": status}
            except Exception as e:  # noqa: BLE001
                yield {**row, "impl": "triton", "check": _error(e)}

            def sdpa_inputs():
                q, kc, vc, _ = build()
                return q[:, None], kc[:, :L], vc[:, :L]

            yield {**row, **_best_sdpa(b, sdpa_inputs, False, nbytes), "check": ""}
            b.empty_cache()


def rotary_cache(b: Bench) -> Iterator[dict]:
    """One decode step's rotary + KV-cache write for one layer: the fused kernel (one launch) against what it
    replaced (apply_rotary, then two indexed copies into the cache), at per-row positions through a row map.
    GB/s counts q, k, v read, rotated q and the k/v slots written. The ring rotates q/k/v and the positions
    (so each call writes other cache lines); the caches are shared."""
    torch, K, S = b.torch, b.K, b.S
    for bs in S.batches:
        row = {"op": "rotary_cache_write", "batch": bs}
        kc, vc = b.randn(bs + 3, S.max_seq, S.n_kv, S.head_dim), b.randn(bs + 3, S.max_seq, S.n_kv, S.head_dim)
        rows_map = torch.arange(bs, device=b.device).flip(0) + 2
        r = rows_map.long()
        nbytes = _rotary_cache_bytes(S, bs, kc.element_size())

        def build():
            qkv = b.randn(bs, 1, S.n_heads + 2 * S.n_kv, S.head_dim)
            q, k, v = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
            return q, k, v, torch.randint(0, S.max_seq, (bs, 1), device=b.device)

        try:
            q, k, v, pos = build()
            qo = K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map, q_out=b.poisoned(q.contiguous()))
            kc_ref, vc_ref = kc.float(), vc.float()
            q_ref = K.rotary.rotary_cache_write_ref(q.float(), k.float(), v.float(), pos, THETA, kc_ref, vc_ref,
                                                    rows=rows_map)
            status = _check([rel_err(qo, q_ref), rel_err(kc[r, pos[:, 0]], kc_ref[r, pos[:, 0]]),
                             rel_err(vc[r, pos[:, 0]], vc_ref[r, pos[:, 0]])])
            del kc_ref, vc_ref
        except Exception as e:  # noqa: BLE001
            yield {**row, "impl": "fused (1 launch)", "check": _error(e)}
            yield {**row, "impl": "rotary + 2 index_put (3 launches)", "check": _error(e)}
            continue

        def fused():
            q, k, v, pos = build()
            return lambda: K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map)

        def separate():
            q, k, v, pos = build()

            def call():
                qr, kr = K.rotary.apply_rotary(q, k, pos, THETA)
                kc[r, pos[:, 0]] = kr[:, 0]
                vc[r, pos[:, 0]] = v[:, 0]
                return qr
            return call

        for impl, make in (("fused (1 launch)", fused), ("rotary + 2 index_put (3 launches)", separate)):
            yield {**row, "impl": impl, "bytes": nbytes, **b.timed(make, nbytes),
                   "check": status if impl.startswith("fused") else ""}
        b.empty_cache()


def attention(b: Bench) -> Iterator[dict]:
    """Prefill attention TFLOP/s (causal FLOPs 4*b*h*s*s*d/2) for the kernel and the faster SDPA."""
    K, S = b.K, b.S
    for s in S.seqs:
        flops = 4 * 1 * S.n_heads * s * s * S.head_dim / 2
        nbytes = _attention_bytes(S, s, b.torch.empty((), dtype=b.dtype).element_size())

        def build():
            qkv = b.randn(1, s, S.n_heads + 2 * S.n_kv, S.head_dim)
            q, k, v = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
            return q.contiguous(), k.contiguous(), v  # as apply_rotary hands them over; v stays a qkv view

        try:
            q, k, v = build()
            out = K.attention.attention(q, k, v, causal=True, out=b.poisoned(q))
            status = _check([rel_err(out, K.attention.attention_ref(q.float(), k.float(), v.float(), causal=True))])
            del q, k, v, out

            def kernel():
                q, k, v = build()
                return lambda: K.attention.attention(q, k, v, causal=True)

            t = b.timed(kernel, nbytes)
            yield {"op": "attention", "seq": s, "impl": "triton", **t, "tflops": flops / t["ms"] / 1e9, "check": status}
        except Exception as e:  # noqa: BLE001
            yield {"op": "attention", "seq": s, "impl": "triton", "check": _error(e)}
        t = _best_sdpa(b, build, True, nbytes)
        yield {"op": "attention", "seq": s, **t, "tflops": flops / t["ms"] / 1e9, "check": ""}
        b.empty_cache()


def _mem_inputs(b: Bench, T: int) -> dict[str, Any]:
    torch, S = b.torch, b.S
    qkv = b.randn(1, T, S.n_heads + 2 * S.n_kv, S.head_dim)
    q, k, _ = qkv.split([S.n_heads, S.n_kv, S.n_kv], dim=2)
    gate, up = b.randn(T, 2 * S.inter).split(S.inter, dim=-1)
    return {"x": b.randn(T, S.hidden), "res": b.randn(T, S.hidden), "w": b.randn(S.hidden, scale=0.1) + 1.0,
            "q": q, "k": k, "pos": torch.arange(T, device=b.device)[None] + 7, "gate": gate, "up": up}


def _mem_calls(b: Bench, op: str) -> dict[str, Callable[[dict], Callable[[], Any]]]:
    """impl -> (inputs -> the call) for one memory-bound op: triton, torch, and liger where Liger has the op."""
    K = b.K
    calls = {
        "rms_norm": {"triton": lambda i: lambda: K.rms_norm.rms_norm(i["x"], i["w"], EPS),
                     "torch": lambda i: lambda: K.rms_norm.rms_norm_ref(i["x"], i["w"], EPS)},
        "add_rms_norm": {"triton": lambda i: lambda: K.rms_norm.add_rms_norm(i["x"], i["res"], i["w"], EPS),
                         "torch": lambda i: lambda: K.rms_norm.add_rms_norm_ref(i["x"], i["res"], i["w"], EPS)},
        "apply_rotary": {"triton": lambda i: lambda: K.rotary.apply_rotary(i["q"], i["k"], i["pos"], THETA),
                         "torch": lambda i: lambda: K.rotary.apply_rotary_ref(i["q"], i["k"], i["pos"], THETA)},
        "swiglu": {"triton": lambda i: lambda: K.swiglu.swiglu(i["gate"], i["up"]),
                   "torch": lambda i: lambda: K.swiglu.swiglu_ref(i["gate"], i["up"])},
    }[op]
    if op in LIGER_OPS:
        calls["liger"] = lambda i: _liger_call(b, op, i)
    return calls


def _liger_call(b: Bench, op: str, i: dict) -> Callable[[], Any]:
    """Liger-Kernel's forward for `op` on inputs laid out as transformers hands them to it (contiguous gate and up;
    q/k as [b, h, s, d] views of contiguous [b, s, h, d]; cos/sin computed once per forward, outside the call)."""
    torch = b.torch
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import rms_norm_forward

        return lambda: rms_norm_forward(i["x"], i["w"], EPS, 0.0, "llama", None)[0]
    if op == "swiglu":
        from liger_kernel.ops.swiglu import swiglu_forward

        gate, up = i["gate"].contiguous(), i["up"].contiguous()
        return lambda: swiglu_forward(gate, up)[2]
    from liger_kernel.ops.rope import rope_forward

    q, k = i["q"].contiguous().transpose(1, 2), i["k"].contiguous().transpose(1, 2)
    inv = 1.0 / (THETA ** (torch.arange(0, b.S.head_dim, 2, device=b.device, dtype=torch.float32) / b.S.head_dim))
    freqs = i["pos"][0].float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None].to(b.dtype), emb.sin()[None].to(b.dtype)
    return lambda: rope_forward(q, k, cos, sin)[:2]  # rotates q and k in place, as Liger's forward does


def _mem_check(b: Bench, op: str, impl: str, i: dict) -> str:
    """The relative error of one implementation of `op` against its fp32 reference, as a check string."""
    K = b.K
    x32, res32, w32 = i["x"].float(), i["res"].float(), i["w"].float()
    if op == "rms_norm":
        out = _mem_calls(b, op)[impl](i)() if impl != "triton" else K.rms_norm.rms_norm(i["x"], i["w"], EPS,
                                                                                        out=b.poisoned(i["x"]))
        return _check([rel_err(out, K.rms_norm.rms_norm_ref(x32, w32, EPS))])
    if op == "add_rms_norm":
        y, h = K.rms_norm.add_rms_norm(i["x"], i["res"], i["w"], EPS, out=b.poisoned(i["x"]), out_h=b.poisoned(i["x"]))
        y_ref, h_ref = K.rms_norm.add_rms_norm_ref(x32, res32, w32, EPS)
        return _check([rel_err(y, y_ref), rel_err(h, h_ref)])
    if op == "apply_rotary":
        qr, kr = K.rotary.apply_rotary_ref(i["q"].float(), i["k"].float(), i["pos"], THETA)
        if impl == "triton":
            qo, ko = K.rotary.apply_rotary(i["q"], i["k"], i["pos"], THETA, q_out=b.poisoned(i["q"].contiguous()),
                                           k_out=b.poisoned(i["k"].contiguous()))
        else:
            qo, ko = (t.transpose(1, 2) for t in _liger_call(b, op, i)())
        return _check([rel_err(qo, qr), rel_err(ko, kr)])
    ref = K.swiglu.swiglu_ref(i["gate"].float(), i["up"].float())
    out = (K.swiglu.swiglu(i["gate"], i["up"], out=b.poisoned(i["gate"].contiguous())) if impl == "triton"
           else _mem_calls(b, op)[impl](i)())
    return _check([rel_err(out, ref)])


def memory_ops(b: Bench) -> Iterator[dict]:
    """GB/s of the memory-bound ops (kernel, torch eager, Liger where it runs) per token count; % of copy."""
    e = b.torch.empty((), dtype=b.dtype).element_size()
    for T in b.S.tokens:
        for op in ("rms_norm", "add_rms_norm", "apply_rotary", "swiglu"):
            nbytes = _mem_bytes(b.S, op, T, e)
            row = {"op": op, "tokens": T, "bytes": nbytes}
            try:
                status = _mem_check(b, op, "triton", _mem_inputs(b, T))
            except Exception as e_:  # noqa: BLE001 - recorded in the row; the other cases still run
                status = _error(e_)
            for impl, call in _mem_calls(b, op).items():
                if impl == "liger" and b.features.liger_missing:
                    yield {**row, "impl": impl, "check": f"skipped: {b.features.liger_missing}"}
                    continue
                if impl == "triton" and status.startswith("ERROR"):
                    yield {**row, "impl": impl, "check": status}
                    continue
                try:
                    check = {"triton": status, "liger": None}.get(impl, "")
                    if check is None:
                        check = _mem_check(b, op, impl, _mem_inputs(b, T))
                    yield {**row, "impl": impl, **b.timed(lambda: call(_mem_inputs(b, T)), nbytes), "check": check}
                except Exception as e_:  # noqa: BLE001
                    yield {**row, "impl": impl, "check": _error(e_)}
            b.empty_cache()


def quant_gemm(b: Bench) -> Iterator[dict]:
    """A layer's prefill products (S.prefill tokens) with int8 / FP8 / int4 weights: kernels/quant_matmul.py against
    cuBLAS on the weight widened to the activations' dtype with its scale (fastsolar.ops' route without the
    kernel), ms and TFLOP/s (2*M*N*K); checked against gemv_ref (dequantise, then matmul) in fp32."""
    torch, S = b.torch, b.S
    ops = importlib.import_module("fastsolar.ops")
    dtype = str(b.dtype).replace("torch.", "")
    e = _itemsize(dtype)
    for name, (n, k, _, _) in _gemv_shapes(S).items():
        if name.startswith("lm_head"):  # a prefill's lm_head sees only each prompt's last row: a GEMV, not this
            continue
        for wdtype in _weight_dtypes(dtype, b.features)[1:]:  # the quantised ones
            nbytes = _weight_bytes(n, k, wdtype) + S.prefill * (k + n) * e
            row = {"op": "quant_gemm", "shape": name.split(" (")[0], "tokens": S.prefill, "weight": wdtype, "N": n,
                   "K": k, "bytes": nbytes}
            flops = 2 * S.prefill * n * k

            def build():
                return (b.randn(S.prefill, k), *_weight(b, n, k, wdtype))

            try:
                x, w, qkw = build()
                y = b.K.quant_matmul.quant_matmul(x, w, out=b.poisoned(torch.empty(S.prefill, n, dtype=x.dtype,
                                                                                   device=b.device)), **qkw)
                status = _check([rel_err(y, b.K.gemv.gemv_ref(x.float(), w, **qkw))])
                del x, w, qkw, y
            except Exception as e_:  # noqa: BLE001 - recorded in the rows; the other cases still run
                yield {**row, "impl": "triton", "check": _error(e_)}
                yield {**row, "impl": "cublas", "check": _error(e_)}
                continue

            def kernel():
                x, w, qkw = build()
                return lambda: b.K.quant_matmul.quant_matmul(x, w, **qkw)

            def widened():
                x, w, qkw = build()
                return lambda: ops._cublas(x, w, **qkw)

            for impl, make in (("triton", kernel), ("cublas", widened)):
                try:
                    t = b.timed(make, nbytes)
                except Exception as e_:  # noqa: BLE001
                    yield {**row, "impl": impl, "check": _error(e_)}
                    continue
                yield {**row, "impl": impl, **t, "tflops": flops / t["ms"] / 1e9,
                       "check": status if impl == "triton" else ""}
            b.empty_cache()


#: The benchmark sections, in run order (the decode path first): name -> generator of row dicts. Add a kernel's
#: benchmark here and its row list in PLANS.
SECTIONS: dict[str, Callable[[Bench], Iterator[dict]]] = {"gemv": gemv, "decode": decode, "rotary_cache": rotary_cache,
                                                           "attention": attention, "memory_ops": memory_ops,
                                                           "quant_gemm": quant_gemm}


def run(sizes: Sizes, *, device: str = "cuda", dtype: str = "bfloat16", copy_gib: float = 1.0,
        sections: list[str] | None = None, l2_bytes: int | None = None, ring_max: int | None = None,
        on_row: Callable[[dict, str, dict], None] | None = None) -> dict:
    """Everything, in one dict (what --json writes); `on_row(result, section, row)` after every row. `l2_bytes`
    defaults to the card's L2 (None on a CPU), `ring_max` to common.RING_MAX."""
    import torch

    torch.manual_seed(0)
    info = device_info(device)
    if l2_bytes is None and info.get("l2_mib"):
        l2_bytes = int(info["l2_mib"] * 2**20)
    features = features_of(device)
    b = Bench(sizes, device, dtype, l2_bytes, ring_max or RING_MAX, features)
    res: dict[str, Any] = {"complete": False, "device": info, "dtype": dtype, "sizes": asdict(sizes),
                           "timing": {"method": "CUDA-graph replay over a ring > 3x L2" if device == "cuda"
                                      else "host clock", "l2_bytes": l2_bytes, "ring_max": b.ring_max},
                           "features": asdict(features), "copy": None,
                           "plan": [asdict(r) for r in plan(sizes, dtype, features, sections)]}
    res["copy"] = copy_bandwidth(device, copy_gib)
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


def _from(*rows: dict) -> str:
    """Where a row's data came from: "HBM" (a ring > 3x L2) or "L2" (a ring that hit its cap), with the ring."""
    for r in rows:
        if r.get("from"):
            return f"{r['from']} ({r['ring']} x {r['ring_MB'] / r['ring']:.3g} MB)"
    return ""


def _spread(t: dict, e: dict) -> str:
    vals = [r["spread_pct"] for r in (t, e) if r.get("spread_pct") is not None]
    return f"{max(vals):.1f}%" if vals else "n/a"


def _memory_table(rows: list[dict], res: dict) -> str:
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["op"], r["tokens"]), {})[r["impl"]] = r
    table = []
    for (op, T), d in by.items():
        t, e, lg = d.get("triton", {}), d.get("torch", {}), d.get("liger")
        nbytes = (t or e).get("bytes")
        peer = "" if lg is None else (lg.get("check") if "us" not in lg else
                                      f"{lg['us']:.1f} µs, {_f(lg.get('gbs'), '.0f')} GB/s ({lg.get('check')})")
        table.append([op, T, _f(nbytes / 1e6 if nbytes else None, ".2f"), _f(t.get("us"), ".1f"),
                      _f(t.get("gbs"), ".0f"), _pct(t.get("pct_copy")), _f(e.get("us"), ".1f"), _f(e.get("gbs"), ".0f"),
                      _pct(e.get("pct_copy")), _speedup(t, e, "us"), peer, _spread(t, e), _from(t, e),
                      t.get("check", "")])
    return ("Memory-bound ops (GB/s = fewest bytes / time; Liger-Kernel's forward as a same-run peer):\n\n"
            + markdown_table(["op", "tokens", "MB", "triton µs", "GB/s", "% copy", "torch µs", "GB/s", "% copy",
                              "speedup", "liger", "spread", "from (ring)", "check"], table))


def _attention_table(rows: list[dict], res: dict) -> str:
    S = res["sizes"]
    table = []
    for (s,), (t, e) in _pairs(rows, lambda r: (r["seq"],)).items():
        table.append([s, _f(t.get("ms"), ".3f"), _f(t.get("tflops"), ".0f"), _f(e.get("ms"), ".3f"),
                      _f(e.get("tflops"), ".0f"), e.get("impl", ""), _speedup(t, e, "ms"), _spread(t, e),
                      _from(t, e), t.get("check", "")])
    return (f"Prefill attention (batch 1, {S['n_heads']}/{S['n_kv']} heads, d {S['head_dim']}, causal; "
            "FLOPs 4*h*s*s*d/2):\n\n"
            + markdown_table(["seq", "triton ms", "TFLOP/s", "sdpa ms", "TFLOP/s", "sdpa variant", "speedup", "spread",
                              "from (ring)", "check"], table))


def _decode_table(rows: list[dict], res: dict) -> str:
    table = []
    for (bs, L), (t, e) in _pairs(rows, lambda r: (r["batch"], r["cached"])).items():
        table.append([bs, L, _f(t.get("us"), ".1f"), _f(t.get("gbs"), ".0f"), _pct(t.get("pct_copy")),
                      _f(e.get("us"), ".1f"), _f(e.get("gbs"), ".0f"), e.get("impl", ""), _speedup(t, e, "us"),
                      _spread(t, e), _from(t, e), t.get("check", "")])
    return (f"Decode attention ({res['sizes']['max_seq']}-slot cache, GB/s of K/V read):\n\n"
            + markdown_table(["batch", "cached", "triton µs", "GB/s", "% copy", "sdpa µs", "GB/s", "sdpa variant",
                              "speedup", "spread", "from (ring)", "check"], table))


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
                      t.get("picked", ""), _spread(t, c), _from(t, c), t.get("check", "")])
    return ("Decode GEMVs (one launch, norm/SwiGLU/residual fused) vs cuBLAS + separate kernels; GB/s = weights "
            "once + activations / time; `picked` = what fastsolar.ops.gemv_choice chose timing the same inputs:\n\n"
            + markdown_table(["product", "batch", "weights", "triton µs", "GB/s", "% copy", "cublas µs", "GB/s",
                              "% copy", "speedup", "picked", "spread", "from (ring)", "check"], table))


def _rotary_cache_table(rows: list[dict], res: dict) -> str:
    table = [[r["batch"], r["impl"], _f(r.get("us"), ".1f"), _f(r.get("gbs"), ".0f"), _pct(r.get("pct_copy")),
              _f(r.get("spread_pct"), ".1f"), _from(r), r.get("check", "")] for r in rows]
    return ("Rotary + KV-cache write of one decode step, one layer (row map, per-row positions):\n\n"
            + markdown_table(["batch", "impl", "µs", "GB/s", "% copy", "spread %", "from (ring)", "check"], table))


def _quant_gemm_table(rows: list[dict], res: dict) -> str:
    table = []
    for (shape, wdt), (t, c) in _pairs(rows, lambda r: (r["shape"], r["weight"])).items():
        tokens = (t or c).get("tokens")
        table.append([shape, tokens, wdt, _f(t.get("ms"), ".3f"), _f(t.get("tflops"), ".0f"), _f(c.get("ms"), ".3f"),
                      _f(c.get("tflops"), ".0f"), _speedup(t, c, "ms"), _spread(t, c), _from(t, c), t.get("check", "")])
    return ("Quantised prefill GEMMs (one byte per weight, tiles dequantised in registers) vs cuBLAS on the weight "
            "widened to bf16 with its scale:\n\n"
            + markdown_table(["product", "tokens", "weights", "triton ms", "TFLOP/s", "widen+cublas ms", "TFLOP/s",
                              "speedup", "spread", "from (ring)", "check"], table))


#: Markdown for each section (sections not listed get _generic_table).
TABLES: dict[str, Callable[[list[dict], dict], str]] = {"memory_ops": _memory_table, "attention": _attention_table,
                                                         "decode": _decode_table, "gemv": _gemv_table,
                                                         "rotary_cache": _rotary_cache_table,
                                                         "quant_gemm": _quant_gemm_table}


def header(res: dict) -> str:
    d, c = res["device"], res.get("copy")
    arch = f"sm_{d['capability'].replace('.', '')}, {d['sms']} SMs, " if d.get("capability") else ""
    if d.get("capability"):
        mode = ("CUDA-graph replay of a lap over a ring of input sets > 3x L2 (every row from memory unless its "
                "'from' says L2)")
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
    for name in [n for n in SECTIONS if n in res] + [n for n in res if n not in SECTIONS and n != "plan"
                                                     and isinstance(res[n], list)]:
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
    ap.add_argument("--tokens", type=_ints, help="token counts for the memory-bound ops (default 16,4096)")
    ap.add_argument("--seqs", type=_ints, help="prefill lengths for attention (default 512,2048,4096)")
    ap.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,8)")
    ap.add_argument("--cached", type=_ints, help="decode cached tokens (default 512,1024,2048,4096)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy-bandwidth buffer in GiB (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one size each")
    ap.add_argument("--rehearse", action="store_true",
                    help="run on the CPU under the Triton interpreter at tiny shapes in float32: checks this script's "
                         "code paths (no GPU needed), measures nothing meaningful")
    args = ap.parse_args(argv)

    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastsolar (and so triton) is imported
        sizes, device, dtype = REHEARSAL, "cpu", "float32"  # bf16 tl.dot is garbage under the interpreter
        rings = {"l2_bytes": REHEARSAL_L2, "ring_max": REHEARSAL_RING_MAX}
        args.copy_gib = min(args.copy_gib, 1 / 64)
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench/kernel_bench.py: no CUDA GPU visible (torch.cuda.is_available() is False); these benchmarks "
                  "need one (--rehearse runs the code paths on a CPU). `--help` lists the options.", file=sys.stderr)
            return 2
        sizes, device, dtype = (QUICK if args.quick else SOLAR), "cuda", "bfloat16"
        rings = {}
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
        res = run(sizes, device=device, dtype=dtype, copy_gib=args.copy_gib, sections=sections, on_row=on_row, **rings)
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

