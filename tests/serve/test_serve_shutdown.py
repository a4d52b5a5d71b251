"""Shutdown with requests still running when --shutdown-timeout expires: each in-flight request gets an
OpenAI-shaped error -- a non-streamed one a 503 `{"error": {...}}`, a stream an SSE `data: {"error": {...}}`
event and then `data: [DONE]` -- with no traceback or error in the log, the same on every try (a loop of
several shutdowns). Requests that finish within the timeout finish normally."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import httpx  # noqa: E402

from fastsolar import Solar, Tokenizer  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402
from fastsolar.serve.server import address, make_server  # noqa: E402

WAIT_S = 60.0
DRAIN_S = 1.5  # --shutdown-timeout of these servers: time for the short request, not for the long ones
TRIES = 3


@pytest.fixture(scope="module")
def slow_model(serve_checkpoint):
    """The tiny model with 50 ms decode steps: a 240-token request outlives the drain by far."""
    model = Solar.from_pretrained(serve_checkpoint)
    decode = model.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.05)
        return decode(*args, **kwargs)

    model.decode = slow_decode
    return model, Tokenizer.from_pretrained(serve_checkpoint)


def _stream_lines(url: str, body: dict, out: dict, started: threading.Event) -> None:
    with httpx.Client(timeout=WAIT_S) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
        out["status"] = r.status_code
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: "):])
                started.set()
        out["lines"] = lines


def _post(url: str, body: dict, out: dict) -> None:
    out["response"] = httpx.post(url + "/v1/completions", json=body, timeout=WAIT_S)


def test_in_flight_requests_get_openai_errors_when_the_timeout_expires(slow_model, caplog):
    model, tok = slow_model
    long = {"model": "m", "prompt": "Hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    short = {"model": "m", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    caplog.set_level(logging.INFO)
    for attempt in range(TRIES):
        caplog.clear()
        engine = Engine(model, tok, max_batch=3, max_queue=2)
        server, sock = make_server(create_app(engine, tok, "m"), "127.0.0.1", 0, shutdown_timeout=DRAIN_S)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        url = address(sock)
        streamed, whole, quick, started = {}, {}, {}, threading.Event()
        workers = [threading.Thread(target=_stream_lines, args=(url, {**long, "stream": True}, streamed, started)),
                   threading.Thread(target=_post, args=(url, long, whole)),
                   threading.Thread(target=_post, args=(url, short, quick))]
        for w in workers:
            w.start()
        assert started.wait(WAIT_S)
        while engine.metrics()["running"] < 2 and time.monotonic() < deadline:  # both long ones decode
            time.sleep(0.01)
        t0 = time.monotonic()
        server.should_exit = True
        for w in workers:
            w.join(WAIT_S)
        thread.join(WAIT_S)
        assert not thread.is_alive() and not any(w.is_alive() for w in workers)
        elapsed = time.monotonic() - t0
        assert DRAIN_S <= elapsed < DRAIN_S + 3, elapsed  # the drain, not uvicorn's later backstop

        # The stream: some text chunks, then one error event, then [DONE].
        assert streamed["status"] == 200
        lines = streamed["lines"]
        assert lines[-1] == "[DONE]", lines[-3:]
        error = json.loads(lines[-2])
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
        assert "shutting down" in error["error"]["message"] and error["error"]["type"] == "server_unavailable"
        assert all("choices" in json.loads(line) for line in lines[:-2]) and len(lines) > 3
        # The non-streamed one: a 503 in OpenAI's shape.
        r = whole["response"]
        assert r.status_code == 503, r.text
        assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_unavailable"
        # The short one finished within the drain time, normally.
        assert quick["response"].status_code == 200 and quick["response"].json()["choices"][0]["finish_reason"] == \
            "length"
        # A quiet log: no traceback, nothing at ERROR (uvicorn's "Cancel N running task(s)" would be one).
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], attempt
        assert any("failed after" in r.getMessage() and "shutting down" in r.getMessage() for r in caplog.records)
        assert not engine._thread.is_alive()
