#!/usr/bin/env python
"""The evidence run on a lent GPU, time-boxed, value first, incremental; `bash bench/gpu_check.sh` runs this file.

    bash bench/gpu_check.sh                    # the mandatory phases (and what else fits), <= 8 min on an H200
    bash bench/gpu_check.sh --phase compile,kernels-rest,gpu-heavy,suite --budget 210   # the follow-up it prints
    bash bench/gpu_check.sh --rehearse         # every phase on this CPU at tiny shapes (Triton interpreter)
    bash bench/gpu_check.sh --list             # the phases with their caps

Phases, in order of value, each in its own process under its own time limit (a hang costs one phase, never the
run), each writing its results to $OUT as they come; a failed phase does not stop the later ones:

    info          card facts: versions, card, driver, copy bandwidth; the tests collected for the plan
    gpu-tests     pytest -m "gpu and not heavy": CUDA graphs first, then the quantised tests, then the rest
    kernels       bench/kernel_bench.py gemv,decode: fused GEMV vs cuBLAS (bf16/fp8/int8, SOLAR's 5 shapes, M 1
                  and 8) and decode attention, every row over a ring of inputs > 3x L2
    probe         bench/probe.py: the profiled full-size decode step, then cuBLAS GEMVs from memory
    bench         bench/run.py --exclude hf-compile: fastsolar, fastsolar-fp8, fastsolar-int8, then the baselines
  optional (in the first call when time is left, else in the follow-up, hf-compile first):
    compile       bench/run.py --engines hf-compile --batch-sizes 1
    kernels-rest  bench/kernel_bench.py rotary_cache,attention,memory_ops (with Liger-Kernel),quant_gemm
    gpu-heavy     pytest -m heavy: CUDA tests that take a minute or more (bench/run.py's engines in a subprocess)
    suite         the rest of the suite on CUDA (-m "not gpu and not cpu_only and not heavy")

The plan: after the info phase every later phase's work is counted (the collected tests of its selection, the
kernel-bench rows, the engines x batch sizes x generate calls) and turned into an H200 estimate by
bench/gpu_plan.py's stated per-item costs. summary.json holds it (phase, counted work, estimate, cap); a
mandatory phase estimated over its cap, mandatory phases over gpu_plan.MANDATORY_S together, or a follow-up
whose hf-compile does not fit gpu_plan.FOLLOW_UP_S count as failures (the rehearsal enforces them in CI).

A phase's time limit is its cap, shortened so that every later mandatory phase keeps at least its minimum; an
optional phase starts only when its estimate (with gpu_plan.OPTIONAL_MARGIN) fits in what is left. What is
skipped or cut short goes into the follow-up command (compile first), sized to FOLLOW_UP_S.

Nothing is lost on a timeout: every JSON is rewritten after each row or engine; pytest appends each test's
result to tests.jsonl as it finishes (tests/conftest.py's --results-jsonl; a test that started and never
reported is listed as unfinished), with a per-test timeout below the phase's cap. New tests (marked gpu,
heavy or neither), engines (bench/run.py's ENGINES) and kernel sections (bench/kernel_bench.py's SECTIONS,
assigned to a phase in KERNEL_SECTIONS) are picked up without editing the phases.

Files in $OUT (at most 8, none in subfolders): gpu_check.log (everything printed), summary.json (versions, card,
plan, each phase's status; rewritten after every phase), tests.jsonl, kernels.json, probe.json, bench.json,
compile.json, kernels-rest.json. `python bench/report.py $OUT --into bench/results` turns them into
bench/results/<date>-<card>/ with a README. Liger-Kernel (bench/wheels/) is installed with `pip --no-deps
--no-index --target` into a temporary folder on PYTHONPATH when it does not import.
Exit status: the number of phases that failed or timed out, plus one for a plan over its limits (a skipped
optional phase is not a failure).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))
import gpu_plan  # noqa: E402  (bench/ on sys.path, as `python bench/gpu_check.py` has it)
from common import test_results  # noqa: E402

FOLLOW_UP = "bash bench/gpu_check.sh --phase"
MAX_FILES = 8
TESTS_FILE = "tests.jsonl"


@dataclass(frozen=True)
class Phase:
    name: str
    cap_s: int  # the most this phase may take
    min_s: int  # the least worth starting it with (optional phases: their estimate, once counted)
    what: str
    files: tuple[str, ...] = ()
    optional: bool = False  # runs only when its estimate fits in what is left; later phases reserve no time for it
    estimate_s: float | None = None  # from the counted work (gpu_plan), set after the info phase
    tests: int | None = None  # pytest phases: the tests counted, and the longest one's estimate (its timeout)
    longest_test_s: float = 0.0


PLAN: tuple[Phase, ...] = (
    Phase("info", 45, 15, "card facts: versions, card, driver, copy bandwidth; tests collected for the plan",
          ("summary.json",)),
    Phase("gpu-tests", 80, 30, "pytest -m 'gpu and not heavy': CUDA graphs, then quantised, then the rest",
          (TESTS_FILE,)),
    Phase("kernels", 110, 20, "decode GEMVs fused vs cuBLAS (bf16/fp8/int8/int4, M 1 and 8) and decode attention",
          ("kernels.json",)),
    Phase("probe", 50, 20, "profiled full-size decode step (CUDA graph); cuBLAS GEMVs from memory", ("probe.json",)),
    Phase("bench", 185, 60, "bench/run.py at SOLAR shape: fastsolar, -fp8, -int8, -int4, then the baselines",
          ("bench.json",)),
    Phase("compile", 200, 150, "hf-compile (torch.compile reduce-overhead) at batch 1", ("compile.json",), optional=True),
    Phase("kernels-rest", 90, 30, "rotary+cache, prefill attention, memory ops (with Liger), quantised GEMM",
          ("kernels-rest.json",), optional=True),
    Phase("gpu-heavy", 150, 60, "pytest -m heavy: the CUDA tests of a minute or more", (TESTS_FILE,), optional=True),
    Phase("suite", 90, 30, "the rest of the suite on CUDA", (TESTS_FILE,), optional=True),
)
BUDGET_S = 470  # the first call: under 8 minutes, inside the device's 10-minute command limit
REHEARSAL_BUDGET_S = 330
# The rehearsal runs every phase whatever its speed: short caps, a token minimum.
REHEARSAL_PLAN = tuple(replace(p, cap_s=60, min_s=5) for p in PLAN)
#: pytest phases: their marker selection (the lent run) and the rehearsal's smallest selection with the same paths.
PYTEST_PHASES = {
    "gpu-tests": ("gpu and not heavy and not cpu_only", gpu_plan.GPU_TEST_COMPILES, ["tests/decoding/test_graphs.py"]),
    "gpu-heavy": ("heavy and not cpu_only", 0.0, ["tests/test_bench.py"]),
    "suite": ("not gpu and not cpu_only and not heavy", gpu_plan.SUITE_TEST_COMPILES,
              ["tests/decoding/test_graphs.py", "-k", "check_batch or snapshot"]),
}
#: bench/kernel_bench.py's sections by phase: the decode path first.
KERNEL_SECTIONS = {"kernels": ["gemv", "decode"], "kernels-rest": ["rotary_cache", "attention", "memory_ops", "quant_gemm"]}
REHEARSAL_BENCH = ["--device", "cpu", "--preset", "tiny", "--layers", "1", "--batch-sizes", "1", "--prompt-len", "4",
                   "--new-tokens", "2", "--repeats", "1"]
TEST_TIMEOUT_MIN_S = 60  # a test's timeout: at least this, at most its phase's limit less 20 s


# ----------------------------------------------------------------------------------------------- planning


def phase_limit(plan: tuple[Phase, ...], index: int, left_s: float) -> float:
    """Seconds phase `index` may take with `left_s` left: its cap, less what later mandatory phases need at least."""
    reserve = sum(p.min_s for p in plan[index + 1:] if not p.optional)
    return min(plan[index].cap_s, left_s - reserve)


def count_work(plan: tuple[Phase, ...], items: list[dict[str, Any]] | None) -> dict[str, gpu_plan.Estimate]:
    """Each phase's counted work and H200 estimate (gpu_plan), from the collected test items (None: not
    collected, the pytest phases then have no estimate) and the code the other phases run."""
    import kernel_bench

    features = kernel_bench.Features(fp8=True, liger_missing=None)  # an H200 with the carried Liger wheel
    out: dict[str, gpu_plan.Estimate] = {}
    engines = gpu_plan.run_engines(ROOT)
    for p in plan:
        if p.name == "info":
            out[p.name] = gpu_plan.info_estimate(p.name)
        elif p.name in PYTEST_PHASES and items is not None:
            expr, compiles, _ = PYTEST_PHASES[p.name]
            out[p.name] = gpu_plan.pytest_estimate(p.name, items, expr, compiles)
        elif p.name in KERNEL_SECTIONS:
            rows = kernel_bench.plan(kernel_bench.SOLAR, "bfloat16", features, KERNEL_SECTIONS[p.name])
            out[p.name] = gpu_plan.kernels_estimate(p.name, rows)
        elif p.name == "probe":
            out[p.name] = gpu_plan.probe_estimate(p.name, 10)
        elif p.name == "bench":
            out[p.name] = gpu_plan.bench_estimate(p.name, [e for e in engines if e != "hf-compile"])
        elif p.name == "compile":
            out[p.name] = gpu_plan.bench_estimate(p.name, ["hf-compile"], (1,))
    return out


def apply_estimates(plan: tuple[Phase, ...], est: dict[str, gpu_plan.Estimate]) -> tuple[Phase, ...]:
    """The plan with each phase's estimate; an optional phase's minimum becomes its estimate with
    gpu_plan.OPTIONAL_MARGIN (it starts only when that fits: a phase cut short by its limit is time lost)."""
    out = []
    for p in plan:
        e = est.get(p.name)
        if e is None:
            out.append(p)
            continue
        out.append(replace(p, estimate_s=round(e.estimate_s, 1),
                           min_s=math.ceil(gpu_plan.OPTIONAL_MARGIN * e.estimate_s) if p.optional else p.min_s,
                           tests=e.counts.get("tests"), longest_test_s=e.counts.get("max_test_s", 0.0)))
    return tuple(out)


def follow_up_phases(plan: tuple[Phase, ...], names: list[str]) -> list[str]:
    """The follow-up's phases: hf-compile first, then the rest in plan order."""
    order = [p.name for p in plan if p.name == "compile"] + [p.name for p in plan if p.name != "compile"]
    return [n for n in order if n in names and n != "info"]


