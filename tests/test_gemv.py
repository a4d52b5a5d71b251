"""The fused skinny-GEMM family (kernels/gemv.py) against its float64 reference.

Each case: fresh random inputs, a NaN-poisoned output, inputs checked unchanged, and an error of at most
~2x torch's own at the same dtype (helpers.assert_close with baseline=) plus one ulp of the result (the
kernel rounds y once from fp32, torch may round an intermediate too). Under the interpreter bf16 is only
run where no tl.dot is involved (M == 1); M >= 2 runs fp16/fp32 there and bf16 on CUDA.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fastsolar import quant
from fastsolar.kernels._workspace import workspace
from fastsolar.kernels.gemv import MAX_M, gemv, gemv_launch_config, gemv_ref
from helpers import DEVICE, ULP, assert_close, poison, randn
EPS = 1e-5


def _inputs(m, n, k, dtype, wdtype, prologue, residual):
    kx = 2 * k if prologue == "swiglu" else k
    x = randn(m, kx, dtype=dtype)
    w = randn(n, k, scale=k ** -0.5)
    scale = None
    if wdtype in (torch.int8, torch.float8_e4m3fn):
        w, scale = quant.quantize_weight(w, quant.MODE_OF_DTYPE[wdtype])  # per channel: w ~= scale[:, None] * q
    else:
        w = w.to(wdtype)
    kw = {"scale": scale}
    if prologue == "norm":
        kw.update(norm_weight=(1.0 + 0.5 * randn(k)).to(dtype), eps=EPS)
    elif prologue == "swiglu":
        kw["swiglu"] = True
    if residual:
        kw["residual"] = randn(m, n, dtype=dtype)
    return x, w, kw


def _check(x, w, kw, msg):
    saved = [t.clone() for t in (x, w, *(v for v in kw.values() if isinstance(v, torch.Tensor)))]
    out = poison(torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=DEVICE))
    y = gemv(x, w, out=out, **kw)
    assert y is out
    now = [x, w, *(v for v in kw.values() if isinstance(v, torch.Tensor))]
    assert all(torch.equal(a, b) for a, b in zip(saved, now)), "an input was modified"
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scale" else v)
            for k, v in kw.items()}
    truth = gemv_ref(x.double(), w, **kw64)
    assert_close(y, truth, baseline=gemv_ref(x, w, **kw), rtol=ULP[x.dtype], msg=msg)
    return y


BF16_DOT = pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter")
CASES = [
    # m, n, k, x dtype, weight dtype, prologue, residual
    pytest.param(1, 37, 123, torch.float32, torch.float32, "plain", False, id="m1-n37-k123-fp32"),
    pytest.param(1, 50, 3000, torch.bfloat16, torch.bfloat16, "swiglu", False, id="m1-swiglu-k3000-bf16-splitk"),
    pytest.param(1, 40, 3000, torch.float16, torch.float16, "norm", True, id="m1-norm-res-k3000-fp16-splitk"),
    pytest.param(1, 17, 300, torch.bfloat16, torch.float8_e4m3fn, "plain", True, id="m1-fp8-res-bf16"),
    pytest.param(1, 123, 123, torch.bfloat16, torch.int8, "norm", False, id="m1-int8-norm-bf16"),
    pytest.param(2, 123, 123, torch.float16, torch.float16, "norm", True, id="m2-norm-res-fp16"),
    pytest.param(3, 37, 123, torch.float32, torch.float32, "swiglu", False, id="m3-swiglu-fp32"),
    pytest.param(5, 17, 300, torch.float16, torch.int8, "plain", False, id="m5-int8-fp16"),
    pytest.param(7, 33, 3000, torch.float16, torch.float8_e4m3fn, "plain", True, id="m7-fp8-res-k3000-splitk"),
    pytest.param(8, 64, 1500, torch.float16, torch.float16, "plain", True, id="m8-res-k1500-splitk"),
    pytest.param(4, 31, 200, torch.bfloat16, torch.bfloat16, "norm", True, marks=[BF16_DOT],
                 id="m4-norm-bf16"),
]


@pytest.mark.parametrize("m, n, k, dtype, wdtype, prologue, residual", CASES)
def test_gemv_matches_reference(m, n, k, dtype, wdtype, prologue, residual):
    x, w, kw = _inputs(m, n, k, dtype, wdtype, prologue, residual)
    _check(x, w, kw, f"m{m} n{n} k{k} {dtype} {wdtype} {prologue} res={residual}")


@pytest.mark.gpu("SOLAR-sized products: too slow for the Triton interpreter")
@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn], ids=["bf16", "int8", "fp8"])
def test_gemv_solar_shapes_on_cuda(m, wdtype):
    """Every decode product of a SOLAR layer at its real size, compiled, bf16 activations."""
    for n, k, prologue, residual in ((6144, 4096, "norm", False), (4096, 4096, "plain", True),
                                     (28672, 4096, "norm", False), (4096, 14336, "swiglu", True)):
        x, w, kw = _inputs(m, n, k, torch.bfloat16, wdtype, prologue, residual)
        _check(x, w, kw, f"SOLAR m{m} {n}x{k} {prologue} {wdtype}")


def test_gemv_fp8_bit_decode_before_sm89(monkeypatch):
    """On an A100 (sm_80: no fp8 conversion) the e4m3 bytes are decoded with integer ops: every one of the
    256 byte values (NaNs aside) must give the value torch gives, through the whole kernel."""
    gemv_mod = importlib.import_module("fastsolar.kernels.gemv")
    monkeypatch.setattr(gemv_mod, "device_properties", lambda device: ((8, 0), 108))
    assert gemv_mod.gemv_launch_config(1, 16, 256, torch.float8_e4m3fn, (8, 0))["W_E4M3_BITS"]
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # drop the two NaN codes
    w = codes[torch.randperm(codes.numel())][: 16 * 15].view(16, 15).view(torch.float8_e4m3fn).to(DEVICE)
    x = torch.zeros(1, 15, device=DEVICE)
    for j in range(15):  # y[n] = w[n, j]: each column alone, so every byte is compared exactly
        x.zero_()
        x[0, j] = 1.0
        y = gemv(x, w, scale=torch.ones(16, device=DEVICE))
        assert torch.equal(y[0], w[:, j].float()), f"column {j}"
    x, w, kw = _inputs(3, 37, 300, torch.float16, torch.float8_e4m3fn, "norm", True)
    _check(x, w, kw, "fp8 bits, M 3")


def test_gemv_strided_rows_and_leading_dims():
    """Decode passes [b, 1, K] rows, and gate|up as one fused [b, 1, 2K] projection output; x rows may be a
    slice of a wider buffer (row stride > K)."""
    wide = randn(3, 1, 400, dtype=torch.float16)
    x = wide[..., 10:133]  # [3, 1, 123], row stride 400
    w = randn(29, 123, dtype=torch.float16, scale=0.1)
    res = randn(3, 1, 29, dtype=torch.float16)
    y = _check(x, w, {"residual": res}, "strided rows")
    assert y.shape == (3, 1, 29)


def test_gemv_split_k_workspace_is_reset_and_poison_safe():
    """Split-K writes every partial before the last program reads it (the workspace is NaN-poisoned here) and
    leaves its counters at 0, so the next launch (or graph replay) over the same workspace is right too."""
    m, n, k = 1, 50, 3000
    cfg = gemv_launch_config(m, n, k, torch.float32)
    assert cfg["SPLIT_K"] > 1
    part = workspace("gemv.partials", (cfg["SPLIT_K"], m, n), torch.float32, DEVICE)
    counters = workspace("gemv.counters", (-(-n // cfg["BLOCK_N"]),), torch.int32, DEVICE)
    for _ in range(2):
        poison(part)
        x, w, kw = _inputs(m, n, k, torch.float32, torch.float32, "plain", True)
        _check(x, w, kw, "split-K")
        assert (counters == 0).all()


def test_gemv_launch_config():
    for m in range(1, MAX_M + 1):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (32000, 4096), (37, 123)):
            for wdt in (torch.bfloat16, torch.int8, torch.float8_e4m3fn, torch.float32):
                c = gemv_launch_config(m, n, k, wdt, (9, 0), 132)
                assert c["BLOCK_M"] == (1 if m == 1 else 16)
                split, per = c["SPLIT_K"], c["k_per_split"]
                assert split >= 1 and (split - 1) * per < k <= split * per
                assert c["k_per_split"] % c["BLOCK_K"] == 0
    # SOLAR's o-proj at batch 1 (N = 4096): 128 output blocks for 132 SMs, so K is split.
    assert gemv_launch_config(1, 4096, 4096, torch.bfloat16, (9, 0), 132)["SPLIT_K"] > 1
    # gate_up (N = 28672) fills the GPU without a split.
    assert gemv_launch_config(1, 28672, 4096, torch.bfloat16, (9, 0), 132)["SPLIT_K"] == 1


def test_gemv_bad_inputs():
    x, w = randn(2, 64), randn(16, 64)
    with pytest.raises(ValueError, match=r"gemv takes 1..8 rows .* got 9"):
        gemv(randn(9, 64), w)
    with pytest.raises(ValueError, match=r"x's last dim must be K = 64"):
        gemv(randn(2, 63), w)
    with pytest.raises(ValueError, match=r"2 \* K \(gate \| up\) = 128"):
        gemv(x, w, swiglu=True)
    with pytest.raises(ValueError, match="needs its per-output-channel scale"):
        gemv(x, w.to(torch.int8))
    with pytest.raises(ValueError, match=r"scale must have shape \[16\]"):
        gemv(x, w.to(torch.int8), scale=torch.ones(15, device=DEVICE))
    with pytest.raises(TypeError, match="scale has dtype float16"):
        gemv(x, w, scale=torch.ones(16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[64\]"):
        gemv(x, w, norm_weight=torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="either an RMSNorm or a SwiGLU"):
        gemv(randn(2, 128), w, swiglu=True, norm_weight=torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 16\)"):
        gemv(x, w, residual=randn(2, 15))
    with pytest.raises(TypeError, match="residual has dtype float16"):
        gemv(x, w, residual=randn(2, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight has dtype int64"):
        gemv(x, w.long())
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv(x, randn(64, 16).t())


# ------------------------------------------------------------------------------ self-selection (gemv_choice)
from fastsolar import gemv_choice, ops  # noqa: E402
from launch_count import count_launches  # noqa: E402


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty choice cache, timing allowed on this device, and a fake timer: a candidate that launches the
    Triton GEMV "takes" TIMES["triton"] ms, any other TIMES["cublas"] (it really runs, once)."""
    times = {}
    timed = []

    def fake_measure(fn):
        _, launched = count_launches(fn)
        name = "triton" if launched["triton._gemv_kernel"] else "cublas"
        timed.append(name)
        return times[name]

    monkeypatch.setattr(gemv_choice, "_choices", {})
    monkeypatch.setattr(gemv_choice, "_forced", None)
    monkeypatch.setattr(gemv_choice, "can_time", lambda device: True)
    monkeypatch.setattr(gemv_choice, "measure", fake_measure)
    return times, timed


