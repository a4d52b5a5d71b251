"""fastsolar.decoding.generate / fastsolar.decoding.sampling: validation, sampling math against transformers, EOS, streaming,
cache reuse."""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, ON_GPU

from fastsolar import KVCache, Solar
from fastsolar.config import SolarConfig
from fastsolar.decoding.generate import generate, stream
from fastsolar.decoding.sampling import Sampler, SamplingParams, process_logits
from fastsolar.decoding.session import DecodeSession

VOCAB, CONTEXT, PAD, EOS = 997, 64, 0, 2


def tiny_model(seed: int = 0) -> Solar:
    config = SolarConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, eos_token_id=EOS, pad_token_id=PAD,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Solar(config).to(DEVICE).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_norm.uniform_(0.5, 1.5)
            layer.ffn_norm.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(4.0)  # peaky enough for greedy, flat enough for sampling at temperature 1
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g).to(DEVICE)


# ---------------------------------------------------------------------------------------------- validation
IDS = prompt(2, 5)
RIGHT_PADDED = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE)
NO_TOKENS = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE)
BAD_INPUTS = [
    (dict(input_ids=IDS[:, :0]), "empty prompt"),
    (dict(attention_mask=NO_TOKENS), r"empty prompt: attention_mask rows \[0\]"),
    (dict(input_ids=prompt(1, 60), max_new_tokens=5),
     r"prompt of 60 tokens \+ max_new_tokens 5 = 65 exceeds the model's context of 64 tokens"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\].*1.5"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(attention_mask=RIGHT_PADDED[:, :4]), r"attention_mask shape \(2, 4\) does not match input_ids shape \(2, 5\)"),
    (dict(attention_mask=RIGHT_PADDED), "not left-padded"),
    (dict(attention_mask=RIGHT_PADDED * 2), "only 0 and 1"),
    (dict(input_ids=IDS[0]), r"shape \[batch, seq\]"),
    (dict(input_ids=IDS.float()), "int64"),
    (dict(input_ids=torch.full((1, 3), VOCAB, device=DEVICE)), r"token id 997 is outside the vocabulary \[0, 997\)"),
]
if not ON_GPU:
    BAD_INPUTS.append((dict(cuda_graphs=True), "cuda_graphs=True needs a model on a CUDA device"))


@pytest.mark.parametrize("entry", ["generate", "stream"])
@pytest.mark.parametrize("bad, message", BAD_INPUTS, ids=[m[:24] for _, m in BAD_INPUTS])
def test_bad_input_refused_before_compute(bad, message, entry, monkeypatch):
    fresh = tiny_model()
    kwargs = dict(input_ids=IDS, max_new_tokens=4)
    kwargs.update(bad)
    fn = generate if entry == "generate" else stream

    def must_not_allocate(*args, **kwargs):
        raise AssertionError("a KV cache was allocated before the arguments were checked")

    monkeypatch.setattr(KVCache, "allocate", must_not_allocate)
    with pytest.raises(ValueError, match=message):
        fn(fresh, kwargs.pop("input_ids"), kwargs.pop("max_new_tokens"), **kwargs)


def test_context_limit_is_inclusive(model):
    out = model.generate(prompt(1, 60), 4, eos_token_id=[])
    assert out.shape == (1, 64)


def test_int32_input_gives_int64_output(model):
    out = model.generate(prompt(1, 6).int(), 3)
    assert out.dtype == torch.int64 and out.shape[0] == 1


# ------------------------------------------------------------------------------------------------ sampling
def test_seeded_sampling_reproducible(model):
    ids = prompt(2, 6, seed=1)
    kw = dict(temperature=1.0, eos_token_id=[])
    a = model.generate(ids, 16, seed=123, **kw)
    b = model.generate(ids, 16, seed=123, **kw)
    c = model.generate(ids, 16, seed=124, **kw)
    greedy = model.generate(ids, 16, eos_token_id=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5, repetition_penalty=1.0)])
def test_degenerate_sampling_is_greedy(model, kw):
    ids = prompt(2, 6, seed=2)
    greedy = model.generate(ids, 12, eos_token_id=[])
    sampled = model.generate(ids, 12, temperature=1.3, seed=7, eos_token_id=[], **kw)
    assert torch.equal(sampled, greedy)


