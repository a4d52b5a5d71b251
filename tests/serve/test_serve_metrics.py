"""GET /metrics in Prometheus' text format, read by prometheus_client's own parser: vLLM's metric names, the
counters and histogram counts equal to what the requests made (their usage fields), gauges while requests run,
and two servers in one process keeping separate registries. /stats keeps the JSON numbers."""
from __future__ import annotations

import time

import pytest

for _name in ("fastapi", "uvicorn", "httpx", "openai", "prometheus_client"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import httpx  # noqa: E402
import openai  # noqa: E402
from helpers import running_server, slowed  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastsolar import Solar, Tokenizer  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402

WAIT_S = 60.0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample /metrics exposes."""
    r = httpx.get(url + "/metrics", timeout=WAIT_S)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.headers
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, model: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": model, **labels}.items())))]


@pytest.fixture(scope="module")
def servers(serve_checkpoint):
    """Two servers of the same model in this process, as "a" and "b"."""
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    model = Solar.from_pretrained(serve_checkpoint)
    delay = slowed(model)
    engine_a = Engine(model, tok, max_batch=4, max_queue=4)
    engine_b = Engine(Solar.from_pretrained(serve_checkpoint), tok, max_batch=2, max_queue=4)
    with running_server(create_app(engine_a, tok, "a"), WAIT_S) as url_a, \
            running_server(create_app(engine_b, tok, "b"), WAIT_S) as url_b:
        yield url_a, url_b, delay


def test_counters_and_histograms_match_the_requests(servers):
    url_a, url_b, _ = servers
    client = openai.OpenAI(base_url=url_a + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    usages, reasons = [], []
    for prompt, max_tokens in (("Hello", 5), ("Once upon a time", 9), ("x", 1)):
        r = client.completions.create(model="a", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=7,
                                       temperature=0.8, seed=3)
    usages.append(r.usage)
    reasons.append(r.choices[0].finish_reason)
    assert reasons[:3] == ["length"] * 3

    m = scrape(url_a)
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert value(m, "vllm:prompt_tokens_total", "a") == prompt
    assert value(m, "vllm:generation_tokens_total", "a") == generated
    for reason in ("stop", "length", "abort", "error"):
        assert value(m, "vllm:request_success_total", "a", finished_reason=reason) == reasons.count(reason), reason
    n = len(usages)
    assert value(m, "vllm:time_to_first_token_seconds_count", "a") == n
    assert value(m, "vllm:e2e_request_latency_seconds_count", "a") == n
    # One inter-token latency per token after each request's first; a per-token time per request of 2+ tokens.
    assert value(m, "vllm:inter_token_latency_seconds_count", "a") == generated - n
    assert value(m, "vllm:request_time_per_output_token_seconds_count", "a") == sum(
        u.completion_tokens > 1 for u in usages)
    assert value(m, "vllm:time_to_first_token_seconds_bucket", "a", le="+Inf") == n
    assert 0 < value(m, "vllm:e2e_request_latency_seconds_sum", "a") < WAIT_S * n
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert value(m, gauge, "a") == 0, gauge

    # The other server counted nothing of these: its own registry, its own label.
    other = scrape(url_b)
    assert value(other, "vllm:prompt_tokens_total", "b") == 0
    assert value(other, "vllm:generation_tokens_total", "b") == 0
    assert not any(labels and dict(labels).get("model_name") == "a" for _, labels in other)
    # The JSON numbers moved to /stats and agree.
    stats = httpx.get(url_a + "/stats", timeout=WAIT_S).json()
    assert stats["prompt_tokens_total"] == prompt and stats["completion_tokens_total"] == generated


def test_gauges_while_requests_run_and_aborts(servers):
    url_a, _, delay = servers
    before = scrape(url_a)
    body = {"model": "a", "prompt": "Hello", "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
    delay["s"] = 0.05
    clients = [httpx.Client(base_url=url_a, timeout=WAIT_S) for _ in range(5)]  # 4 rows: one waits
    streams = []
    try:
        for c in clients:
            cm = c.stream("POST", "/v1/completions", json=body)
            streams.append(cm)
            cm.__enter__()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            m = scrape(url_a)
            if value(m, "vllm:num_requests_running", "a") == 4 and value(m, "vllm:num_requests_waiting", "a") == 1:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"never 4 running and 1 waiting: {m}")
        assert value(m, "vllm:kv_cache_usage_perc", "a") == 1.0  # every row of the cache is taken
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
        delay["s"] = 0.0
    deadline = time.monotonic() + WAIT_S
    aborts = ("vllm:request_success_total", (("finished_reason", "abort"), ("model_name", "a")))
    while time.monotonic() < deadline and scrape(url_a)[aborts] < before[aborts] + 5:
        time.sleep(0.02)
    m = scrape(url_a)
    assert m[aborts] == before[aborts] + 5  # the clients went away: five aborted requests
    assert value(m, "vllm:num_requests_running", "a") == 0 and value(m, "vllm:num_requests_waiting", "a") == 0


def test_metrics_needs_no_api_key(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    engine = Engine(Solar.from_pretrained(serve_checkpoint), tok, max_batch=1)
    with running_server(create_app(engine, tok, "k", api_key="sekrit"), WAIT_S) as url:
        assert value(scrape(url), "vllm:num_requests_running", "k") == 0
        assert httpx.get(url + "/stats", timeout=WAIT_S).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=WAIT_S).status_code == 401
