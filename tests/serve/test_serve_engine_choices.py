"""The engine (no HTTP, so it also runs where fastapi is absent, e.g. the GPU machine, with captured CUDA graphs
there) with `n` choices, presence / frequency penalties and logprobs in one running batch: each choice equals
`generate` with its parameters and seed + index, and each token's logprob equals log_softmax of a fresh
float32 prefill over prompt + the tokens before it."""
from __future__ import annotations

import threading
import time

import torch
from helpers import DEVICE, assert_close, joined

from fastsolar import Solar, Tokenizer
from fastsolar.decoding.sampling import RowParams
from fastsolar.decoding.session import DecodeSession
from fastsolar.serve.engine import Engine, Request

WAIT_S = 60.0


class Choices:
    """A request's sink: each choice's Outputs by index; `wait()` returns once all n finished."""

    def __init__(self, n: int) -> None:
        self.outputs: dict[int, list] = {i: [] for i in range(n)}
        self.done = threading.Event()

    def __call__(self, out) -> None:
        self.outputs[out.index].append(out)
        if all(o and o[-1].finish_reason is not None for o in self.outputs.values()):
            self.done.set()

    def wait(self) -> "Choices":
        assert self.done.wait(WAIT_S), "the request did not finish in time"
        return self


def test_engine_n_choices_penalties_and_logprobs_in_one_batch(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    ref = Solar.from_pretrained(serve_checkpoint, device=DEVICE)
    cases = [  # (prompt, n, sampling, logprobs)
        (tok.encode("alpha beta gamma"), 3,
         dict(temperature=0.9, seed=31, presence_penalty=1.0, frequency_penalty=0.5), 4),
        (tok.encode("Once upon a time"), 1, dict(temperature=0.0), None),
        (tok.encode("delta"), 2, dict(temperature=0.0, frequency_penalty=2.0), 0),
    ]
    steps = 10
    expected = []
    for ids, n, sampling, _ in cases:  # references first: generate must not run beside the engine thread
        out = ref.generate(torch.tensor([ids] * n, device=DEVICE), steps, eos_token_id=[], **sampling)
        expected.append(out[:, len(ids):].tolist())
    engine = Engine(Solar.from_pretrained(serve_checkpoint, device=DEVICE), tok, max_batch=6).start()
    try:
        sinks = [Choices(n) for _, n, _, _ in cases]
        for i, ((ids, n, sampling, k), sink) in enumerate(zip(cases, sinks)):
            params = RowParams(**sampling)
            engine.submit(Request(f"c{i}", ids, steps, params, ignore_eos=True, n=n, logprobs=k), sink)
        for sink in sinks:
            sink.wait()
        assert engine.metrics()["decode_steps_by_batch_size"].get(6, 0) > 0  # all six rows together
        assert engine.metrics()["prompt_tokens_total"] == sum(len(ids) for ids, *_ in cases)  # once per request
        if engine.cuda_graphs:
            assert all(e.graph is not None for e in engine.step.pool.entries.values())
    finally:
        engine.stop()
    for (ids, n, _, k), sink, rows in zip(cases, sinks, expected):
        for index, row in enumerate(rows):
            outs = sink.outputs[index]
            assert "".join(o.text for o in outs) == joined(tok.decode, ids, row), (ids, index)
            assert outs[-1].completion_tokens == steps
            logprobs = [lp for o in outs for lp in o.logprobs]
            if k is None:
                assert logprobs == []
                continue
            assert [lp.token for lp in logprobs] == row
            session = DecodeSession(ref, 1, len(ids) + steps)
            with torch.inference_mode():
                for step, lp in enumerate(logprobs):
                    seq = torch.tensor([ids + row[:step]], device=DEVICE)
                    want = session.prefill(seq, torch.tensor([seq.shape[1]], device=DEVICE))[0].double().log_softmax(-1)
                    assert_close(torch.tensor(lp.logprob, dtype=torch.float64), want[row[step]].cpu(), atol=2e-4)
                    top = want.topk(k)
                    assert [t for t, _ in lp.top] == top.indices.tolist()
                    assert_close(torch.tensor([v for _, v in lp.top], dtype=torch.float64), top.values.cpu(), atol=2e-4)


def test_a_request_whose_choices_end_differently_is_recorded_once(serve_checkpoint):
    """Choice 0 ends at a stop string, then the client goes away while choice 1 runs: the request's end is
    recorded once, as a cancel, when its last choice is dropped (not never, not twice)."""
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    ids = tok.encode("alpha beta gamma")
    sampling = RowParams(temperature=1.0, seed=5)
    engine = Engine(Solar.from_pretrained(serve_checkpoint, device=DEVICE), tok, max_batch=2).start()
    try:
        free = Choices(2)
        engine.submit(Request("free", ids, 30, sampling, ignore_eos=True, n=2), free)
        texts = ["".join(o.text for o in free.wait().outputs[i]) for i in range(2)]
        # A stop string only choice 0 writes (the choices differ: seed + index), early in its text.
        stop = next(texts[0][k:k + 3] for k in range(1, len(texts[0]) - 3) if texts[0][k:k + 3] not in texts[1])
        before = engine.metrics()
        first_done = threading.Event()
        sink = Choices(2)

        def on_output(out) -> None:
            sink(out)
            if out.index == 0 and out.finish_reason is not None:
                first_done.set()

        ticket = engine.submit(Request("r", ids, 30, sampling, stop=(stop,), ignore_eos=True, n=2), on_output)
        assert first_done.wait(WAIT_S) and sink.outputs[0][-1].finish_reason == "stop"
        ticket.cancel()
        deadline = time.monotonic() + WAIT_S
        while engine.metrics()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = engine.metrics()
    finally:
        engine.stop()
    assert after["running"] == 0
    assert (after["requests_cancelled"] - before["requests_cancelled"],
            after["requests_finished"] - before["requests_finished"]) == (1, 0)