def test_choice_times_replays_not_launches():
    """The candidates are timed as a decode step runs them, replayed from a graph: the median over the samples of
    each burst's time per replay, after one untimed replay (the graph's upload)."""
    replays = []
    bursts = iter([12.0, 9.0, 30.0, 10.0, 11.0])  # ms per burst of REPLAYS replays

    def elapsed(run):
        before = len(replays)
        run()
        assert len(replays) - before == gemv_choice.REPLAYS
        return next(bursts)

    ms = gemv_choice.replay_median_ms(lambda: replays.append(1), elapsed)
    assert len(replays) == 1 + gemv_choice.REPLAYS * gemv_choice.SAMPLES
    assert ms == 11.0 / gemv_choice.REPLAYS


@pytest.mark.gpu("CUDA graph capture of a candidate")
def test_choice_measure_captures_once():
    """measure() runs the candidate in Python twice (warm-up, capture) whatever the replays, and times the replays."""
    calls = []
    x, w = randn(1, 1, 4096, dtype=torch.bfloat16), randn(4096, 4096, scale=0.02, dtype=torch.bfloat16)

    def candidate():
        calls.append(1)
        return gemv(x, w)

    ms = gemv_choice.measure(candidate)
    assert len(calls) == 2 and 0 < ms < 10


