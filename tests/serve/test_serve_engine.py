"""fastsolar.serve without HTTP: the counter-based RNG against its Python reference and in distribution, the
per-row sampler, and the continuous-batching engine against `generate` alone (greedy, with a repetition
penalty), per-row seeds whatever else runs, EOS, cancellation, the queue bound, validation and shutdown."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import DEVICE, joined

from fastsolar import Solar, Tokenizer
from fastsolar.decoding import rng
from fastsolar.decoding.sampling import RowParams, Sampler, SamplingParams, process_logits
from fastsolar.serve.engine import Engine, EngineClosed, InvalidRequest, QueueFull, Request

WAIT_S = 60.0  # bound on every wait for the engine thread (the CPU may be shared and slow)


# -- the counter-based RNG ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**63 - 1, -1, -(2**40) - 7, 2**64 + 5])
def test_rng_matches_python_reference(seed):
    counters = torch.tensor([0, 1, 17, 2**31 + 3], dtype=torch.int64)
    index = torch.tensor([0, 1, 2, 255, 31999, 2**20 + 1], dtype=torch.int64)
    key = torch.tensor([rng.seed_words(seed)] * len(counters), dtype=torch.int64)
    u = rng.uniform(key.to(DEVICE), counters.to(DEVICE), index.to(DEVICE)).cpu()
    expected = torch.tensor([[((rng.hash_ref(seed, c, j) >> 8) + 0.5) / 2**24 for j in index.tolist()]
                             for c in counters.tolist()], dtype=torch.float32)
    assert torch.equal(u, expected)
    assert ((u > 0) & (u < 1)).all()


def test_rng_is_uniform_and_streams_are_uncorrelated():
    b, v = 64, 4096
    key = torch.tensor([rng.seed_words(s) for s in range(b)], dtype=torch.int64)
    u0 = rng.uniform(key, torch.zeros(b, dtype=torch.int64), torch.arange(v))
    u1 = rng.uniform(key, torch.ones(b, dtype=torch.int64), torch.arange(v))
    n = u0.numel()
    counts = torch.histc(u0, bins=32, min=0, max=1)
    chi2 = float(((counts - n / 32) ** 2 / (n / 32)).sum())
    assert chi2 < 80, chi2  # 31 degrees of freedom: p ~ 1e-6 at 80
    assert abs(float(u0.mean()) - 0.5) < 0.005
    for a, c in ((u0, u1), (u0[:, :-1], u0[:, 1:]), (u0[:-1], u0[1:])):  # next step, next token, next seed
        corr = torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.01, float(corr)
    e = rng.exponential(key, torch.zeros(b, dtype=torch.int64), torch.arange(v))
    assert (e > 0).all() and abs(float(e.mean()) - 1.0) < 0.02


# -- the per-row sampler -----------------------------------------------------------------------------

def test_row_sampler_draws_follow_probabilities():
    rows, vocab, calls = 64, 6, 60
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    sampler = Sampler(rows, vocab, DEVICE, coarse_modes=True)
    for r in range(rows):
        sampler.assign(r, RowParams(temperature=1.0, seed=1000 + r))
    all_rows = torch.arange(rows, device=DEVICE)
    sampler.select(all_rows, list(range(rows)))
    logits = probs.log().to(DEVICE).expand(rows, vocab)
    draws = torch.cat([sampler(logits).cpu() for _ in range(calls)])
    freq = torch.bincount(draws, minlength=vocab).float() / draws.numel()
    n = draws.numel()
    chi2 = float(((freq - probs) ** 2 / probs).sum() * n)
    assert chi2 < 30, (chi2, freq)  # 5 degrees of freedom
    assert torch.equal(sampler.counter.cpu(), torch.full((rows,), calls))


def test_row_sampler_sampled_row_is_the_exponential_race_over_its_own_noise():
    """One sampled row, no top-k / top-p of its own (though the sampling mode runs both stages): the token is
    argmax(p / E) with p transformers' processed distribution and E this row's counter-based noise."""
    vocab = 301
    sampler = Sampler(4, vocab, DEVICE, coarse_modes=True)
    sampler.assign(2, RowParams(temperature=0.8, seed=99))
    sampler.select(torch.tensor([2], device=DEVICE), [2])
    # Sampling widened to top-k/p; no penalties, no logprobs; slot 2 not in order.
    assert sampler.mode == (False, True, True, True, False, False, False, False)
    g = torch.Generator().manual_seed(5)
    ref = SamplingParams.build(1, vocab, DEVICE, temperature=0.8)
    assert (ref.use_top_k, ref.use_top_p) == (False, False)
    key = torch.tensor([rng.seed_words(99)], dtype=torch.int64, device=DEVICE)
    for step in range(4):
        logits = (torch.randn(1, vocab, generator=g) * 2).to(DEVICE)
        probs = process_logits(logits, ref).softmax(dim=-1)
        noise = rng.exponential(key, torch.tensor([step], device=DEVICE), torch.arange(vocab, device=DEVICE))
        assert sampler(logits).item() == int((probs / noise).argmax())


def test_row_sampler_row_result_independent_of_batch():
    """A row's tokens depend on its own logits, parameters, seed and counter only: the same rows sampled as
    one batch in one order, or one by one, give the same tokens, step after step."""
    vocab, steps = 97, 5
    params = {
        0: RowParams(temperature=0.0),
        2: RowParams(temperature=0.8, top_p=0.9, seed=7),
        3: RowParams(temperature=1.2, top_k=5, repetition_penalty=1.3, seed=-3),
        5: RowParams(temperature=0.0, repetition_penalty=1.5),
    }
    prompts = {r: [r + 1, 2 * r + 3, 11] for r in params}
    together, alone = Sampler(6, vocab, DEVICE, coarse_modes=True), Sampler(6, vocab, DEVICE, coarse_modes=True)
    for s in (together, alone):
        for r, p in params.items():
            s.assign(r, p, prompts[r])
    order = [3, 0, 5, 2]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        logits = (torch.randn(len(order), vocab, generator=g) * 3).to(DEVICE)
        rows = torch.tensor(order, device=DEVICE)
        together.select(rows, order)
        batch = together(logits).tolist()
        singles = []
        for i, r in enumerate(order):
            alone.select(rows[i:i + 1], [r])
            singles.append(alone(logits[i:i + 1]).item())
        assert batch == singles
        for i, r in enumerate(order):
            if params[r].temperature == 0 and params[r].repetition_penalty == 1:
                assert batch[i] == int(logits[i].argmax())
    assert together.mode == (True, True, True, True, False, True, False, False)
    # Greedy with a penalty is transformers' processing then argmax (checked against process_logits directly).
    fresh = Sampler(6, vocab, DEVICE, coarse_modes=True)
    fresh.assign(5, params[5], prompts[5])
    fresh.select(torch.tensor([5], device=DEVICE), [5])
    logits = torch.randn(1, vocab, generator=g).to(DEVICE)
    ref = SamplingParams.build(1, vocab, DEVICE, temperature=0.0, repetition_penalty=1.5)
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=DEVICE)
    seen[0, prompts[5]] = True
    assert fresh(logits).item() == int(process_logits(logits, ref, seen).argmax())


# -- the engine ---------------------------------------------------------------------------------------

class Collector:
    """A request's sink: gathers its Outputs; `wait()` returns once the last one came."""

    def __init__(self, on_output=None) -> None:
        self.outputs = []
        self.finished = threading.Event()
        self.on_output = on_output

    def __call__(self, out) -> None:
        self.outputs.append((time.perf_counter(), out))
        if self.on_output is not None:
            self.on_output(out)
        if out.finish_reason is not None:
            self.finished.set()

    def wait(self):
        assert self.finished.wait(WAIT_S), "the request did not finish in time"
        return self

    @property
    def text(self) -> str:
        return "".join(o.text for _, o in self.outputs)

    @property
    def last(self):
        return self.outputs[-1][1]


