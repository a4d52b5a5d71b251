"""fastsolar.decoding.graphs: batch validation, the static-buffer step (CPU, capture=False) against the eager step, recapture
rules; on CUDA, the captured step and graphed generate against eager."""
from __future__ import annotations

import copy

import pytest
import torch

import fastsolar.decoding.generate as gen_mod
from fastsolar import Solar
from fastsolar.config import SolarConfig
from fastsolar.decoding.generate import generate
from fastsolar.decoding.graphs import CudaGraphLoop, CudaGraphStep, WeightStorage, check_batch
from fastsolar.decoding.sampling import Sampler
from fastsolar.decoding.session import DecodeSession
from fastsolar.model import quant

SMALL = SolarConfig(
    vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, torch_dtype="float32",
)


class ToySampler:
    """A small stand-in for fastsolar.decoding.sampling.Sampler with the same kinds of state: per-row device params,
    a seen-token mask (repetition penalty) and a generator; greedy rows take argmax, others an exponential
    race. Enough to prove that warm-up does not leak state into the real steps."""

    def __init__(self, batch: int, vocab: int, device: torch.device, seed: int = 0) -> None:
        self.temperature = torch.zeros(batch, device=device)
        self.penalty = torch.ones(batch, device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.generator = torch.Generator(device=device)
        self.reset([0.0] * batch, [1.0] * batch, seed)

    def reset(self, temperature: list[float], penalty: list[float], seed: int) -> None:
        self.temperature.copy_(torch.tensor(temperature))
        self.penalty.copy_(torch.tensor(penalty))
        self.seen.zero_()
        self.generator.manual_seed(seed)

    # The state protocol fastsolar.decoding.graphs relies on (the same as fastsolar.decoding.sampling.Sampler's).
    def snapshot(self):
        return [t.clone() for t in (self.temperature, self.penalty, self.seen)], self.generator.get_state()

    def restore(self, snap) -> None:
        tensors, gen = snap
        for live, saved in zip((self.temperature, self.penalty, self.seen), tensors):
            live.copy_(saved)
        self.generator.set_state(gen)

    def generators(self):
        return [self.generator]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        pen = self.penalty[:, None]
        penalised = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(self.seen, penalised, logits)
        greedy = logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature.clamp_min(1e-5)[:, None], dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(-1)
        tokens = torch.where(self.temperature > 0, sampled, greedy)
        self.seen.scatter_(1, tokens[:, None], True)
        return tokens


def make_model(device="cpu", dtype=torch.float32, seed=0) -> Solar:
    torch.manual_seed(seed)
    model = Solar(SMALL).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 * 10)  # a bit larger than HF's init so greedy choices are well separated
    return model


