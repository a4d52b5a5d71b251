"""fastsolar.patch_hf: a transformers Llama/Mistral running fastsolar's kernels, on the test device
(compiled kernels on CUDA, the Triton interpreter on a CPU), for every transformers version in
fastsolar.versions.SUPPORTED_TRANSFORMERS (CI runs this file at both ends of the range)."""
from __future__ import annotations

import collections

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from helpers import DEVICE, assert_close  # noqa: E402

from fastsolar import kernels as K  # noqa: E402
from fastsolar.hf.patch import ATTN_IMPLEMENTATION, PATCHED_ATTR, patch_hf, unpatch_hf  # noqa: E402
from fastsolar.ops import force_kernels  # noqa: E402

KERNELS = ("rms_norm", "add_rms_norm", "apply_rotary", "swiglu", "attention")
SEQ = 9


def _tiny(kind: str = "llama", seed: int = 0, attn: str = "eager", **overrides):
    """A random float32 model on the test device with non-trivial norms and a scaled-up lm_head
    (well-separated greedy tokens)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    kw.update(overrides)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    model = model.to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.3, 1.0) if name.endswith("norm.weight") else (0.1, 0.0)
            p.copy_(shift + scale * torch.randn(p.shape, generator=g))
        model.lm_head.weight.mul_(8.0)
    return model.to(DEVICE)


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 101, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each Triton kernel that the patched model makes (through fastsolar.ops, which
    looks each kernel up on fastsolar.kernels at call time, so the patched attributes see every call)."""
    counter: collections.Counter = collections.Counter()
    for name in KERNELS:
        fn = getattr(K, name)

        def wrapped(*a, __fn=fn, __name=name, **kw):
            counter[__name] += 1
            return __fn(*a, **kw)

        monkeypatch.setattr(K, name, wrapped)
    return counter


def _logits(model, ids, **kw):
    with torch.no_grad(), force_kernels(True):
        return model(ids, **kw).logits


def _greedy(model, ids, n=3, **kw):
    with torch.no_grad(), force_kernels(True):
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def _overridden(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_patched_logits_and_greedy_match(kind, calls):
    model = _tiny(kind)
    ids = _ids()
    want_logits = _logits(model, ids)
    want_tokens = _greedy(model, ids)
    assert patch_hf(model) is model
    assert getattr(model, PATCHED_ATTR) and model.config._attn_implementation == ATTN_IMPLEMENTATION
    got_logits = _logits(model, ids)
    # fp32 kernels against fp32 torch: differences are rounding only.
    assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4, msg=f"{kind} logits")
    assert all(calls[k] >= 2 for k in KERNELS), dict(calls)  # every hook really ran the kernel
    assert calls["rms_norm"] == 3 and calls["add_rms_norm"] == 2  # input norms + final; fused post-attn norms
    calls.clear()
    got_tokens = _greedy(model, ids)
    assert torch.equal(got_tokens, want_tokens)
    assert calls["attention"] == 2 * 3  # prefill + 2 decode steps per layer, all on the kernel path