@pytest.fixture(scope="module")
def ckpt(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    ref = Solar.from_pretrained(serve_checkpoint, device=DEVICE)
    return serve_checkpoint, tok, ref


@pytest.fixture
def make_engine(ckpt):
    engines = []

    def make(**kw):
        d, tok, _ = ckpt
        engine = Engine(Solar.from_pretrained(d, device=DEVICE), tok, **kw).start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


def no_engine_running() -> None:
    """References are computed before an engine starts, never beside it: generate on this thread while the engine
    thread decodes would share the split-K workspaces with it, and could run during its CUDA-graph capture (nothing
    else may run then)."""
    running = [t.name for t in threading.enumerate() if t.name == "fastsolar-engine" and t.is_alive()]
    assert not running, "a reference computed while an engine thread runs: compute it before starting the engine"


def reply(tok: Tokenizer, prompt: list[int], new) -> str:
    """The text of `new` after `prompt` (the join rule, tests/serve/test_serve_join.py)."""
    return joined(lambda ids: tok.decode(ids, skip_special_tokens=True), prompt, list(new))


def alone(ref: Solar, tok: Tokenizer, prompt: list[int], max_tokens: int, **sampling):
    """What generate gives one prompt: (text, finish_reason, completion tokens) with EOS ending it."""
    no_engine_running()
    ids = torch.tensor([prompt], device=ref.device)
    new = ref.generate(ids, max_tokens, **sampling)[0, len(prompt):].tolist()
    eos = set(ref.config.eos_token_ids)
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    if cut is not None:
        return reply(tok, prompt, new[:cut]), "stop", cut + 1
    return reply(tok, prompt, new), "length", len(new)


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Once upon a time",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42", "### User:\nWhat is the capital of France?\n\n### Assistant:\n",
           "Café, naïve, résumé", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "def main():"]


