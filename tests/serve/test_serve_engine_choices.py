"""The engine (no HTTP, so it also runs where fastapi is absent, e.g. the GPU machine, with captured CUDA graphs
there) with `n` choices, presence / frequency penalties and logprobs in one running batch: each choice equals
`generate` with its parameters and seed + index, and each token's logprob equals log_softmax of a fresh
float32 prefill over prompt + the tokens before it."""
from __future__ import annotations

import threading

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
