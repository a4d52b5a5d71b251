#!/usr/bin/env python
"""Calibration probe: what cuBLAS gets out of the card for SOLAR's decode GEMVs, and where one decode step's
time goes. Run on one CUDA GPU (bench/gpu_check.sh runs it); `--rehearse` runs the same code on a CPU.
The parts run in the order --parts gives (default: the profile first, the more valuable of the two).

1. gemv: torch.nn.functional.linear (cuBLAS) of x [M, K] by a bf16 weight [N, K] at M = 1 and 8, for
   SOLAR-10.7B's five weight shapes: 4096->6144 (fused q/k/v), 4096->4096 (o), 4096->28672 (fused
   gate/up), 14336->4096 (down), 4096->32000 (lm_head). Without L2 reuse: the products run over a ring of
   weight copies holding more than 3x the L2 cache, each copy read once per lap, so every product streams its
   weight from memory; a CUDA graph of one lap is replayed (no launch gaps) and timed with CUDA events,
   median of 3 samples (common.graph_ring_ms). GB/s = (weight + x + y bytes) / time, against the copy bandwidth measured first
   (bench/common.py copy_bandwidth: bytes read + written). Each product is checked against fp32 first.
2. profile: one decode step of the full 48-layer SOLAR-10.7B (random bf16 weights, bench/engines.random_solar)
   after a prefill of --context tokens, captured in a CUDA graph by fastsolar's CudaGraphStep (sampler greedy),
   replayed --replays times under torch.profiler: every kernel's name, calls and µs per step, summed by kind
   (KINDS). Step time: median of CUDA-event-timed replays; achieved GB/s: the bytes a step must read (weights
   but the embedding table, plus the K/V cache) / step time. Kernel µs that add up to less than the step
   time are gaps between kernels inside the graph.

The JSON (--json) is rewritten after every row; each row is printed as it comes, the tables at the end.

    python bench/probe.py --json out/probe.json
    python bench/probe.py --rehearse --json /tmp/probe.json   # CPU: tiny shapes, host clock, code paths only
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from typing import Any

from common import (copy_bandwidth, decode_step_bytes, device_info, graph_ring_ms, host_ms, import_fastsolar,
                    markdown_table, ring_size, write_json)

#: SOLAR-10.7B's decode weight shapes: (name, K = in features, N = out features).
SOLAR_SHAPES = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                ("lm_head", 4096, 32000))
REHEARSAL_SHAPES = tuple((n, k // 64, m // 64) for n, k, m in SOLAR_SHAPES)

#: Kernel kinds for the profile, first match wins (lower-cased substrings of the kernel's name).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("attn", "attention", "_decode_kernel", "decode_split", "decode_reduce", "flash", "sdpa")),
    ("gemm/gemv", ("gemm", "gemv", "nvjet", "cutlass", "cublas", "xmma", "matmul", "splitk", "aten::mm",
                   "aten::addmm", "aten::bmm")),
    ("norm", ("rms", "norm")),
    ("rotary", ("rotary", "rope")),
    ("swiglu", ("swiglu", "silu")),
    ("sampling", ("argmax", "argmin", "topk", "sort", "softmax", "exponential", "multinomial", "where")),
    ("copy/fill/index", ("copy", "memcpy", "memset", "fill", "index", "scatter", "gather", "cat", "arange",
                         "embedding", "clone")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def rel_err(out, ref) -> float:
    import torch

    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return math.inf
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------- gemv


def gemv_rows(shapes, batches, device: str, dtype, l2_bytes: int | None, copy_gbs: float | None):
    """Yield one row per (shape, M): µs per product, GB/s, % of copy bandwidth, TFLOP/s, the check."""
    import torch
    import torch.nn.functional as F

    for name, k, n in shapes:
        w_bytes = n * k * dtype.itemsize
        ring = max(2, ring_size(w_bytes, l2_bytes))
        weights = [(torch.randn(n, k, device=device) * 0.02).to(dtype) for _ in range(ring)]
        for m in batches:
            x = torch.randn(m, k, device=device).to(dtype)
            outs = [torch.empty(m, n, device=device, dtype=dtype) for _ in range(ring)]
            row: dict[str, Any] = {"shape": name, "K": k, "N": n, "M": m, "ring": ring,
                                   "ring_MB": round(ring * w_bytes / 1e6, 1)}
            try:
                check = rel_err(F.linear(x, weights[0]), x.float() @ weights[0].float().T)

                # F.linear's product, into a fixed output (graph-safe), one per weight copy of the ring
                fns = [lambda w=w, y=y, x=x: torch.mm(x, w.t(), out=y) for w, y in zip(weights, outs)]
                if device == "cuda":
                    ms, spread = graph_ring_ms(fns)
                else:
                    ms, spread = host_ms(lambda: [f() for f in fns], warmup=1, samples=3, repeats=1)
                    ms /= ring
                s = ms / 1e3
                nbytes = w_bytes + (m * k + m * n) * dtype.itemsize
                gbs = nbytes / s / 1e9
                row.update(us=s * 1e6, spread_pct=spread, gbs=gbs,
                           pct_copy=100 * gbs / copy_gbs if copy_gbs else None, tflops=2 * m * n * k / s / 1e12,
                           rel_err=check, check="ok" if check <= 1e-2 else f"BAD ({check:.1e})")
            except Exception as e:  # noqa: BLE001 - recorded; the other shapes still run
                row.update(check=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            yield row
            del x, outs
        del weights
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- profile


def _event_times(evt, on_cuda: bool) -> float:
    """An averaged profiler event's own time in µs: device time for kernels, CPU self time on a CPU."""
    if on_cuda:
        for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.0
    return float(evt.self_cpu_time_total)