def test_engine_greedy_equals_generate_while_requests_come_and_go(ckpt, make_engine):
    _, tok, ref = ckpt
    budgets = [12, 5, 20, 9, 16, 3, 14, 7]
    expected = [alone(ref, tok, tok.encode(p), n) for p, n in zip(PROMPTS, budgets)]
    engine = make_engine(max_batch=3)
    collectors = [Collector() for _ in PROMPTS]
    # Three now; the rest while those run, so they join a batch mid-generation and reuse freed rows.
    for i in range(3):
        engine.submit(Request(f"r{i}", tok.encode(PROMPTS[i]), budgets[i], RowParams(temperature=0.0)), collectors[i])
    deadline = time.monotonic() + WAIT_S
    while not collectors[0].outputs and time.monotonic() < deadline:
        time.sleep(0.002)
    for i in range(3, len(PROMPTS)):
        engine.submit(Request(f"r{i}", tok.encode(PROMPTS[i]), budgets[i], RowParams(temperature=0.0)), collectors[i])
    for i, c in enumerate(collectors):
        c.wait()
        assert (c.text, c.last.finish_reason, c.last.completion_tokens) == expected[i], i
        assert c.last.prompt_tokens == len(tok.encode(PROMPTS[i]))
    assert engine.rows_used == {0, 1, 2}
    assert max(engine.batch_sizes) == 3 and len(engine.batch_sizes) > 1
    # Continuous: a later request produced tokens before an earlier one finished.
    first_late = min(c.outputs[0][0] for c in collectors[3:])
    assert first_late < max(c.outputs[-1][0] for c in collectors[:3])
    # The static-buffer graph step recorded one entry per batch size used (greedy: one sampling mode).
    assert sorted({k.batch for k in engine.step.pool.entries}) == sorted(engine.batch_sizes)
    m = engine.metrics()
    assert m["running"] == 0 and m["queued"] == 0 and m["requests_finished"] == len(PROMPTS)
    assert m["completion_tokens_total"] == sum(c.last.completion_tokens for c in collectors)


