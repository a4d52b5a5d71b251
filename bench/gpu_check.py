#!/usr/bin/env python
"""The evidence run on a lent GPU, time-boxed and incremental; `bash bench/gpu_check.sh` runs this file.

    bash bench/gpu_check.sh                    # every phase, <= 8 min on an H100/H200; files under $OUT (else ./out)
    bash bench/gpu_check.sh --phase compile    # the follow-up: what the first run skipped (any phase names, comma separated)
    bash bench/gpu_check.sh --rehearse         # every phase on this CPU at tiny shapes (Triton interpreter)
    bash bench/gpu_check.sh --list             # the phase plan: caps and estimates

Phases run in this order, each in its own process under its own time limit (a hang costs one phase, never the
run), each writing its results to $OUT as they come; a failed phase does not stop the later ones:

    info       versions, card (name, SMs, L2, driver), measured copy bandwidth; makes `fastsolar` importable
    gpu-tests  pytest -m gpu: every CUDA-only test (tests marked @pytest.mark.gpu), CUDA-graph tests first
    probe      bench/probe.py: cuBLAS GEMV/GEMM at SOLAR's weight shapes from memory; a profiled decode step
    kernels    bench/kernel_bench.py --cuda-graph: every kernel against its torch baseline at SOLAR sizes
    bench      bench/run.py --exclude hf-compile: every engine at the real SOLAR-10.7B shape, batch 1 and 8
    suite      the rest of the suite on CUDA (-m "not gpu and not cpu_only": CPU-only files deselected)
    compile    bench/run.py --engines hf-compile --batch-sizes 1, only if enough time is left; else skipped,
               with the follow-up command printed

A phase's time limit is its cap, shortened so that every later phase keeps at least its minimum; a phase with
less than its minimum left is skipped and named in the follow-up command. New tests (marked gpu or not),
engines (bench/run.py's default list) and kernel sections (bench/kernel_bench.py's SECTIONS) are picked up without
editing this file.

Files in $OUT (at most 8, none in subfolders): gpu_check.log (everything printed), summary.json (versions,
card, plan, each phase's status; rewritten after every phase), pytest-gpu.xml, probe.json, kernels.json,
bench.json, pytest-suite.xml, compile.json. pytest runs with -v -rA, a JUnit XML and, where pytest-timeout is
installed, a per-test timeout (with pytest-xdist, in parallel workers, so a hung test costs one worker).
`python bench/report.py $OUT --into bench/results` turns them into bench/results/<date>-<card>/ with a README.
Exit status: the number of phases that failed or timed out (a skipped compile phase is not a failure).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FOLLOW_UP = "bash bench/gpu_check.sh --phase"
MAX_FILES = 8


@dataclass(frozen=True)
class Phase:
    name: str
    cap_s: int  # the most this phase may take
    estimate_s: int  # expected on an H100/H200 (a warm Triton cache from earlier phases included)
    min_s: int  # the least worth starting it with
    what: str
    files: tuple[str, ...] = ()
    optional: bool = False  # runs only with min_s left; later phases reserve no time for it


PLAN: tuple[Phase, ...] = (
    Phase("info", 40, 20, 15, "versions, card, copy bandwidth; fastsolar importable", ("summary.json",)),
    Phase("gpu-tests", 85, 65, 30, "pytest -m gpu (CUDA-only tests), CUDA-graph tests first", ("pytest-gpu.xml",)),
    Phase("probe", 60, 35, 20, "cuBLAS GEMV/GEMM at SOLAR shapes; profiled graph-replayed decode step",
          ("probe.json",)),
    Phase("kernels", 75, 50, 20, "bench/kernel_bench.py --cuda-graph at SOLAR sizes", ("kernels.json",)),
    # The quantised engines (FP8, int8) run batch 1 only under the phase's --time-budget: ~10 s of the 120.
    Phase("bench", 150, 120, 60, "bench/run.py, every engine but hf-compile, SOLAR-10.7B shape", ("bench.json",)),
    Phase("suite", 55, 45, 20, "rest of the suite on CUDA (not gpu, not cpu_only)", ("pytest-suite.xml",)),
    Phase("compile", 240, 170, 180, "hf-compile (torch.compile reduce-overhead) at batch 1, if time is left",
          ("compile.json",), optional=True),
)
BUDGET_S = 470  # the whole run: under 8 minutes, inside the device's 10-minute command limit
REHEARSAL_BUDGET_S = 170
# The rehearsal runs every phase whatever its speed: short caps, a token minimum.
REHEARSAL_PLAN = tuple(replace(p, cap_s=60, min_s=5) for p in PLAN)
# Rehearsal: the same phases and code paths on a CPU, with the smallest selections that still exercise them.
REHEARSAL_TESTS = {"gpu-tests": ["tests/decoding/test_graphs.py"], "suite": ["tests/decoding/test_graphs.py", "-k", "check_batch or snapshot"]}
REHEARSAL_BENCH = ["--device", "cpu", "--preset", "tiny", "--layers", "1", "--batch-sizes", "1", "--prompt-len", "4",
                   "--new-tokens", "2", "--repeats", "1"]


# ----------------------------------------------------------------------------------------------- planning


def phase_limit(plan: tuple[Phase, ...], index: int, left_s: float) -> float:
    """Seconds phase `index` may take with `left_s` left: its cap, less what later mandatory phases need at least."""
    reserve = sum(p.min_s for p in plan[index + 1:] if not p.optional)
    return min(plan[index].cap_s, left_s - reserve)


def plan_table(plan: tuple[Phase, ...], budget_s: int) -> str:
    rows = [f"| {p.name} | {p.cap_s} s | {p.estimate_s} s | {p.min_s} s | {p.what} |" for p in plan]
    est = sum(p.estimate_s for p in plan if not p.optional)
    return "\n".join([f"Budget {budget_s} s; mandatory phases estimated at {est} s on an H100/H200, leaving "
                      f"{budget_s - est} s for the optional ones.", "",
                      "| phase | cap | estimate (H100/H200) | minimum to start | what |", "|---|---:|---:|---:|---|",
                      *rows])


def select(plan: tuple[Phase, ...], names: str | None) -> tuple[Phase, ...]:
    """The phases to run: all, or info plus the named ones (in plan order)."""
    if not names:
        return plan
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {p.name for p in plan}
    if unknown:
        raise SystemExit(f"gpu_check: unknown phase(s) {sorted(unknown)}; phases: {', '.join(p.name for p in plan)}")
    wanted.add("info")  # every run records what it ran on
    return tuple(p for p in plan if p.name in wanted)


def status_of(phase: Phase, rc: int | None) -> str:
    if rc is None:
        return "timeout"
    if rc == 0 or (rc == 5 and phase.name in ("gpu-tests", "suite")):  # pytest's 5: no test selected
        return "passed"
    return "failed"


# ---------------------------------------------------------------------------------------------- commands


def pytest_command(py: str, out: Path, junit: str, marker: str, rehearse: bool, selection: list[str],
                   limit_s: float = 0) -> list[str]:
    """pytest with -v -rA, a JUnit XML, per-test timeouts and xdist workers where those plugins are installed;
    with pytest-timeout >= 2.3 it also stops starting tests before `limit_s`, so that the XML still gets written."""
    # -P (Python >= 3.11): no repo root on sys.path, as with CI's plain `pytest`, so every import of fastsolar is
    # the installed package (a bare `kernels` there is an empty module: kernels/__init__.py).
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [py, *safe_path, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "--graphs-first", "-m", marker,
           f"--junitxml={out / junit}", "-o", "junit_family=xunit2"]
    xdist = importlib.util.find_spec("xdist") is not None and not rehearse
    if importlib.util.find_spec("pytest_timeout") is not None:
        # With workers, a hung test is ended by killing its worker (thread method); without, by SIGALRM.
        cmd += ["--timeout", "150", "--timeout-method", "thread" if xdist else "signal"]
        if limit_s > 60 and _versions().pytest_session_timeout_supported():
            cmd += ["--session-timeout", str(int(limit_s - 25))]
    if xdist:
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 2) // 2)))]
    return cmd + (selection or ["tests"])


def _versions():
    """fastsolar/versions.py (the version gates) on its own: this process runs before fastsolar may be installed
    (the info phase installs it), and versions.py imports nothing of fastsolar."""
    if "fastsolar_versions" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fastsolar_versions", ROOT / "fastsolar" / "versions.py")
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["fastsolar_versions"]


def phase_command(phase: Phase, py: str, out: Path, rehearse: bool, limit_s: float) -> list[str]:
    r = ["--rehearse"] if rehearse else []
    budget = str(int(max(10, limit_s - 30)))  # bench/run.py starts nothing new after this; writes what finished
    if phase.name == "gpu-tests":
        return pytest_command(py, out, "pytest-gpu.xml", "gpu", rehearse,
                              REHEARSAL_TESTS["gpu-tests"] if rehearse else [], limit_s)
    if phase.name == "suite":
        return pytest_command(py, out, "pytest-suite.xml", "not gpu and not cpu_only", rehearse,
                              REHEARSAL_TESTS["suite"] if rehearse else [], limit_s)
    if phase.name == "probe":
        return [py, "bench/probe.py", "--json", str(out / "probe.json"), *r]
    if phase.name == "kernels":
        return [py, "bench/kernel_bench.py", "--cuda-graph", "--json", str(out / "kernels.json"), *r]
    bench = REHEARSAL_BENCH if rehearse else []
    if phase.name == "bench":
        return [py, "bench/run.py", "--exclude", "hf-compile", "--json", str(out / "bench.json"),
                "--time-budget", budget, *bench]
    if phase.name == "compile":
        return [py, "bench/run.py", "--engines", "hf-compile", "--batch-sizes", "1", "--json", str(out / "compile.json"),
                "--time-budget", budget, *bench]
    raise ValueError(phase.name)


# --------------------------------------------------------------------------------------------- execution


class Log:
    """Everything printed goes to stdout and to $OUT/gpu_check.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self.file.write(text + "\n")
            self.file.flush()