def decode_run(session: DecodeSession, step, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """What generate does around its step: prefill, then n decode steps; returns the new tokens [b, n]."""
    b, s = prompts.shape
    seqlens = torch.full((b,), s, dtype=torch.int32, device=prompts.device)
    with torch.no_grad():
        tokens = session.prefill(prompts, seqlens).argmax(-1)
    positions = torch.full((b,), s, dtype=torch.int64, device=prompts.device)
    out = []
    for _ in range(n):
        tokens = step(tokens, positions)
        out.append(tokens)
        positions = positions + 1
    return torch.stack(out, 1)


def eager_step(session, sampler):
    @torch.no_grad()
    def step(tokens, positions):
        return sampler(session.decode(tokens, positions))

    return step


def prompts_for(b: int, s: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SMALL.vocab_size, (b, s), generator=g).to(device)


def test_check_batch():
    for b in (1, 2, 3, 7, 16):
        check_batch(b, 16)
    with pytest.raises(ValueError, match="max_batch"):
        check_batch(9, 8)
    with pytest.raises(ValueError):
        check_batch(0, 8)


def test_sampler_snapshot_restores_its_state():
    """Sampler.snapshot()/restore(): every buffer the sampler writes (seen-masks and draw counters), put back in
    place; the noise is counter-based, so a restored sampler draws the same tokens again, with no generator."""
    s = Sampler(2, 10, torch.device("cpu"))
    s.reset(temperature=[0.0, 0.9], repetition_penalty=1.3, seed=3)
    logits = torch.randn(2, 10)
    ptrs = [t.data_ptr() for t in s.state_tensors()]
    snap = s.snapshot()
    first = s(logits)
    assert s.seen.any()
    s.restore(snap)
    assert not s.seen.any() and [t.data_ptr() for t in s.state_tensors()] == ptrs
    assert not s.counter.any()
    assert torch.equal(s(logits), first), "the restored counters must draw the same noise again"
    assert s.generators() == []


def test_static_path_equals_eager_across_runs_batches_and_cache_reallocation():
    """capture=False runs the graph step's exact bookkeeping (key, warm-up with state restore, static buffers,
    clone-out) without capture; its tokens must equal the eager step's token for token."""
    model = make_model()
    dev = torch.device("cpu")
    session = DecodeSession(model, 4, 48)
    pool = session.graphs
    n = 6

    def both(b, seed, temps, pens, sampler_e, sampler_g, s=7):
        p = prompts_for(b, s, seed)
        sampler_e.reset(temps, pens, seed)
        want = decode_run(session, eager_step(session, sampler_e), p, n)
        sampler_g.reset(temps, pens, seed)
        got = decode_run(session, CudaGraphStep(session, sampler_g, capture=False), p, n)
        assert torch.equal(got, want), f"batch {b}: static-buffer step {got.tolist()} != eager {want.tolist()}"
        return got

    # Run 1, batch 3: greedy, sampled and penalised rows (warm-up must not leak into seen mask or RNG).
    e3, g3 = ToySampler(3, SMALL.vocab_size, dev), ToySampler(3, SMALL.vocab_size, dev)
    both(3, 1, [0.0, 0.8, 0.0], [1.0, 1.0, 1.3], e3, g3)
    assert pool.captures == 1
    # Run 2, batch 2: a second graph.
    e2, g2 = ToySampler(2, SMALL.vocab_size, dev), ToySampler(2, SMALL.vocab_size, dev)
    both(2, 2, [1.0, 0.0], [1.2, 1.0], e2, g2)
    assert pool.captures == 2
    # Run 3, batch 3 again with the same (reset in place) sampler: the recorded step is reused.
    both(3, 3, [0.5, 0.0, 0.9], [1.0, 1.5, 1.0], e3, g3)
    assert pool.captures == 2
    entry = pool.lookup(next(k for k in pool.entries if k.batch == 3))
    assert entry.replays == 2 * n
    # A new sampler object of the same batch size is recorded afresh (its buffers are other tensors).
    e3b, g3b = ToySampler(3, SMALL.vocab_size, dev), ToySampler(3, SMALL.vocab_size, dev)
    both(3, 5, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], e3b, g3b)
    assert pool.captures == 3
    # Another session of the same model records into its own pool and cache; the first's graphs stay.
    first = session
    session = DecodeSession(model, 8, 64)
    pool = session.graphs
    both(3, 4, [0.0, 0.0, 0.7], [1.0, 1.1, 1.0], e3, g3)
    assert pool.captures == 1 and first.graphs.captures == 3 and len(first.graphs.entries) == 3


