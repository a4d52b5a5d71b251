"""Launch budget of one decode step on the kernel path, counted the way a CUDA trace would count it.

tests/launch_count.py counts Triton launches plus the aten ops that launch kernels (views, metadata and
allocation launch none). The model is tiny, but the count depends only on the op sequence: two models that
differ only in depth give the per-layer and the fixed cost. The budget is the issue's: at most 6 kernels
per layer (today: qkv GEMV with its RMSNorm, rotary + cache write, one-launch decode attention, o GEMV with
the residual add, gate_up GEMV with its RMSNorm, down GEMV with SwiGLU and the residual add), and a few for
embedding, step bookkeeping, final norm + lm_head and the sampler. Main before issue 9: 12 per layer + 7.
Quantised weights (int8 / FP8, fastsolar.model.quant) keep the same budget: the GEMVs read them as they are.
"""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE
from launch_count import count_launches

from fastsolar import KVCache, Solar, SolarConfig, ops
from fastsolar.decoding.sampling import Sampler
from fastsolar.model import quant
from fastsolar.ops.gemv_choice import force_gemv

PER_LAYER_BUDGET = 6
FIXED_BUDGET = 6


def _step_launches(layers: int, batch: int, mapped: bool, quantize: str | None) -> tuple[int, dict]:
    config = SolarConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         torch_dtype="float32")
    torch.manual_seed(0)
    model = Solar(config).to(DEVICE).eval()
    if quantize is not None:
        quant.quantize(model, quantize)
    sampler = Sampler(batch, config.vocab_size, DEVICE)
    sampler.reset()
    rows = torch.arange(batch, device=DEVICE).flip(0) + 1 if mapped else None
    with torch.inference_mode(), ops.force_kernels(True), force_gemv("triton"):
        cache = KVCache.allocate(config, batch + 1, 32, model.device, model.dtype)
        prompt = torch.randint(3, 97, (batch, 3), device=DEVICE)
        model.prefill(prompt, torch.full((batch,), 3, device=DEVICE), cache, rows=rows)
        tokens, positions = prompt[:, -1], torch.full((batch,), 3, device=DEVICE)
        sampler(model.decode(tokens, positions, cache, rows))  # first step: workspaces are made once, not counted
        positions += 1
        _, counts = count_launches(lambda: sampler(model.decode(tokens, positions, cache, rows)))
    return sum(counts.values()), counts


@pytest.mark.parametrize("batch, mapped, quantize", [(1, False, None), (2, True, None), (1, False, "int8"),
                                                     (2, True, "fp8")], ids=["b1", "b2-row-map", "b1-int8", "b2-fp8"])
def test_decode_step_launch_budget(batch: int, mapped: bool, quantize: str | None) -> None:
    one, counts_one = _step_launches(1, batch, mapped, quantize)
    two, counts_two = _step_launches(2, batch, mapped, quantize)
    per_layer, fixed = two - one, 2 * one - two
    what = f"per layer {per_layer}: {dict(counts_two - counts_one)}; fixed {fixed}: {dict(counts_one)}"
    assert per_layer <= PER_LAYER_BUDGET, what
    assert fixed <= FIXED_BUDGET, what


def test_top_k_with_top_p_sorts_once() -> None:
    sampler = Sampler(2, 50, DEVICE)
    sampler.reset(temperature=0.8, top_k=10, top_p=0.9, seed=0)
    logits = torch.randn(2, 50, device=DEVICE)
    _, counts = count_launches(lambda: sampler(logits))
    assert counts["aten.sort"] == 1, dict(counts)
