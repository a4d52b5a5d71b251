"""`fastsolar generate|chat|serve --tensor-parallel-size 2` on the CPU (gloo) against one process, in real
processes: the command starting its ranks itself, and under torchrun."""
from __future__ import annotations

import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hf_fixtures as F
import pytest
from helpers import running_server

from fastsolar import Solar, Tokenizer, cli

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
WAIT_S = 120


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama (scaled lm_head: well-separated greedy tokens) with a tokenizer.json tokenizer."""
    hf = F.build_hf_model(vocab_size=403, bos_token_id=0, eos_token_id=4, pad_token_id=None, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    d = F.save(hf, tmp_path_factory.mktemp("tp-cli") / "ckpt")
    F.make_tokenizer_module().train_tokenizer_json(d)
    return d


def _fastsolar(*argv: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsolar", *argv], input=stdin, capture_output=True, text=True,
                          env=env or ENV, timeout=WAIT_S)


def _one_process(argv: list[str], capsys, monkeypatch, stdin: str = "") -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GENERATE = ["--max-new-tokens", "16", "--temperature", "0"]


def test_generate_with_its_own_ranks_prints_what_one_process_prints(ckpt, capsys, monkeypatch):
    expected = _one_process(["generate", str(ckpt), "--prompt", "hello world", *GENERATE], capsys, monkeypatch)
    assert len(expected.strip()) > 4
    p = _fastsolar("generate", str(ckpt), *GENERATE, "--tensor-parallel-size", "2", stdin="hello world")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected  # printed once (rank 0), the prompt read from stdin by rank 0 only


def test_generate_under_torchrun(ckpt, capsys, monkeypatch):
    expected = _one_process(["generate", str(ckpt), "--prompt", "under torchrun", *GENERATE], capsys, monkeypatch)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "fastsolar",
                        "generate", str(ckpt), "--prompt", "under torchrun", *GENERATE, "--tensor-parallel-size", "2"],
                       capture_output=True, text=True, env=ENV, timeout=WAIT_S)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected


def test_chat_drives_its_ranks(ckpt, capsys, monkeypatch):
    turns = "hi there\nand again\n/exit\n"
    argv = ["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "10"]
    expected = _one_process(argv, capsys, monkeypatch, stdin=turns)
    assert expected.count("\n") == 2
    p = _fastsolar(*argv, "--tensor-parallel-size", "2", stdin=turns)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected


def test_a_bad_degree_is_one_line_before_any_rank_starts(ckpt, capsys):
    assert cli.main(["generate", str(ckpt), "--prompt", "x", "--tensor-parallel-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastsolar: error: tensor_parallel_size 3 does not divide the model's num_key_value_heads 4: each "
                   "rank must hold whole heads and equal slices"]


def _post(base: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        return json.loads(r.read())


def _texts(base: str, bodies: list[dict]) -> list[list[str]]:
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: decoded together, each in its own cache row
        return [[c["text"] for c in r["choices"]] for r in pool.map(lambda b: _post(base, b), bodies)]


BODIES = [dict(model="m", prompt=[0, 17, 99, 250, 3], max_tokens=12, temperature=0),
          dict(model="m", prompt="a longer prompt for the second row", max_tokens=9, temperature=0),
          # n choices: one prefill whose cache rows every rank copies (Transformer.copy_cache_rows, driven)
          dict(model="m", prompt="two sampled choices", max_tokens=8, temperature=0.9, seed=5, n=2)]


@pytest.fixture(scope="module")
def served_alone(ckpt) -> list[list[str]]:
    """What one process's server answers BODIES."""
    from fastsolar.serve.api import create_app
    from fastsolar.serve.engine import Engine

    tok = Tokenizer.from_pretrained(ckpt)
    engine = Engine(Solar.from_pretrained(ckpt, dtype="float32"), tok, max_batch=4, max_seq=128)
    engine.start()
    try:
        with running_server(create_app(engine, tok, "m"), WAIT_S) as base:
            texts = _texts(base, BODIES)
    finally:
        engine.stop()
    assert all(len(t) > 2 for choices in texts for t in choices) and len(texts[2]) == 2
    return texts


@pytest.mark.parametrize("n", [2, 4])
def test_serve_front_on_rank_0_drives_the_other_ranks(ckpt, served_alone, n):
    p = subprocess.Popen([sys.executable, "-m", "fastsolar", "serve", str(ckpt), "--port", "0", "--model-name", "m",
                          "--max-batch", "4", "--max-seq", "128", "--tensor-parallel-size", str(n)],
                         stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stderr], daemon=True).start()
    try:
        deadline, base = time.monotonic() + WAIT_S, None
        while base is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "listening on " in line:
                base = line.split("listening on ")[1].split()[0]
        assert base, "the server did not start"
        while True:  # bound before it accepts: ask /health until it answers
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /health"
                time.sleep(0.1)
        assert _texts(base, BODIES) == served_alone
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0  # rank 0 shut down and released the other rank
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _rank_processes(parent: int) -> list[int]:
    """The spawned rank processes under `parent` (not multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                found.append(int(pid))
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through Linux's /proc")
def test_serve_ends_with_a_clear_error_when_a_rank_is_killed(ckpt):
    p = subprocess.Popen([sys.executable, "-m", "fastsolar", "serve", str(ckpt), "--port", "0",
                          "--tensor-parallel-size", "2"], stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in p.stderr], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while "listening on " not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
            pass
        (rank1,) = _rank_processes(p.pid)
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        assert p.wait(timeout=60) == 1
        assert time.monotonic() - t0 < 30  # the watchdog's grace, not the process group's timeout
        reader.join(10)  # stderr read to its end
        err = []
        while not lines.empty():
            err.append(lines.get())
        assert "fastsolar: error: tensor-parallel rank 1 of 2 was killed by SIGKILL; ending all ranks\n" in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