def hf_processors(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature > 0:  # transformers' warpers only run when sampling
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [
        (0.7, 50, 0.9, 1.3),
        (1.0, 0, 0.8, 1.0),
        (1.9, 7, 1.0, 0.7),
        (0.3, 0, 1.0, 1.0),
        (0.0, 0, 1.0, 1.2),  # greedy: only the penalty applies
        (1.1, 1000, 0.95, 2.0),  # top_k above the vocabulary
        (0.9, 3, 0.99, 1.0),
    ],
)
def test_process_logits_matches_transformers(temperature, top_k, top_p, penalty):
    pytest.importorskip("transformers")
    b, v = 4, VOCAB
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(b, v, generator=g) * 3).to(DEVICE)
    history = torch.randint(0, v, (b, 12), generator=g).to(DEVICE)
    history[0, :6] = logits[0].topk(6).indices  # the penalty must hit likely tokens too
    history[1, :6] = logits[1].topk(6, largest=False).indices  # and negative logits
    expected = hf_processors(temperature, top_k, top_p, penalty)(history, logits.clone())

    sampler = Sampler(b, v, DEVICE)
    sampler.reset(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, prompt_ids=history)
    before = logits.clone()
    actual = process_logits(logits, sampler.params, sampler.seen)
    assert torch.equal(logits, before), "process_logits must not modify its input"
    assert torch.equal(actual, expected), (actual - expected).abs().nan_to_num().max()
    assert torch.equal(actual.softmax(-1), expected.softmax(-1))
    kept = torch.isfinite(actual).sum(-1)
    if temperature > 0 and (top_k or top_p < 1):
        assert (kept < v).all()  # the masks did something


def test_process_logits_per_row_params():
    b, v = 3, 50
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    params = SamplingParams.build(b, v, DEVICE, temperature=[0.0, 1.0, 0.5], top_k=[5, 0, 2], top_p=[0.5, 1.0, 1.0])
    out = process_logits(logits, params)
    assert torch.equal(out[0], logits[0])  # greedy row: warpers neutral
    assert torch.equal(out[1], logits[1])  # temperature 1, no top-k/top-p
    assert torch.isfinite(out[2]).sum() == 2
    scaled = logits[2] / 0.5
    expected = torch.where(scaled >= scaled.topk(2).values[-1], scaled, float("-inf"))
    assert torch.equal(out[2], expected)


def test_sampler_frequencies_follow_probabilities():
    """The exponential race draws from softmax(logits): 4000 rows over 5 tokens."""
    b = 4000
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 1e-9])).to(DEVICE).expand(b, 5).contiguous()
    sampler = Sampler(b, 5, DEVICE)
    sampler.reset(temperature=1.0, seed=0)
    tokens = sampler(logits)
    freq = torch.bincount(tokens.cpu(), minlength=5).double() / b
    assert torch.allclose(freq[:4], torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.03)
    assert freq[4] == 0


def test_sampler_mixes_greedy_and_sampled_rows():
    """One batch mixing greedy and sampled rows (per-row temperature, top-k): every greedy row is its logits' argmax
    at every draw, exactly; every sampled row draws from its own processed distribution (4 row kinds x 1500
    replicas over 6 tokens, frequencies within 0.05); the same seed gives the same draws, another seed other
    draws of the sampled rows only. A sampled row never draws a token its own top-k removed."""
    reps, v = 1500, 6
    kinds = torch.log(torch.tensor([[0.05, 0.1, 0.15, 0.2, 0.25, 0.25],  # greedy: argmax 4 (first of the tie)
                                    [0.3, 0.1, 0.2, 0.1, 0.2, 0.1],  # sampled at temperature 1
                                    [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],  # greedy: argmax 5
                                    [0.12, 0.4, 0.08, 0.3, 0.05, 0.05]]))  # sampled at temperature 0.5, top_k 3
    temperature, top_k = [0.0, 1.0, 0.0, 0.5], [0, 0, 2, 3]  # a greedy row's top_k changes nothing
    logits = kinds.repeat(reps, 1).to(DEVICE)  # row i is kind i % 4
    sampler = Sampler(4 * reps, v, DEVICE)
    sampler.reset(temperature=temperature * reps, top_k=top_k * reps, seed=11)
    tokens = sampler(logits).cpu().view(reps, 4)
    assert (tokens[:, 0] == 4).all() and (tokens[:, 2] == 5).all(), "a greedy row was not its argmax"
    probs = {1: kinds[1].softmax(-1), 3: torch.zeros(v)}
    probs[3][[1, 3, 0]] = (kinds[3][[1, 3, 0]] / 0.5).softmax(-1)  # its top 3 tokens, at temperature 0.5
    for kind, p in probs.items():
        freq = torch.bincount(tokens[:, kind], minlength=v).double() / reps
        assert torch.allclose(freq, p.double(), atol=0.05), (kind, freq.tolist(), p.tolist())
        assert (freq[p == 0] == 0).all(), f"kind {kind} drew a token its top-k removed: {freq.tolist()}"
    sampler.reset(temperature=temperature * reps, top_k=top_k * reps, seed=11)
    assert torch.equal(sampler(logits).cpu().view(reps, 4), tokens), "the same seed must give the same draws"
    sampler.reset(temperature=temperature * reps, top_k=top_k * reps, seed=12)
    other = sampler(logits).cpu().view(reps, 4)
    assert torch.equal(other[:, [0, 2]], tokens[:, [0, 2]]) and not torch.equal(other[:, [1, 3]], tokens[:, [1, 3]])