def profile_decode(preset: str, layers: int | None, batch: int, context: int, replays: int, device: str, dtype,
                   copy_gbs: float | None) -> dict[str, Any]:
    """One decode step captured by CudaGraphStep (eager static-buffer path on a CPU), timed and profiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engines import fit_layers, random_solar
    from fastsolar.config import SolarConfig
    from fastsolar.decoding.graphs import CudaGraphStep
    from fastsolar.decoding.sampling import Sampler
    from fastsolar.decoding.session import DecodeSession

    on_cuda = device == "cuda"
    config = SolarConfig.preset(preset).replace(eos_token_id=None)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    dev = torch.device(device)
    kv = 2 * config.num_hidden_layers * batch * (context + 64) * config.num_key_value_heads * config.head_dim * 2
    config, note = fit_layers(config, dev, dtype, extra_bytes=kv + (2 << 30))
    t0 = time.perf_counter()
    model = random_solar(config, dev, dtype, seed=0)
    out: dict[str, Any] = {"preset": preset, "layers": config.num_hidden_layers, "batch": batch, "context": context,
                           "replays": replays, "dtype": str(dtype).replace("torch.", ""), "note": note}
    with torch.inference_mode():
        session = DecodeSession(model, batch, context + 64)
        ids = torch.randint(3, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
        seqlens = torch.full((batch,), context, dtype=torch.int32, device=dev)
        sampler = Sampler(batch, config.vocab_size, dev)
        sampler.reset(temperature=0.0)
        tokens = sampler(session.prefill(ids.to(dev), seqlens))
        positions = seqlens.to(torch.int64)
        step = CudaGraphStep(session, sampler)  # captures on CUDA; the same static-buffer path, eager, on a CPU
        t1 = time.perf_counter()
        step(tokens, positions)  # warm-up + capture + first replay (every replay rewrites the same cache slot)
        if on_cuda:
            torch.cuda.synchronize()
        out.update(build_s=round(t1 - t0, 2), capture_s=round(time.perf_counter() - t1, 2),
                   captured=any(e.graph is not None for e in step.pool.entries.values()))
        if on_cuda:
            times = []
            for _ in range(max(5, replays)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(tokens, positions)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            step_s = statistics.median(times)
            spread = 100 * (max(times) - min(times)) / min(times)
        else:
            step_s, spread = host_ms(lambda: step(tokens, positions), warmup=1, samples=3, repeats=1)
            step_s /= 1e3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(replays):
                step(tokens, positions)
            if on_cuda:
                torch.cuda.synchronize()
    nbytes = decode_step_bytes(config, dtype.itemsize, batch, context + 1)
    gbs = nbytes["total"] / step_s / 1e9
    out["step"] = {"ms": step_s * 1e3, "spread_pct": spread, "bytes": nbytes, "gbs": gbs,
                   "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
                   "timing": "CUDA events around each graph replay, median" if on_cuda else "host clock, median"}

    kernels = []
    for evt in prof.key_averages():
        if on_cuda and getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if not on_cuda and not evt.key.startswith("aten::"):
            continue
        us = _event_times(evt, on_cuda)
        if us <= 0:
            continue
        kernels.append({"name": evt.key, "kind": kind_of(evt.key), "calls_per_step": evt.count / replays,
                        "us_per_step": us / replays})
    kernels.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in kernels) or 1.0
    for r in kernels:
        r["pct"] = 100 * r["us_per_step"] / total
    by_kind: dict[str, dict[str, float]] = {}
    for r in kernels:
        k = by_kind.setdefault(r["kind"], {"calls_per_step": 0.0, "us_per_step": 0.0, "kernels": 0})
        k["calls_per_step"] += r["calls_per_step"]
        k["us_per_step"] += r["us_per_step"]
        k["kernels"] += 1
    for k in by_kind.values():
        k["pct"] = 100 * k["us_per_step"] / total
    out["kernel_us_per_step"] = total
    out["gap_us_per_step"] = step_s * 1e6 - total  # time in the step not covered by any kernel
    out["by_kind"] = dict(sorted(by_kind.items(), key=lambda kv_: -kv_[1]["us_per_step"]))
    out["kernels"] = kernels
    del model, step, sampler
    if on_cuda:
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ output


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown(res: dict[str, Any]) -> str:
    d, c = res["device"], res.get("copy") or {}
    lines = [f"**{d['card']}**, torch {d['torch']}, {d['date']}. Copy bandwidth {_f(c.get('gbs'), '.0f')} GB/s "
             "(read + write)."]
    if res.get("gemv"):
        rows = [[r["shape"], f"{r['K']}->{r['N']}", r["M"], _f(r.get("us"), ".1f"), _f(r.get("gbs"), ".0f"),
                 _f(r.get("pct_copy"), ".0f"), _f(r.get("tflops"), ".2f"), _f(r.get("spread_pct"), ".1f"),
                 f"{r['ring']} x ({r['ring_MB']:.0f} MB)", r.get("check", "")] for r in res["gemv"]]
        lines += ["", f"cuBLAS (torch) GEMV/GEMM, {res.get('dtype')} weights streamed from memory (ring of copies > 3x "
                  "L2, CUDA-graph replay), GB/s = (weight + x + y) / time:", "",
                  markdown_table(["weight", "K->N", "M", "µs", "GB/s", "% copy", "TFLOP/s", "spread %", "ring", "check"],
                                 rows)]
    p = res.get("profile")
    if p and p.get("step"):
        s = p["step"]
        lines += ["", f"Decode step profile: {p['preset']} ({p['layers']} layers), batch {p['batch']}, "
                  f"{p['context']} cached tokens, {p['dtype']}, {'CUDA graph' if p.get('captured') else 'eager'}: "
                  f"**{s['ms']:.3f} ms/step** (spread {s['spread_pct']:.1f}%), {s['bytes']['total'] / 1e9:.2f} GB read "
                  f"-> {s['gbs']:.0f} GB/s = {_f(s.get('pct_copy'), '.0f')}% of copy; kernels {p['kernel_us_per_step']:.0f} "
                  f"µs, gaps {p['gap_us_per_step']:.0f} µs per step.", ""]
        rows = [[k, _f(v["kernels"], "d"), _f(v["calls_per_step"], ".0f"), _f(v["us_per_step"], ".1f"),
                 _f(v["pct"], ".1f")] for k, v in p["by_kind"].items()]
        lines += [markdown_table(["kind", "kernels", "calls/step", "µs/step", "% of kernel time"], rows), ""]
        rows = [[r["name"][:90], r["kind"], _f(r["calls_per_step"], ".0f"), _f(r["us_per_step"], ".1f"),
                 _f(r["pct"], ".1f")] for r in p["kernels"][:25]]
        lines += [f"Top {len(rows)} of {len(p['kernels'])} kernels:", "",
                  markdown_table(["kernel", "kind", "calls/step", "µs/step", "%"], rows)]
    elif p and p.get("error"):
        lines += ["", f"Decode step profile: {p['error']}"]
    if not res.get("complete", True):
        lines += ["", "INCOMPLETE: the probe stopped before every part finished."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here (rewritten after every row)")
    ap.add_argument("--parts", default="profile,gemv",
                    help="comma-separated subset of profile,gemv, run in the order given (default profile,gemv)")
    ap.add_argument("--batches", default="1,8", help="GEMV rows M (default 1,8)")
    ap.add_argument("--profile-batch", type=int, default=1, help="decode batch of the profiled step (default 1)")
    ap.add_argument("--context", type=int, default=512, help="cached tokens before the profiled step (default 512)")
    ap.add_argument("--replays", type=int, default=10, help="profiled replays (default 10)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for the profile (default: the preset's)")
    ap.add_argument("--rehearse", action="store_true",
                    help="CPU, tiny shapes and model, host clock: checks this script's code paths, measures nothing")
    args = ap.parse_args(argv)

    import torch

    if args.rehearse:
        device, shapes, preset, dtype = "cpu", REHEARSAL_SHAPES, "tiny", torch.float32
        args.context, args.replays, args.layers = min(args.context, 8), min(args.replays, 2), args.layers or 2
    elif not torch.cuda.is_available():
        print("bench/probe.py: no CUDA GPU visible; --rehearse runs the code paths on a CPU", file=sys.stderr)
        return 2
    else:
        device, shapes, preset, dtype = "cuda", SOLAR_SHAPES, "solar-10.7b", torch.bfloat16
    import_fastsolar("bench/probe.py")
    parts = [p for p in args.parts.split(",") if p]
    torch.manual_seed(0)
    info = device_info(device)
    res: dict[str, Any] = {"complete": False, "device": info, "dtype": str(dtype).replace("torch.", ""),
                           "copy": copy_bandwidth(device, 1 / 64 if args.rehearse else None)}
    copy_gbs = res["copy"]["gbs"]
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    save = (lambda: write_json(args.json, res)) if args.json else (lambda: None)
    save()
    failed = False
    for part in parts:
        if part == "gemv":
            res["gemv"] = []
            l2 = int(info["l2_mib"] * 2**20) if info.get("l2_mib") else None
            for row in gemv_rows(shapes, [int(b) for b in args.batches.split(",") if b], device, dtype, l2, copy_gbs):
                res["gemv"].append(row)
                failed |= not str(row.get("check", "")).startswith("ok")
                print(f"[gemv] {row['shape']} {row['K']}->{row['N']} M={row['M']}: {_f(row.get('us'), '.1f')} µs "
                      f"{_f(row.get('gbs'), '.0f')} GB/s ({_f(row.get('pct_copy'), '.0f')}% copy) {row.get('check')}",
                      flush=True)
                save()
        elif part == "profile":
            try:
                res["profile"] = profile_decode(preset, args.layers, args.profile_batch, args.context, args.replays,
                                                device, dtype, copy_gbs)
            except Exception as e:  # noqa: BLE001 - keep the other part's rows; say what broke
                traceback.print_exc()
                res["profile"] = {"error": f"{type(e).__name__}: {e}"}
                failed = True
            save()
        else:
            ap.error(f"unknown part {part!r}; choose from profile,gemv")
    res["complete"] = True
    save()
    print("\n" + markdown(res), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
