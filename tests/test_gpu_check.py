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
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FILES = {"gpu_check.log", "summary.json", "pytest-gpu.xml", "probe.json", "kernels.json", "bench.json",
         "pytest-suite.xml", "compile.json"}

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
                          text=True, timeout=400)
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
    assert "| phase | status | seconds | limit | result |" in stdout

    # pytest phases: verbose, with JUnit XML (the CUDA-only tests are selected and, without CUDA, skipped).
    gpu = ET.parse(out / "pytest-gpu.xml").getroot()
    cases = list(gpu.iter("testcase"))
    assert cases and all(c.find("skipped") is not None for c in cases)
    assert any("graph" in c.get("name") for c in cases)
    assert "SKIPPED" in log and "PASSED" in log  # -v / -rA lines
    suite = ET.parse(out / "pytest-suite.xml").getroot()
    assert any(c.find("skipped") is None and c.find("failure") is None for c in suite.iter("testcase"))

    probe = json.loads((out / "probe.json").read_text())
    assert probe["complete"] and len(probe["gemv"]) == 10 and all(r["check"] == "ok" for r in probe["gemv"])
    assert {r["M"] for r in probe["gemv"]} == {1, 8}
    prof = probe["profile"]
    assert prof["step"]["ms"] > 0 and prof["kernels"] and "gemm/gemv" in prof["by_kind"]
    assert sum(k["us_per_step"] for k in prof["by_kind"].values()) == pytest.approx(prof["kernel_us_per_step"])

    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["complete"] and kernels["device"]["capability"] is None
    for section in ("memory_ops", "attention", "decode"):
        rows = kernels[section]
        assert rows and all(r["check"] in ("ok", "") for r in rows), rows
        assert {r["impl"] for r in rows} >= {"triton"}

    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and "hf-compile" not in bench["engines"]
    assert bench["engines"]["torch-ref"]["status"] == "ok"
    compiled = json.loads((out / "compile.json").read_text())
    assert list(compiled["engines"]) == ["hf-compile"] and compiled["engines"]["hf-compile"]["status"] == "skipped"


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
                   "## Tests: CUDA-only tests", "cuBLAS (torch) GEMV/GEMM", "Decode step profile",
                   "Memory-bound ops", "Prefill attention", "Decode attention", "| torch-ref | 1 |",
                   "| hf-compile | skipped"):
        assert needle in text, needle
    assert {p.name for p in dest.iterdir()} == FILES | {"README.md"}


def test_time_limits_keep_later_phases_and_total_within_budget(bench_script):
    gc = bench_script("gpu_check")
    mandatory = [p for p in gc.PLAN if not p.optional]
    assert sum(p.cap_s for p in mandatory) <= gc.BUDGET_S <= 480  # each cap fits: the run ends within 8 minutes
    assert sum(p.estimate_s for p in mandatory) < gc.BUDGET_S
    assert [p.name for p in gc.PLAN] == ["info", "gpu-tests", "probe", "kernels", "bench", "suite", "compile"]
    # A phase that overran leaves the later ones their minimum; the optional compile phase reserves nothing.
    later = sum(p.min_s for p in mandatory[2:])
    assert gc.phase_limit(gc.PLAN, 1, 200) == 200 - later
    assert gc.phase_limit(gc.PLAN, 1, 1000) == gc.PLAN[1].cap_s
    assert gc.phase_limit(gc.PLAN, len(gc.PLAN) - 1, 100) == 100
    assert [p.name for p in gc.select(gc.PLAN, "compile")] == ["info", "compile"]
    with pytest.raises(SystemExit, match="unknown phase"):
        gc.select(gc.PLAN, "nope")
    assert gc.status_of(gc.PLAN[1], 5) == "passed" and gc.status_of(gc.PLAN[4], 5) == "failed"
    assert gc.status_of(gc.PLAN[4], None) == "timeout"