@pytest.mark.parametrize("faster", ["triton", "cublas"])
def test_choice_keeps_the_faster_candidate(fresh_choices, faster, caplog):
    """The first call of a shape times both candidates and keeps the faster (a slower one is never picked);
    later calls of that shape reuse the pick without timing; one log line names the pick and both times."""
    times, timed = fresh_choices
    times.update({"triton": 2.0, "cublas": 0.5} if faster == "cublas" else {"triton": 0.5, "cublas": 2.0})
    x, w, res = randn(1, 1, 96), randn(40, 96, scale=0.1), randn(1, 1, 40)
    with ops.force_kernels(True), caplog.at_level("INFO", logger="fastsolar.gemv_choice"):
        first = ops.linear(x, w, residual=res)
        _, launched = count_launches(lambda: ops.linear(x, w, residual=res))
    assert sorted(timed) == ["cublas", "triton"], "both candidates are timed once, on the first call only"
    assert bool(launched["triton._gemv_kernel"]) == (faster == "triton"), dict(launched)
    assert list(gemv_choice.choices().values()) == [faster]
    (line,) = [r.getMessage() for r in caplog.records]
    assert f": {faster} (" in line, line
    assert all(f"{name} {ms * 1e3:.1f} us" in line for name, ms in times.items()), line
    assert "M=1 N=40 K=96" in line
    assert_close(first, gemv_ref(x.double(), w.double(), residual=res.double()), baseline=gemv_ref(x, w, residual=res))