def run_process(cmd: list[str], limit_s: float, log: Log, env: dict[str, str],
                cwd: Path | str = ROOT) -> tuple[int | None, float]:
    """Run cmd (its own process group) with output to the log; on the limit SIGTERM, then SIGKILL after 15 s.
    Returns (exit status or None when it was stopped at the limit, seconds)."""
    t0 = time.monotonic()
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        rc = None
        _signal_group(proc, signal.SIGTERM)  # bench/run.py writes its JSON and table on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return rc, time.monotonic() - t0


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


NOT_IMPORTABLE = 3  # collect_info's exit status when fastsolar does not import from this tree


def install_fastsolar(py: str, log: Log, env: dict[str, str]) -> dict[str, str]:
    """Make `fastsolar` and `fastsolar.kernels` import from this tree in child processes: an offline editable
    install, else a symlink fastsolar/kernels -> ../kernels plus PYTHONPATH (the lent machine runs a throw-away
    copy of the tree). Returns the environment later phases get."""
    log("fastsolar does not import from this tree: pip install --no-deps --no-build-isolation --no-index -e .")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                        str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    log((p.stdout + p.stderr).strip()[-1500:])
    if p.returncode == 0:
        return env
    log("editable install failed; using a symlink fastsolar/kernels -> ../kernels and PYTHONPATH")
    link = ROOT / "fastsolar" / "kernels"
    if not link.exists():
        link.symlink_to("../kernels")
    return dict(env, PYTHONPATH=os.pathsep.join([str(ROOT)] + [v for v in [env.get("PYTHONPATH")] if v]))