def follow_up_fit(plan: tuple[Phase, ...], names: list[str]) -> tuple[list[str], list[str]]:
    """(phases the follow-up runs within FOLLOW_UP_S, phases left over): info's estimate first, then what each
    needs to start (an optional phase's minimum, a mandatory one's estimate)."""
    by = {p.name: p for p in plan}
    used = by["info"].estimate_s or by["info"].min_s
    fits, left = [], []
    for n in follow_up_phases(plan, names):
        p = by[n]
        cost = p.min_s if p.optional else p.estimate_s if p.estimate_s is not None else p.cap_s
        if not left and used + cost <= gpu_plan.FOLLOW_UP_S:
            fits.append(n)
            used += cost
        else:
            left.append(n)
    return fits, left


def plan_problems(plan: tuple[Phase, ...]) -> list[str]:
    """What makes the plan unfit: a mandatory phase with no estimate or one over its cap, mandatory phases over
    MANDATORY_S together, a follow-up that cannot start with hf-compile inside FOLLOW_UP_S."""
    problems = []
    mandatory = [p for p in plan if not p.optional]
    for p in mandatory:
        if p.estimate_s is None:
            problems.append(f"{p.name}: no estimate (its work could not be counted)")
        elif p.estimate_s > p.cap_s:
            problems.append(f"{p.name}: estimate {p.estimate_s:.0f} s over its cap {p.cap_s} s")
    total = sum(p.estimate_s or 0 for p in mandatory)
    if total > gpu_plan.MANDATORY_S:
        problems.append(f"mandatory phases estimated at {total:.0f} s, over {gpu_plan.MANDATORY_S} s")
    optional = [p.name for p in plan if p.optional]
    if "compile" in optional:
        fits, _ = follow_up_fit(plan, optional)
        if not fits or fits[0] != "compile":
            problems.append(f"the follow-up cannot run hf-compile within {gpu_plan.FOLLOW_UP_S} s")
    return problems