def test_outputs_are_copies_and_errors_are_clear():
    model = make_model()
    sampler = ToySampler(2, SMALL.vocab_size, torch.device("cpu"))
    session = DecodeSession(model, 2, 16)
    step = CudaGraphStep(session, sampler, capture=False)
    session.prefill(prompts_for(2, 4, 0), torch.tensor([4, 4], dtype=torch.int32))
    a = step(torch.tensor([3, 4]), torch.tensor([4, 4]))
    b = step(a, torch.tensor([5, 5]))
    assert a.data_ptr() != b.data_ptr()
    assert CudaGraphStep(session, sampler, capture=False).pool is step.pool is session.graphs
    assert not [k for k in vars(model) if "fastsolar" in k or "graph" in k], "nothing is attached to the model"
    with pytest.raises(ValueError, match="max_batch"):
        step(torch.tensor([1, 2, 3]), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphStep(session, sampler, capture=True)


def test_static_path_with_row_map_equals_eager():
    """A step with a cache-row map (a serving engine's batch over free rows): the static-buffer path copies the
    map into its own buffer each call, so one recording serves any map, and tokens equal the eager step's."""
    model = make_model()
    session = DecodeSession(model, 4, 32)
    dev = torch.device("cpu")
    prompts = prompts_for(2, 5, 11)
    sampler_e, sampler_g = ToySampler(2, SMALL.vocab_size, dev), ToySampler(2, SMALL.vocab_size, dev)
    pool = session.graphs
    step_g = CudaGraphStep(session, sampler_g, capture=False)
    for rows in ([3, 1], [0, 2]):
        rows_t = torch.tensor(rows)
        outs = []
        for sampler, step in ((sampler_e, lambda t, p: sampler_e(session.decode(t, p, rows_t))),
                              (sampler_g, lambda t, p: step_g(t, p, rows_t))):
            sampler.reset([0.0, 0.8], [1.0, 1.2], 3)
            with torch.no_grad():
                tokens = session.prefill(prompts, torch.tensor([5, 5], dtype=torch.int32), rows=rows_t).argmax(-1)
            positions = torch.tensor([5, 5])
            seq = []
            for _ in range(4):
                tokens = step(tokens, positions)
                seq.append(tokens)
                positions = positions + 1
            outs.append(torch.stack(seq, 1))
        assert torch.equal(outs[1], outs[0]), f"rows {rows}: {outs[1].tolist()} != {outs[0].tolist()}"
    assert pool.captures == 1, "a new row map must reuse the recorded step"
    entry = next(iter(pool.entries.values()))
    assert entry.key.rows_dtype == torch.int64 and entry.rows is not None


def test_default_capture_follows_device():
    session = DecodeSession(make_model(), 1, 8)
    assert CudaGraphStep(session, ToySampler(1, SMALL.vocab_size, torch.device("cpu"))).capture is False


def test_generate_with_static_step_equals_eager_generate(monkeypatch):
    """fastsolar.decoding.generate with its step hook routed to CudaGraphStep(capture=False) (what the CUDA wiring does,
    minus capture) gives eager generate's tokens: greedy, sampled with a seed, penalised, over repeated calls
    and two batch sizes (the real Sampler, reset in place, reused)."""
    model = make_model()
    runs = [
        (3, dict(temperature=0.0)),
        (3, dict(temperature=[0.0, 0.9, 1.2], top_k=[0, 20, 0], top_p=[1.0, 1.0, 0.9], repetition_penalty=1.3, seed=5)),
        (2, dict(temperature=0.7, repetition_penalty=[1.0, 1.2], seed=7)),
        (3, dict(temperature=[0.0, 0.9, 1.2], top_k=[0, 20, 0], top_p=[1.0, 1.0, 0.9], repetition_penalty=1.3, seed=6)),
    ]
    prompts = {b: prompts_for(b, 6, b) for b in (2, 3)}
    want = [gen_mod.generate(model, prompts[b], 7, eos_token_id=[], **kw) for b, kw in runs]

    session = DecodeSession(model, 3, 16)
    pool = session.graphs
    made = []
    original = gen_mod._make_advance

    def make_static_loop(session_, sampler, loop, cuda_graphs):
        made.append(loop.tokens.shape[0])
        return CudaGraphLoop(session_, sampler, loop, capture=False)

    monkeypatch.setattr(gen_mod, "_make_advance", make_static_loop)
    got = [gen_mod.generate(model, prompts[b], 7, eos_token_id=[], session=session, **kw) for b, kw in runs]
    monkeypatch.setattr(gen_mod, "_make_advance", original)
    assert made == [3, 3, 2, 3]
    for (b, kw), g, w in zip(runs, got, want):
        assert torch.equal(g, w), f"batch {b} {kw}: {g[:, 6:].tolist()} != {w[:, 6:].tolist()}"
    # Greedy and sampled runs differ in Sampler.mode, so they are separate recordings; the last run reuses one.
    assert pool.captures == 3


def test_generate_loop_bookkeeping_inside_the_step(monkeypatch):
    """With EOS ids the per-token bookkeeping (pad after EOS, finish steps, history, next input, positions)
    runs inside the recorded loop body: the static path gives eager generate's tokens and trimming, and a
    stream's "all finished?" check for step t - 1 is read only after step t is queued (no stall)."""
    model = make_model(seed=1)
    ids = prompts_for(2, 5, 9)
    free = gen_mod.generate(model, ids, 12, eos_token_id=[])[:, 5:].tolist()
    eos = [free[0][3], free[1][5]]
    want = gen_mod.generate(model, ids, 12, eos_token_id=eos)
    assert want.shape[1] < 5 + 12, "the case must stop early"

    monkeypatch.setattr(gen_mod, "_make_advance",
                        lambda s, sampler, loop, graphs_: CudaGraphLoop(s, sampler, loop, capture=False))
    assert torch.equal(gen_mod.generate(model, ids, 12, eos_token_id=eos), want)

    events = []
    probe_cls = gen_mod.DoneProbe

    class Probe(probe_cls):
        def post(self, step):
            events.append(("post", step, int(self.loop.step)))
            super().post(step)

        def all_done(self):
            events.append(("read", self.step, int(self.loop.step)))
            return super().all_done()

    monkeypatch.setattr(gen_mod, "DoneProbe", Probe)
    streamed = torch.stack(list(gen_mod.stream(model, ids, 12, eos_token_id=eos)), dim=1)
    assert torch.equal(streamed, want[:, 5:])
    reads = [(step, queued) for kind, step, queued in events if kind == "read"]
    assert reads and all(queued == step + 2 for step, queued in reads), f"a check waited on its own step: {events}"


def test_model_deep_copies_after_graph_path_generate(monkeypatch):
    """Decoding attaches nothing to the model: after generate on the graph path (its static-buffer twin on a
    CPU) the model holds only its own attributes, and copy.deepcopy gives a model with the same tokens (a pool
    holding CUDA graphs and streams inside the model made deepcopy raise on CUDA)."""
    model = make_model(seed=2)
    own = set(vars(model))
    made = []

    def static_loop(session, sampler, loop, cuda_graphs):
        made.append(session)
        return CudaGraphLoop(session, sampler, loop, capture=False)

    monkeypatch.setattr(gen_mod, "_make_advance", static_loop)
    ids = prompts_for(2, 5, 3)
    out = gen_mod.generate(model, ids, 6, eos_token_id=[], temperature=[0.0, 0.8], seed=4)
    assert made and made[0].graphs.captures == 1, "the graph path ran"
    assert set(vars(model)) == own
    twin = copy.deepcopy(model)
    assert torch.equal(gen_mod.generate(twin, ids, 6, eos_token_id=[], temperature=[0.0, 0.8], seed=4), out)


def test_replaced_weights_are_recaptured():
    """The key covers the weights' storage: a parameter replaced after recording (a new Parameter, or new
    .data) records the step again instead of replaying over freed memory; an in-place copy keeps it."""
    model = make_model()
    session = DecodeSession(model, 2, 32)
    pool = session.graphs
    sampler = ToySampler(2, SMALL.vocab_size, torch.device("cpu"))
    step = CudaGraphStep(session, sampler, capture=False)
    prompts = prompts_for(2, 5, 4)

    def run():
        return decode_run(session, step, prompts, 3), decode_run(session, eager_step(session, sampler), prompts, 3)

    def weights_signature(m):
        return WeightStorage(m).signature()  # walked afresh: what the session's cached walk must agree with

    run()
    assert pool.captures == 1
    signature = weights_signature(model)
    ff = model.layers[1].feed_forward
    with torch.no_grad():
        ff.w_down.weight.copy_(ff.w_down.weight * 1.5)  # same storage: still valid
    run()
    assert pool.captures == 1 and weights_signature(model) == signature == session.weights.signature()
    ff.w_down.weight = torch.nn.Parameter(ff.w_down.weight.detach() * -1.0)  # re-registered
    got, want = run()
    assert pool.captures == 2 and torch.equal(got, want)
    ff.w_gate_up.weight.data = ff.w_gate_up.weight.data.flip(0).contiguous()  # same Parameter, new storage
    got, want = run()
    assert pool.captures == 3 and torch.equal(got, want)
    quant.quantize(model, "int8", only=["layers.0.attention.wo"])  # a layer replaced by a quantised one
    got, want = run()
    assert pool.captures == 4 and torch.equal(got, want)
    assert session.weights.signature() == weights_signature(model)
    assert len(pool.entries) == 1, "entries over old weights are dropped"


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu("CUDA graph capture")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_captured_step_equals_eager_on_cuda(dtype):
    dev = torch.device("cuda")
    model = make_model(dev, dtype)
    session = DecodeSession(model, 4, 64)
    pool = session.graphs
    for b, seed in ((3, 1), (1, 2), (3, 3)):
        p = prompts_for(b, 9, seed, dev)
        temps = [0.0] * b
        temps[-1] = 0.9 if b > 1 else 0.0
        se, sg = ToySampler(b, SMALL.vocab_size, dev), ToySampler(b, SMALL.vocab_size, dev)
        se.reset(temps, [1.2] * b, seed)
        sg.reset(temps, [1.2] * b, seed)
        want = decode_run(session, eager_step(session, se), p, 8)
        got = decode_run(session, CudaGraphStep(session, sg, capture=True), p, 8)
        torch.cuda.synchronize()
        assert torch.equal(got, want), f"batch {b}: graphed {got.tolist()} != eager {want.tolist()}"
    assert pool.captures == 3 and all(e.graph is not None for e in pool.entries.values())


@pytest.mark.gpu("CUDA graph capture")
def test_captured_step_with_row_map_equals_eager_on_cuda():
    """The serving engine's contract captured for real: one graph per batch size serves any row map."""
    dev = torch.device("cuda")
    model = make_model(dev, torch.bfloat16)
    session = DecodeSession(model, 5, 64)
    pool = session.graphs
    sampler_e, sampler_g = ToySampler(2, SMALL.vocab_size, dev), ToySampler(2, SMALL.vocab_size, dev)
    step_g = CudaGraphStep(session, sampler_g, capture=True)
    prompts = prompts_for(2, 7, 3, dev)
    for rows in ([4, 1], [0, 3]):
        rows_t = torch.tensor(rows, device=dev)
        outs = []
        for sampler, step in ((sampler_e, lambda t, p: sampler_e(session.decode(t, p, rows_t))),
                              (sampler_g, lambda t, p: step_g(t, p, rows_t))):
            sampler.reset([0.0, 0.8], [1.0, 1.2], 3)
            with torch.inference_mode():
                tokens = session.prefill(prompts, torch.tensor([7, 7], device=dev), rows=rows_t).argmax(-1)
                positions = torch.tensor([7, 7], device=dev)
                seq = []
                for _ in range(6):
                    tokens = step(tokens, positions)
                    seq.append(tokens)
                    positions = positions + 1
            outs.append(torch.stack(seq, 1))
        torch.cuda.synchronize()
        assert torch.equal(outs[1], outs[0]), f"rows {rows}: {outs[1].tolist()} != {outs[0].tolist()}"
    assert pool.captures == 1 and next(iter(pool.entries.values())).graph is not None


@pytest.mark.gpu("CUDA graph capture")
def test_graphed_generate_matches_eager_on_cuda():
    model = make_model(torch.device("cuda"), torch.bfloat16)
    session = DecodeSession(model, 3, 32)
    pool = session.graphs
    sampled = dict(temperature=[0.8, 0.0, 1.1], top_k=[50, 0, 0], top_p=[0.9, 1.0, 1.0], repetition_penalty=1.2, seed=3)
    for b, kw in ((1, {}), (3, {}), (3, sampled)):
        ids = prompts_for(b, 11, b, "cuda")
        eager = generate(model, ids, 12, cuda_graphs=False, eos_token_id=[], **kw)
        captures = pool.captures
        graphed = generate(model, ids, 12, cuda_graphs=True, eos_token_id=[], session=session, **kw)
        assert pool.captures > captures, "generate(cuda_graphs=True) did not use fastsolar.decoding.graphs"
        again = generate(model, ids, 12, cuda_graphs=True, eos_token_id=[], session=session, **kw)  # reused
        assert pool.captures == captures + 1
        assert torch.equal(graphed, eager), f"batch {b} {kw}: {graphed[:, 11:].tolist()} != {eager[:, 11:].tolist()}"
        assert torch.equal(again, eager), f"batch {b} {kw}, second graphed call"
