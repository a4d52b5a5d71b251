"""The GPU evidence run's plan: each phase's work counted before it runs, turned into an H200 estimate.

bench/gpu_check.py runs phases under caps; this file says how long each should take on a lent H200, from work
counted in the code that will run, never from a guess per phase:

* pytest phases: the collected tests of the phase's marker selection (`pytest --collect-only`, the conftest's
  --collect-json), each costing TEST_BASE_S plus its share of cold Triton compiles, or the seconds its
  `heavy(seconds)` marker states; spread over the xdist workers;
* kernel phases: bench/kernel_bench.py's `plan()` rows at SOLAR sizes (cold compiles, timed rings, the launches
  and bytes of one call, the ring each row gets over an H200's L2);
* probe: the profiled full-size decode step (a random 48-layer model, its capture and profiled replays) and the
  cuBLAS GEMV rows;
* bench phases: every engine x batch size x the generate calls bench/run.py makes (warm-up, then `repeats` pairs
  of 1 and N new tokens), at the per-step costs below.

The per-item costs are stated once, here. They come from the close read behind issue 17 and the measurements
recorded for this card kind (copy 4.3 TB/s read + write, bf16 GEMM about 790 TFLOP/s); a lent GPU replaces
them with what each phase took (summary.json keeps both). `check()` is what the rehearsal enforces: every
mandatory phase's estimate within its cap, the mandatory phases within MANDATORY_S, and the follow-up within
FOLLOW_UP_S.
"""
from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import L2_MULTIPLE, RING_MAX, SAMPLE_S, SAMPLES, ring_size

# -------------------------------------------------------------------------------- per-item costs (H200)
H200_L2_BYTES = 60 * 2**20
WORKERS = 8  # pytest-xdist workers on the lent machine's 16 cores (gpu_check.pytest_command)
COMPILE_S = 1.5  # one cold Triton compile of a kernel variant on the lent host (ptxas included)
PROCESS_START_S = 5.0  # a Python process importing torch and triton
PYTEST_START_S = 12.0  # pytest: imports (transformers too) and collection of tests/
XDIST_START_S = 8.0  # xdist workers: each imports and collects again
TEST_BASE_S = 0.3  # one test's own run besides its compiles (small tensors, a reference, a check)
GPU_TEST_COMPILES = 1.6  # cold compiles per CUDA-only test: 120-170 counted over the 85 of them
SUITE_TEST_COMPILES = 0.35  # per test of the rest of the suite: 150+ over ~444
TIMING_BASE_S = 0.05  # one timed ring: side stream, capture, graph instantiation, syncs
LAUNCH_HOST_S = 25e-6  # host time of one kernel launch in Python (a ring's warm-up and capture each pay it)
BUILD_LAUNCHES = 6  # launches to build one input set of a ring (randn, scale, cast, quantise)
MIN_KERNEL_S = 3e-6  # the least a launch takes in a replayed graph
HBM_BPS = 3.5e12  # streaming rate a kernel reaches (the copy measured 4.3e12 bytes read + written per s)
MATMUL_FLOPS = 4.0e14  # what the prefill-sized products reach (the bf16 GEMM peak measured 7.9e14)
CHECK_S = 0.05  # one case's fp32 reference and check
COPY_BANDWIDTH_S = 1.0  # the copy-bandwidth measurement at the start of a bench script
NVIDIA_SMI_S = 1.0
RANDOM_SOLAR_S = 10.0  # building SOLAR-10.7B with random bf16 weights on the card
PROFILE_S = 8.0  # the probe's prefill, graph capture and 10 profiled replays (profiler start-up included)
PROFILE_COMPILES = 8  # kernel variants a decode step compiles (warm by then when earlier phases ran them)
PROBE_GEMV_ROW_S = 0.4  # one cuBLAS GEMV row: its ring of weights, capture, replays
# bench/run.py: each engine's set-up seconds, cold compiles, ms per decode step at batch 1 and 8, ms per prefill
# of the 512-token prompt at batch 1 (batch 8: 8x). Decode of the bf16 engines reads 21.4 GB a step; the 8-bit
# ones half; the eager ones pay Python launch costs; hf-compile's set-up is torch.compile's.
ENGINE_COSTS: dict[str, tuple[float, int, float, float, float]] = {
    "fastsolar": (4.0, 10, 5.8, 6.4, 30.0),
    "fastsolar-fp8": (6.0, 6, 3.4, 3.9, 45.0),
    "fastsolar-int8": (6.0, 6, 3.4, 3.9, 45.0),
    "fastsolar-int4": (6.0, 6, 2.5, 3.2, 60.0),  # 5.7 GB a step: a quarter of bf16's bytes plus group scales
    "fastsolar-eager": (1.0, 0, 10.0, 11.0, 32.0),
    "torch-ref": (1.0, 0, 16.0, 18.0, 40.0),
    "hf-eager": (8.0, 0, 28.0, 30.0, 60.0),
    "hf-compile": (110.0, 0, 7.0, 8.0, 35.0),
}
BENCH_PROMPT, BENCH_NEW_TOKENS, BENCH_REPEATS, BENCH_BATCHES = 512, 128, 3, (1, 8)  # bench/run.py's CUDA defaults
MANDATORY_S = 420  # the mandatory phases' estimates together
OPTIONAL_MARGIN = 1.2  # an optional phase starts only with its estimate and this margin left
FOLLOW_UP_S = 210  # the follow-up command: 3.5 minutes, what a lend has left after the first call


