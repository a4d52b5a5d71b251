#!/usr/bin/env bash
# The one script to run on a lent GPU machine, from anywhere (it runs from the repo root):
#
#     bash bench/gpu_check.sh                    # the evidence run: <= 8 min on an H100/H200, results in $OUT (else ./out)
#     bash bench/gpu_check.sh --phase compile    # the follow-up: what the first run could not do (any phase names)
#     bash bench/gpu_check.sh --rehearse         # the same phases on this CPU at tiny shapes (the suite runs this)
#     bash bench/gpu_check.sh --list             # the phase plan with each phase's cap and estimate
#
# It needs only what the GPU image has (python3 with torch, triton, transformers, pytest; no network, no
# carried wheels). bench/gpu_check.py holds the phases, their time limits and the files they write.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u bench/gpu_check.py "$@"