def test_padding_and_sliding_window_fall_back_exactly(calls):
    """A padding mask (left padding) and a sliding window smaller than the sequence go to transformers'
    sdpa with transformers' own mask; the rest of the layer still runs the kernels."""
    model = _tiny("llama", seed=1)
    ids = _ids(seed=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded by 3
    ids = ids.masked_fill(mask == 0, 0)
    want = _logits(model, ids, attention_mask=mask)
    want_tokens = _greedy(model, ids, attention_mask=mask)
    patch_hf(model)
    got = _logits(model, ids, attention_mask=mask)
    assert calls["attention"] == 0 and calls["apply_rotary"] == 2  # masked: sdpa; rotary etc. still kernels
    real = mask.bool()
    assert_close(got[real], want[real], atol=1e-4, rtol=1e-4, msg="padded logits")
    assert torch.equal(_greedy(model, ids, attention_mask=mask), want_tokens)

    mistral = _tiny("mistral", seed=2, sliding_window=4)
    ids = _ids(batch=1, seed=8)
    want = _logits(mistral, ids)
    patch_hf(mistral)
    calls.clear()
    assert_close(_logits(mistral, ids), want, atol=1e-4, rtol=1e-4, msg="sliding window logits")
    assert calls["attention"] == 0 and calls["swiglu"] == 2


def test_autograd_runs_transformers_code(calls):
    model = _tiny("llama", seed=3, attn="sdpa")  # under autograd, attention falls back to transformers' sdpa
    ids = _ids(batch=1)
    want = model(ids).logits
    patch_hf(model)
    with force_kernels(True):
        got = model(ids).logits  # grad mode on, parameters require grad: no kernel may run
    assert sum(calls.values()) == 0
    assert torch.equal(got, want) and got.requires_grad
    got.sum().backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


def test_second_call_is_noop_and_unpatch_restores():
    model = _tiny("llama", seed=4, attn="sdpa")
    ids = _ids(batch=1)
    with torch.no_grad():
        want = model(ids).logits
    patch_hf(model)
    patched = _overridden(model)
    assert len(patched) == 1 + 2 * 5  # final norm; per layer: layer, attention, mlp, two norms
    assert patch_hf(model) is model and _overridden(model) == patched
    unpatch_hf(model)
    assert _overridden(model) == [] and not hasattr(model, PATCHED_ATTR)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def _refused(model, exc, match):
    impl = model.config._attn_implementation
    with pytest.raises(exc, match=match):
        patch_hf(model)
    assert _overridden(model) == [] and not hasattr(model, PATCHED_ATTR)
    assert model.config._attn_implementation == impl


def test_refuses_unsupported_models(monkeypatch):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101))
    _refused(gpt2, TypeError, "LlamaForCausalLM.*got GPT2LMHeadModel")
    scaled = _tiny("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    _refused(scaled, ValueError, "rope scaling")
    _refused(_tiny("llama", attention_bias=True), ValueError, "attention_bias")
    _refused(_tiny("llama", hidden_act="gelu"), ValueError, "hidden_act")
    _refused(_tiny("llama", hidden_size=32, num_attention_heads=4), ValueError, "head_dim 8")
    bare = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    _refused(bare, TypeError, "got LlamaModel")
    import fastsolar.versions

    monkeypatch.setattr(fastsolar.versions, "SUPPORTED_TRANSFORMERS", SpecifierSet(">=4.40,<4.41"))
    _refused(_tiny("llama"), ValueError, r"supports transformers >=4.40,<4.41 \(tested at both ends\); this is 5\.")


def test_version_gate_and_cache_api():
    """The supported range holds its two tested ends and nothing outside; the cache argument follows the version."""
    from fastsolar.versions import SUPPORTED_TRANSFORMERS, check_transformers, transformers_cache_api

    for v in ("5.17.0", "5.24.0", "5.25.0", "5.25.1"):
        assert Version(v) in SUPPORTED_TRANSFORMERS, v
    for v in ("4.57.6", "5.16.1", "5.26.0", "6.0.0"):
        assert Version(v) not in SUPPORTED_TRANSFORMERS, v
    assert check_transformers() == Version(transformers.__version__)  # the installed one is supported
    assert vars(transformers_cache_api(Version("5.17.0"))) == {"name": "past_key_values", "update_kwargs": False}
    assert vars(transformers_cache_api(Version("5.23.0"))) == {"name": "past_key_values", "update_kwargs": False}
    assert vars(transformers_cache_api(Version("5.24.0"))) == {"name": "cache", "update_kwargs": True}
    # The installed transformers' attention forward really takes the argument the patch will pass.
    import inspect

    params = inspect.signature(transformers.models.llama.modeling_llama.LlamaAttention.forward).parameters
    assert transformers_cache_api().name in params