def plan_table(plan: tuple[Phase, ...], budget_s: int, est: dict[str, gpu_plan.Estimate] | None = None) -> str:
    est = est or {}
    rows = [f"| {p.name} | {'optional' if p.optional else 'mandatory'} | {p.cap_s} s | "
            f"{'' if p.estimate_s is None else f'{p.estimate_s:.0f} s'} | {est[p.name].work if p.name in est else ''} | "
            f"{p.what} |" for p in plan]
    mandatory = sum(p.estimate_s or 0 for p in plan if not p.optional)
    return "\n".join([f"Budget {budget_s} s; mandatory phases estimated at {mandatory:.0f} s on an H200 (limit "
                      f"{gpu_plan.MANDATORY_S} s); follow-up {gpu_plan.FOLLOW_UP_S} s, hf-compile first.", "",
                      "| phase | kind | cap | estimate (H200) | counted work | what |", "|---|---|---:|---:|---|---|",
                      *rows])


def select(plan: tuple[Phase, ...], names: str | None) -> tuple[Phase, ...]:
    """The phases to run: all, or info plus the named ones (plan order; hf-compile first among the optional
    ones, where it already is)."""
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
    if rc == 0 or (rc == 5 and phase.name in PYTEST_PHASES):  # pytest's 5: no test selected
        return "passed"
    return "failed"