# ---------------------------------------------------------------------------------------------- counting
@dataclass(frozen=True)
class Estimate:
    phase: str
    work: str  # the counted work, in words
    estimate_s: float
    counts: dict[str, Any]


def item_cost_s(marks: dict[str, Any], compiles_per_test: float) -> float:
    """One collected test's seconds: its heavy(seconds) marker, else the base cost and its share of compiles."""
    return float(marks["heavy"]) if marks.get("heavy") else TEST_BASE_S + compiles_per_test * COMPILE_S


def selected(items: list[dict[str, Any]], expression: str) -> list[dict[str, Any]]:
    """The collected items (nodeid, marks) a pytest `-m expression` selects, evaluated as pytest evaluates it."""
    from _pytest.mark.expression import Expression

    expr = Expression.compile(expression)
    return [it for it in items if expr.evaluate(lambda name, **kw: name in it["marks"])]


def pytest_estimate(phase: str, items: list[dict[str, Any]], expression: str, compiles_per_test: float,
                    workers: int = WORKERS) -> Estimate:
    tests = selected(items, expression)
    workers = max(1, min(workers, len(tests)))  # gpu_check starts no more workers than tests
    costs = [item_cost_s(t["marks"], compiles_per_test) for t in tests]
    heavy = sum(1 for t in tests if t["marks"].get("heavy"))
    run = max(sum(costs) / workers, max(costs, default=0.0))
    est = PYTEST_START_S + (XDIST_START_S if workers > 1 else 0) + run
    return Estimate(phase, f"{len(tests)} tests ({heavy} heavy), ~{compiles_per_test * len(tests):.0f} cold compiles, "
                           f"{workers} workers", est,
                    {"tests": len(tests), "heavy": heavy, "compiles": round(compiles_per_test * (len(tests) - heavy)),
                     "test_s": round(sum(costs), 1), "max_test_s": round(max(costs, default=0.0), 1),
                     "workers": workers})


def kernel_row_s(row: Any, l2_bytes: int = H200_L2_BYTES) -> float:
    """One kernel_bench Row's seconds: its cold compiles, check, and each timed ring (inputs built, warm-up and
    capture launched from Python, the first replay and SAMPLES samples of at least SAMPLE_S)."""
    ring = ring_size(row.nbytes, l2_bytes, RING_MAX)
    lap = ring * max(row.nbytes / HBM_BPS + row.flops / MATMUL_FLOPS, row.launches * MIN_KERNEL_S)
    timing = (TIMING_BASE_S + ring * (BUILD_LAUNCHES + 2 * row.launches) * LAUNCH_HOST_S
              + lap + SAMPLES * max(SAMPLE_S, lap))
    return row.compiles * (COMPILE_S + CHECK_S) + row.timings * timing