def test_choice_forced_and_untimed(fresh_choices, monkeypatch):
    """FASTSOLAR_GEMV / force_gemv win over timing; where nothing can be timed (a CPU, a graph capture) the
    cuBLAS path runs and nothing is remembered."""
    times, timed = fresh_choices
    times.update({"triton": 9.0, "cublas": 1.0})
    x, g, w = randn(2, 64), (1 + 0.1 * randn(64)), randn(24, 64, scale=0.1)
    with ops.force_kernels(True):
        with gemv_choice.force_gemv("triton"):
            _, launched = count_launches(lambda: ops.norm_linear(x, g, EPS, w))
        assert launched["triton._gemv_kernel"] == 1 and not timed
        monkeypatch.setattr(gemv_choice, "can_time", lambda device: False)
        _, launched = count_launches(lambda: ops.norm_linear(x, g, EPS, w))
        assert launched["triton._rms_norm_kernel"] == 1 and sum(launched.values()) == 2, dict(launched)
    assert not timed and not gemv_choice.choices()
    with pytest.raises(ValueError, match="force_gemv takes one of triton, cublas"):
        with gemv_choice.force_gemv("cutlass"):
            pass
    # More rows than a GEMV takes (prefill) never consult the choice at all.
    monkeypatch.setattr(gemv_choice, "can_time", lambda device: True)
    with ops.force_kernels(True):
        ops.norm_linear(randn(9, 64), g, EPS, w)
    assert not timed
