"""The model's kernel path against its torch-reference path, and the static-cache bookkeeping.

On CPU the kernels run under the Triton interpreter (forced through `fastsolar.ops.force_kernels`), so
the whole fast path of a small model is checked in CI: prefill attention, decode attention over the
static cache, rotary fused with the cache write, RMSNorm and SwiGLU, through the same `generate` a user
calls; the decode-sized products run both ways the GEMV choice can go (the fused Triton GEMVs, forced
with `force_gemv("triton")`, and cuBLAS with the separate small kernels).
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, assert_close, left_pad

from fastsolar import KVCache, Solar, SolarConfig, memory, ops
from fastsolar.decoding.session import DecodeSession
from fastsolar.ops.gemv_choice import force_gemv

CONFIG = SolarConfig(
    vocab_size=97, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=1, max_position_embeddings=128, torch_dtype="float32",
)


@pytest.fixture(scope="module")
def model() -> Solar:
    torch.manual_seed(0)
    m = Solar(CONFIG).to(DEVICE).eval()
    with torch.no_grad():
        for layer in m.layers:  # norms that are not all ones, so a kernel that ignores the weight fails
            layer.attention_norm.uniform_(0.5, 1.5)
            layer.ffn_norm.uniform_(0.5, 1.5)
        m.norm.uniform_(0.5, 1.5)
        m.lm_head.weight.mul_(4.0)  # well-separated logits: greedy tokens cannot flip on rounding
    return m


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i: the last lengths[i] tokens of one seeded [rows, max(lengths)] draw, left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, CONFIG.vocab_size, (len(lengths), width), generator=g)
    return left_pad([ids[row, width - n:] for row, n in enumerate(lengths)], pad_id=0)


def test_kernel_logits_match_reference(model: Solar) -> None:
    ids, _ = left_padded([17, 17], seed=1)
    with torch.inference_mode():
        with ops.force_kernels(False):
            ref = model(ids).logits
        with ops.force_kernels(True):
            fast = model(ids).logits
    assert_close(fast, ref, atol=2e-4, rtol=1e-4, msg="kernel-path logits")


GEMV = pytest.mark.parametrize("gemv", ["cublas", "triton"])


@GEMV
def test_kernel_generate_matches_reference(model: Solar, gemv: str) -> None:
    """Batched, left-padded, through prefill and decode_attention over the static cache."""
    ids, mask = left_padded([5, 13, 1], seed=2)
    kw = dict(max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    with ops.force_kernels(False):
        ref = model.generate(ids, **kw)
    with ops.force_kernels(True), force_gemv(gemv):
        fast = model.generate(ids, **kw)
    assert torch.equal(fast, ref), f"kernel path tokens {fast.tolist()} != reference {ref.tolist()}"


def test_decode_logits_match_full_forward_on_kernels(model: Solar) -> None:
    """Prefill then many decode steps on the kernels give the logits of one full forward."""
    ids, _ = left_padded([19], seed=3)
    n_prompt = 7
    with torch.inference_mode(), ops.force_kernels(True):
        full = model(ids).logits
        cache = KVCache.allocate(model.config, 1, 32, model.device, model.dtype)
        cache.k.fill_(float("nan"))  # slots the decode must never read
        cache.v.fill_(float("nan"))
        steps = [model.prefill(ids[:, :n_prompt], torch.tensor([n_prompt], device=DEVICE), cache)]
        pos = torch.tensor([n_prompt], device=DEVICE)
        for t in range(n_prompt, ids.shape[1]):
            steps.append(model.decode(ids[:, t], pos, cache))
            pos += 1
    got = torch.stack(steps, dim=1)
    assert_close(got[:, :-1], full[:, n_prompt - 1:-1], atol=2e-4, rtol=1e-4, msg="decode vs full forward")


@pytest.mark.parametrize("kernels, gemv", [(False, None), (True, "cublas")], ids=["reference", "kernels"])
def test_row_map_prefill_and_decode(model: Solar, kernels: bool, gemv: str | None) -> None:
    """Prompts prefilled into chosen rows of a larger cache, at different times, then decoded together
    through a row map, give the logits of one full forward per prompt: what a serving engine does when
    requests join a running batch in whatever rows are free. Unused rows and slots hold NaN."""
    a, _ = left_padded([15], seed=21)
    b, _ = left_padded([9], seed=22)
    with torch.inference_mode(), ops.force_kernels(kernels), force_gemv(gemv):
        full_a, full_b = model(a).logits, model(b).logits
        cache = KVCache.allocate(model.config, 4, 32, model.device, model.dtype)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        n_a, n_b = 6, 4
        # a goes into row 2 first and decodes alone for two steps; then b is prefilled into row 0.
        first = model.prefill(a[:, :n_a], torch.tensor([n_a], device=DEVICE), cache, rows=torch.tensor([2], device=DEVICE))
        pos_a = torch.tensor([n_a], device=DEVICE)
        steps_a = [first]
        for t in range(n_a, n_a + 2):
            steps_a.append(model.decode(a[:, t], pos_a, cache, rows=torch.tensor([2], device=DEVICE)))
            pos_a += 1
        steps_b = [model.prefill(b[:, :n_b], torch.tensor([n_b], device=DEVICE), cache, rows=torch.tensor([0], device=DEVICE))]
        rows = torch.tensor([0, 2], device=DEVICE)  # batch row 0 -> cache row 0 (b), 1 -> 2 (a)
        pos = torch.tensor([n_b, n_a + 2], device=DEVICE)
        for _ in range(4):
            tokens = torch.stack([b[0, pos[0]], a[0, pos[1]]])
            logits = model.decode(tokens, pos, cache, rows=rows)
            steps_b.append(logits[0:1])
            steps_a.append(logits[1:2])
            pos += 1
        assert torch.isnan(cache.k[:, [1, 3]]).all(), "rows no request maps to were written"
    got_a, got_b = torch.stack(steps_a, dim=1), torch.stack(steps_b, dim=1)
    assert_close(got_a, full_a[:, n_a - 1:n_a + 6], atol=2e-4, rtol=1e-4, msg="row 2 (joined first)")
    assert_close(got_b, full_b[:, n_b - 1:n_b + 4], atol=2e-4, rtol=1e-4, msg="row 0 (joined later)")


def test_row_map_is_checked(model: Solar) -> None:
    ids, _ = left_padded([5, 5], seed=23)
    lens = torch.tensor([5, 5], device=DEVICE)
    cache = KVCache.allocate(model.config, 3, 16, model.device, model.dtype)
    for rows, message in (([0, 0], "must be distinct"), ([1, 3], r"in \[0, 3\)"), ([1], r"shape \[2\]")):
        with pytest.raises(ValueError, match=message):
            model.prefill(ids, lens, cache, rows=torch.tensor(rows, device=DEVICE))
    with pytest.raises(TypeError, match="rows must be an int64"):
        model.prefill(ids, lens, cache, rows=torch.tensor([0.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"rows must have shape \[2\]"):
        model.decode(ids[:, 0], lens, cache, rows=torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match=r"a prefill of batch 2 x 17 tokens needs a cache of at least 2 rows x 17"):
        model.prefill(torch.ones(2, 17, dtype=torch.int64, device=DEVICE), lens, cache)


def test_cache_bookkeeping_across_calls(model: Solar) -> None:
    """A second generate call on one session reuses its cache, and a stale longer prompt in it does not leak."""
    long_ids, long_mask = left_padded([40, 33], seed=4)
    short_ids, short_mask = left_padded([3, 8], seed=5)
    session = DecodeSession(model, 2, 64)
    cache = session.cache
    with ops.force_kernels(True):
        model.generate(long_ids, max_new_tokens=3, attention_mask=long_mask, eos_token_id=[], session=session)
        again = model.generate(short_ids, max_new_tokens=5, attention_mask=short_mask, eos_token_id=[],
                               session=session)
    assert session.cache is cache and not session.rows_in_use
    fresh = Solar(CONFIG).to(DEVICE).eval()
    fresh.load_state_dict(model.state_dict())
    with ops.force_kernels(False):
        expected = fresh.generate(short_ids, max_new_tokens=5, attention_mask=short_mask, eos_token_id=[])
    assert torch.equal(again, expected)


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.zeros(1, 3), TypeError, "input_ids must be an int64"),
        (torch.ones(3, dtype=torch.int64), ValueError, r"shape \[batch, seq\], got \(3,\)"),
        (torch.ones(2, 0, dtype=torch.int64), ValueError, r"input_ids is empty \(shape \(2, 0\)\)"),
        (torch.ones(1, 129, dtype=torch.int64), ValueError, "sequence of 129 tokens exceeds the context of 128"),
        (torch.tensor([[1, 97]]), ValueError, r"token id 97 is outside the vocabulary \[0, 97\)"),
        (torch.tensor([[-1, 2]]), ValueError, "token id -1 is outside"),
    ],
)
def test_forward_refuses_bad_input(model: Solar, ids: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        model(ids.to(DEVICE))


def test_cache_too_big_is_refused(model: Solar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "free_memory", lambda device: (2**20, "faked for the test"))
    with pytest.raises(memory.InsufficientMemoryError, match=r"the KV cache \(2, 4, 128, 1, 32\) does not fit on "
                       r".* only 1.05 MB is free \(faked for the test\)\. Lower the batch size"):
        DecodeSession(model, 4, 128)


def test_cache_longer_than_context_is_refused(model: Solar) -> None:
    with pytest.raises(ValueError, match="max_seq 129 exceeds the model's context of 128 tokens"):
        DecodeSession(model, 1, 129)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        DecodeSession(model, 0, 16)


@pytest.mark.gpu("bf16 tl.dot cannot run under the Triton interpreter")
def test_bf16_kernel_model_against_fp32_reference(model: Solar) -> None:
    """The compiled bf16 kernel path may be at most about twice as far from the fp32 model as torch's own
    bf16 path is, for a full forward and for prefill + decode over the cache."""
    ids, _ = left_padded([33, 33], seed=6)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    n = 20
    lens = torch.full((2,), n, device=DEVICE)

    def run(m: Solar) -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache.allocate(m.config, 2, 64, m.device, m.dtype)
        steps = [m.prefill(ids[:, :n], lens, cache)]
        pos = lens.clone()
        for t in range(n, ids.shape[1]):
            steps.append(m.decode(ids[:, t], pos, cache))
            pos += 1
        return m(ids).logits.float(), torch.stack(steps, dim=1).float()

    with torch.inference_mode():
        with ops.force_kernels(False):
            full32, dec32 = run(model)
            full_torch16, dec_torch16 = run(m16)
        with ops.force_kernels(True):
            full16, dec16 = run(m16)
    assert_close(full16, full32, baseline=full_torch16, atol=1e-2, msg="bf16 full forward")
    assert_close(dec16, dec32, baseline=dec_torch16, atol=1e-2, msg="bf16 prefill + decode")
