"""fastsolar against transformers on the same saved weights: logits, greedy tokens, cache paths, batching."""
from __future__ import annotations

import hf_fixtures as F
import pytest
import torch
from helpers import DEVICE, assert_close, left_pad

from fastsolar import KVCache, Solar

RTOL, ATOL = 1e-5, 1e-5
N_NEW = 32


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """About 1e-5 relative: per element rtol plus an atol scaled by the logits' magnitude (float32 sums in
    a different order differ by a few ulps of the largest terms, not of each small logit). The scale is the
    largest finite |expected|: an Inf there would make atol infinite; non-finite elements must match exactly."""
    finite = expected[torch.isfinite(expected)].abs()
    scale = float(finite.max()) if finite.numel() else 0.0
    assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=msg)


def _prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, F.VOCAB, (batch, length), generator=g)


_built: dict[str, tuple] = {}


def _pair(name: str, tmp_path_factory) -> tuple:
    """(transformers model, fastsolar model) holding the same float32 weights; built once per module."""
    if name not in _built:
        kind = "mistral" if name == "mistral" else "llama"
        hf = F.build_hf_model(kind, seed=11 if kind == "mistral" else 0)
        d = F.save(hf, tmp_path_factory.mktemp(name) / "ckpt", max_shard_size="60KB")
        assert len(F.shard_files(d)) > 1
        if name == "llama-legacy-config":
            raw = F.rewrite_config_legacy(d)
            assert "rope_parameters" not in raw and "head_dim" not in raw and "rope_theta" in raw
        model = Solar.from_pretrained(d, device=DEVICE, dtype="float32")
        assert model.config.model_type == kind
        _built[name] = (hf.to(DEVICE), model)
    return _built[name]


@pytest.fixture(scope="module", params=["llama-sharded", "llama-legacy-config", "mistral"])
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["llama-sharded", "mistral"])
def gen_pair(request, tmp_path_factory):
    """The generation-heavy tests skip the legacy-config variant: its weights are llama-sharded's."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _built.clear()


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = _prompt(2, 37, seed=1).to(DEVICE)
    with torch.no_grad():
        expected = hf(ids).logits
    actual = model(ids).logits
    assert actual.dtype == torch.float32
    close(actual, expected, "logits")


def test_greedy_tokens_match_transformers(pair):
    hf, model = pair
    ids = _prompt(1, 9, seed=2).to(DEVICE)
    expected = hf.generate(ids, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=F.PAD_ID)
    # eos_token_id=[]: no EOS, so all 32 tokens are generated on both sides.
    hf_tokens = expected[0, 9:].tolist()
    assert len(hf_tokens) == N_NEW and len(set(hf_tokens)) > 3
    actual = model.generate(ids, N_NEW, eos_token_id=[])
    assert actual.tolist() == expected.tolist()


def test_prefill_then_decode_equals_full_forward(pair):
    _, model = pair
    ids = _prompt(2, 20, seed=3).to(DEVICE)
    full = model(ids).logits
    lens = torch.tensor([12, 7], device=DEVICE)
    right = ids[:, :12].clone()
    right[1, 7:] = 0  # row 1 holds only 7 real tokens
    cache = KVCache.allocate(model.config, 2, 32, model.device, model.dtype)
    logits = model.prefill(right, lens, cache)
    close(logits, full[torch.arange(2), lens - 1], "prefill")
    positions = lens.clone()
    for _ in range(6):
        tokens = ids[torch.arange(2), positions]
        logits = model.decode(tokens, positions, cache)
        close(logits, full[torch.arange(2), positions], "decode")
        positions += 1


def _left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i: a prompt of lengths[i] tokens drawn with seed + i, left-padded with PAD_ID."""
    return left_pad([_prompt(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)], F.PAD_ID)


def test_batched_left_padded_matches_single_and_transformers(gen_pair):
    hf, model = gen_pair
    lengths = [5, 11, 8]
    ids, mask = _left_padded(lengths, seed=40)
    batched = model.generate(ids, 20, attention_mask=mask, eos_token_id=[])
    assert batched.shape == (3, 11 + 20)
    assert torch.equal(batched[:, :11], ids)  # the left-padded prompt is returned as given
    for i, n in enumerate(lengths):
        single = model.generate(ids[i:i + 1, 11 - n:], 20, eos_token_id=[])
        assert batched[i, 11:].tolist() == single[0, n:].tolist(), f"row {i}"
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=F.PAD_ID)
    assert batched.tolist() == expected.tolist()


def test_batched_eos_padding_matches_transformers(gen_pair):
    """A row that hits EOS gets pad tokens afterwards and generation stops once every row has finished,
    exactly where transformers stops."""
    hf, model = gen_pair
    ids, mask = _left_padded([6, 9], seed=50)
    free = model.generate(ids, 24, attention_mask=mask, eos_token_id=[])
    rows = [free[0, 9:].tolist(), free[1, 9:].tolist()]

    def first_new_token(row: int, start: int) -> int:
        """A token that row `row` first emits at step >= start and the other row never emits."""
        mine, other = rows[row], rows[1 - row]
        return next(t for k, t in enumerate(mine) if k >= start and t not in mine[:k] and t not in other)

    eos = [first_new_token(0, 3), first_new_token(1, 12)]
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                           eos_token_id=eos, pad_token_id=F.PAD_ID)
    actual = model.generate(ids, 24, attention_mask=mask, eos_token_id=eos)
    assert actual.tolist() == expected.tolist()
    assert (actual[0, 9:] == F.PAD_ID).any()  # row 0 was padded after its EOS


def test_greedy_repetition_penalty_matches_transformers(gen_pair):
    hf, model = gen_pair
    ids = _prompt(1, 7, seed=60).to(DEVICE)
    expected = hf.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.5,
                           eos_token_id=None, pad_token_id=F.PAD_ID)
    actual = model.generate(ids, 24, repetition_penalty=1.5, eos_token_id=[])
    assert actual.tolist() == expected.tolist()
    plain = model.generate(ids, 24, eos_token_id=[])
    assert plain.tolist() != actual.tolist()  # the penalty changed something
