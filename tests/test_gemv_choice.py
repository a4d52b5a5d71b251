"""fastsolar.gemv_choice: which decode product (the fused Triton GEMV or cuBLAS plus the small kernels) a
shape takes on the kernel path, picked by timing both once per shape, or forced."""
from __future__ import annotations

import pytest

from fastsolar import gemv_choice, ops
from fastsolar.kernels.gemv import gemv_ref
from helpers import assert_close, randn
from launch_count import count_launches

EPS = 1e-5


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
