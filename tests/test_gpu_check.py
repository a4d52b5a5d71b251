"""bench/gpu_check.sh, the one-shot GPU evidence run, and the scripts it runs (probe.py, kernel_bench.py, report.py):
its CPU rehearsal runs every phase and writes the documented files; the time-boxing rules hold."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FILES = {"gpu_check.log", "summary.json", "tests.jsonl", "kernels.json", "probe.json", "bench.json", "compile.json",
         "kernels-rest.json"}

# Runs everything on the CPU whatever the machine: a GPU adds nothing here.
pytestmark = pytest.mark.cpu_only



@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`bash bench/gpu_check.sh --rehearse` once: (OUT folder, stdout, seconds)."""
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets up its own phases
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--rehearse"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=500)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"rehearsal failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    print(f"gpu_check.sh --rehearse took {seconds:.1f} s")
    return out, proc.stdout, seconds


def test_rehearsal_runs_every_phase_and_writes_the_files(rehearsal, bench_script):
    out, stdout, _ = rehearsal
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == FILES  # at most 8, all at the top of $OUT: every one comes back from the device
    summary = json.loads((out / "summary.json").read_text())
    gpu_check = bench_script("gpu_check")
    assert list(summary["phases"]) == [p.name for p in gpu_check.PLAN]
    assert {n: r["status"] for n, r in summary["phases"].items()} == {p.name: "passed" for p in gpu_check.PLAN}
    assert summary["mode"] == "rehearse" and summary["follow_up"] is None
    assert summary["info"]["copy"]["gbs"] > 0 and summary["info"]["packages"]["torch"]
    # The log holds each phase's banner, in plan order, and the final table.
    log = (out / "gpu_check.log").read_text()
    positions = [log.index(f"phase {p.name} (") for p in gpu_check.PLAN]
    assert positions == sorted(positions)
    assert "| phase | status | seconds | estimate | limit | result |" in stdout
    assert "liger_kernel: installed" in log or "liger_kernel: importable" in log

    # pytest phases: each test's result appended as it came, labelled with its phase; on a CPU the CUDA-only
    # tests are selected and skipped, graph tests first.
    common = bench_script("common")
    gpu = common.test_results(out / "tests.jsonl", "gpu-tests")
    assert set(gpu["counts"]) == {"skipped"} and not gpu["failed"] and not gpu["unfinished"]
    lines = [json.loads(x) for x in (out / "tests.jsonl").read_text().splitlines()]
    started = [r["nodeid"] for r in lines if r["outcome"] == "started" and r["label"] == "gpu-tests"]
    assert len(started) == gpu["counts"]["skipped"] and "graph" in started[0]
    assert common.test_results(out / "tests.jsonl", "suite")["counts"].get("passed", 0) > 0
    assert common.test_results(out / "tests.jsonl", "gpu-heavy")["counts"] == {"skipped": 1}
    assert "SKIPPED" in log and "PASSED" in log  # -v / -rA lines

    probe = json.loads((out / "probe.json").read_text())
    assert list(probe)[-2:] == ["profile", "gemv"]  # the profile first: the more valuable part
    assert probe["complete"] and len(probe["gemv"]) == 10 and all(r["check"] == "ok" for r in probe["gemv"])
    assert {r["M"] for r in probe["gemv"]} == {1, 8}
    prof = probe["profile"]
    assert prof["step"]["ms"] > 0 and prof["kernels"] and "gemm/gemv" in prof["by_kind"]
    assert sum(k["us_per_step"] for k in prof["by_kind"].values()) == pytest.approx(prof["kernel_us_per_step"])

    kb = bench_script("kernel_bench")
    assert sorted(s for ss in gpu_check.KERNEL_SECTIONS.values() for s in ss) == sorted(kb.SECTIONS)
    # Where the interpreter cannot run loop kernels (triton < 3.7 with numpy >= 2.4) those cases say so and why.
    conflict = summary["info"]["interpreter_numpy_conflict"]
    conflict = f"skipped: {conflict}" if conflict else None
    for name, sections in gpu_check.KERNEL_SECTIONS.items():
        kernels = json.loads((out / f"{name}.json").read_text())
        assert kernels["complete"] and kernels["device"]["capability"] is None
        produced = [kb.row_id(sec, r) for sec in sections for r in kernels[sec]]
        # The counting is the run: the planned rows are exactly the rows produced, in order.
        assert produced == [(r["section"], tuple(r["key"]), r["impl"]) for r in kernels["plan"]]
        rows = [r for sec in sections for r in kernels[sec]]
        assert all(r["check"] in ("ok", "") or r["check"].startswith("skipped: Liger") or r["check"] == conflict
                   for r in rows), rows
        assert all(r["ring"] >= 1 and r["from"] for r in rows if "us" in r)
    rest = json.loads((out / "kernels-rest.json").read_text())
    assert any(r["ring"] > 1 for sec in ("rotary_cache", "memory_ops") for r in rest[sec] if "ring" in r)
    assert {r["impl"] for r in rest["memory_ops"]} == {"triton", "torch", "liger"}

    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and "hf-compile" not in bench["engines"]
    assert list(bench["engines"])[:3] == ["fastsolar", "fastsolar-fp8", "fastsolar-int8"]
    assert bench["engines"]["torch-ref"]["status"] == "ok"
    compiled = json.loads((out / "compile.json").read_text())
    assert list(compiled["engines"]) == ["hf-compile"] and compiled["engines"]["hf-compile"]["status"] == "skipped"


