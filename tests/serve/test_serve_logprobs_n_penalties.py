"""fastsolar serve's logprobs, `n` choices and presence / frequency penalties, with the real `openai` client
against a uvicorn server on 127.0.0.1 serving a tiny saved checkpoint: logprobs equal log_softmax of
transformers' float32 forward over prompt + generated tokens (the model's raw distribution, whatever the
penalties and temperature), top logprobs sorted and consistent with it, in chat's and the legacy
completions' shapes, streamed equal to whole; n choices share one prefill and choice i equals `generate`
with seed + i, reproducibly; penalties served equal `generate` with them, and a big frequency penalty
never repeats a token; all of it with penalised and plain, greedy and sampled requests in one batch."""
from __future__ import annotations

import asyncio

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import openai  # noqa: E402
import transformers  # noqa: E402

from helpers import assert_close, joined, running_server, slowed  # noqa: E402

from fastsolar import Solar, Tokenizer  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402

MODEL = "tiny"
WAIT_S = 60.0
ATOL = 2e-4  # float32 forward of one sequence (transformers) vs the engine's prefill + decode steps


class Server:
    def __init__(self, url: str, engine: Engine, tok: Tokenizer, ref: Solar, hf, delay: dict) -> None:
        self.url, self.engine, self.tok, self.ref, self.hf, self.delay = url, engine, tok, ref, hf, delay

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)

    def chat_ids(self, content: str) -> list[int]:
        return self.tok.encode_chat([{"role": "user", "content": content}])

    def generated(self, ids: list[int], n: int, rows: int = 1, **sampling) -> list[list[int]]:
        """What generate gives `rows` copies of the prompt (row i seeded with seed + i), EOS ignored."""
        out = self.ref.generate(torch.tensor([ids] * rows), n, eos_token_id=[], **sampling)
        return out[:, len(ids):].tolist()

    def reference_logprobs(self, ids: list[int], new: list[int]) -> torch.Tensor:
        """log_softmax of transformers' float32 logits at each generated token's step: [len(new), vocab]."""
        with torch.no_grad():
            logits = self.hf(torch.tensor([ids + new])).logits[0].double()
        return logits[len(ids) - 1: len(ids) + len(new) - 1].log_softmax(-1)

    def piece(self, token_id: int) -> bytes:
        """A token's bytes from its sentencepiece piece: <0xNN> is one byte, U+2581 a space."""
        p = self.tok.id_to_piece(token_id)
        return bytes([int(p[3:5], 16)]) if p.startswith("<0x") and len(p) == 6 else p.replace("\u2581", " ").encode()


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    model = Solar.from_pretrained(serve_checkpoint)
    delay = slowed(model)  # a slower model, so that concurrent requests surely share steps
    hf = transformers.AutoModelForCausalLM.from_pretrained(serve_checkpoint, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    engine = Engine(model, tok, max_batch=8, max_queue=4)
    with running_server(create_app(engine, tok, MODEL), WAIT_S) as base:
        yield Server(base, engine, tok, Solar.from_pretrained(serve_checkpoint), hf, delay)


def _check_chat_logprobs(server: Server, content: list, ids: list[int], new: list[int], k: int) -> None:
    ref = server.reference_logprobs(ids, new)
    assert len(content) == len(new)
    for step, (entry, tok) in enumerate(zip(content, new)):
        assert bytes(entry.bytes) == server.piece(tok), step
        assert entry.token == server.piece(tok).decode("utf-8", errors="backslashreplace")
        assert_close(torch.tensor(entry.logprob, dtype=torch.float64), ref[step, tok], atol=ATOL, rtol=0)
        top = entry.top_logprobs
        assert len(top) == k
        values = torch.tensor([t.logprob for t in top], dtype=torch.float64)
        assert bool((values[1:] <= values[:-1]).all()), step  # most likely first
        best = ref[step].topk(k)
        assert_close(values, best.values, atol=ATOL, rtol=0)
        assert [bytes(t.bytes) for t in top] == [server.piece(i) for i in best.indices.tolist()], step
        assert entry.logprob <= top[0].logprob + ATOL


def test_chat_logprobs_are_the_models_distribution_streamed_and_whole(server):
    """Sampled with a temperature and penalties, the logprobs are still log_softmax of the raw logits."""
    client = server.client()
    ids = server.chat_ids("Tell me about logprobs")
    sampling = dict(temperature=0.8, seed=77, presence_penalty=0.6, frequency_penalty=0.4)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about logprobs"}], max_tokens=9,
              logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True}, **sampling)
    whole = client.chat.completions.create(**kw)
    (new,) = server.generated(ids, 9, **sampling)
    choice = whole.choices[0]
    _check_chat_logprobs(server, choice.logprobs.content, ids, new, 5)
    assert whole.usage.completion_tokens == 9

    streamed, text = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text.append(c.delta.content or "")
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert "".join(text) == choice.message.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in choice.logprobs.content]

    # top_logprobs 0 (or absent): each token's logprob alone; no logprobs: none at all.
    zero = client.chat.completions.create(**{**kw, "top_logprobs": 0}).choices[0].logprobs.content
    assert [e.logprob for e in zero] == [e.logprob for e in choice.logprobs.content]
    assert all(e.top_logprobs == [] for e in zero)
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == choice.message.content