def test_generate_on_a_served_model_leaves_the_served_output_unchanged(ckpt, make_engine):
    """`model.generate` on the very model an engine is serving, run between two of the engine's steps (from a
    request's sink, on the engine thread): generate decodes in a session of its own, so the served request's
    cache row is untouched and both get exactly what they get alone."""
    _, tok, ref = ckpt
    engine = make_engine(max_batch=2)
    served, other = tok.encode(PROMPTS[1]), tok.encode(PROMPTS[3])
    got: list = []

    def interleave(out) -> None:
        if len(c.outputs) == 3:  # the served request sits in cache row 0 (what generate's rows 0.. would hit)
            try:
                got.append(engine.model.generate(torch.tensor([other, other], device=DEVICE), 8, eos_token_id=[]))
            except Exception as e:  # reported below: a raising sink would only cancel the request
                got.append(e)

    c = Collector(on_output=interleave)
    engine.submit(Request("s", served, 20, RowParams(temperature=0.0), ignore_eos=True), c)
    c.wait()
    assert len(got) == 1 and isinstance(got[0], torch.Tensor), got
    new = ref.generate(torch.tensor([served], device=DEVICE), 20, eos_token_id=[])[0, len(served):]
    want_served = reply(tok, served, new.tolist())
    assert (c.text, c.last.completion_tokens) == (want_served, 20)
    want_other = ref.generate(torch.tensor([other, other], device=DEVICE), 8, eos_token_id=[])
    assert torch.equal(got[0], want_other)
    assert engine.session.rows_in_use == frozenset()


def test_same_seed_same_tokens_through_generate_stream_and_the_engine(ckpt, make_engine):
    """One sampler for all: a seeded, sampled request gives the same tokens through `generate` (alone, and as
    row 0 of a batch), `stream` and the serving engine (beside other requests, in another cache row)."""
    _, tok, ref = ckpt
    prompt = tok.encode(PROMPTS[2])
    sampling = dict(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.1)
    ids = torch.tensor([prompt], device=DEVICE)
    new = ref.generate(ids, 16, eos_token_id=[], seed=42, **sampling)[0, len(prompt):]
    streamed = torch.stack(list(ref.stream(ids, 16, eos_token_id=[], seed=42, **sampling)), dim=1)[0]
    other = tok.encode(PROMPTS[0])[:len(prompt)]
    pair = torch.tensor([prompt, other + [other[-1]] * (len(prompt) - len(other))], device=DEVICE)
    batched = ref.generate(pair, 16, eos_token_id=[], seed=42, **sampling)[0, len(prompt):]
    assert torch.equal(streamed, new) and torch.equal(batched, new)
    assert not torch.equal(new, ref.generate(ids, 16, eos_token_id=[], seed=43, **sampling)[0, len(prompt):])

    engine = make_engine(max_batch=3)
    busy = Collector()
    engine.submit(Request("o", tok.encode(PROMPTS[4]), 16, RowParams(temperature=1.0, seed=7)), busy)
    served = Collector()
    engine.submit(Request("s", prompt, 16, RowParams(seed=42, **sampling), ignore_eos=True), served)
    assert served.wait().text == reply(tok, prompt, new.tolist())
    busy.wait()


def test_engine_greedy_with_repetition_penalty_equals_generate(ckpt, make_engine):
    _, tok, ref = ckpt
    params = RowParams(temperature=0.0, repetition_penalty=1.3)
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    expected = [alone(ref, tok, p, 15, repetition_penalty=1.3)[:2] for p in prompts]
    engine = make_engine(max_batch=4)
    collectors = [Collector() for _ in prompts]
    for i, p in enumerate(prompts):
        # Mixed with a sampled request, so the step runs the penalty and sampling stages for every row.
        engine.submit(Request(f"p{i}", p, 15, params if i else RowParams(temperature=1.0, seed=1)), collectors[i])
    for i, c in enumerate(collectors[1:], 1):
        assert (c.wait().text, c.last.finish_reason) == expected[i]