def test_rehearsal_plan_fits_the_lend(rehearsal, bench_script):
    """summary.json's plan: every phase's counted work and H200 estimate; the mandatory phases each within their
    cap and together within 420 s; a follow-up of 3.5 minutes that starts with hf-compile."""
    out, _, _ = rehearsal
    gc = bench_script("gpu_check")
    plan = json.loads((out / "summary.json").read_text())["plan"]
    assert plan["problems"] == []
    phases = {p["phase"]: p for p in plan["phases"]}
    assert list(phases) == [p.name for p in gc.PLAN]
    mandatory = [p for p in plan["phases"] if not p["optional"]]
    assert all(p["estimate_s"] is not None and p["estimate_s"] <= p["cap_s"] for p in mandatory), mandatory
    assert sum(p["estimate_s"] for p in mandatory) == pytest.approx(plan["mandatory_estimate_s"], abs=0.5)
    assert plan["mandatory_estimate_s"] <= plan["mandatory_limit_s"] == 420
    assert plan["follow_up"]["budget_s"] == 210 and plan["follow_up"]["runs"][0] == "compile"
    # Counted from the code: the CUDA-only tests (the heavy one apart), the kernel rows at SOLAR sizes, the engines.
    gpu = phases["gpu-tests"]["counts"]
    assert gpu["tests"] >= 80 and gpu["heavy"] == 0 and phases["gpu-heavy"]["counts"]["heavy"] >= 1
    kb = bench_script("kernel_bench")
    rows = kb.plan(kb.SOLAR, "bfloat16", kb.Features(fp8=True, liger_missing=None), ["gemv", "decode"])
    assert phases["kernels"]["counts"]["rows"] == len(rows) == 5 * 4 * 2 * 2 + 2 * 4 * 2
    assert phases["kernels"]["counts"]["rows_from_l2"] == 0 == phases["kernels-rest"]["counts"]["rows_from_l2"]
    assert list(phases["bench"]["counts"]["engines"])[:3] == ["fastsolar", "fastsolar-fp8", "fastsolar-int8"]


def test_rehearsal_report(rehearsal, tmp_path):
    """bench/report.py turns $OUT into bench/results/<date>-<card>/ with a README holding every table."""
    out, _, _ = rehearsal
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out), "--into", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dest = Path(proc.stdout.strip())
    assert dest.parent == tmp_path and dest.name.endswith("-rehearsal-cpu")
    text = (dest / "README.md").read_text()
    for needle in ("CPU REHEARSAL", "| versions |", "| copy bandwidth |", "| compile | passed |",
                   "## Tests: CUDA-only tests", "## Tests: heavy CUDA tests", "cuBLAS (torch) GEMV/GEMM",
                   "Decode step profile", "Memory-bound ops", "Prefill attention", "Decode attention", "Decode GEMVs",
                   "| torch-ref | 1 |", "| hf-compile | skipped", "| phase | kind | counted work | estimate s |",
                   "| gpu-tests | mandatory | "):
        assert needle in text, needle
    assert {p.name for p in dest.iterdir()} == FILES | {"README.md"}