# ---------------------------------------------------------------------------------------------- commands


def pytest_command(py: str, out: Path, label: str, marker: str, rehearse: bool, selection: list[str],
                   limit_s: float = 0, tests: int | None = None, longest_s: float = 0.0) -> list[str]:
    """pytest with -v -rA, each test's result appended to $OUT/tests.jsonl as it finishes (labelled with the
    phase), per-test timeouts below the phase's limit and xdist workers (no more than the `tests` counted) where
    those plugins are installed; with pytest-timeout >= 2.3 it also stops starting tests before `limit_s`."""
    # -P (Python >= 3.11): no repo root on sys.path, as with CI's plain `pytest`, so every import of fastsolar is
    # the installed package (a bare `kernels` there is an empty module: kernels/__init__.py).
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [py, *safe_path, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "--graphs-first", "-m", marker,
           f"--results-jsonl={out / TESTS_FILE}", f"--results-label={label}"]
    workers = min(gpu_plan.WORKERS, tests if tests is not None else gpu_plan.WORKERS)
    xdist = importlib.util.find_spec("xdist") is not None and not rehearse and workers > 1
    if importlib.util.find_spec("pytest_timeout") is not None:
        # With workers, a hung test is ended by killing its worker (thread method); without, by SIGALRM.
        cmd += ["--timeout", str(test_timeout(limit_s, longest_s)), "--timeout-method", "thread" if xdist else "signal"]
        if limit_s > 60 and _versions().pytest_session_timeout_supported():
            cmd += ["--session-timeout", str(int(limit_s - 25))]
    if xdist:
        cmd += ["-n", str(workers)]
    return cmd + (selection or ["tests"])