def test_seeded_sampling_is_the_same_whatever_else_runs(ckpt, make_engine):
    _, tok, _ = ckpt
    engine = make_engine(max_batch=4)
    target = Request("t", tok.encode(PROMPTS[2]), 24, RowParams(temperature=0.9, top_p=0.95, seed=42),
                     ignore_eos=True)
    solo = Collector()
    engine.submit(target, solo)
    solo.wait()
    # Again, now in another row and batch position, next to greedy and other sampled requests.
    others = [Collector() for _ in range(3)]
    again = Collector()
    engine.submit(Request("o0", tok.encode(PROMPTS[0]), 30, RowParams(temperature=1.0, seed=1)), others[0])
    engine.submit(Request("o1", tok.encode(PROMPTS[4]), 8, RowParams(temperature=0.0)), others[1])
    engine.submit(target, again)
    engine.submit(Request("o2", tok.encode(PROMPTS[5]), 30, RowParams(temperature=0.7, top_k=4, seed=9)), others[2])
    assert again.wait().text == solo.text
    assert again.last.completion_tokens == solo.last.completion_tokens == 24
    for c in others:
        c.wait()
    other_seed = Collector()
    engine.submit(Request("t2", target.prompt, 24, RowParams(temperature=0.9, top_p=0.95, seed=43), ignore_eos=True),
                  other_seed)
    assert other_seed.wait().text != solo.text


def test_engine_eos_and_length(ckpt, make_engine):
    _, tok, ref = ckpt
    prompt = tok.encode(PROMPTS[1])
    no_engine_running()
    tokens = ref.generate(torch.tensor([prompt], device=ref.device), 12, eos_token_id=[])[0, len(prompt):].tolist()
    engine = make_engine(max_batch=2)
    full = Collector()
    engine.submit(Request("full", prompt, 12, RowParams(temperature=0.0), ignore_eos=True), full)
    assert full.wait().text == reply(tok, prompt, tokens) and full.last.finish_reason == "length"
    # A later token made the EOS: the request ends at its first occurrence ("stop"), counted but not shown.
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    engine.eos = frozenset({tokens[k]})
    eos = Collector()
    engine.submit(Request("eos", prompt, 12, RowParams(temperature=0.0)), eos)
    assert (eos.wait().text, eos.last.finish_reason, eos.last.completion_tokens) == \
        (reply(tok, prompt, tokens[:k]), "stop", k + 1)


def test_cancel_frees_the_row_within_a_step(ckpt, make_engine):
    _, tok, _ = ckpt
    engine = make_engine(max_batch=1, max_queue=1)
    seen_at_cancel = []
    box = {}

    def cancel_third(out):
        if out.completion_tokens >= 3 and not seen_at_cancel:
            seen_at_cancel.append(out.completion_tokens)
            box["ticket"].cancel()

    first = Collector(cancel_third)
    box["ticket"] = engine.submit(Request("long", tok.encode("a b c"), 200, RowParams(temperature=0.0),
                                          ignore_eos=True), first)
    nxt = Collector()
    engine.submit(Request("next", tok.encode(PROMPTS[0]), 4, RowParams(temperature=0.0), ignore_eos=True), nxt)
    assert nxt.wait().last.finish_reason == "length"
    # Cancelled from its sink (on the engine thread, so at a known token): dropped before another step ran.
    assert box["ticket"].done and box["ticket"].generated == seen_at_cancel[0]
    assert not first.finished.is_set()  # a cancelled request gets no further events
    assert engine.metrics()["requests_cancelled"] == 1 and engine.rows_used == {0}


