"""bench/host_overhead.py: its gap arithmetic on made-up step records, and one tiny end-to-end run through the
serve engine (the structure of its report, never a timing)."""
from __future__ import annotations

import json

import pytest
import torch


def test_gaps_are_between_consecutive_full_batch_steps(bench_script):
    ho = bench_script("host_overhead")
    # (batch, start, end, cpu start, cpu end): steps of 2 rows then 3; the first `skip` full ones are dropped.
    calls = [(2, 0.000, 0.010, 0.0, 0.001), (3, 0.012, 0.020, 0.002, 0.003), (3, 0.021, 0.030, 0.0035, 0.004),
             (3, 0.034, 0.040, 0.0045, 0.005), (2, 0.041, 0.050, 0.006, 0.007), (3, 0.052, 0.060, 0.0072, 0.008),
             (3, 0.065, 0.070, 0.0081, 0.009)]
    got = ho.gaps_us(calls, 3, skip=1)
    # Calls 3 and 5 are not consecutive (a 2-row step between) and skip drops 1 -> 2: left are 2 -> 3 and 5 -> 6.
    assert got["wall"] == pytest.approx([4000.0, 5000.0])
    assert got["cpu"] == pytest.approx([500.0, 100.0])
    assert got["step"] == pytest.approx([6000.0, 5000.0])
    assert ho.gaps_us(calls, 3, skip=10) == {"wall": [], "cpu": [], "step": []}


@pytest.mark.slow
def test_runs_the_engine_and_reports_per_row(bench_script, tmp_path, capsys):
    pytest.importorskip("mistral_common", reason="the bench's tokenizer.model comes from mistral-common")
    ho = bench_script("host_overhead")
    out = tmp_path / "host.json"
    threads = torch.get_num_threads()  # main() sets the server's thread policy, as `fastsolar serve` would
    try:
        assert ho.main(["--rows", "2,3", "--prompt-len", "4", "--new-tokens", "8", "--device", "cpu",
                        "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert [r["rows"] for r in data["results"]] == [2, 3]
    for r in data["results"]:
        assert r["completion_tokens"] == 8 * r["rows"] and r["full_batch_gaps"] > 0 and r["text_chars"] > 0
        for key in ("host_us_per_step", "host_cpu_us_per_step", "step_call_us"):
            assert set(r[key]) == {"p50", "p90", "mean"} and r[key]["p50"] > 0
        assert r["host_us_per_step_per_row"]["p50"] == pytest.approx(r["host_us_per_step"]["p50"] / r["rows"])
    assert "| 3 |" in capsys.readouterr().out