def test_timeout(limit_s: float, longest_s: float = 0.0) -> int:
    """A test's timeout in a phase limited to `limit_s` whose longest test is estimated at `longest_s`: twice
    that, at least TEST_TIMEOUT_MIN_S, and below the limit (so a hang costs one test and the phase still reports)."""
    return int(max(10, min(limit_s - 20, max(TEST_TIMEOUT_MIN_S, 2 * longest_s))))


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
    if phase.name in PYTEST_PHASES:
        marker, _, rehearsal = PYTEST_PHASES[phase.name]
        return pytest_command(py, out, phase.name, marker, rehearse, rehearsal if rehearse else [], limit_s,
                              None if rehearse else phase.tests, phase.longest_test_s)
    if phase.name == "probe":
        return [py, "bench/probe.py", "--parts", "profile,gemv", "--json", str(out / "probe.json"), *r]
    if phase.name in KERNEL_SECTIONS:
        return [py, "bench/kernel_bench.py", "--sections", ",".join(KERNEL_SECTIONS[phase.name]), "--json",
                str(out / phase.files[0]), *r]
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
        if phase.name in PYTEST_PHASES:
            res = test_results(out / TESTS_FILE, phase.name)
            line = ", ".join(f"{n} {k}" for k, n in res["counts"].items()) or "no test reported"
            if res["unfinished"]:
                line += f"; unfinished (killed or hung): {', '.join(res['unfinished'][:3])}"
            return line
        data = json.loads((out / phase.files[0]).read_text())
        if phase.name == "probe":
            step = (data.get("profile") or {}).get("step") or {}
            bad = [r["shape"] for r in data.get("gemv", []) if not str(r.get("check", "")).startswith("ok")]
            return (f"decode step {step.get('ms', float('nan')):.3f} ms; " if step else "no decode profile; ") + \
                f"{len(data.get('gemv', []))} GEMV rows{' (not ok: ' + ', '.join(bad) + ')' if bad else ''}"
        if phase.name in KERNEL_SECTIONS:
            rows = [r for k, v in data.items() if k in KERNEL_SECTIONS[phase.name] for r in v]
            bad = [r for r in rows if str(r.get("check", "")).startswith(("BAD", "ERROR"))]
            return (f"{len(rows)} of {len(data.get('plan', []))} planned rows, {len(bad)} failed checks"
                    f"{'' if data.get('complete') else ', INCOMPLETE'}")
        if phase.name in ("bench", "compile"):
            parts = []
            for name, e in data.get("engines", {}).items():
                r1 = e.get("results", {}).get("1")
                parts.append(f"{name}: {e['status']}" + (f" {r1['decode_tokens_per_s']:.1f} tok/s b1" if r1 else ""))
            return "; ".join(parts)
    except (OSError, ValueError, KeyError, TypeError) as e:
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
    items: list[dict[str, Any]] | None = None  # the collected tests (nodeid, marks), for the plan

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
    ap.add_argument("--list", action="store_true", help="print the plan (counted work, H200 estimates, caps) and exit")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else ./out)")
    ap.add_argument("--collect-info", metavar="PATH", help=argparse.SUPPRESS)  # the info phase's child process
    args = ap.parse_args(argv)
    if args.collect_info:
        return collect_info(args.collect_info, args.rehearse)
    budget = args.budget or int(os.environ.get("GPU_CHECK_TOTAL_S", 0)) or (
        REHEARSAL_BUDGET_S if args.rehearse else BUDGET_S)
    plan = REHEARSAL_PLAN if args.rehearse else PLAN
    phases = select(plan, args.phase)
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.list:
        with tempfile.TemporaryDirectory() as d:
            est = count_work(PLAN, collect_tests(py, env, print, Path(d), 120))
        print(plan_table(apply_estimates(PLAN, est), BUDGET_S, est))
        problems = plan_problems(apply_estimates(PLAN, est))
        print("\n".join(["", "PLAN PROBLEMS:", *problems]) if problems else "\nplan within its limits")
        return len(problems)

    out = (args.out or Path(os.environ.get("OUT") or ROOT / "out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for phase in phases:  # a rerun into the same folder must not mix stale results with fresh ones
        for name in phase.files:
            (out / name).unlink(missing_ok=True)
    log = Log(out / "gpu_check.log")
    run = Run(out, args.rehearse, budget, phases, log)
    run.summary.update(mode="rehearse" if args.rehearse else "gpu", budget_s=budget,
                       started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       command=" ".join(["bash bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
                       phases={}, plan=None, follow_up=None)
    log(plan_table(phases, budget))
    skipped: list[str] = []
    failed = 0
    i = 0
    while i < len(phases):
        phase = phases[i]
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
            i += 1
            continue
        banner(log, run, f"phase {phase.name} (limit {limit:.0f} s, cap {phase.cap_s} s, estimate "
                         f"{'?' if phase.estimate_s is None else round(phase.estimate_s)} s): {phase.what}")
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
        if phase.name == "info":
            phases, problems = _plan(run, phases, args.rehearse)
            failed += bool(problems)
        run.save()
        i += 1

    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    if run.summary.get("liger_site"):
        shutil.rmtree(run.summary["liger_site"], ignore_errors=True)
    left = follow_up_phases(PLAN, skipped)
    follow_up = f"{FOLLOW_UP} {','.join(left)} --budget {gpu_plan.FOLLOW_UP_S}" if left else None
    run.summary["follow_up"] = follow_up
    run.save()
    banner(log, run, f"done: {failed} failure(s) (phases failed or timed out, a plan over its limits); results in {out}")
    log("| phase | status | seconds | estimate | limit | result |")
    log("|---|---|---:|---:|---:|---|")
    for name, r in run.summary["phases"].items():
        log(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {r.get('estimate_s')} | {r.get('limit_s')} | "
            f"{r.get('result') or r.get('reason', '')} |")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    deep = [p for p in files if len(p.relative_to(out).parts) > 2]
    log(f"files ({len(files)}): " + ", ".join(str(p.relative_to(out)) for p in files))
    if len(files) > MAX_FILES or deep:
        log(f"WARNING: more than {MAX_FILES} files or files deeper than $OUT/x: not all of them come back")
    if follow_up:
        log(f"FOLLOW-UP (what did not run or finish): {follow_up}")
    return failed


def _plan(run: Run, phases: tuple[Phase, ...], rehearse: bool) -> tuple[tuple[Phase, ...], list[str]]:
    """Count every phase's work (the lent H200's plan, in a rehearsal too), record it in the summary and print it;
    returns the phases to run with their estimates (a rehearsal keeps its token minimums) and the plan's problems."""
    est = count_work(PLAN, run.items)
    full = apply_estimates(PLAN, est)
    problems = plan_problems(full)
    fits, left = follow_up_fit(full, [p.name for p in full if p.optional])
    run.summary["plan"] = {
        "phases": [{"phase": p.name, "optional": p.optional, "cap_s": p.cap_s, "estimate_s": p.estimate_s,
                    "work": est[p.name].work if p.name in est else None,
                    "counts": est[p.name].counts if p.name in est else None} for p in full],
        "mandatory_estimate_s": round(sum(p.estimate_s or 0 for p in full if not p.optional), 1),
        "mandatory_limit_s": gpu_plan.MANDATORY_S,
        "follow_up": {"budget_s": gpu_plan.FOLLOW_UP_S, "runs": fits, "left": left},
        "costs": {k: v for k, v in vars(gpu_plan).items() if k.isupper()},
        "problems": problems,
    }
    run.log(plan_table(full, BUDGET_S, est))
    run.log(f"follow-up within {gpu_plan.FOLLOW_UP_S} s: {', '.join(fits) or 'nothing'}"
            f"{'; left for later: ' + ', '.join(left) if left else ''}")
    for problem in problems:
        run.log(f"PLAN PROBLEM: {problem}")
    by = {p.name: p for p in full}
    if rehearse:
        return tuple(replace(p, estimate_s=by[p.name].estimate_s) for p in phases), problems
    return tuple(by[p.name] for p in phases), problems


def collect_tests(py: str, env: dict[str, str], log, folder: Path, timeout_s: float) -> list[dict[str, Any]] | None:
    """Every test the GPU run could select (`-m "not cpu_only"`), with its markers, from `pytest --collect-only`
    (tests/conftest.py's --collect-json); None when collection fails."""
    path = folder / "collected.json"
    cmd = [py, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pytest", "--collect-only", "-q", "-p",
           "no:cacheprovider", "-m", "not cpu_only", f"--collect-json={path}", "tests"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(5.0, timeout_s))
        items = json.loads(path.read_text())
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        log(f"test collection failed ({type(e).__name__}: {e}); the pytest phases have no estimate")
        return None
    log(f"collected {len(items)} tests for the plan (pytest exit {p.returncode})")
    return items


def install_liger(py: str, log, env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Liger-Kernel (the element-wise kernels' same-run peer) from bench/wheels/ into a temporary folder on
    PYTHONPATH when it does not import; offline, no dependencies (it needs only torch and triton). Returns the
    environment and the folder (None when nothing was installed)."""
    if importlib.util.find_spec("liger_kernel") is not None:
        log("liger_kernel: importable")
        return env, None
    wheels = sorted((ROOT / "bench" / "wheels").glob("liger_kernel-*.whl"))
    if not wheels:
        log("liger_kernel: not importable and no wheel in bench/wheels/")
        return env, None
    site = tempfile.mkdtemp(prefix="fastsolar-liger-")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", site,
                        str(wheels[-1])], env=env, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        log(f"liger_kernel: install failed: {(p.stdout + p.stderr).strip()[-500:]}")
        shutil.rmtree(site, ignore_errors=True)
        return env, None
    log(f"liger_kernel: installed {wheels[-1].name} into {site} (PYTHONPATH)")
    return dict(env, PYTHONPATH=os.pathsep.join([site] + [v for v in [env.get("PYTHONPATH")] if v])), site


def _info_phase(run: Run, py: str, env: dict[str, str], limit: float) -> tuple[int | None, float, dict[str, str]]:
    """Card facts and versions (installing fastsolar first when it does not import from this tree), Liger-Kernel
    when it does not import, and the tests collected for the plan. Returns the exit status, seconds and the
    environment later phases get."""
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
        env, run.summary["liger_site"] = install_liger(py, run.log, env)
        run.items = collect_tests(py, env, run.log, Path(d), limit - (time.monotonic() - t0))
        run.summary["collected_tests"] = None if run.items is None else len(run.items)
    return rc, time.monotonic() - t0, env


if __name__ == "__main__":
    sys.exit(main())