def collect_info(path: str, rehearse: bool) -> int:
    """(The info phase's child process, run from a temporary folder.) Check that fastsolar imports from this
    tree (else exit NOT_IMPORTABLE), then write versions, card and copy bandwidth as JSON at `path`."""
    try:
        import fastsolar.kernels
        import fastsolar.model  # noqa: F401
    except ImportError as e:
        print(f"fastsolar is not importable: {e}", flush=True)
        return NOT_IMPORTABLE
    found = os.path.realpath(fastsolar.kernels.__file__)
    print(f"fastsolar.kernels: {found}", flush=True)
    if not found.startswith(os.path.realpath(ROOT) + os.sep):
        print(f"fastsolar.kernels is not this tree's kernels/ ({ROOT})", flush=True)
        return NOT_IMPORTABLE
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from common import copy_bandwidth, device_info

    from fastsolar import versions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info(device)
    info["packages"] = {n: str(versions.installed_version(n)) for n in
                        ("torch", "triton", "numpy", "transformers", "safetensors", "sentencepiece", "pytest",
                         "pytest-timeout", "pytest-xdist", "packaging")}
    info["interpreter_numpy_conflict"] = versions.interpreter_numpy_conflict()
    info["copy"] = copy_bandwidth(device, 1 / 64 if rehearse else None)
    print(f"{info['card']}: {info['sms']} SMs, L2 {info['l2_mib']} MiB, {info['memory_gib']} GiB; copy bandwidth "
          f"{info['copy']['gbs']:.0f} GB/s ({info['copy']['method']})", flush=True)
    with open(path, "w") as f:
        json.dump(info, f, indent=1, default=str)
    return 0


