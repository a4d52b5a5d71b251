"""bench/run.py's fastsolar-tp row on the CPU (gloo, 2 ranks): it runs, matches the reference's greedy tokens
(the same random weights, sliced per rank) and counts one rank's half of the weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tp_row_matches_the_reference_engine(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench never runs kernels on a CPU
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu", "--preset", "tiny",
                        "--layers", "1", "--engines", "torch-ref", "--tp", "2", "--batch-sizes", "3",
                        "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-5000:]
    engines = json.loads(out.read_text())["engines"]
    tp = engines["fastsolar-tp"]
    assert tp["status"] == "ok", (tp.get("reason"), tp.get("traceback"))
    r = tp["results"]["3"]
    assert r["match_baseline"] == "torch-ref" and r["token_match"] == 1.0, r
    full = engines["torch-ref"]["results"]["3"]["weights_GB"]
    assert 0.49 * full < r["weights_GB"] < 0.51 * full, (r["weights_GB"], full)
    assert "| fastsolar-tp | 3 |" in p.stdout