def kernels_estimate(phase: str, rows: list[Any], l2_bytes: int = H200_L2_BYTES) -> Estimate:
    timings = sum(r.timings for r in rows)
    compiles = sum(r.compiles for r in rows)
    rings = [ring_size(r.nbytes, l2_bytes, RING_MAX) for r in rows if r.timings]
    from_l2 = sum(1 for r in rows if r.timings and ring_size(r.nbytes, l2_bytes, RING_MAX) * r.nbytes
                  <= L2_MULTIPLE * l2_bytes)
    est = PROCESS_START_S + COPY_BANDWIDTH_S + sum(kernel_row_s(r, l2_bytes) for r in rows)
    sections = sorted({r.section for r in rows}, key=[r.section for r in rows].index)
    return Estimate(phase, f"{len(rows)} rows ({', '.join(sections)}): {timings} timed rings, {compiles} cold "
                           f"compiles", est,
                    {"rows": len(rows), "timings": timings, "compiles": compiles, "ring_sets": sum(rings),
                     "rows_from_l2": from_l2, "sections": sections})


def probe_estimate(phase: str, gemv_rows: int) -> Estimate:
    est = (PROCESS_START_S + COPY_BANDWIDTH_S + RANDOM_SOLAR_S + PROFILE_S + PROFILE_COMPILES * COMPILE_S
           + gemv_rows * PROBE_GEMV_ROW_S)
    return Estimate(phase, f"profiled 48-layer decode step ({PROFILE_COMPILES} compiles), {gemv_rows} cuBLAS GEMV rows",
                    est, {"profile": 1, "gemv_rows": gemv_rows, "compiles": PROFILE_COMPILES})


def engine_s(name: str, batches: tuple[int, ...]) -> float:
    """One engine's seconds in bench/run.py: set-up, compiles, and per batch size the warm-up generate, one
    1-token generate, then `repeats` pairs of 1 and N new tokens (steps and prefills counted from that)."""
    setup, compiles, b1_ms, b8_ms, prefill_ms = ENGINE_COSTS[name]
    steps = BENCH_NEW_TOKENS + 1 + BENCH_REPEATS * (1 + BENCH_NEW_TOKENS)
    prefills = 2 + 2 * BENCH_REPEATS
    total = setup + compiles * COMPILE_S
    for b in batches:
        total += (steps * (b1_ms if b == 1 else b8_ms) + prefills * prefill_ms * b) / 1e3
    return total


QUANTISED_ENGINES = ("fastsolar-fp8", "fastsolar-int8", "fastsolar-int4")  # batch 1 only under bench/run.py's --time-budget


def bench_estimate(phase: str, engines: list[str], batches: tuple[int, ...] = BENCH_BATCHES) -> Estimate:
    """bench/run.py with `engines` at `batches` under a --time-budget (the quantised engines at the smallest)."""
    per = {e: engine_s(e, batches[:1] if e in QUANTISED_ENGINES else batches) for e in engines}
    est = PROCESS_START_S + COPY_BANDWIDTH_S + RANDOM_SOLAR_S + sum(per.values())
    quantised = " (quantised: batch 1)" if set(engines) & set(QUANTISED_ENGINES) and len(batches) > 1 else ""
    return Estimate(phase, f"{len(engines)} engine{'s' if len(engines) > 1 else ''} ({', '.join(engines)}) x batch "
                           f"{','.join(map(str, batches))}{quantised}", est,
                    {"engines": {e: round(s, 1) for e, s in per.items()}})


def info_estimate(phase: str) -> Estimate:
    return Estimate(phase, "nvidia-smi, versions, card, copy bandwidth; test collection for the plan",
                    NVIDIA_SMI_S + PROCESS_START_S + COPY_BANDWIDTH_S + PYTEST_START_S, {})


def run_engines(root: Path) -> tuple[str, ...]:
    """bench/run.py's ENGINES (its value order), read without importing it (it imports torch)."""
    tree = ast.parse((root / "bench" / "run.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ENGINES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise ValueError("bench/run.py has no ENGINES")


def as_dict(e: Estimate) -> dict[str, Any]:
    d = asdict(e)
    d["estimate_s"] = round(e.estimate_s, 1)
    return d