def nvidia_smi(log: Log) -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        log("nvidia-smi: not found")
        return {}
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        log(p.stdout.strip() or p.stderr.strip())
        values = [v.strip() for v in p.stdout.splitlines()[0].split(",")] if p.stdout.strip() else []
        return dict(zip(fields.split(","), values))
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        log(f"nvidia-smi failed: {e}")
        return {}


# ---------------------------------------------------------------------------------------------- results


def result_line(phase: Phase, out: Path) -> str:
    """One line of what a phase's file says (counts, the headline numbers), for the summary."""
    try:
        if phase.name in ("gpu-tests", "suite"):
            root = ET.parse(out / phase.files[0]).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
        data = json.loads((out / phase.files[0]).read_text())
        if phase.name == "probe":
            step = (data.get("profile") or {}).get("step") or {}
            bad = [r["shape"] for r in data.get("gemv", []) if not str(r.get("check", "")).startswith("ok")]
            return (f"{len(data.get('gemv', []))} GEMV rows{' (not ok: ' + ', '.join(bad) + ')' if bad else ''}; "
                    f"decode step {step.get('ms', float('nan')):.3f} ms" if step else "no decode profile")
        if phase.name == "kernels":
            rows = [r for k, v in data.items() if isinstance(v, list) for r in v]
            bad = [r for r in rows if str(r.get("check", "")).startswith(("BAD", "ERROR"))]
            return f"{len(rows)} rows, {len(bad)} failed checks{'' if data.get('complete') else ', INCOMPLETE'}"
        if phase.name in ("bench", "compile"):
            parts = []
            for name, e in data.get("engines", {}).items():
                r1 = e.get("results", {}).get("1")
                parts.append(f"{name}: {e['status']}" + (f" {r1['decode_tokens_per_s']:.1f} tok/s b1" if r1 else ""))
            return "; ".join(parts)
    except (OSError, ValueError, KeyError, ET.ParseError, TypeError) as e:
        return f"no result file ({type(e).__name__})"
    return ""


@dataclass
class Run:
    out: Path
    rehearse: bool
    budget_s: int
    phases: tuple[Phase, ...]
    log: Log
    started: float = field(default_factory=time.monotonic)
    summary: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")


