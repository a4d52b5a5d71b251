"""Microbenchmarks of fastsolar's Triton kernels at SOLAR-10.7B sizes, on one CUDA GPU.

What it measures (all bf16, batch 1 unless said, inputs laid out as fastsolar/model.py lays them out):

* the card's copy bandwidth: a device-to-device copy of a large buffer, GB/s counting bytes read
  plus bytes written. It is the ceiling the memory-bound ops are compared with ("% copy");
* rms_norm, add_rms_norm, apply_rotary, swiglu at 1, 16 and 4096 tokens: time, GB/s (the fewest
  bytes the op must move: each input read once, each output written once) and % of copy, for the
  Triton kernel and for torch eager (the op's *_ref at bf16);
* attention (prefill, causal, 32/8 heads, head_dim 128) at 512, 2048 and 4096 tokens: TFLOP/s
  counting causal FLOPs as 4*b*h*s*s*d/2, against torch's scaled_dot_product_attention;
* decode_attention at batch 1 and 8 with 512..4096 cached tokens in a 4096-slot cache: µs and
  GB/s of K/V read, against SDPA over the cache's first L slots (the padded cache cut to the
  longest row: all rows hold L tokens here).

How: the copy bandwidth is measured first, as the ceiling the memory-bound ops are held against.
Every op is checked for correctness before it is timed: against its torch reference in fp32
(relative L2 error, NaN-poisoned outputs where the op takes `out=`), on fresh random data; then
timed with triton.testing.do_bench (CUDA events, warm-up excluded, L2 flushed before every call,
median of the repeats), twice, keeping the faster median and reporting the spread of the two.
Times include the Python launch path (argument checks, allocation) unless --cuda-graph is given,
which replays a CUDA graph instead (do_bench_cudagraph: no launch gaps, but no L2 flush either).

The SDPA baseline runs two ways, K/V expanded to 32 heads beforehand (so the flash backend is
eligible) and with enable_gqa=True where torch has it; the faster one is reported and named.

Use from another script: `copy_bandwidth()`, `bench_memory_ops()`, `bench_attention()`,
`bench_decode()`, `run()` and `markdown()` are plain functions returning dicts.
(with bench/ on sys.path: it imports its sibling common.py, as `python bench/kernels.py` does).

    python bench/kernels.py                       # full run, markdown tables on stdout
    python bench/kernels.py --json out.json       # also write the numbers, card, date, versions
    python bench/kernels.py --quick               # fewer sizes, shorter timing (smoke test)
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import types

from common import copy_bandwidth as common_copy_bandwidth
from common import device_info, do_bench_ms, import_fastsolar, markdown_table

# SOLAR-10.7B
HIDDEN, N_HEADS, N_KV, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
EPS, THETA = 1e-5, 10000.0
MAX_SEQ = 4096  # SOLAR's context: the decode cache's size

# Only a CPU smoke test of this script's code paths (Triton interpreter) changes these two.
DEVICE = "cuda"
DTYPE = "bfloat16"


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def _kernels() -> types.SimpleNamespace:
    """fastsolar.kernels' submodules (the installed package; see common.import_fastsolar)."""
    import_fastsolar("bench/kernels.py")
    names = ("rms_norm", "rotary", "swiglu", "attention", "decode_attention")
    return types.SimpleNamespace(**{n: importlib.import_module(f"fastsolar.kernels.{n}") for n in names})


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------------------
# timing and checking
# ----------------------------------------------------------------------------------------------
_TIMING = {"warmup": 25, "rep": 100, "graph": False, "repeats": 2}


