"""OpenAI's presence / frequency penalties and the logprob outputs of the one Sampler, checked against plain
torch computations of their definitions: the formula on known counts (float64), the counts the sampler keeps
against the tokens it drew, greedy and sampled, penalised and unpenalised rows mixed in one batch (in slot
order as generate runs it, and through a row map as the server does), and generate with the penalties
against a step-by-step host loop over the model's full forward."""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close

from fastsolar import Solar
from fastsolar.config import SolarConfig
from fastsolar.decoding import rng
from fastsolar.decoding.generate import generate
from fastsolar.decoding.sampling import RowParams, Sampler, SamplingParams, check_sampling_args, process_logits

VOCAB = 211


def formula(logits: torch.Tensor, counts: torch.Tensor, frequency: list[float], presence: list[float]) -> torch.Tensor:
    """OpenAI's definition in float64: logit[j] - count[j] * frequency - (count[j] > 0) * presence."""
    f = torch.tensor(frequency, dtype=torch.float64)[:, None]
    p = torch.tensor(presence, dtype=torch.float64)[:, None]
    c = counts.double().cpu()
    return logits.double().cpu() - c * f - (c > 0).double() * p


def test_process_logits_applies_the_openai_penalty_formula():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, VOCAB, generator=g) * 3).to(DEVICE)
    counts = torch.randint(0, 4, (4, VOCAB), generator=g).float()
    counts[:, ::3] = 0  # unseen tokens as well as seen ones
    frequency, presence = [0.0, 1.5, -2.0, 0.7], [0.0, -0.4, 2.0, 1.1]
    params = SamplingParams.build(4, VOCAB, DEVICE, frequency_penalty=frequency, presence_penalty=presence)
    assert params.count_penalize
    out = process_logits(logits, params, counts=counts.to(DEVICE))
    assert_close(out.double().cpu(), formula(logits, counts, frequency, presence), atol=1e-5, rtol=1e-6)
    assert torch.equal(out[0], logits[0].float())  # the neutral row is untouched, bit for bit
    # Temperature divides the penalised logits (the penalties come first, as in vLLM).
    warm = SamplingParams.build(4, VOCAB, DEVICE, temperature=0.5, frequency_penalty=frequency,
                                presence_penalty=presence)
    out = process_logits(logits, warm, counts=counts.to(DEVICE))
    assert_close(out.double().cpu(), formula(logits, counts, frequency, presence) / 0.5, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalty_bounds(name):
    for ok in (-2, -2.0, 0, 1.25, 2):
        check_sampling_args(**{name: ok})
    for bad in (2.0001, -2.5, float("nan")):
        with pytest.raises(ValueError, match=rf"{name} must be in \[-2, 2\]"):
            check_sampling_args(**{name: bad})
    with pytest.raises(ValueError, match=name):
        SamplingParams.build(2, VOCAB, DEVICE, **{name: [0.5, 3.0]})


ROWS = {  # slot -> parameters: greedy and sampled, penalised and not, with and without repetition penalty
    0: RowParams(temperature=0.0),
    1: RowParams(temperature=0.0, frequency_penalty=1.2, presence_penalty=0.5, logprobs=True),
    3: RowParams(temperature=0.9, frequency_penalty=-0.8, presence_penalty=1.7, seed=11),
    4: RowParams(temperature=1.1, top_k=50, seed=5, logprobs=True),
    6: RowParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=2.0),
}


@pytest.mark.parametrize("mapped", [False, True], ids=["slots-in-order", "row-map"])
def test_sampler_penalises_counts_of_its_own_draws(mapped):
    """Step after step, each row's token is what the formula on the counts of its own earlier draws gives
    (greedy: argmax; sampled: the exponential race on its own noise), and the sampler's counts are exactly
    the histogram of those draws; the prompt counts for the repetition penalty only."""
    order = [3, 0, 6, 1, 4] if mapped else sorted(ROWS)
    slots = max(ROWS) + 1 if mapped else len(order)
    sampler = Sampler(slots, VOCAB, DEVICE, coarse_modes=mapped)
    params = [ROWS[s] for s in order]
    prompts = [[s + 3, 2 * s + 7, 40] for s in order]
    if mapped:
        for s, p, ids in zip(order, params, prompts):
            sampler.assign(s, p, ids)
        sampler.select(torch.tensor(order, device=DEVICE), order)
    else:  # generate's way: per-row values in slots 0..b-1
        sampler.reset(temperature=[p.temperature for p in params], top_k=[p.top_k or 0 for p in params],
                      repetition_penalty=[p.repetition_penalty for p in params],
                      frequency_penalty=[p.frequency_penalty for p in params],
                      presence_penalty=[p.presence_penalty for p in params], seed=[p.seed for p in params],
                      prompt_ids=torch.tensor(prompts, device=DEVICE))
    slot_of = order if mapped else list(range(len(order)))
    counts = torch.zeros(len(order), VOCAB, dtype=torch.float64)
    seen = torch.zeros(len(order), VOCAB, dtype=torch.bool)
    for i, ids in enumerate(prompts):
        seen[i, ids] = True
    g = torch.Generator().manual_seed(4)
    index = torch.arange(VOCAB, device=DEVICE)
    for step in range(6):
        # A few strong favourites, so that unpenalised rows would repeat them and penalised rows must not.
        logits = torch.randn(len(order), VOCAB, generator=g)
        logits[:, :3] += 4.0
        tokens = sampler(logits.to(DEVICE)).cpu().tolist()
        for i, p in enumerate(params):
            scores = logits[i].double()
            if p.repetition_penalty != 1:
                pen = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
                scores = torch.where(seen[i], pen, scores)
            scores = formula(scores[None], counts[i:i + 1], [p.frequency_penalty], [p.presence_penalty])[0]
            if p.temperature == 0:
                assert tokens[i] == int(scores.argmax()), (step, i)
            else:
                scores = scores / p.temperature
                if p.top_k:
                    scores = scores.masked_fill(scores < scores.topk(p.top_k).values[-1], float("-inf"))
                key = torch.tensor([rng.seed_words(p.seed)], dtype=torch.int64, device=DEVICE)
                noise = rng.exponential(key, torch.tensor([step], device=DEVICE), index).cpu()[0].double()
                assert tokens[i] == int((scores.softmax(-1) / noise).argmax()), (step, i)
            counts[i, tokens[i]] += 1
            seen[i, tokens[i]] = True
        assert torch.equal(sampler.counts[slot_of].cpu().double(), counts), step
    greedy_free = order.index(0)
    assert counts[greedy_free, :3].sum() == 6  # the unpenalised greedy row keeps to the favourites
    assert counts[order.index(1)].max() <= 2  # the penalised greedy row moves on


