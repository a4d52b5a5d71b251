"""bench/kernel_bench.py's decode-GEMV, rotary + cache-write and quantised prefill GEMM sections run end to end on a
CPU under the Triton interpreter at the rehearsal's tiny shapes: every code path the GPU run takes, the correctness check inside
each case, and the tables, work before a GPU is lent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastsolar import versions
from fastsolar.model import quant

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cpu_only


@pytest.fixture
def kernels_bench(bench_script):
    return bench_script("kernel_bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of these sections (a GPU runs them for real)")
def test_gemv_rotary_cache_and_quant_gemm_sections(kernels_bench):
    kb = kernels_bench
    assert kb.INT4_GROUP == quant.GROUP_SIZE  # what the rows quantise with is what the plan counts
    sections = ["gemv", "rotary_cache", "quant_gemm"]
    res = kb.run(kb.REHEARSAL, device="cpu", dtype="float32", copy_gib=1 / 256, sections=sections,
                 l2_bytes=kb.REHEARSAL_L2, ring_max=kb.REHEARSAL_RING_MAX)
    planned = kb.plan(kb.REHEARSAL, "float32", kb.Features(fp8=True, liger_missing="CPU"), sections)
    assert [kb.row_id(sec, r) for sec in sections for r in res[sec]] == [(r.section, r.key, r.impl) for r in planned]
    # Every timed row ran over a ring sized against the (pretend) L2: more than one input set where they are small.
    assert all(r["ring"] == kb.ring_size(r["bytes"], kb.REHEARSAL_L2, kb.REHEARSAL_RING_MAX) for s in sections
               for r in res[s] if "bytes" in r and "us" in r)
    text = kb.markdown(res)
    assert "| down (swiglu, +residual) | 2 | int8 |" in text and "| 2 | fused (1 launch) |" in text
    assert f"| gate_up | {kb.REHEARSAL.prefill} | float8_e4m3fn |" in text
    assert "| down (swiglu, +residual) | 2 | int4 |" in text and f"| gate_up | {kb.REHEARSAL.prefill} | int4 |" in text
    conflict = versions.interpreter_numpy_conflict()
    if conflict and any(r["check"] == f"skipped: {conflict}" for s in sections for r in res[s]):
        pytest.skip(conflict)  # the rows name it: this interpreter cannot run the loop kernels they check
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