def time_ms(fn) -> tuple[float, float]:
    """(median ms, spread %) of `fn` under the --warmup/--rep/--repeats/--cuda-graph settings (common.do_bench_ms)."""
    return do_bench_ms(fn, **_TIMING)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere in out gives inf."""
    torch = _torch()
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return math.inf
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))


def _empty_cache():
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _randn(*shape, dtype=None, scale=1.0):
    torch = _torch()
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype or getattr(torch, DTYPE))


def _poisoned(t):
    return _torch().full_like(t, float("nan"))


BF16_TOL = 1e-2  # relative L2 error of bf16 operands against an fp32 reference: 1e-3 .. 1e-2


def _check(errs: list[float]) -> str:
    worst = max(errs)
    return "ok" if worst <= BF16_TOL else f"BAD ({worst:.1e})"


# ----------------------------------------------------------------------------------------------
# the benchmarks
# ----------------------------------------------------------------------------------------------
def copy_bandwidth(gib: float = 1.0) -> dict:
    """Device-to-device copy of a `gib` GiB buffer: GB/s = (bytes read + bytes written) / time (common.py's)."""
    return common_copy_bandwidth(DEVICE, gib, **_TIMING)


def _mem_cases(K, tokens: int):
    """(op, kernel fn, reference fn, fp32 check fn, bytes moved) for one token count."""
    torch = _torch()
    T = tokens
    x, res = _randn(T, HIDDEN), _randn(T, HIDDEN)
    w = _randn(HIDDEN, scale=0.1) + 1.0
    qkv = _randn(1, T, N_HEADS + 2 * N_KV, HEAD_DIM)
    q, k, _ = qkv.split([N_HEADS, N_KV, N_KV], dim=2)
    pos = torch.arange(T, device=DEVICE)[None] + 7
    gate, up = _randn(T, 2 * INTER).split(INTER, dim=-1)
    e = x.element_size()  # 2: bf16

    def check_rms():
        out = K.rms_norm.rms_norm(x, w, EPS, out=_poisoned(x))
        return [rel_err(out, K.rms_norm.rms_norm_ref(x.float(), w.float(), EPS))]

    def check_add():
        y, h = K.rms_norm.add_rms_norm(x, res, w, EPS, out=_poisoned(x), out_h=_poisoned(x))
        y_ref, h_ref = K.rms_norm.add_rms_norm_ref(x.float(), res.float(), w.float(), EPS)
        return [rel_err(y, y_ref), rel_err(h, h_ref)]

    def check_rot():
        qo, ko = K.rotary.apply_rotary(q, k, pos, THETA, q_out=_poisoned(q.contiguous()), k_out=_poisoned(k.contiguous()))
        qr, kr = K.rotary.apply_rotary_ref(q.float(), k.float(), pos, THETA)
        return [rel_err(qo, qr), rel_err(ko, kr)]

    def check_swiglu():
        out = K.swiglu.swiglu(gate, up, out=_poisoned(gate.contiguous()))
        return [rel_err(out, K.swiglu.swiglu_ref(gate.float(), up.float()))]

    qk_elems = T * (N_HEADS + N_KV) * HEAD_DIM
    return [
        ("rms_norm", lambda: K.rms_norm.rms_norm(x, w, EPS), lambda: K.rms_norm.rms_norm_ref(x, w, EPS),
         check_rms, (2 * T * HIDDEN + HIDDEN) * e),
        ("add_rms_norm", lambda: K.rms_norm.add_rms_norm(x, res, w, EPS),
         lambda: K.rms_norm.add_rms_norm_ref(x, res, w, EPS), check_add, (4 * T * HIDDEN + HIDDEN) * e),
        ("apply_rotary", lambda: K.rotary.apply_rotary(q, k, pos, THETA),
         lambda: K.rotary.apply_rotary_ref(q, k, pos, THETA), check_rot,
         2 * qk_elems * e + T * pos.element_size() + HEAD_DIM // 2 * 4),
        ("swiglu", lambda: K.swiglu.swiglu(gate, up), lambda: K.swiglu.swiglu_ref(gate, up),
         check_swiglu, 3 * T * INTER * e),
    ]


def bench_memory_ops(tokens=(1, 16, 4096), copy_gbs: float | None = None, K=None) -> list[dict]:
    """GB/s of the memory-bound ops (kernel and torch eager) per token count; % of `copy_gbs`."""
    K = K or _kernels()
    rows = []
    for T in tokens:
        for op, fn, ref, check, nbytes in _mem_cases(K, T):
            status = _check(check())
            for impl, f in (("triton", fn), ("torch", ref)):
                ms, spread = time_ms(f)
                gbs = nbytes / ms / 1e6
                rows.append({"op": op, "tokens": T, "impl": impl, "bytes": nbytes, "us": ms * 1e3,
                             "spread_pct": spread, "gbs": gbs,
                             "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
                             "check": status if impl == "triton" else ""})
    return rows


def _sdpa_variants(q, k, v, causal: bool):
    """SDPA callables over [b, s, h, d] tensors: expanded K/V, and enable_gqa where available."""
    torch = _torch()
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


def bench_attention(seqs=(512, 2048, 4096), K=None) -> list[dict]:
    """Prefill attention TFLOP/s (causal FLOPs 4*b*h*s*s*d/2) for the kernel and the faster SDPA."""
    K = K or _kernels()
    rows = []
    for s in seqs:
        qkv = _randn(1, s, N_HEADS + 2 * N_KV, HEAD_DIM)
        q, k, v = qkv.split([N_HEADS, N_KV, N_KV], dim=2)
        q, k = q.contiguous(), k.contiguous()  # as apply_rotary hands them over; v stays a qkv view
        flops = 4 * 1 * N_HEADS * s * s * HEAD_DIM / 2
        out = K.attention.attention(q, k, v, causal=True, out=_poisoned(q))
        status = _check([rel_err(out, K.attention.attention_ref(q.float(), k.float(), v.float(), causal=True))])
        ms, spread = time_ms(lambda: K.attention.attention(q, k, v, causal=True))
        rows.append({"op": "attention", "seq": s, "impl": "triton", "ms": ms, "spread_pct": spread,
                     "tflops": flops / ms / 1e9, "check": status})
        best = None
        for name, f in _sdpa_variants(q, k, v, causal=True).items():
            t, sp = time_ms(f)
            if best is None or t < best[1]:
                best = (name, t, sp)
        rows.append({"op": "attention", "seq": s, "impl": best[0], "ms": best[1], "spread_pct": best[2],
                     "tflops": flops / best[1] / 1e9, "check": ""})
        del qkv, q, k, v, out
        _empty_cache()
    return rows


def bench_decode(batches=(1, 8), lens=(512, 1024, 2048, 4096), copy_gbs: float | None = None, K=None) -> list[dict]:
    """decode_attention µs (one query token per row, L cached tokens in a MAX_SEQ-slot cache) vs SDPA
    over the first L cache slots; GB/s counts the K/V bytes read (b * L * kv * d * 2 tensors * 2 B)."""
    torch = _torch()
    K = K or _kernels()
    rows = []
    for b in batches:
        kc = _randn(b, MAX_SEQ, N_KV, HEAD_DIM)
        vc = _randn(b, MAX_SEQ, N_KV, HEAD_DIM)
        for L in lens:
            q = _randn(b, N_HEADS, HEAD_DIM)
            seqlens = torch.full((b,), L, dtype=torch.int32, device=DEVICE)
            nbytes = 2 * b * L * N_KV * HEAD_DIM * 2 + 2 * b * N_HEADS * HEAD_DIM * 2
            out = K.decode_attention.decode_attention(q, kc, vc, seqlens, out=_poisoned(q))
            ref = K.decode_attention.decode_attention_ref(q.float(), kc.float(), vc.float(), seqlens)
            status = _check([rel_err(out, ref)])
            ms, spread = time_ms(lambda: K.decode_attention.decode_attention(q, kc, vc, seqlens))
            rows.append({"op": "decode_attention", "batch": b, "cached": L, "impl": "triton", "us": ms * 1e3,
                         "spread_pct": spread, "gbs": nbytes / ms / 1e6,
                         "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbs if copy_gbs else None, "check": status})
            best = None
            for name, f in _sdpa_variants(q[:, None], kc[:, :L], vc[:, :L], causal=False).items():
                t, sp = time_ms(f)
                if best is None or t < best[1]:
                    best = (name, t, sp)
            rows.append({"op": "decode_attention", "batch": b, "cached": L, "impl": best[0], "us": best[1] * 1e3,
                         "spread_pct": best[2], "gbs": nbytes / best[1] / 1e6,
                         "pct_copy": 100 * nbytes / best[1] / 1e6 / copy_gbs if copy_gbs else None, "check": ""})
        del kc, vc
        _empty_cache()
    return rows


def run(tokens=(1, 16, 4096), seqs=(512, 2048, 4096), batches=(1, 8), lens=(512, 1024, 2048, 4096),
        copy_gib: float = 1.0) -> dict:
    """Everything, in one dict (what --json writes)."""
    torch = _torch()
    torch.manual_seed(0)
    K = _kernels()
    info = device_info(DEVICE)
    copy = copy_bandwidth(copy_gib)
    return {
        "device": info,
        "timing": dict(_TIMING),
        "copy": copy,
        "memory_ops": bench_memory_ops(tokens, copy["gbs"], K),
        "attention": bench_attention(seqs, K),
        "decode": bench_decode(batches, lens, copy["gbs"], K),
    }


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _pct(x):
    return "" if x is None else f"{x:.0f}%"


def markdown(res: dict) -> str:
    d, c = res["device"], res["copy"]
    mode = "CUDA-graph replay" if res["timing"]["graph"] else "do_bench, L2 flushed, launch path included"
    out = [f"**{d['card']}** (sm_{d['capability'].replace('.', '')}, {d['sms']} SMs, {d['memory_gib']} GiB), "
           f"torch {d['torch']}, triton {d['triton']}, CUDA {d['cuda']}, {d['date']}; {mode}; medians.",
           "", f"Copy bandwidth: **{c['gbs']:.0f} GB/s** (read+write of {c['bytes'] / 2**30:.1f} GiB in "
           f"{c['ms']:.3f} ms, spread {c['spread_pct']:.1f}%)", ""]
    # memory ops: one row per (op, tokens), triton and torch side by side
    by = {}
    for r in res["memory_ops"]:
        by.setdefault((r["op"], r["tokens"]), {})[r["impl"]] = r
    rows = []
    for (op, T), m in by.items():
        t, e = m["triton"], m["torch"]
        rows.append([op, T, f"{t['bytes'] / 1e6:.2f}", f"{t['us']:.1f}", f"{t['gbs']:.0f}", _pct(t["pct_copy"]),
                     f"{e['us']:.1f}", f"{e['gbs']:.0f}", _pct(e["pct_copy"]), f"{e['us'] / t['us']:.2f}x",
                     f"{max(t['spread_pct'], e['spread_pct']):.1f}%", t["check"]])
    out += ["Memory-bound ops (bf16; GB/s = fewest bytes / time):", "",
            markdown_table(["op", "tokens", "MB", "triton µs", "GB/s", "% copy", "torch µs", "GB/s", "% copy",
                            "speedup", "spread", "check"], rows), ""]
    att = {}
    for r in res["attention"]:
        att.setdefault(r["seq"], []).append(r)
    rows = []
    for s, (t, e) in att.items():
        rows.append([s, f"{t['ms']:.3f}", f"{t['tflops']:.0f}", f"{e['ms']:.3f}", f"{e['tflops']:.0f}", e["impl"],
                     f"{e['ms'] / t['ms']:.2f}x", f"{max(t['spread_pct'], e['spread_pct']):.1f}%", t["check"]])
    out += ["Prefill attention (bf16, batch 1, 32/8 heads, d 128, causal; FLOPs 4*h*s*s*d/2):", "",
            markdown_table(["seq", "triton ms", "TFLOP/s", "sdpa ms", "TFLOP/s", "sdpa variant", "speedup", "spread",
                            "check"], rows), ""]
    dec = {}
    for r in res["decode"]:
        dec.setdefault((r["batch"], r["cached"]), []).append(r)
    rows = []
    for (b, L), (t, e) in dec.items():
        rows.append([b, L, f"{t['us']:.1f}", f"{t['gbs']:.0f}", _pct(t["pct_copy"]), f"{e['us']:.1f}",
                     f"{e['gbs']:.0f}", e["impl"], f"{e['us'] / t['us']:.2f}x",
                     f"{max(t['spread_pct'], e['spread_pct']):.1f}%", t["check"]])
    out += [f"Decode attention (bf16, {MAX_SEQ}-slot cache, GB/s of K/V read):", "",
            markdown_table(["batch", "cached", "triton µs", "GB/s", "% copy", "sdpa µs", "GB/s", "sdpa variant",
                            "speedup", "spread", "check"], rows)]
    return "\n".join(out)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Needs one CUDA GPU; exits with status 2 without one.")
    ap.add_argument("--json", metavar="PATH", help="also write all numbers, card, date and versions as JSON")
    ap.add_argument("--tokens", type=_ints, default=(1, 16, 4096), help="token counts for the memory-bound ops (default 1,16,4096)")
    ap.add_argument("--seqs", type=_ints, default=(512, 2048, 4096), help="prefill lengths for attention (default 512,2048,4096)")
    ap.add_argument("--batches", type=_ints, default=(1, 8), help="decode batch sizes (default 1,8)")
    ap.add_argument("--cached", type=_ints, default=(512, 1024, 2048, 4096), help="decode cached tokens (default 512,1024,2048,4096)")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy-bandwidth buffer in GiB (default 1)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repeat time, ms (default 100)")
    ap.add_argument("--repeats", type=int, default=2, help="time each case this many times; the spread is the noise (default 2)")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch gaps, no L2 flush)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one size each, short timing")
    args = ap.parse_args(argv)

    torch = _torch()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "these benchmarks need one. `--help` lists the options.", file=sys.stderr)
        return 2
    _TIMING.update(warmup=args.warmup, rep=args.rep, graph=args.cuda_graph, repeats=max(1, args.repeats))
    if args.quick:
        args.tokens, args.seqs, args.batches, args.cached = (16,), (512,), (1,), (1024,)
        _TIMING.update(warmup=5, rep=20, repeats=1)
    res = run(args.tokens, args.seqs, args.batches, args.cached, args.copy_gib)
    print(markdown(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    bad = [r for part in ("memory_ops", "attention", "decode") for r in res[part] if r["check"].startswith("BAD")]
    if bad:
        print(f"\n{len(bad)} case(s) failed the correctness check (relative L2 error > {BF16_TOL}): "
              + ", ".join(f"{r['op']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------
# issue 9 (appended, self-contained): the decode GEMVs against cuBLAS and what the self-selection picks,
# the fused rotary + KV-cache write against the separate launches it replaced. decode_attention above
# already times the one-launch kernel (it is the only one now).
# ----------------------------------------------------------------------------------------------
QKV_ROWS = (N_HEADS + 2 * N_KV) * HEAD_DIM
VOCAB = 32000
# name: (N, K, prologue, residual): every decode product of a SOLAR layer, and the head
GEMV_SHAPES = {
    "qkv (rmsnorm)": (QKV_ROWS, HIDDEN, "norm", False),
    "o (+residual)": (HIDDEN, N_HEADS * HEAD_DIM, "plain", True),
    "gate_up (rmsnorm)": (2 * INTER, HIDDEN, "norm", False),
    "down (swiglu, +residual)": (HIDDEN, INTER, "swiglu", True),
    "lm_head (rmsnorm)": (VOCAB, HIDDEN, "norm", False),
}


def _gemv_case(torch, name: str, m: int, wdtype: str):
    """x, weight and gemv keyword arguments for one product at batch m (8-bit weights: per-channel scale)."""
    n, k, prologue, residual = GEMV_SHAPES[name]
    x = _randn(m, 1, 2 * k if prologue == "swiglu" else k)
    w = _randn(n, k, scale=k ** -0.5, dtype=torch.float32)
    scale = None
    if wdtype in ("int8", "float8_e4m3fn"):
        scale = w.abs().amax(1) / (127.0 if wdtype == "int8" else 448.0)
        q = w / scale[:, None]
        w = q.round().clamp(-127, 127).to(torch.int8) if wdtype == "int8" else q.to(torch.float8_e4m3fn)
    else:
        w = w.to(getattr(torch, wdtype))
    kw = {"scale": scale}
    if prologue == "norm":
        kw.update(norm_weight=_randn(k, scale=0.1) + 1.0, eps=EPS)
    elif prologue == "swiglu":
        kw["swiglu"] = True
    if residual:
        kw["residual"] = _randn(m, 1, n)
    return x, w, kw


def _gemv_unfused(K, ops, x, w, kw):
    """What fastsolar.ops runs instead of the fused kernel: cuBLAS plus the separate small kernels."""
    scale, res = kw["scale"], kw.get("residual")
    if "norm_weight" in kw:
        return ops._matmul(K.rms_norm.rms_norm(x, kw["norm_weight"], EPS), w, scale)
    a = K.swiglu.swiglu(*x.chunk(2, dim=-1)) if kw.get("swiglu") else x
    y = ops._matmul(a, w, scale)
    return y if res is None else res + y


def _gemv_pick(ops, choice, x, w, kw) -> str:
    """Run the self-selection for real on these inputs (a fresh choice cache, restored afterwards)."""
    saved = dict(choice._choices)
    choice._choices.clear()
    try:
        with choice.force_gemv(None), ops.force_kernels(True):
            scale, res = kw["scale"], kw.get("residual")
            if "norm_weight" in kw:
                ops.norm_linear(x, kw["norm_weight"], EPS, w, scale=scale)
            elif kw.get("swiglu"):
                ops.swiglu_linear(x, w, residual=res, scale=scale)
            else:
                ops.linear(x, w, residual=res, scale=scale)
        picked = list(choice.choices().values())
    finally:
        choice._choices.clear()
        choice._choices.update(saved)
    return picked[0] if picked else "untimed"


def bench_gemv(batches=(1, 8), copy_gbs: float | None = None, weight_dtypes=("bfloat16",), shapes=None) -> list[dict]:
    """Each decode GEMV of SOLAR fused in Triton (one launch) and as cuBLAS + the separate small kernels (what
    fastsolar.ops runs otherwise), µs and GB/s of the fewest bytes (weights once, x, y, residual) against
    `copy_gbs`; then the self-selection run for real on the same inputs (fastsolar.gemv_choice) and its
    pick. `weight_dtypes` may add "int8" / "float8_e4m3fn" (issue 10's weights, per-channel fp32 scale)."""
    torch = _torch()
    K = _kernels()
    gemv_mod = importlib.import_module("fastsolar.kernels.gemv")
    ops = importlib.import_module("fastsolar.ops")
    choice = importlib.import_module("fastsolar.gemv_choice")
    rows = []
    for name in shapes or GEMV_SHAPES:
        n, k, _, residual = GEMV_SHAPES[name]
        for wdtype in weight_dtypes:
            for m in batches:
                x, w, kw = _gemv_case(torch, name, m, wdtype)
                y = gemv_mod.gemv(x, w, out=_poisoned(torch.empty(m, 1, n, dtype=x.dtype, device=DEVICE)), **kw)
                kw32 = {a: (b.float() if isinstance(b, torch.Tensor) and a != "scale" else b) for a, b in kw.items()}
                status = _check([rel_err(y, gemv_mod.gemv_ref(x.float(), w, **kw32))])
                nbytes = (w.numel() * w.element_size() + x.numel() * x.element_size()
                          + m * n * x.element_size() * (2 if residual else 1))
                picked = _gemv_pick(ops, choice, x, w, kw)
                for impl, fn in (("triton", lambda: gemv_mod.gemv(x, w, **kw)),
                                 ("cublas", lambda: _gemv_unfused(K, ops, x, w, kw))):
                    ms, spread = time_ms(fn)
                    rows.append({"op": "gemv", "shape": name, "batch": m, "weight": wdtype, "N": n, "K": k,
                                 "impl": impl, "us": ms * 1e3, "spread_pct": spread, "gbs": nbytes / ms / 1e6,
                                 "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbs if copy_gbs else None,
                                 "picked": picked, "check": status if impl == "triton" else ""})
        _empty_cache()
    return rows


def bench_rotary_cache(batches=(1, 8), copy_gbs: float | None = None) -> list[dict]:
    """One decode step's rotary + KV-cache write for one layer: the fused kernel (one launch) against what it
    replaced (apply_rotary, then two indexed copies into the cache), at per-row positions through a row map.
    GB/s counts q, k, v read, rotated q and the k/v slots written."""
    torch = _torch()
    K = _kernels()
    rows = []
    for b in batches:
        qkv = _randn(b, 1, N_HEADS + 2 * N_KV, HEAD_DIM)
        q, k, v = qkv.split([N_HEADS, N_KV, N_KV], dim=2)
        kc, vc = _randn(b + 3, MAX_SEQ, N_KV, HEAD_DIM), _randn(b + 3, MAX_SEQ, N_KV, HEAD_DIM)
        rows_map = torch.arange(b, device=DEVICE).flip(0) + 2
        pos = torch.randint(0, MAX_SEQ, (b, 1), device=DEVICE)
        qo = K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map, q_out=_poisoned(q.contiguous()))
        kc_ref, vc_ref = kc.float(), vc.float()
        q_ref = K.rotary.rotary_cache_write_ref(q.float(), k.float(), v.float(), pos, THETA, kc_ref, vc_ref,
                                                rows=rows_map)
        r = rows_map.long()
        status = _check([rel_err(qo, q_ref), rel_err(kc[r, pos[:, 0]], kc_ref[r, pos[:, 0]]),
                         rel_err(vc[r, pos[:, 0]], vc_ref[r, pos[:, 0]])])
        e = q.element_size()
        nbytes = b * (2 * N_HEADS + 4 * N_KV) * HEAD_DIM * e

        def separate():
            qr, kr = K.rotary.apply_rotary(q, k, pos, THETA)
            kc[r, pos[:, 0]] = kr[:, 0]
            vc[r, pos[:, 0]] = v[:, 0]
            return qr

        def fused():
            return K.rotary.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows_map)

        for impl, fn in (("fused (1 launch)", fused), ("rotary + 2 index_put (3 launches)", separate)):
            ms, spread = time_ms(fn)
            rows.append({"op": "rotary_cache_write", "batch": b, "impl": impl, "us": ms * 1e3, "spread_pct": spread,
                         "gbs": nbytes / ms / 1e6, "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbs if copy_gbs else None,
                         "check": status if impl.startswith("fused") else ""})
        _empty_cache()
    return rows


def markdown_issue9(res: dict) -> str:
    """Tables for res["gemv"] and res["rotary_cache"] (either may be missing)."""
    out = []
    if res.get("gemv"):
        by = {}
        for r in res["gemv"]:
            by.setdefault((r["shape"], r["batch"], r["weight"]), {})[r["impl"]] = r
        rows = []
        for (shape, m, wdt), d in by.items():
            t, c = d["triton"], d["cublas"]
            rows.append([shape, m, wdt, f"{t['us']:.1f}", f"{t['gbs']:.0f}", _pct(t["pct_copy"]), f"{c['us']:.1f}",
                         f"{c['gbs']:.0f}", _pct(c["pct_copy"]), f"{c['us'] / t['us']:.2f}x", t["picked"],
                         f"{max(t['spread_pct'], c['spread_pct']):.1f}%", t["check"]])
        out += ["Decode GEMVs (one launch, norm/SwiGLU/residual fused) vs cuBLAS + separate kernels; GB/s = weights "
                "once + activations / time; `picked` = what fastsolar.gemv_choice chose timing the same inputs:", "",
                markdown_table(["product", "batch", "weights", "triton µs", "GB/s", "% copy", "cublas µs", "GB/s",
                                "% copy", "speedup", "picked", "spread", "check"], rows), ""]
    if res.get("rotary_cache"):
        rows = [[r["batch"], r["impl"], f"{r['us']:.1f}", f"{r['gbs']:.0f}", _pct(r["pct_copy"]),
                 f"{r['spread_pct']:.1f}%", r["check"]] for r in res["rotary_cache"]]
        out += ["Rotary + KV-cache write of one decode step, one layer (row map, per-row positions):", "",
                markdown_table(["batch", "impl", "µs", "GB/s", "% copy", "spread", "check"], rows), ""]
    return "\n".join(out)


# Registration for the main/JSON/markdown flow (wired by the lead): res[key] = fn(batches, copy_gbs).
ISSUE9_BENCHES = {"gemv": bench_gemv, "rotary_cache": bench_rotary_cache}