def test_completion_logprobs_in_the_legacy_shape_streamed_and_whole(server):
    client = server.client()
    ids = server.tok.encode("The quick brown")
    kw = dict(model=MODEL, prompt=ids, max_tokens=7, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    (new,) = server.generated(ids, 7)
    lp = whole.logprobs
    ref = server.reference_logprobs(ids, new)
    strings = [server.piece(t).decode("utf-8", errors="backslashreplace") for t in new]
    assert lp.tokens == strings
    assert_close(torch.tensor(lp.token_logprobs, dtype=torch.float64), ref.gather(1, torch.tensor(new)[:, None])[:, 0],
                 atol=ATOL, rtol=0)
    assert lp.text_offset == [sum(len(s) for s in strings[:i]) for i in range(len(strings))]
    for step, top in enumerate(lp.top_logprobs):
        best = ref[step].topk(3)
        expected = {server.piece(i).decode("utf-8", errors="backslashreplace"): v
                    for i, v in zip(best.indices.tolist(), best.values.tolist())}
        assert set(top) == set(expected) | {strings[step]}  # the top 3 and the sampled token
        for s, v in expected.items():
            assert abs(top[s] - v) < ATOL, (step, s)
    assert new[0] == int(ref[0].argmax())  # greedy: the sampled token is the most likely one

    chunks = list(client.completions.create(stream=True, **kw))
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for c in chunk.choices:
            if c.logprobs is not None:
                for key in got:
                    got[key].extend(getattr(c.logprobs, key))
    assert got == {key: getattr(lp, key) for key in got}
    assert "".join(c.text for ch in chunks for c in ch.choices) == whole.text


def test_n_choices_share_a_prefill_and_reproduce_seeded_generate(server):
    client = server.client()
    content = "Give me three ideas"
    ids = server.chat_ids(content)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=1.0,
              seed=2024, n=3, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    expected = [joined(server.tok.decode, ids, row)
                for row in server.generated(ids, 12, rows=3, temperature=1.0, seed=2024)]
    assert [c.message.content for c in first.choices] == expected  # choice i: generate's row i (seed + i)
    assert len(set(expected)) == 3
    assert first.usage.prompt_tokens == len(ids) and first.usage.completion_tokens == 36
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == expected
    # n=1 with that seed is choice 0, and generate alone with the seed.
    one = client.chat.completions.create(**{**kw, "n": 1}).choices
    assert [c.message.content for c in one] == expected[:1]

    texts, finishes, usage = {}, {}, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == expected and finishes == {0: "length", 1: "length", 2: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 36)

    # Greedy choices are identical (as OpenAI's are at temperature 0), and equal greedy generate.
    greedy = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, n=2,
                                       extra_body={"ignore_eos": True})
    (plain,) = server.generated(ids, 8)
    assert [c.text for c in greedy.choices] == [joined(server.tok.decode, ids, plain)] * 2


def test_penalties_served_follow_the_formula_and_never_repeat(server):
    client = server.client()
    ids = server.tok.encode("one one one one")
    (plain,) = server.generated(ids, 16)
    assert len(set(plain)) < len(plain)  # greedy alone repeats itself on this model
    kw = dict(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    # Greedy with the strongest penalties never repeats a token here.
    out = client.completions.create(max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0, logprobs=0, **kw)
    (both,) = server.generated(ids, 16, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(both)) == len(both) and out.choices[0].text == joined(server.tok.decode, ids, both)
    # Each step's token is the argmax of the model's float32 log_softmax (transformers) minus the formula on
    # the counts of the tokens generated before it (a constant per step does not move the argmax).
    out = client.completions.create(max_tokens=24, frequency_penalty=1.5, presence_penalty=-0.5, logprobs=0, **kw)
    (new,) = server.generated(ids, 24, frequency_penalty=1.5, presence_penalty=-0.5)
    assert out.choices[0].text == joined(server.tok.decode, ids, new)
    assert out.choices[0].logprobs.tokens == [server.piece(t).decode("utf-8", errors="backslashreplace") for t in new]
    ref = server.reference_logprobs(ids, new)
    counts = torch.zeros(ref.shape[1], dtype=torch.float64)
    for step, tok in enumerate(new):
        assert tok == int((ref[step] - 1.5 * counts + 0.5 * (counts > 0).double()).argmax()), step
        counts[tok] += 1
    assert int(counts.max()) > 1  # penalised, yet a token came back: the formula, not a ban, decided


def test_penalised_plain_greedy_sampled_and_n_requests_in_one_batch(server):
    """Requests that share decode steps get what each gets alone (generate with its parameters)."""
    server.delay["s"] = 0.02
    before = dict(server.engine.batch_sizes)
    try:
        prompts = [server.tok.encode(p) for p in ("alpha beta", "gamma delta epsilon", "zeta", "eta theta")]
        cases = [  # (prompt, n, sampling)
            (prompts[0], 1, dict(temperature=0.0)),
            (prompts[1], 1, dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5)),
            (prompts[2], 2, dict(temperature=0.9, seed=5, frequency_penalty=-0.7)),
            (prompts[3], 1, dict(temperature=1.1, seed=9)),
        ]

        async def run():
            c = server.async_client()
            calls = [c.completions.create(model=MODEL, prompt=p, max_tokens=16, n=n, logprobs=2,
                                          extra_body={"ignore_eos": True}, **s) for p, n, s in cases]
            return await asyncio.wait_for(asyncio.gather(*calls), WAIT_S)

        results = asyncio.run(run())
    finally:
        server.delay["s"] = 0.0
    shared = [b for b, k in server.engine.batch_sizes.items() if k > before.get(b, 0)]
    assert max(shared) == 5  # all five rows decoded together
    for (p, n, s), res in zip(cases, results):
        rows = server.generated(p, 16, rows=n, **s)
        assert [c.text for c in res.choices] == [joined(server.tok.decode, p, r) for r in rows], s
        for c, row in zip(res.choices, rows):
            ref = server.reference_logprobs(p, row)
            assert_close(torch.tensor(c.logprobs.token_logprobs, dtype=torch.float64),
                         ref.gather(1, torch.tensor(row)[:, None])[:, 0], atol=ATOL, rtol=0)
