"""fastsolar serve over HTTP, with the real `openai` client and plain httpx, against a uvicorn server on
127.0.0.1 (an ephemeral port) serving a tiny saved checkpoint: chat and text completions streamed and not
(the same text, equal to `generate` alone), 8 concurrent greedy requests, stop strings across chunks,
max_tokens / finish_reason, every bad input's 4xx while a good request completes, disconnects freeing rows,
429 beyond the queue, seeds, and -- through the `fastsolar serve` command -- the API key and a clean
SIGTERM shutdown. Every wait is bounded."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The serve and test extras bring these (CI installs them); a bare image, such as the GPU machine's, skips.
for _name in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import httpx  # noqa: E402
import openai  # noqa: E402

from helpers import joined, running_server, slowed  # noqa: E402

from fastsolar import Solar, Tokenizer, cli  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402

MODEL = "tiny"
WAIT_S = 60.0  # bound on any wait (the shared CPU can be slow); the tests take far less when it is not
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    url: str
    engine: Engine
    tok: Tokenizer
    ref: Solar  # a second copy of the weights for generate (the engine's model belongs to its thread)
    delay: dict  # {"s": seconds}: added to every decode step while a test needs requests to overlap

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=WAIT_S)

    def metrics(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=WAIT_S).json()

    def wait_metrics(self, ok, what: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            m = self.metrics()
            if ok(m):
                return m
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}: {self.metrics()}")


@pytest.fixture(scope="module")
def served(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    model = Solar.from_pretrained(serve_checkpoint)
    delay = slowed(model)  # a slower model, so that tests can hold requests in flight
    engine = Engine(model, tok, max_batch=8, max_queue=2)
    with running_server(create_app(engine, tok, MODEL), WAIT_S) as base:
        yield Served(base, engine, tok, Solar.from_pretrained(serve_checkpoint), delay)
    assert not engine._thread.is_alive(), "the engine thread outlived the server"


@pytest.fixture
def slow(served):
    """Decode steps take 20 ms while the test runs, so concurrent requests overlap for sure."""
    served.delay["s"] = 0.02
    yield
    served.delay["s"] = 0.0


def alone(served: Served, ids: list[int], max_tokens: int, stops=(), ignore_eos=False):
    """What generate gives the prompt alone: (text, finish_reason, completion tokens)."""
    new = served.ref.generate(torch.tensor([ids]), max_tokens, eos_token_id=[] if ignore_eos else None)
    new = new[0, len(ids):].tolist()
    eos = set(served.ref.config.eos_token_ids)
    cut = None if ignore_eos else next((i for i, t in enumerate(new) if t in eos), None)
    text = joined(lambda x: served.tok.decode(x, skip_special_tokens=True), ids, new if cut is None else new[:cut])
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return text[:min(hits)], "stop", None  # (where a stop string ends generation, tokens are not compared)
    return (text, "length", len(new)) if cut is None else (text, "stop", cut + 1)


def chat_ids(served: Served, content: str) -> list[int]:
    return served.tok.encode_chat([{"role": "user", "content": content}])


def stream_chat(client: openai.OpenAI, **kw):
    text, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(text), finish, usage


def stream_completion(client: openai.OpenAI, **kw):
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    return pieces, finish, usage


# -- the endpoints ------------------------------------------------------------------------------------

def test_models_health_and_stats(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    with served.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        m = http.get("/stats").json()
    assert {"running", "queued", "tokens_per_second", "requests_finished", "completion_tokens_total"} <= set(m)
    assert m["max_batch"] == 8 and m["max_queue"] == 2 and m["cuda_graphs"] is False


def test_chat_streamed_equals_whole_equals_generate(served):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    text, finish, usage = stream_chat(client, messages=messages, max_tokens=24, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert (text, finish) == (choice.message.content, choice.finish_reason)
    assert usage.model_dump() == whole.usage.model_dump()
    ids = served.tok.encode_chat(messages)
    expected = alone(served, ids, 24, stops=served.tok.chat_stop_strings)
    assert (choice.message.content, choice.finish_reason) == expected[:2]
    assert usage.prompt_tokens == len(ids) and usage.total_tokens == len(ids) + usage.completion_tokens
    if expected[2] is not None:
        assert usage.completion_tokens == expected[2]


def test_completion_streamed_equals_whole_equals_generate(served):
    client = served.client()
    prompt = "Once upon a time there was"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    pieces, finish, usage = stream_completion(client, prompt=prompt, max_tokens=20, temperature=0)
    assert whole.object == "text_completion"
    assert ("".join(pieces), finish) == (whole.choices[0].text, whole.choices[0].finish_reason)
    assert usage.model_dump() == whole.usage.model_dump()
    ids = served.tok.encode(prompt)
    assert (whole.choices[0].text, whole.choices[0].finish_reason, whole.usage.completion_tokens) == \
        alone(served, ids, 20)
    # Token ids are a prompt too.
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_eight_concurrent_greedy_requests_each_equal_generate(served, slow):
    prompts = ["Hi", "The quick brown fox", "Once upon a time there was a little model that wanted to talk.",
               "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1234", "Café", "def main():\n    print('hello world')",
               "日本語のテキストです。", "Hello, world! How are you today? I am fine, thank you. " * 3]
    budgets = [24, 30, 26, 28, 32, 25, 27, 29]
    steps_at_8 = served.metrics()["decode_steps_by_batch_size"].get("8", 0)

    async def run_all():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
        calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                 for p, n in zip(prompts, budgets)]
        return await asyncio.wait_for(asyncio.gather(*calls), WAIT_S)

    results = asyncio.run(run_all())
    lengths = {len(served.tok.encode(p)) for p in prompts}
    assert len(lengths) == len(prompts)  # every prompt length differs
    for p, n, r in zip(prompts, budgets, results):
        got = (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)
        assert got == alone(served, served.tok.encode(p), n), p
    assert served.metrics()["decode_steps_by_batch_size"].get("8", 0) > steps_at_8  # they ran as one batch


def test_stop_strings_across_chunk_boundaries(served):
    client = served.client()
    prompt = "The quick brown fox jumps over"
    pieces, finish, _ = stream_completion(client, prompt=prompt, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
    full = "".join(pieces)
    assert finish == "length" and len(pieces) > 8
    # A stop string made of the end of one chunk and the start of the next (so it is complete only once
    # the second arrives, and the first chunk's tail must be held back meanwhile).
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = full[:full.find(stop)]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                      stop=["never-appears", stop], extra_body={"ignore_eos": True})
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage.completion_tokens < 40
    got, finish, usage = stream_completion(client, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                           extra_body={"ignore_eos": True})
    assert ("".join(got), finish) == (expected, "stop")
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_finish_reason(served):
    client = served.client()
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 7)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 3)
    # No max_tokens: whatever fits the context.
    r = client.completions.create(model=MODEL, prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    context = served.ref.config.max_position_embeddings
    assert (r.choices[0].finish_reason, r.usage.total_tokens) == ("length", context)


def test_seeded_request_gets_the_same_text_whatever_else_runs(served):
    client = served.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20,
              temperature=0.9, top_p=0.95, seed=1234, extra_body={"ignore_eos": True, "top_k": 50})
    solo = client.chat.completions.create(**kw).choices[0].message.content

    async def with_others():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
        others = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Other {i}" * (i + 1)}],
                                            max_tokens=25, temperature=t, seed=i)
                  for i, t in enumerate((1.0, 0.0, 0.7))]
        return await asyncio.wait_for(asyncio.gather(others[0], c.chat.completions.create(**kw), *others[1:]), WAIT_S)

    assert asyncio.run(with_others())[1].choices[0].message.content == solo
    kw["seed"] = 1235
    assert client.chat.completions.create(**kw).choices[0].message.content != solo


# -- faults ---------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

BAD = [
    # (path, body (a str is sent as is), status, fragment of the message, param)
    (CHAT, "{not json", 400, "not valid JSON", None),
    (CHAT, "[1, 2]", 400, "JSON object", None),
    (CHAT, "", 400, "no JSON body", None),
    (CHAT, b"model=x", 400, "Content-Type: application/json", None),
    (CHAT, {"messages": GOOD["messages"]}, 400, "missing required parameter 'model'", "model"),
    (CHAT, {"model": MODEL}, 400, "missing required parameter 'messages'", "messages"),
    (CHAT, {**GOOD, "messages": []}, 400, "at least 1", "messages"),
    (CHAT, {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "'system', 'user' or 'assistant'",
     "messages[0].role"),
    (CHAT, {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "string or a list of text parts",
     "messages[0].content"),
    (CHAT, {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400,
     "image_url", "messages[0].content[0].type"),
    (CHAT, {**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0].content", "messages[0].content"),
    (CHAT, {**GOOD, "temperature": "hot"}, 400, "valid number", "temperature"),
    (CHAT, {**GOOD, "temperature": -0.5}, 400, "greater than or equal to 0", "temperature"),
    (CHAT, {**GOOD, "top_p": 1.5}, 400, "less than or equal to 1", "top_p"),
    (CHAT, {**GOOD, "top_k": -1}, 400, "top_k", "top_k"),
    (CHAT, {**GOOD, "repetition_penalty": 0}, 400, "greater than 0", "repetition_penalty"),
    (CHAT, {**GOOD, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
    (CHAT, {**GOOD, "max_tokens": "5"}, 400, "valid integer", "max_tokens"),
    (CHAT, {**GOOD, "max_tokens": 10_000}, 400, "exceed the model's context of 256", "max_tokens"),
    (CHAT, {**GOOD, "stream": "yes"}, 400, "valid boolean", "stream"),
    (CHAT, {**GOOD, "stop": ["x", ""]}, 400, "must not be empty", "stop"),
    (CHAT, {**GOOD, "stop": 3}, 400, "string or a list of strings", "stop"),
    (CHAT, {**GOOD, "seed": 1.5}, 400, "valid integer", "seed"),
    (CHAT, {**GOOD, "n": 9}, 400, "n must be an integer in [1, 8]", "n"),
    (CHAT, {**GOOD, "n": 0}, 400, "greater than or equal to 1", "n"),
    (CHAT, {**GOOD, "n": 1.5}, 400, "valid integer", "n"),
    (CHAT, {**GOOD, "logprobs": True, "top_logprobs": 21}, 400, "less than or equal to 20", "top_logprobs"),
    (CHAT, {**GOOD, "logprobs": True, "top_logprobs": -1}, 400, "greater than or equal to 0", "top_logprobs"),
    (CHAT, {**GOOD, "top_logprobs": 3}, 400, "top_logprobs needs logprobs: true", "top_logprobs"),
    (CHAT, {**GOOD, "logprobs": 3}, 400, "valid boolean", "logprobs"),
    (CHAT, {**GOOD, "presence_penalty": 2.5}, 400, "less than or equal to 2", "presence_penalty"),
    (CHAT, {**GOOD, "frequency_penalty": -2.01}, 400, "greater than or equal to -2", "frequency_penalty"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "presence_penalty": -3}, 400, "greater than or equal to -2",
     "presence_penalty"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "frequency_penalty": 2.5}, 400, "less than or equal to 2",
     "frequency_penalty"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "less than or equal to 5", "logprobs"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "valid integer", "logprobs"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "n": 9}, 400, "--max-n", "n"),
    (CHAT, {**GOOD, "tools": []}, 400, "unsupported parameter 'tools'", "tools"),
    (CHAT, {**GOOD, "logit_bias": {"5": 1}}, 400, "unsupported parameter 'logit_bias'", "logit_bias"),
    (CHAT, {**GOOD, "stream_options": {"include_usage": True}}, 400, "only allowed with stream", None),
    (CHAT, {**GOOD, "model": "gpt-4"}, 404, "does not exist", "model"),
    (CHAT, {**GOOD, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context is 256", "messages"),
    (COMPLETIONS, {"model": MODEL}, 400, "missing required parameter 'prompt'", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "batch of 2 prompts", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, "a"]}, 400, "token ids", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, 100_000]}, 400, "outside the vocabulary", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": []}, 400, "empty", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", "echo"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "unsupported parameter 'suffix'", "suffix"),
    ("/v1/nowhere", GOOD, 404, "Not Found", None),
]


def test_bad_requests_get_4xx_while_a_good_request_completes(served, slow):
    good = {"model": MODEL, "prompt": "Hello, world!", "max_tokens": 60, "temperature": 0, "stream": True,
            "ignore_eos": True}
    result = {}

    def run_good():
        with served.http() as http, http.stream("POST", COMPLETIONS, json=good) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        result["lines"] = lines

    worker = threading.Thread(target=run_good)
    worker.start()
    served.wait_metrics(lambda m: m["running"] >= 1, "the good request to start")  # in flight from here on
    with served.http() as http:
        for path, body, status, fragment, param in BAD:
            if isinstance(body, bytes):  # a form post, as curl -d sends without a header
                r = http.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
            elif isinstance(body, str):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert fragment in err["message"] and err["param"] == param, (body, err)
        assert http.get("/v1/completions").status_code == 405
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert result["lines"][-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in result["lines"][:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == alone(served, served.tok.encode(good["prompt"]), 60, ignore_eos=True)[0]


def test_disconnect_frees_its_row_and_429_beyond_the_queue(served, slow):
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = served.metrics()
    clients = [served.http() for _ in range(8)]
    streams = []
    try:
        for c in clients:  # 8 streams fill every row
            cm = c.stream("POST", COMPLETIONS, json=long)
            r = cm.__enter__()
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping the iterator would close the response
            next(lines)  # the first chunk arrived: the request runs
            streams.append((cm, lines))
        served.wait_metrics(lambda m: m["running"] == 8, "8 running requests")
        # Two more wait in the queue (max_queue 2) ...
        short = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        queued_responses = []
        waiting = [threading.Thread(target=lambda: queued_responses.append(
            httpx.post(served.url + COMPLETIONS, json=short, timeout=WAIT_S))) for _ in range(2)]
        for w in waiting:
            w.start()
        served.wait_metrics(lambda m: m["queued"] == 2, "2 queued requests")
        # ... and the next one is refused.
        r = httpx.post(served.url + COMPLETIONS, json=short, timeout=WAIT_S)
        assert r.status_code == 429
        err = r.json()["error"]
        assert "at capacity" in err["message"] and err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        # A client that goes away frees its row at once: a queued request takes it, the batch stays full. Decode
        # steps of 0.5 s keep the admitted 3-token request running well past the poll that sees it leave the queue.
        served.delay["s"] = 0.5
        cm, _ = streams.pop(0)
        cm.__exit__(None, None, None)
        m = served.wait_metrics(lambda m: m["requests_cancelled"] > before["requests_cancelled"], "the cancel")
        m = served.wait_metrics(lambda m: m["queued"] < 2, "a queued request to get the freed row")
        assert (m["queued"], m["running"], m["requests_finished"]) == (1, 8, before["requests_finished"]), m
        served.delay["s"] = 0.02
        for w in waiting:
            w.join(WAIT_S)
            assert not w.is_alive()
        # Both queued requests were served in full, each with what generate gives its prompt alone.
        text, finish, tokens = alone(served, served.tok.encode(short["prompt"]), 3, ignore_eos=True)
        assert len(queued_responses) == 2
        for r in queued_responses:
            assert r.status_code == 200, r.text
            body = r.json()
            assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [(text, finish)], body
            assert body["usage"]["completion_tokens"] == tokens == 3, body
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    m = served.wait_metrics(lambda m: m["running"] == 0 and m["queued"] == 0, "every row to be free")
    assert m["requests_cancelled"] == before["requests_cancelled"] + 8
    # A non-streamed request whose client gives up is cancelled too (the handler polls for the disconnect).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + COMPLETIONS, json={**long, "stream": False}, timeout=httpx.Timeout(WAIT_S, read=0.3))
    m = served.wait_metrics(lambda m: m["requests_cancelled"] == before["requests_cancelled"] + 9, "the cancel")
    assert m["running"] == 0


# -- the command: API key and shutdown ---------------------------------------------------------------

def test_serve_help_and_option_errors(capsys, serve_checkpoint):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--max-batch", "--max-queue", "--api-key", "--device", "--dtype", "--quantize"):
        assert option in out
    for argv, fragment in ((["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                           (["--max-queue", "-1"], "--max-queue"), (["--dtype", "int3"], "--dtype"),
                           (["--max-seq", "100000"], "max_seq must be in [2, 256]")):
        assert cli.main(["serve", str(serve_checkpoint), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastsolar: error: ") and fragment in err[0], err


def test_serve_command_with_quantized_weights(serve_checkpoint, monkeypatch):
    """`fastsolar serve --quantize int8` serves int8 weights: its greedy completion is what generate gives the
    same quantised model alone. (The command runs in this process; only uvicorn's signal-handling run is
    replaced by a server on a thread that asks one question and stops.)"""
    from fastsolar.serve import server as server_mod

    prompt, answers, loaded = "Once upon a time", [], []

    def serve_one_request(app, host, port, *, shutdown_timeout):
        with running_server(app, WAIT_S) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
            answers.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text)

    real_load = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda args: loaded.append(real_load(args)) or loaded[-1])
    monkeypatch.setattr(server_mod, "run", serve_one_request)
    argv = ["serve", str(serve_checkpoint), "--quantize", "int8", "--device", "cpu", "--max-batch", "2",
            "--model-name", MODEL]
    threads = torch.get_num_threads()
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets the server's thread policy (fastsolar.serve.threads)
    assert [m.layers[1].feed_forward.w_down.weight.dtype for m in loaded] == [torch.int8]
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    ids = tok.encode(prompt)
    ref = Solar.from_pretrained(serve_checkpoint, device="cpu", quantize="int8")
    new = ref.generate(torch.tensor([ids]), 8, eos_token_id=[])[0, len(ids):].tolist()
    assert answers == [joined(lambda x: tok.decode(x, skip_special_tokens=True), ids, new)]


def _read_lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_api_key_and_clean_shutdown_of_the_command(serve_checkpoint, sig):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fastsolar", "serve", str(serve_checkpoint), "--port", "0", "--max-batch", "2",
           "--api-key", "sekrit", "--model-name", MODEL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    log: list[str] = []

    def wait_for(pattern: str) -> re.Match:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            log.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} in the server's log:\n{''.join(log)}")

    try:
        url = wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        wait_for(r"Application startup complete")
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(url + "/v1/models", headers=headers, timeout=WAIT_S)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(url + CHAT, json={"model": MODEL, "messages": "nope"}, timeout=WAIT_S)
        assert r.status_code == 401  # authentication comes before validation
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", timeout=WAIT_S, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
        # A stream in flight when the signal comes finishes; then the process exits 0.
        stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0, stream=True,
                                           user="alice", extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        proc.send_signal(sig)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
    while (line := lines.get(timeout=WAIT_S)) is not None:
        log.append(line)
    text = "".join(log)
    assert re.search(r"cmpl-\w+: length, prompt \d+ tokens, completion 60 tokens, time to first token [\d.]+ s, "
                     r"[\d.]+ tokens/s, total [\d.]+ s \(user 'alice'\)", text), text
    assert "Shutting down" in text and "shut down" in text and "Traceback" not in text
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