def test_sampler_reset_in_place():
    sampler = Sampler(2, 11, DEVICE)
    buffers = [sampler.seen, *[getattr(sampler.params, f) for f in
                               ("temperature", "divisor", "inv_divisor", "top_k", "top_p_threshold", "penalty")]]
    ptrs = [t.data_ptr() for t in buffers]
    sampler.reset(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.2, seed=1,
                  prompt_ids=torch.tensor([[1, 2], [3, 0]], device=DEVICE),
                  prompt_mask=torch.tensor([[True, True], [True, False]], device=DEVICE))
    assert [t.data_ptr() for t in buffers] == ptrs
    assert sampler.seen.nonzero().tolist() == [[0, 1], [0, 2], [1, 3]]  # padding marked nothing
    assert sampler.params.top_k.tolist() == [3, 3]
    # No min_new_tokens: no EOS ban; no presence/frequency penalty, no logprobs; slots in order.
    assert sampler.mode == (True, True, True, True, False, False, False, True)


@pytest.mark.gpu("host-sync detection needs CUDA")
def test_sampler_never_syncs():
    sampler = Sampler(3, 997, DEVICE)
    sampler.reset(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=0,
                  prompt_ids=prompt(3, 5))
    logits = torch.randn(3, 997, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ EOS and stream
def test_eos_stops_row_and_pads(model):
    ids = prompt(2, 7, seed=3)
    free = model.generate(ids, 20, eos_token_id=[])[:, 7:].tolist()
    k, eos = next((k, t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[0][:k] and t not in free[1])
    out = model.generate(ids, 20, eos_token_id=eos)
    assert out.shape == (2, 27)  # row 1 never finishes: full length
    assert out[0, 7:7 + k + 1].tolist() == free[0][:k + 1]
    assert (out[0, 7 + k + 1:] == PAD).all()
    assert out[1, 7:].tolist() == free[1]


@pytest.mark.parametrize("stop_step", [2, 15, 16, 17])
def test_all_rows_finished_trims_like_transformers(model, stop_step):
    """Every row emits one EOS by step `stop_step`: the output ends right there whatever the check cadence."""
    ids = prompt(2, 5, seed=4)
    free = model.generate(ids, 40, eos_token_id=[])[:, 5:].tolist()
    eos = [free[0][stop_step], free[1][stop_step]]
    first = [min(r.index(e) for e in eos if e in r) for r in free]
    out = model.generate(ids, 40, eos_token_id=eos)
    assert out.shape[1] == 5 + max(first) + 1
    streamed = torch.stack(list(model.stream(ids, 40, eos_token_id=eos)), dim=1)
    assert torch.equal(streamed, out[:, 5:])


def test_default_eos_from_config(model):
    ids = prompt(1, 5, seed=8)
    assert torch.equal(model.generate(ids, 10), model.generate(ids, 10, eos_token_id=model.config.eos_token_id))


def test_stream_matches_generate(model):
    ids = prompt(3, 8, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for kw in (dict(), dict(temperature=0.9, top_k=40, seed=9, repetition_penalty=1.2)):
        out = model.generate(ids, 12, attention_mask=mask, eos_token_id=[], **kw)
        it = stream(model, ids, 12, attention_mask=mask, eos_token_id=[], **kw)
        steps = list(it)
        assert len(steps) == 12 and all(s.shape == (3,) for s in steps)
        assert torch.equal(torch.stack(steps, dim=1), out[:, 8:])


def test_repeated_calls_on_one_session_reuse_its_cache(model):
    """A session given to generate is reused as it is (cache, rows free again after each call); calls without
    one get the same tokens; a call that does not fit the session is refused, naming both sizes."""
    ids = prompt(2, 9, seed=6)
    session = DecodeSession(model, 2, 24)
    k = session.cache.k
    first = model.generate(ids, 10, session=session)
    assert torch.equal(first, model.generate(ids, 10, session=session))
    assert torch.equal(first, model.generate(ids, 10))
    shorter = model.generate(ids[:1, :4], 3, session=session)
    assert session.cache.k is k and not session.rows_in_use
    assert torch.equal(shorter, model.generate(ids[:1, :4], 3))
    with pytest.raises(ValueError, match=r"needs a session of at least 2 rows x 25 positions .* has 2 x 24"):
        model.generate(ids, 16, session=session)
    with pytest.raises(ValueError, match="a DecodeSession of this model"):
        model.generate(ids, 4, session=DecodeSession(tiny_model(seed=5), 2, 24))


def test_cache_follows_the_model_dtype_and_grad_mode():
    """A session's cache made under inference_mode still serves prefill/decode under plain no_grad; after
    `model.to(dtype)` it no longer matches the weights and is refused, while a new call gets a new cache."""
    model = tiny_model(seed=3)
    ids = prompt(1, 6, seed=7)
    with torch.inference_mode():
        session = DecodeSession(model, 1, 16)
    model.generate(ids, 4, session=session)
    with torch.no_grad():  # not inference_mode: the cache must be a normal tensor
        session.prefill(ids, torch.tensor([6], device=DEVICE))
        session.decode(ids[:, 0], torch.tensor([6], device=DEVICE))
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"in torch.bfloat16; the given one has 1 x 16 .* in torch.float32"):
        model.generate(ids, 4, session=session)
    assert model.generate(ids, 4).shape == (1, 10)