def test_compile_without_enough_time_is_skipped_with_the_follow_up(tmp_path, monkeypatch, capsys, bench_script):
    gc = bench_script("gpu_check")
    monkeypatch.setattr(gc, "_info_phase", lambda run, py, env, limit: (0, 0.0, env))
    failed = gc.main(["--phase", "compile", "--budget", "100", "--out", str(tmp_path)])
    assert failed == 0  # skipping is not failing
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["compile"]["status"] == "skipped"
    assert summary["follow_up"] == "bash bench/gpu_check.sh --phase compile"
    printed = capsys.readouterr().out
    assert "SKIPPED compile" in printed
    assert "FOLLOW-UP (what did not run or finish): bash bench/gpu_check.sh --phase compile" in printed
    assert not (tmp_path / "compile.json").exists()


def test_pytest_command_uses_the_plugins_it_finds(monkeypatch, tmp_path, bench_script):
    gc = bench_script("gpu_check")
    real = importlib.util.find_spec

    def find(present):
        return lambda name, *a: (real("pytest") if name in present else None) if name in ("xdist", "pytest_timeout") \
            else real(name, *a)

    monkeypatch.setattr(gc.importlib.util, "find_spec", find({"xdist", "pytest_timeout"}))
    cmd = gc.pytest_command("py", tmp_path, "x.xml", "gpu", rehearse=False, selection=[])
    assert cmd[0] == "py" and cmd[cmd.index("-m"):][:2] == ["-m", "pytest"]
    assert {"-v", "-rA", "--graphs-first"} <= set(cmd)
    assert f"--junitxml={tmp_path / 'x.xml'}" in cmd and cmd[cmd.index("-m", cmd.index("pytest")) + 1] == "gpu"
    assert cmd[cmd.index("--timeout-method") + 1] == "thread" and "-n" in cmd and cmd[-1] == "tests"
    monkeypatch.setattr(gc.importlib.util, "find_spec", find({"pytest_timeout"}))
    cmd = gc.pytest_command("py", tmp_path, "x.xml", "gpu", rehearse=False, selection=[])
    assert cmd[cmd.index("--timeout-method") + 1] == "signal" and "-n" not in cmd
    monkeypatch.setattr(gc.importlib.util, "find_spec", find(set()))
    assert "--timeout" not in gc.pytest_command("py", tmp_path, "x.xml", "gpu", rehearse=False, selection=[])
    # Whatever engines bench/run.py has, the bench phase runs all but hf-compile; compile runs only hf-compile.
    bench = gc.phase_command(gc.PLAN[4], "py", tmp_path, rehearse=False, limit_s=150)
    assert bench[1] == "bench/run.py" and bench[bench.index("--exclude") + 1] == "hf-compile" and "--engines" not in bench
    assert "--cuda-graph" in gc.phase_command(gc.PLAN[3], "py", tmp_path, rehearse=False, limit_s=75)


def test_kernels_markdown_survives_partial_results_and_no_capability(bench_script):
    kernels = bench_script("kernel_bench")
    res = {"complete": False, "dtype": "bfloat16", "sizes": dataclasses.asdict(kernels.SOLAR),
           "timing": {"graph": True}, "copy": None,
           "device": {"card": "X", "capability": None, "sms": None, "memory_gib": 1.0, "torch": "t", "triton": "t",
                      "cuda": None, "date": "d"},
           "memory_ops": [{"op": "rms_norm", "tokens": 1, "impl": "triton", "bytes": 8194, "us": 2.0, "gbs": 4.1,
                           "pct_copy": None, "spread_pct": 1.0, "cache": "L2", "check": "ok"}],
           "attention": [{"op": "attention", "seq": 512, "impl": "triton", "check": "ERROR RuntimeError: boom"}],
           "decode": [],
           "fused_gemv": [{"op": "gemv", "M": 1, "impl": "triton", "us": 3.25, "check": "ok"}]}
    text = kernels.markdown(res)
    assert "**X** (1.0 GiB)" in text and "INCOMPLETE" in text
    assert "| rms_norm | 1 | 0.01 | 2.0 | 4 |  | n/a | n/a |  | n/a | 1.0% | L2 | ok |" in text
    assert "ERROR RuntimeError: boom" in text
    assert "| gemv | 1 | triton | 3.25 | ok |" in text  # a section without its own table gets the generic one