def test_time_limits_keep_later_phases_and_total_within_budget(bench_script):
    gc = bench_script("gpu_check")
    mandatory = [p for p in gc.PLAN if not p.optional]
    assert sum(p.cap_s for p in mandatory) <= gc.BUDGET_S <= 480  # each cap fits: the run ends within 8 minutes
    assert [p.name for p in gc.PLAN] == ["info", "gpu-tests", "kernels", "probe", "bench", "compile", "kernels-rest",
                                         "gpu-heavy", "suite"]
    assert [p.name for p in mandatory] == ["info", "gpu-tests", "kernels", "probe", "bench"]
    # A phase that overran leaves the later mandatory ones their minimum; optional phases reserve nothing.
    later = sum(p.min_s for p in mandatory[2:])
    assert gc.phase_limit(gc.PLAN, 1, 150) == 150 - later
    assert gc.phase_limit(gc.PLAN, 1, 1000) == gc.PLAN[1].cap_s
    assert gc.phase_limit(gc.PLAN, len(gc.PLAN) - 1, 80) == 80
    assert [p.name for p in gc.select(gc.PLAN, "suite,compile")] == ["info", "compile", "suite"]
    with pytest.raises(SystemExit, match="unknown phase"):
        gc.select(gc.PLAN, "nope")
    assert gc.status_of(gc.PLAN[1], 5) == "passed" and gc.status_of(gc.PLAN[4], 5) == "failed"
    assert gc.status_of(gc.PLAN[4], None) == "timeout"
    for limit in (30, 60, 90, 150):  # per-test timeouts stay below the phase's limit
        assert gc.test_timeout(limit) < limit and gc.test_timeout(limit, 90) < limit
    assert gc.test_timeout(150, 90) >= 120  # room for a heavy test of 90 s, and for it to run long


def test_plan_problems_name_what_does_not_fit(bench_script):
    gc, gp = bench_script("gpu_check"), bench_script("gpu_plan")

    def plan(**seconds):
        est = {p.name: gp.Estimate(p.name, "w", seconds.get(p.name.replace("-", "_"), 10.0), {}) for p in gc.PLAN}
        return gc.apply_estimates(gc.PLAN, est)

    assert gc.plan_problems(plan()) == []
    cap = gc.PLAN[2].cap_s
    assert gc.plan_problems(plan(kernels=cap + 1.0)) == [f"kernels: estimate {cap + 1} s over its cap {cap} s"]
    total = plan(**{p.name.replace("-", "_"): p.cap_s - 1.0 for p in gc.PLAN if not p.optional})
    assert [x for x in gc.plan_problems(total) if "mandatory phases estimated" in x]
    # hf-compile must fit the follow-up with its margin: 10 s of info + 1.2 x 170 s > 210 s.
    assert gc.plan_problems(plan(compile=170.0)) == ["the follow-up cannot run hf-compile within 210 s"]
    unknown = tuple(dataclasses.replace(p, estimate_s=None) if p.name == "gpu-tests" else p for p in plan())
    assert gc.plan_problems(unknown) == ["gpu-tests: no estimate (its work could not be counted)"]
    # An optional phase starts only with its estimate and the margin left.
    assert {p.name: p.min_s for p in plan(compile=130.0) if p.optional}["compile"] == 156
    # The follow-up: hf-compile first, then the others in plan order while they fit.
    assert gc.follow_up_phases(gc.PLAN, ["suite", "bench", "compile"]) == ["compile", "bench", "suite"]
    assert gc.follow_up_fit(plan(), ["suite", "compile", "kernels-rest"]) == (["compile", "kernels-rest", "suite"], [])
    big = plan(compile=130.0, kernels_rest=40.0)
    assert gc.follow_up_fit(big, ["suite", "compile", "kernels-rest"]) == (["compile"], ["kernels-rest", "suite"])


