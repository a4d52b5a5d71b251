#!/usr/bin/env bash
# The one script to run on a lent GPU machine, from anywhere (it runs from the repo root):
#
#     bash bench/gpu_check.sh                    # the evidence run, value first: <= 470 s, results in $OUT (else ./out)
#     bash bench/gpu_check.sh --phase compile,kernels-rest,gpu-heavy,suite --budget 210   # the follow-up it prints
#     bash bench/gpu_check.sh --rehearse         # the same phases on this CPU at tiny shapes (the suite runs this)
#     bash bench/gpu_check.sh --list             # the plan: each phase's counted work, H200 estimate and cap
#
# It needs only what the GPU image has (python3 with torch, triton, transformers, pytest; no network); the one
# extra, Liger-Kernel, travels in the tree (bench/wheels/). bench/gpu_check.py holds the phases, their time limits
# and the files they write; bench/gpu_plan.py the per-item costs the plan is estimated from.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u bench/gpu_check.py "$@"