def test_sampler_logprobs_are_the_raw_distribution():
    """Rows asking for logprobs get log_softmax of the raw logits at the drawn token, and the top 20 of it in
    descending order with their ids -- whatever their penalties or temperature; a vocabulary under 20 gives
    all of it."""
    for vocab in (VOCAB, 13):
        sampler = Sampler(8, vocab, DEVICE, coarse_modes=True)
        order = [4, 1, 0, 6] if vocab == VOCAB else [1, 4]
        for s in order:
            sampler.assign(s, ROWS[s], [1, 2])
        sampler.select(torch.tensor(order, device=DEVICE), order)
        assert sampler.mode[-2]  # the logprobs flag is part of the graph key
        k = min(20, vocab)
        g = torch.Generator().manual_seed(vocab)
        for _ in range(3):
            logits = (torch.randn(len(order), vocab, generator=g) * 2).to(DEVICE)
            tokens = sampler(logits).cpu()
            ref = logits.double().cpu().log_softmax(-1)
            b = len(order)
            assert_close(sampler.logprob[:b].cpu().double(), ref.gather(1, tokens[:, None])[:, 0], atol=1e-5, rtol=1e-5)
            top = sampler.top_logprobs[:b].cpu().double()
            ids = sampler.top_ids[:b].cpu()
            assert top.shape == (b, k) and ids.shape == (b, k)
            assert bool((top[:, 1:] <= top[:, :-1]).all())  # sorted, most likely first
            assert_close(top, ref.sort(-1, descending=True).values[:, :k], atol=1e-5, rtol=1e-5)
            assert_close(ref.gather(1, ids), top, atol=1e-5, rtol=1e-5)  # each id carries its own logprob


def test_generate_with_penalties_matches_a_host_loop_over_the_full_forward():
    """Greedy generate with presence / frequency penalties (batch rows with different ones, one of them
    neutral) equals a plain loop: the model's full forward over prompt + tokens so far, the formula on the
    counts of the generated tokens, argmax."""
    config = SolarConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2,
                         pad_token_id=0, torch_dtype="float32")
    torch.manual_seed(0)
    model = Solar(config).to(DEVICE).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    frequency, presence = [0.0, 2.0, -0.5], [0.0, 0.3, 1.9]
    n = 12
    out = generate(model, ids, n, frequency_penalty=frequency, presence_penalty=presence, eos_token_id=[])
    for i in range(3):
        seq = ids[i].tolist()
        counts = torch.zeros(1, VOCAB, dtype=torch.float64)
        for _ in range(n):
            logits = _full_logits(model, seq)
            tok = int(formula(logits[None], counts, [frequency[i]], [presence[i]])[0].argmax())
            counts[0, tok] += 1
            seq.append(tok)
        assert out[i].tolist() == seq, i
    assert len(set(out[1, 7:].tolist())) == n  # frequency 2: this model never repeats a token


def _full_logits(model: Solar, seq: list[int]) -> torch.Tensor:
    """The last position's logits of a fresh full prefill over `seq` (a cache of its own)."""
    from fastsolar.decoding.session import DecodeSession

    session = DecodeSession(model, 1, len(seq))
    with torch.inference_mode():
        x = torch.tensor([seq], device=DEVICE)
        return session.prefill(x, torch.tensor([len(seq)], device=DEVICE))[0].float()


@pytest.mark.gpu("host-sync detection needs CUDA")
def test_sampler_with_penalties_and_logprobs_never_syncs():
    sampler = Sampler(8, 997, DEVICE, coarse_modes=True)
    for s, p in ROWS.items():
        sampler.assign(s, p, [1, 2, 3])
    order = [6, 3, 1, 4, 0]
    sampler.select(torch.tensor(order, device=DEVICE), order)
    logits = torch.randn(len(order), 997, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(logits)
        sampler(logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
