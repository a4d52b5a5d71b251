"""bench/kernels.py's issue-9 benchmarks (decode GEMVs with the self-selection, fused rotary + cache write)
run end to end on a CPU under the Triton interpreter at tiny shapes, with the timer faked: every code path
the GPU run takes, and the correctness checks inside it, work before a GPU is lent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_kernels_issue9", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp16: bf16 tl.dot (the batch-8 GEMV) is garbage under the interpreter
    for name, value in dict(DEVICE=device, DTYPE="float16", N_HEADS=4, N_KV=2, HEAD_DIM=32, MAX_SEQ=64).items():
        monkeypatch.setattr(mod, name, value)
    monkeypatch.setattr(mod, "GEMV_SHAPES", {"qkv (rmsnorm)": (48, 40, "norm", False),
                                             "o (+residual)": (40, 64, "plain", True),
                                             "down (swiglu, +residual)": (40, 96, "swiglu", True)})
    if device == "cpu":
        monkeypatch.setattr(mod, "time_ms", lambda fn: (fn(), 0.01, 0.0)[1:])  # runs fn once: 10 µs, 0 spread
    return mod


def test_issue9_benches_run_and_check(bench):
    gemv = bench.bench_gemv(batches=(1, 3), copy_gbs=100.0, weight_dtypes=("float16", "int8", "float8_e4m3fn"))
    assert len(gemv) == 3 * 2 * 3 * 2
    assert all(r["check"] == "ok" for r in gemv if r["impl"] == "triton"), [r for r in gemv if r["check"] != "ok"]
    assert {r["picked"] for r in gemv} <= {"triton", "cublas", "untimed"}
    rot = bench.bench_rotary_cache(batches=(1, 2), copy_gbs=100.0)
    assert len(rot) == 4 and all(r["check"] == "ok" for r in rot if r["impl"].startswith("fused"))
    text = bench.markdown_issue9({"gemv": gemv, "rotary_cache": rot})
    assert "| down (swiglu, +residual) | 3 | int8 |" in text and "| 2 | fused (1 launch) |" in text
    assert set(bench.ISSUE9_BENCHES) == {"gemv", "rotary_cache"}
