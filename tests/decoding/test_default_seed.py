"""Sampling without `seed=` draws from torch's default generator, as transformers' generate does: the same
`torch.manual_seed` / `transformers.set_seed` before two calls gives the same tokens (generate, stream, eager
or CUDA graphs), another seed other tokens. The call takes one value from the generator at its start, on the
host, so a captured decode step never touches it."""
from __future__ import annotations

import pytest
import torch
import transformers
from helpers import DEVICE

from fastsolar import Solar
from fastsolar.config import SolarConfig

KW = dict(max_new_tokens=12, temperature=1.2, top_k=60, eos_token_id=[])


@pytest.fixture(scope="module")
def model() -> Solar:
    config = SolarConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2,
                         pad_token_id=0, torch_dtype="float32")
    torch.manual_seed(0)
    model = Solar(config).to(DEVICE).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # a spread-out but not flat distribution: draws differ between seeds
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, 211, (2, 7), generator=torch.Generator().manual_seed(3)).to(DEVICE)


def _generate(model: Solar, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.generate(_ids(), **KW, **kw)


def test_manual_seed_makes_sampling_reproducible(model: Solar) -> None:
    a, b = _generate(model, 0), _generate(model, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, _generate(model, 1)), "another torch seed must draw other tokens"
    transformers.set_seed(0)
    assert torch.equal(model.generate(_ids(), **KW), a), "transformers.set_seed seeds the same generator"
    torch.manual_seed(0)
    streamed = torch.stack(list(model.stream(_ids(), **KW)), dim=1)
    assert torch.equal(streamed, a[:, _ids().shape[1]:])
    # Each call takes its own draw: a second call after one manual_seed samples anew, as in transformers.
    torch.manual_seed(0)
    first, second = model.generate(_ids(), **KW), model.generate(_ids(), **KW)
    assert torch.equal(first, a) and not torch.equal(second, a)


@pytest.mark.gpu("CUDA graphs")
def test_manual_seed_is_the_same_with_cuda_graphs(model: Solar) -> None:
    eager = _generate(model, 0, cuda_graphs=False)
    assert torch.equal(_generate(model, 0, cuda_graphs=True), eager)
    assert torch.equal(_generate(model, 0, cuda_graphs=True), eager)  # replaying the captured graph
    assert not torch.equal(_generate(model, 1, cuda_graphs=True), eager)