def test_queue_bound_and_shutdown(ckpt, make_engine):
    _, tok, _ = ckpt
    engine = make_engine(max_batch=1, max_queue=1)
    running, queued = Collector(), Collector()
    engine.submit(Request("a", tok.encode("x"), 200, RowParams(temperature=0.0), ignore_eos=True), running)
    engine.submit(Request("b", tok.encode("y"), 200, RowParams(temperature=0.0), ignore_eos=True), queued)
    with pytest.raises(QueueFull, match="max batch 1.*max queue 1"):
        engine.submit(Request("c", tok.encode("z"), 5, RowParams(temperature=0.0)), Collector())
    engine.stop()
    for c in (running, queued):
        assert c.wait().last.finish_reason == "error" and "shutting down" in c.last.error
    with pytest.raises(EngineClosed, match="shutting down"):
        engine.submit(Request("d", tok.encode("z"), 5), Collector())
    assert not engine._thread.is_alive()


def test_stop_drains_running_requests(ckpt, make_engine):
    _, tok, _ = ckpt
    engine = make_engine(max_batch=2)
    c = Collector()
    engine.submit(Request("a", tok.encode("x"), 30, RowParams(temperature=0.0), ignore_eos=True), c)
    engine.stop(drain=WAIT_S)
    assert c.finished.is_set() and c.last.finish_reason == "length" and c.last.completion_tokens == 30


def test_references_are_never_computed_beside_a_running_engine(ckpt, make_engine):
    """The guard the engine tests rely on: alone() refuses to run while an engine thread is alive (the race a GPU
    would hit: generate sharing split-K workspaces with the engine's steps, or running during its graph capture)."""
    _, tok, ref = ckpt
    engine = make_engine(max_batch=1)
    with pytest.raises(AssertionError, match="before starting the engine"):
        alone(ref, tok, tok.encode(PROMPTS[0]), 2)
    engine.stop()
    assert alone(ref, tok, tok.encode(PROMPTS[0]), 2)[2] >= 1


@pytest.mark.parametrize("request_kw, param, fragment", [
    (dict(prompt=[]), "prompt", "empty"),
    (dict(prompt=[1, 10**6]), "prompt", "outside the vocabulary"),
    (dict(prompt=[1] * 256), "prompt", "context is 256"),
    (dict(prompt=[1] * 250, max_tokens=7), "max_tokens", "257 tokens exceed"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(sampling=RowParams(temperature=-1.0)), "temperature", "temperature"),
    (dict(sampling=RowParams(top_p=1.5)), "top_p", "top_p"),
    (dict(sampling=RowParams(repetition_penalty=0.0)), "repetition_penalty", "repetition_penalty"),
    (dict(stop=("",)), "stop", "non-empty"),
])
def test_engine_refuses_bad_requests(ckpt, request_kw, param, fragment):
    d, tok, ref = ckpt
    engine = Engine(ref, tok, max_batch=1)  # validation needs no running engine
    kw = dict(id="bad", prompt=[1, 5, 6], max_tokens=4) | request_kw
    with pytest.raises(InvalidRequest, match=fragment) as e:
        engine.validate(Request(**kw))
    assert e.value.param == param


def test_engine_arguments_are_checked(ckpt):
    _, tok, ref = ckpt
    for kw, fragment in ((dict(max_batch=0), "max_batch"), (dict(max_queue=-1), "max_queue"),
                         (dict(max_seq=10**6), "max_seq")):
        with pytest.raises(ValueError, match=fragment):
            Engine(ref, tok, **kw)


@pytest.mark.gpu("CUDA graph capture of the server's decode steps")
def test_engine_with_cuda_graphs_equals_generate(ckpt, make_engine):
    """On CUDA the decode steps replay captured graphs (one per batch size): greedy still equals generate."""
    _, tok, ref = ckpt
    expected = [alone(ref, tok, tok.encode(p), 10 + i)[:2] for i, p in enumerate(PROMPTS)]
    engine = make_engine(max_batch=4)
    assert engine.cuda_graphs
    collectors = [Collector() for _ in PROMPTS]
    for i, p in enumerate(PROMPTS):
        engine.submit(Request(f"g{i}", tok.encode(p), 10 + i, RowParams(temperature=0.0)), collectors[i])
    for i, c in enumerate(collectors):
        assert (c.wait().text, c.last.finish_reason) == expected[i]
    assert all(e.graph is not None for e in engine.step.pool.entries.values())