def banner(log: Log, run: Run, text: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    log()
    log(f"=== [{now} UTC, {time.monotonic() - run.started:.0f} s of {run.budget_s} s] {text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--phase", help="run only these phases (comma separated; info always runs): the follow-up")
    ap.add_argument("--rehearse", action="store_true", help="every phase on the CPU at tiny shapes (Triton interpreter)")
    ap.add_argument("--budget", type=int, default=None,
                    help=f"seconds for the whole run (default {BUDGET_S}, {REHEARSAL_BUDGET_S} with --rehearse; "
                         "env GPU_CHECK_TOTAL_S)")
    ap.add_argument("--list", action="store_true", help="print the phase plan and exit")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else ./out)")
    ap.add_argument("--collect-info", metavar="PATH", help=argparse.SUPPRESS)  # the info phase's child process
    args = ap.parse_args(argv)
    if args.collect_info:
        return collect_info(args.collect_info, args.rehearse)
    budget = args.budget or int(os.environ.get("GPU_CHECK_TOTAL_S", 0)) or (
        REHEARSAL_BUDGET_S if args.rehearse else BUDGET_S)
    plan = REHEARSAL_PLAN if args.rehearse else PLAN
    phases = select(plan, args.phase)
    if args.list:
        print(plan_table(plan, budget))
        return 0

    out = (args.out or Path(os.environ.get("OUT") or ROOT / "out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for phase in phases:  # a rerun into the same folder must not mix stale results with fresh ones
        for name in phase.files:
            (out / name).unlink(missing_ok=True)
    log = Log(out / "gpu_check.log")
    run = Run(out, args.rehearse, budget, phases, log)
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run.summary.update(mode="rehearse" if args.rehearse else "gpu", budget_s=budget,
                       started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       command=" ".join(["bash bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
                       plan=[asdict(p) for p in plan], phases={}, follow_up=None)
    log(plan_table(phases, budget))
    skipped: list[str] = []
    failed = 0
    for i, phase in enumerate(phases):
        limit = phase_limit(phases, i, run.left())
        mins = phase.min_s
        record: dict[str, Any] = {"cap_s": phase.cap_s, "estimate_s": phase.estimate_s, "limit_s": round(limit)}
        run.summary["phases"][phase.name] = record
        if limit < mins:
            record["status"] = "skipped"
            record["reason"] = f"{max(0, run.left()):.0f} s left, {limit:.0f} s for this phase; it needs {mins} s"
            skipped.append(phase.name)
            banner(log, run, f"SKIPPED {phase.name}: {record['reason']}")
            run.save()
            continue
        banner(log, run, f"phase {phase.name} (limit {limit:.0f} s, cap {phase.cap_s} s, estimate {phase.estimate_s} s): "
                         f"{phase.what}")
        if phase.name == "info":
            rc, seconds, env = _info_phase(run, py, env, limit)
        else:
            rc, seconds = run_process(phase_command(phase, py, out, args.rehearse, limit), limit, log, env)
        status = status_of(phase, rc)
        record.update(status=status, rc=rc, seconds=round(seconds, 1), result=result_line(phase, out) if phase.files
                      and phase.name != "info" else "")
        failed += status != "passed"
        log(f"--- {phase.name}: {status.upper()} in {seconds:.0f} s{' (exit ' + str(rc) + ')' if rc else ''}"
            f"{': ' + record['result'] if record['result'] else ''}")
        if status == "timeout":
            skipped.append(phase.name)
        run.save()

    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    follow_up = f"{FOLLOW_UP} {','.join(skipped)}" if skipped else None
    run.summary["follow_up"] = follow_up
    run.save()
    banner(log, run, f"done: {failed} phase(s) failed or timed out; results in {out}")
    log("| phase | status | seconds | limit | result |")
    log("|---|---|---:|---:|---|")
    for name, r in run.summary["phases"].items():
        log(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {r.get('limit_s')} | "
            f"{r.get('result') or r.get('reason', '')} |")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    deep = [p for p in files if len(p.relative_to(out).parts) > 2]
    log(f"files ({len(files)}): " + ", ".join(str(p.relative_to(out)) for p in files))
    if len(files) > MAX_FILES or deep:
        log(f"WARNING: more than {MAX_FILES} files or files deeper than $OUT/x: not all of them come back")
    if follow_up:
        log(f"FOLLOW-UP (what did not run or finish): {follow_up}")
    return failed


def _info_phase(run: Run, py: str, env: dict[str, str], limit: float) -> tuple[int | None, float, dict[str, str]]:
    """Card facts and versions (installing fastsolar first when it does not import from this tree). Returns the
    exit status, seconds and the environment later phases get."""
    t0 = time.monotonic()
    run.summary["nvidia_smi"] = nvidia_smi(run.log)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "info.json")
        cmd = [py, str(ROOT / "bench" / "gpu_check.py"), "--collect-info", path] + (["--rehearse"] if run.rehearse else [])
        rc, _ = run_process(cmd, limit - (time.monotonic() - t0), run.log, env, cwd=d)
        if rc == NOT_IMPORTABLE:
            env = install_fastsolar(py, run.log, env)
            rc, _ = run_process(cmd, limit - (time.monotonic() - t0), run.log, env, cwd=d)
        if rc == 0:
            run.summary["info"] = json.loads(Path(path).read_text())
    return rc, time.monotonic() - t0, env


if __name__ == "__main__":
    sys.exit(main())
