"""bench/kernel_bench.py's decode-GEMV, rotary + cache-write and quantised prefill GEMM sections run end to end on a
CPU under the Triton interpreter at the rehearsal's tiny shapes: every code path the GPU run takes, the correctness check inside
each case, and the tables, work before a GPU is lent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cpu_only


@pytest.fixture
def kernels_bench(bench_script):
    return bench_script("kernel_bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of these sections (a GPU runs them for real)")
def test_gemv_rotary_cache_and_quant_gemm_sections(kernels_bench):
    kb = kernels_bench
    timing = {"warmup": 1, "rep": 1, "graph": False, "repeats": 1, "samples": 1}
    res = kb.run(kb.REHEARSAL, device="cpu", dtype="float32", timing=timing, copy_gib=1 / 256,
                 sections=["gemv", "rotary_cache", "quant_gemm"])
    gemv = res["gemv"]
    shapes = kb._gemv_shapes(kb.REHEARSAL)
    assert len(gemv) == len(shapes) * 4 * len(kb.REHEARSAL.batches) * 2  # fp32/int8/fp8/int4 x triton/cublas
    assert all(r["check"] == "ok" for r in gemv if r["impl"] == "triton"), [r for r in gemv if r["check"] != "ok"]
    assert {r["picked"] for r in gemv} == {"untimed"}  # nothing is timed on a CPU
    rot = res["rotary_cache"]
    assert len(rot) == 2 * len(kb.REHEARSAL.batches)
    assert all(r["check"] == "ok" for r in rot if r["impl"].startswith("fused"))
    gemm = res["quant_gemm"]
    assert len(gemm) == 4 * 3 * 2  # qkv/o/gate_up/down x int8/fp8/int4 x triton/cublas
    assert all(r["check"] == "ok" for r in gemm if r["impl"] == "triton"), [r for r in gemm if r["check"] != "ok"]
    text = kb.markdown(res)
    assert "| down (swiglu, +residual) | 2 | int8 |" in text and "| 2 | fused (1 launch) |" in text
    assert f"| gate_up | {kb.REHEARSAL.prefill} | float8_e4m3fn |" in text
    assert "| down (swiglu, +residual) | 2 | int4 |" in text and f"| gate_up | {kb.REHEARSAL.prefill} | int4 |" in text
