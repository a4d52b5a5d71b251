"""The server's Prometheus metrics (GET /metrics), under vLLM's names so that its dashboards and alerts work.

Every series has the label `model_name` (the served name). The registry is this object's own, not
prometheus_client's global one, so two servers in one process keep separate counts.

    vllm:num_requests_running          gauge      requests holding a cache row
    vllm:num_requests_waiting          gauge      requests queued for a row
    vllm:kv_cache_usage_perc           gauge      fraction of the KV cache's rows in use (0-1): each running
                                                  request reserves one whole row of max-model-len positions
    vllm:prompt_tokens_total           counter    prompt tokens prefilled
    vllm:generation_tokens_total       counter    tokens generated
    vllm:request_success_total         counter    requests ended, by label finished_reason: stop, length,
                                                  abort (the client went away) or error
    vllm:time_to_first_token_seconds   histogram  submission to first token
    vllm:inter_token_latency_seconds   histogram  between consecutive tokens of a request (decode steps)
    vllm:request_time_per_output_token_seconds  histogram  a finished request's mean time per token after the first
    vllm:e2e_request_latency_seconds   histogram  submission to end

Engine counters come in through the engine's observer calls (on its thread); the gauges are read from the
engine when scraped.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from fastsolar.serve.engine import Engine

#: vLLM's buckets for its latency histograms (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")


class ServeMetrics:
    """The Prometheus metrics of one engine served as `model_name`; an engine observer (`Engine.add_observer`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: "Engine", model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        label = {"model_name": model_name}

        def metric(cls, name: str, doc: str, **kw):
            return cls(name, doc, labelnames=list(label), registry=self.registry, **kw).labels(**label)

        metric(Gauge, "vllm:num_requests_running", "Number of requests in the running batch.").set_function(
            lambda: engine.metrics()["running"])
        metric(Gauge, "vllm:num_requests_waiting", "Number of requests waiting for a cache row.").set_function(
            lambda: engine.metrics()["queued"])
        metric(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage: fraction of the cache rows in use (1 = full)."
               ).set_function(lambda: engine.metrics()["running"] / engine.max_batch)
        self.prompt_tokens = metric(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = metric(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of finished requests, by finish reason.",
                          labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.success = {r: success.labels(model_name=model_name, finished_reason=r) for r in FINISHED_REASONS}
        self.ttft = metric(Histogram, "vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                           "seconds.", buckets=TTFT_BUCKETS)
        self.itl = metric(Histogram, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                          "seconds.", buckets=TOKEN_BUCKETS)
        self.tpot = metric(Histogram, "vllm:request_time_per_output_token_seconds", "Histogram of time per output "
                           "token in seconds.", buckets=TOKEN_BUCKETS)
        self.e2e = metric(Histogram, "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency "
                          "in seconds.", buckets=REQUEST_BUCKETS)
        engine.add_observer(self)

    def on_tokens(self, prompt_tokens: int, new_tokens: int, first_token_s: Sequence[float],
                  inter_token_s: Sequence[float]) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)
        for s in first_token_s:
            self.ttft.observe(s)
        for s in inter_token_s:
            self.itl.observe(s)

    def on_finish(self, reason: str, prompt_tokens: int, choice_tokens: int, e2e_s: float,
                  first_token_s: float | None) -> None:
        self.success[reason].inc()
        self.e2e.observe(e2e_s)
        if first_token_s is not None and choice_tokens > 1:
            self.tpot.observe((e2e_s - first_token_s) / (choice_tokens - 1))

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)
