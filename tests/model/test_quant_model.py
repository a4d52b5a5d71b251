"""The quantised model: its kernel path against its reference path, its accuracy against the unquantised
fp32 model, and its memory.

Accuracy is bounded by what the weight rounding alone implies. The rounding of a well-chosen scale is noise
of a known size per weight (int8: uniform within half a step, step = the row's absmax / 127; FP8: within
half an e4m3 ulp of each scaled weight), so the fp32 model with exactly that much random noise added to
its linear weights, and no other change, shows how far the logits should move. The quantised model must
land within 1.5x of that (and not suspiciously below it), and a deliberately worse scale choice must not.
"""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_close, left_pad

from fastsolar import Solar, SolarConfig, ops
from fastsolar.model import quant
from fastsolar.ops.gemv_choice import force_gemv

MODES = ("int8", "fp8")
FP8_OK = not ON_GPU or torch.cuda.get_device_capability() >= (8, 9)

# Kernel-path checks: small enough for the Triton interpreter.
SMALL = SolarConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, torch_dtype="float32",
)
# Accuracy checks (reference path only): wider and deeper, with trained-like weight statistics.
REALISTIC = SolarConfig(
    vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, torch_dtype="float32",
)
BOUND = 1.5  # allowed logit error, in units of the error the rounding noise alone makes