def test_engine_costs_cover_bench_run_engines_in_value_order(bench_script):
    gp = bench_script("gpu_plan")
    engines = gp.run_engines(ROOT)
    assert engines[:3] == ("fastsolar", "fastsolar-fp8", "fastsolar-int8") and engines[-1] == "hf-compile"
    assert set(gp.ENGINE_COSTS) == set(engines) and set(gp.QUANTISED_ENGINES) < set(engines)
    # A pytest phase is counted with pytest's own -m evaluation and the heavy(seconds) marker.
    items = [{"nodeid": "a", "marks": {"gpu": "why"}}, {"nodeid": "b", "marks": {"gpu": True, "heavy": 90}},
             {"nodeid": "c", "marks": {"cpu_only": True}}, {"nodeid": "d", "marks": {}}]
    assert [i["nodeid"] for i in gp.selected(items, "gpu and not heavy")] == ["a"]
    assert [i["nodeid"] for i in gp.selected(items, "not gpu and not cpu_only and not heavy")] == ["d"]
    heavy = gp.pytest_estimate("gpu-heavy", items, "heavy", 0.0)
    assert heavy.counts["tests"] == 1 and heavy.estimate_s >= 90


def test_test_results_survive_a_kill(tmp_path, bench_script):
    """tests.jsonl as a killed pytest leaves it: finished tests counted, the one it was in named, a cut line ignored."""
    common = bench_script("common")
    lines = [{"nodeid": "t::a", "when": "start", "outcome": "started"},
             {"nodeid": "t::a", "when": "setup", "outcome": "passed"},
             {"nodeid": "t::a", "when": "call", "outcome": "failed", "message": "AssertionError: 1 != 2"},
             {"nodeid": "t::a", "when": "teardown", "outcome": "passed"},
             {"nodeid": "t::b", "when": "start", "outcome": "started"},
             {"nodeid": "t::b", "when": "setup", "outcome": "skipped", "message": "no CUDA"},
             {"nodeid": "t::b", "when": "teardown", "outcome": "passed"},
             {"nodeid": "t::c", "when": "start", "outcome": "started"},
             {"nodeid": "t::c", "when": "setup", "outcome": "passed"}]
    text = "\n".join(json.dumps({**r, "label": "gpu-tests"}) for r in lines) + '\n{"nodeid": "t::c", "wh'
    (tmp_path / "tests.jsonl").write_text(text)
    res = common.test_results(tmp_path / "tests.jsonl", "gpu-tests")
    assert res == {"counts": {"failed": 1, "skipped": 1}, "failed": [("t::a", "AssertionError: 1 != 2")],
                   "unfinished": ["t::c"]}
    assert common.test_results(tmp_path / "tests.jsonl", "suite")["counts"] == {}


def test_ring_holds_more_than_three_l2(bench_script):
    common = bench_script("common")
    l2 = 60 * 2**20
    for nbytes in (24 * 1024, 270_000, 50 * 2**20, 300 * 2**20):
        n = common.ring_size(nbytes, l2)
        assert common.from_memory(n, nbytes, l2) and (n == 1 or (n - 1) * nbytes <= 3 * l2)
    assert common.ring_size(1000, l2) == common.RING_MAX and not common.from_memory(common.RING_MAX, 1000, l2)
    assert common.ring_size(1000, None) == 1


def test_probe_files_decode_attention_under_attention(bench_script):
    probe = bench_script("probe")
    assert probe.kind_of("_decode_kernel") == "attention"
    assert probe.kind_of("_gemv_kernel") == "gemm/gemv"
    assert probe.kind_of("_rotary_cache_kernel") == "rotary"


def test_compile_without_enough_time_is_skipped_with_the_follow_up(tmp_path, monkeypatch, capsys, bench_script):
    gc = bench_script("gpu_check")

    def info(run, py, env, limit):
        run.items = []  # nothing collected: the pytest phases count zero tests
        return 0, 0.0, env

    monkeypatch.setattr(gc, "_info_phase", info)
    failed = gc.main(["--phase", "compile", "--budget", "100", "--out", str(tmp_path)])
    assert failed == 0  # skipping is not failing
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["compile"]["status"] == "skipped"
    # An optional phase starts only when its counted estimate fits in what is left.
    assert summary["phases"]["compile"]["estimate_s"] > 100 - summary["phases"]["info"]["seconds"]
    assert summary["follow_up"] == "bash bench/gpu_check.sh --phase compile --budget 210"
    printed = capsys.readouterr().out
    assert "SKIPPED compile" in printed
    assert "FOLLOW-UP (what did not run or finish): bash bench/gpu_check.sh --phase compile --budget 210" in printed
    assert not (tmp_path / "compile.json").exists()


