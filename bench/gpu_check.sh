#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repo root:
#
#     bash bench/gpu_check.sh            # logs and JSON under $OUT (set by the device tool), else ./out
#
# Benchmark method (bench/kernels.py): copy bandwidth measured first, as the ceiling; correctness checked
# before anything is timed; medians of triton's do_bench with L2 flushed; repeated runs, spread reported.
#
# Stages, each under its own `timeout`, all run even if an earlier one fails; whole run < ~9.5 minutes:
#   0. card, date, versions (nvidia-smi; the image's python3: torch 2.11 + triton 3.6 there, no internet)
#   1. make `fastsolar.kernels` importable: `pip install --no-deps --no-build-isolation --no-index -e .`
#      (offline: everything the package needs is already in the image), else a symlink
#      fastsolar/kernels -> ../kernels plus PYTHONPATH (the device gets a throw-away copy of the tree)
#   2. the whole test suite on CUDA (compiled kernels, bf16, CUDA graphs)       -> $OUT/pytest.log
#   3. python bench/kernels.py --json $OUT/kernels.json                         -> $OUT/kernels.log
#   4. python bench/run.py --json $OUT/bench.json (SOLAR-10.7B shape, bf16)     -> $OUT/bench.log
# Files back (at most 8): gpu_check.log, pytest.log, kernels.json, kernels.log, bench.json, bench.log.
# Exit status: 0 when every stage passed, else the number of failed stages.
# The GPU image carries transformers 5.17, but patch_hf and the test extra pin 5.24.x. Bring that wheel along
# (it installs with --no-deps there; the image's huggingface-hub, tokenizers and safetensors satisfy it):
#     pip download "transformers>=5.24,<5.25" --no-deps -d .gpu-wheels     # here, once
#     device run with carry [".gpu-wheels"]                                # stage 1 installs what it holds
# Knobs: GPU_CHECK_TOTAL_S (default 560), PYTHON (default python3), PYTEST_ARGS (e.g. "tests/test_graphs.py"),
# GPU_CHECK_NO_INSTALL=1 (skip the pip install when fastsolar already imports).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

TOTAL_S="${GPU_CHECK_TOTAL_S:-560}"   # keep the whole script inside the 10-minute command limit
PY="${PYTHON:-python3}"
failed=0
stage() { echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $*"; }
left() { echo $(( TOTAL_S - SECONDS )); }
# run_stage NAME SECONDS LOGFILE CMD...: run with a time limit, record failure without stopping the script
run_stage() {
    local name=$1 limit=$2 logfile=$3; shift 3
    if (( limit < 20 )); then echo "SKIPPED $name: no time left"; failed=$((failed + 1)); return; fi
    set +e
    timeout -k 20 "$limit" "$@" 2>&1 | tee "$logfile"
    local rc=${PIPESTATUS[0]}
    set -e
    if (( rc == 0 )); then echo "PASSED $name (${SECONDS}s)";
    elif (( rc == 124 || rc == 137 )); then echo "TIMED OUT $name after ${limit}s"; failed=$((failed + 1));
    else echo "FAILED $name (exit $rc)"; failed=$((failed + 1)); fi
}

main() {
set -e
stage "0. card, date, versions"
date -u +%Y-%m-%dT%H:%M:%SZ
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv || true
nvidia-smi || true
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name in ("triton", "transformers", "safetensors", "sentencepiece", "pytest"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF

stage "1. make fastsolar importable"
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl && echo "installed carried wheels: $(ls .gpu-wheels)"
fi
# bench/run.py and bench/kernels.py only `import fastsolar` / `fastsolar.kernels` (no fallback of their own), so
# this stage must leave both importable from anywhere, from this tree: checked from /tmp, with the file's path.
importable() {
    local root="$PWD"  # taken before the cd: "$PWD" inside the subshell would already be /tmp
    (cd /tmp && "$PY" - "$root" <<'PYEOF'
import os, sys
import fastsolar.kernels, fastsolar.model
root, found = os.path.realpath(sys.argv[1]), os.path.realpath(fastsolar.kernels.__file__)
print("fastsolar.kernels:", found)
sys.exit(0 if found.startswith(root + os.sep) else f"fastsolar.kernels is not this tree's kernels/: {found}")
PYEOF
    )
}
if [ -n "${GPU_CHECK_NO_INSTALL:-}" ] && importable; then
    echo "already importable; not installing (GPU_CHECK_NO_INSTALL)"
elif "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . && importable; then
    echo "installed editable"
else
    echo "editable install failed; using a symlink fastsolar/kernels -> ../kernels and PYTHONPATH"
    [ -e fastsolar/kernels ] || ln -s ../kernels fastsolar/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    importable || { echo "fastsolar still not importable"; return 99; }
fi

stage "2. test suite on CUDA"
# Most of the suite's time on a GPU is Triton compiling kernel variants, which parallelises over the CPU
# cores; the image carries pytest-xdist.
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
run_stage pytest "$(( $(left) < 200 ? $(left) : 200 ))" "$OUT/pytest.log" \
    "$PY" -m pytest -q -ra -p no:cacheprovider $xdist ${PYTEST_ARGS:-}

stage "3. kernel microbenchmarks"
run_stage kernels "$(( $(left) < 120 ? $(left) : 120 ))" "$OUT/kernels.log" \
    "$PY" bench/kernels.py --json "$OUT/kernels.json"

stage "4. end-to-end benchmark"
# bench/run.py stops starting new engines at --time-budget and, on timeout's SIGTERM, still writes its JSON
# and prints the table of what finished (hf-compile, the slowest, runs last).
limit=$(( $(left) - 10 ))
run_stage bench "$limit" "$OUT/bench.log" \
    "$PY" bench/run.py --json "$OUT/bench.json" --time-budget "$(( limit > 60 ? limit - 60 : 10 ))"

stage "done: $failed failed stage(s) in ${SECONDS}s; files in $OUT"
ls -la "$OUT"
return "$failed"
}

set +e
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