def realistic_model(config: SolarConfig, seed: int = 0) -> Solar:
    """Random weights with the statistics of trained ones: heavy-tailed entries (Student t, 6 degrees of
    freedom) and row scales spread over a factor of ~e between typical rows (log-normal), fan-in scaled so
    each sublayer nudges the residual stream rather than replacing it; norms around 1."""
    g = torch.Generator().manual_seed(seed)
    model = Solar(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                n, k = p.shape
                t = torch.randn(n, k, generator=g) / (torch.randn(n, k, 6, generator=g).pow(2).mean(-1)).sqrt()
                rows = torch.exp(0.5 * torch.randn(n, 1, generator=g))
                p.copy_(t * rows / math.sqrt(k) * (2.0 if name == "lm_head.weight" else 0.5))
    return model.to(DEVICE)


def left_padded(lengths: list[int], seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    return left_pad([ids[row, width - n:] for row, n in enumerate(lengths)], pad_id=0)


# ------------------------------------------------------------------------------- kernel vs reference


@pytest.fixture(scope="module")
def small_models() -> dict[str, Solar]:
    base = realistic_model(SMALL, seed=1)
    with torch.no_grad():
        base.lm_head.weight.mul_(4.0)  # well-separated logits: greedy tokens cannot flip on rounding
    return {mode: quant.quantized_copy(base, mode) for mode in MODES}


@pytest.mark.parametrize("mode, gemv", [("int8", "triton"), ("fp8", "triton"), ("fp8", "cublas")])
def test_kernel_path_equals_reference_path(small_models, mode, gemv):
    """Logits of a full forward and batched, left-padded greedy generation equal the dequantise-then-matmul
    reference path: the forward and the prefill (3 x 9 rows) through the quant_matmul kernel, the decode
    steps (M = 3 rows) through the fused GEMVs reading the 8-bit weights (forced "triton") or cuBLAS on the
    widened weights ("cublas", what the self-selection may pick). (The rest of the kernel path is
    test_fast_path's; this keeps the interpreter's work small.)"""
    model = small_models[mode]
    ids, mask = left_padded([9, 4, 1], seed=2, vocab=SMALL.vocab_size)
    kw = dict(max_new_tokens=3, attention_mask=mask, eos_token_id=[])
    with torch.inference_mode():
        with ops.force_kernels(False):
            ref_logits = model(ids).logits
            ref_tokens = model.generate(ids, **kw)
        with ops.force_kernels(True), force_gemv(gemv):
            fast_logits = model(ids).logits
            fast_tokens = model.generate(ids, **kw)
    assert_close(fast_logits, ref_logits, atol=2e-4, rtol=1e-4, msg=f"{mode} kernel-path logits")
    assert torch.equal(fast_tokens, ref_tokens), f"{mode}: kernel path {fast_tokens.tolist()} != {ref_tokens.tolist()}"


def test_static_decode_path_equals_eager(small_models, monkeypatch):
    """The CUDA-graph wiring minus the capture (CudaGraphLoop(capture=False): static buffers, the whole loop
    body per token) on FP8 weights and the fused GEMVs gives eager generate's tokens, over two calls (the
    recording is reused)."""
    from fastsolar.decoding.graphs import CudaGraphLoop
    from fastsolar.decoding.session import DecodeSession

    gen_mod = importlib.import_module("fastsolar.decoding.generate")

    model = copy.deepcopy(small_models["fp8"])
    ids, mask = left_padded([5, 2], seed=3, vocab=SMALL.vocab_size)
    kw = dict(max_new_tokens=3, attention_mask=mask, eos_token_id=[])
    with ops.force_kernels(True), force_gemv("triton"):
        eager = model.generate(ids, **kw)
        monkeypatch.setattr(gen_mod, "_make_advance",
                            lambda s, sampler, loop, graphs_: CudaGraphLoop(s, sampler, loop, capture=False))
        session = DecodeSession(model, 2, 8)
        assert torch.equal(model.generate(ids, session=session, **kw), eager)
        assert torch.equal(model.generate(ids, session=session, **kw), eager) and session.graphs.captures == 1


@pytest.mark.gpu("bf16 tl.dot cannot run under the Triton interpreter; CUDA graph capture")
@pytest.mark.parametrize("mode", [m for m in MODES if m == "int8" or FP8_OK])
def test_bf16_kernel_path_on_gpu(mode):
    """Compiled bf16 kernels with quantised weights: at most about twice as far from the same quantised model
    run in fp32 as torch's bf16 reference path is; CUDA-graph generation gives the eager kernel path's tokens,
    with the fused GEMVs forced and with the self-selection's picks."""
    q16 = quant.quantized_copy(realistic_model(REALISTIC, seed=3).to(torch.bfloat16), mode)
    q32 = copy.deepcopy(q16)
    for module in q32.modules():  # the same quantised weights; embeddings and norms (and activations) in fp32
        if not isinstance(module, quant.QuantLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
    ids, mask = left_padded([33, 20, 7], seed=4, vocab=REALISTIC.vocab_size)
    kw = dict(max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    with torch.inference_mode():
        with ops.force_kernels(False):
            ref32, torch16 = q32(ids).logits, q16(ids).logits
        fast16 = q16(ids).logits
        for gemv in ("triton", None):
            with force_gemv(gemv):
                eager = q16.generate(ids, cuda_graphs=False, **kw)
                graphed = q16.generate(ids, cuda_graphs=True, **kw)
            assert torch.equal(graphed, eager), f"bf16 {mode} {gemv}: graphed {graphed.tolist()} != {eager.tolist()}"
    assert_close(fast16, ref32, baseline=torch16, atol=1e-2, msg=f"bf16 {mode} kernel path")


# ------------------------------------------------------------------------------------------- accuracy


def _e4m3_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values around |v|: 2**(exponent - 3) for normals, 2**-9 below 2**-6."""
    a = v.abs()
    return torch.where(a >= 2.0**-6, torch.exp2(torch.floor(torch.log2(a.clamp_min(2.0**-6))) - 3), 2.0**-9)


def rounding_noise_model(base: Solar, mode: str, seed: int) -> Solar:
    """`base` with each quantisable weight perturbed by uniform noise of exactly the size the rounding of
    the per-channel absmax scale (int4: the per-group range) implies, and nothing else changed."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name in quant.quantizable_linears(model):
            w = model.get_submodule(name).weight
            if mode == "int4":  # a step per group of GROUP_SIZE inputs: the group's range, 0 included, / 15
                n, k = w.shape
                groups = w.new_zeros(n, -(-k // quant.GROUP_SIZE) * quant.GROUP_SIZE)
                groups[:, :k] = w
                groups = groups.view(n, -1, quant.GROUP_SIZE)
                step = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
                step = step.repeat_interleave(quant.GROUP_SIZE, dim=1)[:, :k]
            else:
                s = w.abs().amax(dim=1, keepdim=True) / quant.QMAX[mode]
                step = s if mode == "int8" else _e4m3_ulp(w / s) * s
            w.add_((torch.rand(w.shape, generator=g).to(w.device) - 0.5) * step)
    return model


def with_scales(base: Solar, mode: str, scale_of) -> Solar:
    """`base` quantised with the per-row scales `scale_of(weight, qmax)` instead of the absmax ones."""
    model = quant.quantized_copy(base, mode)
    qmax = quant.QMAX[mode]
    with torch.no_grad():
        for name in quant.quantizable_linears(base):
            w = base.get_submodule(name).weight
            s = scale_of(w, qmax).to(torch.float32)
            v = (w / s[:, None]).clamp(-qmax, qmax)
            layer = model.get_submodule(name)
            layer.weight.copy_(v.round() if mode == "int8" else v)
            layer.weight_scale.copy_(s)
    return model


WORSE = {  # scale choices that round worse than per-channel absmax, per mode
    "int8": {
        "per-tensor": lambda w, qmax: torch.full((w.shape[0],), float(w.abs().max()) / qmax, device=w.device),
        "2x too large": lambda w, qmax: 2 * w.abs().amax(dim=1) / qmax,
    },
    # e4m3 is floating point: a per-tensor or too-large scale only shifts exponents (18 binades of range),
    # but a too-small one clips each row's largest weights.
    "fp8": {"4x too small": lambda w, qmax: w.abs().amax(dim=1) / qmax / 4},
}


@pytest.fixture(scope="module")
def realistic() -> tuple[Solar, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 model, 4 prompts of 32 tokens, its logits on them, and its greedy 32 new tokens after the
    first 8 tokens of each."""
    model = realistic_model(REALISTIC)
    ids = torch.randint(3, REALISTIC.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.inference_mode():
        return model, ids, model(ids).logits.double(), model.generate(ids[:, :8], 32, eos_token_id=[])


def _logit_error(model: Solar, ids: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        d = (model(ids).logits.double() - ref).abs()
    return {"rms": float(d.pow(2).mean().sqrt()), "mean": float(d.mean()), "max": float(d.max())}


@pytest.mark.parametrize("mode", [*MODES, "int4"])
def test_accuracy_against_fp32_is_what_rounding_implies(realistic, mode):
    base, ids, ref, want = realistic
    q = quant.quantized_copy(base, mode)
    got = _logit_error(q, ids, ref)
    noise = [_logit_error(rounding_noise_model(base, mode, seed), ids, ref) for seed in (1, 2)]
    expect = {k: sum(n[k] for n in noise) / len(noise) for k in ("rms", "mean")}
    print(f"\n{mode}: logit error rms {got['rms']:.4f} mean {got['mean']:.4f} max {got['max']:.3f} "
          f"(logit std {float(ref.std()):.3f}); rounding noise alone: rms {expect['rms']:.4f} "
          f"mean {expect['mean']:.4f}")
    for k in ("rms", "mean"):
        assert got[k] <= BOUND * expect[k], \
            f"{mode}: logit error {k} {got[k]:.4f} > {BOUND} x rounding's {expect[k]:.4f}"
        # Far below the rounding noise would mean the weights were not really quantised.
        assert got[k] >= expect[k] / BOUND, f"{mode}: logit error {k} {got[k]:.4f} is implausibly small"
    for why, scale_of in WORSE.get(mode, {}).items():
        bad = _logit_error(with_scales(base, mode, scale_of), ids, ref)
        print(f"  {why} scales: rms {bad['rms']:.4f} mean {bad['mean']:.4f}")
        assert bad["rms"] > BOUND * expect["rms"], f"{mode} with {why} scales passes the bound: the test cannot tell"

    # Greedy agreement over 32 new tokens: free-running, and teacher-forced on the fp32 model's tokens.
    with torch.inference_mode():
        got_tokens = q.generate(ids[:, :8], 32, eos_token_id=[])
        forced = q(want).logits.argmax(-1)[:, 7:-1]
    free = (got_tokens[:, 8:] == want[:, 8:]).float().mean().item()
    teacher = (forced == want[:, 8:]).float().mean().item()
    first = [(row != ref_row).nonzero()[0].item() if (row != ref_row).any() else 32
             for row, ref_row in zip(got_tokens[:, 8:], want[:, 8:])]
    print(f"  greedy over 32 tokens: {free:.1%} identical (first divergence at {first}), "
          f"{teacher:.1%} top-1 agreement teacher-forced")
    # int4's steps are 8-16x int8's: its logit error is ~0.2 of the logits' spread here (rounding's share too),
    # and 84% of the teacher-forced top-1 tokens agree (8-bit: > 95%).
    need = 0.8 if mode == "int4" else 0.9
    assert teacher >= need, f"{mode}: top-1 agreement with the fp32 model {teacher:.1%} < {need:.0%}"


# --------------------------------------------------------------------------------------------- memory


def _meta_bytes(config: SolarConfig, mode: str | None) -> tuple[int, int]:
    """(all parameter bytes, bytes of the quantisable linears) of a bf16 model built on the meta device."""
    with torch.device("meta"):
        model = Solar(config).to(torch.bfloat16)
    names = quant.quantizable_linears(model)
    if mode is not None:
        quant.quantize(model, mode)
    return quant.parameter_bytes(model), sum(quant.parameter_bytes(model.get_submodule(n)) for n in names)


@pytest.mark.parametrize("mode", MODES)
def test_quantised_memory(mode):
    """The quantised linears take at most 0.52x their bf16 bytes (one byte per weight plus a 4-byte scale
    per row) and nothing else changes; for SOLAR-10.7B, whose 0.26 GB embedding table stays bf16, that is
    also at most 0.52x of the whole model. (The tiny preset's 32000 x 256 table is 40% of its parameters,
    so the whole tiny model only drops to ~0.7x.)"""
    for name in ("tiny", "solar-10.7b"):
        config = SolarConfig.preset(name)
        bf16_all, bf16_linear = _meta_bytes(config, None)
        q_all, q_linear = _meta_bytes(config, mode)
        h, d = config.hidden_size, config.head_dim
        rows = (config.num_attention_heads * d + 2 * config.num_key_value_heads * d + h + 2 * config.intermediate_size
                + h) * config.num_hidden_layers + config.vocab_size  # qkv, o, gate_up, down; lm_head
        assert q_linear == bf16_linear // 2 + 4 * rows, "one byte per weight and one fp32 scale per row"
        assert q_linear <= 0.52 * bf16_linear, (name, q_linear, bf16_linear)
        assert q_all == bf16_all - bf16_linear + q_linear, "only the linear layers may change"
        print(f"\n{name} {mode}: {q_all / 1e9:.3f} GB vs bf16 {bf16_all / 1e9:.3f} GB ({q_all / bf16_all:.3f}x); "
              f"linears {q_linear / bf16_linear:.4f}x")
        if name == "solar-10.7b":
            assert q_all <= 0.52 * bf16_all, (q_all, bf16_all)
            assert 10.8e9 < q_all < 11.0e9, q_all


def test_int4_memory():
    """SOLAR-10.7B's linears in int4: half a byte per weight, plus an fp16 scale and a uint8 zero per 128
    weights: 0.2578x their bf16 bytes; the whole model (its 0.26 GB bf16 embedding table unchanged) ~0.27x."""
    config = SolarConfig.preset("solar-10.7b")
    bf16_all, bf16_linear = _meta_bytes(config, None)
    q_all, q_linear = _meta_bytes(config, "int4")
    assert q_linear == bf16_linear // 4 + bf16_linear // 2 // 128 * 3, "4 bits per weight, 3 bytes per group"
    assert q_all == bf16_all - bf16_linear + q_linear
    assert 0.25 < q_all / bf16_all < 0.28, q_all / bf16_all
    print(f"\nsolar-10.7b int4: {q_all / 1e9:.3f} GB vs bf16 {bf16_all / 1e9:.3f} GB ({q_all / bf16_all:.4f}x)")