def test_pytest_command_uses_the_plugins_it_finds(monkeypatch, tmp_path, bench_script):
    gc = bench_script("gpu_check")
    real = importlib.util.find_spec

    def find(present):
        return lambda name, *a: (real("pytest") if name in present else None) if name in ("xdist", "pytest_timeout") \
            else real(name, *a)

    monkeypatch.setattr(gc.importlib.util, "find_spec", find({"xdist", "pytest_timeout"}))
    cmd = gc.pytest_command("py", tmp_path, "gpu-tests", "gpu", rehearse=False, selection=[], limit_s=90)
    assert cmd[0] == "py" and cmd[cmd.index("-m"):][:2] == ["-m", "pytest"]
    assert {"-v", "-rA", "--graphs-first"} <= set(cmd)
    assert f"--results-jsonl={tmp_path / 'tests.jsonl'}" in cmd and "--results-label=gpu-tests" in cmd
    assert cmd[cmd.index("-m", cmd.index("pytest")) + 1] == "gpu"
    assert cmd[cmd.index("--timeout-method") + 1] == "thread" and "-n" in cmd and cmd[-1] == "tests"
    assert int(cmd[cmd.index("--timeout") + 1]) < 90  # a hung test ends before its phase does
    one = gc.pytest_command("py", tmp_path, "gpu-heavy", "heavy", rehearse=False, selection=[], limit_s=150, tests=1,
                            longest_s=90)
    assert "-n" not in one and int(one[one.index("--timeout") + 1]) >= 120  # one test: no workers to start
    monkeypatch.setattr(gc.importlib.util, "find_spec", find({"pytest_timeout"}))
    cmd = gc.pytest_command("py", tmp_path, "gpu-tests", "gpu", rehearse=False, selection=[])
    assert cmd[cmd.index("--timeout-method") + 1] == "signal" and "-n" not in cmd
    monkeypatch.setattr(gc.importlib.util, "find_spec", find(set()))
    assert "--timeout" not in gc.pytest_command("py", tmp_path, "gpu-tests", "gpu", rehearse=False, selection=[])
    # Whatever engines bench/run.py has, the bench phase runs all but hf-compile; compile runs only hf-compile.
    by = {p.name: p for p in gc.PLAN}
    bench = gc.phase_command(by["bench"], "py", tmp_path, rehearse=False, limit_s=150)
    assert bench[1] == "bench/run.py" and bench[bench.index("--exclude") + 1] == "hf-compile" and "--engines" not in bench
    kernels = gc.phase_command(by["kernels"], "py", tmp_path, rehearse=False, limit_s=75)
    assert kernels[kernels.index("--sections") + 1] == "gemv,decode"
    probe = gc.phase_command(by["probe"], "py", tmp_path, rehearse=False, limit_s=60)
    assert probe[probe.index("--parts") + 1] == "profile,gemv"


def test_kernels_markdown_survives_partial_results_and_no_capability(bench_script):
    kernels = bench_script("kernel_bench")
    res = {"complete": False, "dtype": "bfloat16", "sizes": dataclasses.asdict(kernels.SOLAR),
           "timing": {"method": "m"}, "copy": None,
           "device": {"card": "X", "capability": None, "sms": None, "memory_gib": 1.0, "torch": "t", "triton": "t",
                      "cuda": None, "date": "d"},
           "memory_ops": [{"op": "rms_norm", "tokens": 1, "impl": "triton", "bytes": 8194, "us": 2.0, "gbs": 4.1,
                           "pct_copy": None, "spread_pct": 1.0, "ring": 3, "ring_MB": 0.024, "from": "L2",
                           "check": "ok"}],
           "attention": [{"op": "attention", "seq": 512, "impl": "triton", "check": "ERROR RuntimeError: boom"}],
           "decode": [],
           "fused_gemv": [{"op": "gemv", "M": 1, "impl": "triton", "us": 3.25, "check": "ok"}]}
    text = kernels.markdown(res)
    assert "**X** (1.0 GiB)" in text and "INCOMPLETE" in text
    assert "| rms_norm | 1 | 0.01 | 2.0 | 4 |  | n/a | n/a |  | n/a |  | 1.0% | L2 (3 x 0.008 MB) | ok |" in text
    assert "ERROR RuntimeError: boom" in text
    assert "| gemv | 1 | triton | 3.25 | ok |" in text  # a section without its own table gets the generic one
