"""bench/serve.py: runs small against a real `fastsolar serve` subprocess on a CPU and writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_serve_runs_on_cpu_and_writes_json(tmp_path, serve_checkpoint):
    """The bench's own fastsolar server and a peer given by URL (here another fastsolar server, on a thread of
    this process), in two alternating rounds."""
    for name in ("fastapi", "uvicorn", "httpx"):  # the bench extra brings them, the test extra too
        pytest.importorskip(name, reason=f"bench/serve.py needs {name}: pip install -e '.[test]'")
    from helpers import running_server

    from fastsolar import Solar, Tokenizer
    from fastsolar.serve.api import create_app
    from fastsolar.serve.engine import Engine

    out = tmp_path / "serve.json"
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    engine = Engine(Solar.from_pretrained(serve_checkpoint, device="cpu"), tok, max_batch=3, max_queue=8)
    with running_server(create_app(engine, tok, "peer-model"), 60.0) as peer:
        cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(serve_checkpoint), "--device",
               "cpu", "--clients", "1,3", "--requests-per-client", "1", "--prompt-len", "8", "--new-tokens", "5",
               "--rounds", "2", "--peer-url", peer, "--peer-model-name", "peer-model", "--peer-label", "the peer",
               "--json", str(out)]
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the bench never runs kernels on a CPU
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["meta"]["server_exit_code"] == 0
    assert {"card", "date", "torch", "clients", "prompt_len", "new_tokens", "method"} <= set(data["meta"])
    for result in [data["baseline"], *data["serve"].values()]:
        assert result["tokens_per_s"] > 0 and result["completion_tokens"] == 5 * result["requests"]
        assert set(result["ttft_ms"]) == set(result["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert set(data["serve"]) == {"1", "3"} and data["baseline"]["requests"] == 3
    assert sum(data["serve"]["3"]["decode_steps_by_batch_size"].values()) > 0  # what the server batched
    assert "| fastsolar serve | 3 |" in proc.stdout and "| generate, one request at a time | 1 |" in proc.stdout
    peer = data["peers"]["the peer"]
    assert set(peer) == {"1", "3"} and "| the peer | 3 |" in proc.stdout
    for result in [*data["serve"].values(), *peer.values()]:
        assert len(result["rounds"]) == 2 and result["completion_tokens"] == 5 * result["requests"]
        assert result["tokens_per_s"] == sorted(r["tokens_per_s"] for r in result["rounds"])[0]  # the median of 2
        assert set(result["itl_ms"]) == {"p50", "p90", "p99", "mean"} and result["itl_ms"]["p50"] > 0
    assert sum(peer["3"]["decode_steps_by_batch_size"].values()) > 0
