"""bench/run.py: the end-to-end benchmark runs small on a CPU and writes the documented JSON; its pieces
(weight sharing with transformers, byte counts, the table) are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULT_FIELDS = {
    "batch", "ttft_ms", "prefill_tokens_per_s", "ms_per_token", "decode_tokens_per_s", "achieved_GBps",
    "share_of_copy_bw", "peak_memory_GiB", "token_match", "first_divergence_mean", "match_baseline", "t1_s", "tn_s",
    "weights_GB",
}
ENGINES = ("fastsolar", "fastsolar-eager", "torch-ref", "hf-eager", "hf-compile", "fastsolar-fp8", "fastsolar-int8",
           "fastsolar-int4")



def _run_bench(tmp_path: Path, *extra: str) -> tuple[dict, str, float]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--preset", "tiny", "--new-tokens", "4",
           "--prompt-len", "8", "--json", str(out), *extra]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench never runs kernels on a CPU
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()), proc.stdout, seconds


@pytest.mark.slow
@pytest.mark.cpu_only
def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    data, stdout, seconds = _run_bench(tmp_path, "--device", "cpu")
    assert data["complete"] is True
    meta = data["meta"]
    for key in ("date", "card", "versions", "config", "copy_bandwidth_GBps", "prompt_len", "new_tokens", "batch_sizes"):
        assert key in meta, key
    assert {"torch", "triton", "transformers"} <= set(meta["versions"])
    assert meta["prompt_len"] == 8 and meta["new_tokens"] == 4 and meta["batch_sizes"] == [1, 8]
    assert meta["copy_bandwidth_GBps"] > 0
    assert set(data["engines"]) == set(ENGINES)
    for name in ("fastsolar", "fastsolar-eager", "hf-compile"):
        assert data["engines"][name]["status"] == "skipped", name
    for name in ("torch-ref", "hf-eager", "fastsolar-fp8", "fastsolar-int8", "fastsolar-int4"):
        e = data["engines"][name]
        assert e["status"] == "ok", (name, e.get("reason"), e.get("traceback"))
        assert set(e["results"]) == {"1", "8"}
        for r in e["results"].values():
            assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
            assert r["ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0 and r["achieved_GBps"] > 0
            assert 0.0 <= r["token_match"] <= 1.0
    # fp32 on a CPU: transformers computes the same greedy tokens as the reference model.
    assert data["engines"]["hf-eager"]["results"]["1"]["token_match"] == 1.0
    # The quantised engines read about a quarter of the fp32 weight bytes (one byte per weight plus scales).
    full = data["engines"]["torch-ref"]["results"]["1"]["weights_GB"]
    for name in ("fastsolar-fp8", "fastsolar-int8"):
        r = data["engines"][name]["results"]["1"]
        assert 0.25 * full < r["weights_GB"] < 0.27 * full, (name, r["weights_GB"], full)
        assert r["match_baseline"] == "torch-ref"
    int4 = data["engines"]["fastsolar-int4"]["results"]["1"]
    assert 0.12 * full < int4["weights_GB"] < 0.14 * full, (int4["weights_GB"], full)  # 4 bits, 3 bytes per 128
    assert "| engine | batch |" in stdout and "| hf-eager | 8 |" in stdout
    print(f"bench on CPU took {seconds:.1f} s")


@pytest.mark.cpu_only
def test_quantised_engines_run_batch_1_only_under_a_time_budget(tmp_path):
    data, _, _ = _run_bench(tmp_path, "--device", "cpu", "--layers", "1", "--engines", "torch-ref,fastsolar-int8",
                            "--batch-sizes", "2,1", "--time-budget", "600")
    assert set(data["engines"]["torch-ref"]["results"]) == {"1", "2"}
    int8 = data["engines"]["fastsolar-int8"]
    assert int8["status"] == "ok" and set(int8["results"]) == {"1"}, int8
    assert any("batch 1 only under --time-budget" in n for n in int8["notes"])


@pytest.mark.cpu_only
def test_hf_model_shares_weights_and_matches_logits(bench_script):
    pytest.importorskip("transformers")
    run = bench_script("run")
    from fastsolar.config import SolarConfig

    config = SolarConfig.preset("tiny").replace(num_hidden_layers=2, vocab_size=500, eos_token_id=None)
    model = run.random_solar(config, torch.device("cpu"), torch.float32, seed=0)
    hf = run.hf_sharing_weights(model, torch.float32)
    assert hf.model.layers[1].mlp.up_proj.weight.data_ptr() == (
        model.layers[1].feed_forward.w_gate_up.weight[config.intermediate_size:].data_ptr()
    )
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    assert ours.std() > 0.05  # random weights give non-degenerate logits


@pytest.mark.cpu_only
def test_step_bytes_and_table(bench_script):
    run = bench_script("run")
    args = run.parse_args(["--preset", "solar-10.7b", "--device", "cpu", "--prompt-len", "512", "--new-tokens", "128",
                           "--dtype", "bfloat16"])
    bench = run.Bench.__new__(run.Bench)
    bench.args = args
    from fastsolar.config import SolarConfig

    bench.config = SolarConfig.preset("solar-10.7b")
    b1 = bench.step_bytes(1)
    # 10.73 B params minus the 131 M embedding table, bf16: about 21.2 GB of weights per step.
    assert 21.1e9 < b1["weights"] < 21.3e9
    # K/V: 48 layers x 2 x 8 heads x 128 x 2 bytes = 196,608 bytes per token, at a mean of 576 positions.
    assert b1["kv"] == pytest.approx(48 * 2 * 8 * 128 * 2 * 576)
    assert bench.step_bytes(8)["kv"] == pytest.approx(8 * b1["kv"])
    # A quantised engine passes its own weight bytes; the rest of the count is the same.
    assert bench.step_bytes(1, 10_000)["weights"] == 10_000 + 4096 * 2

    data = {
        "complete": False,
        "meta": {"card": "X", "date": "d", "versions": {"torch": "t", "triton": "t", "transformers": "t"},
                 "config": {"num_hidden_layers": 48, "hidden_size": 4096}, "num_parameters": 10.7e9,
                 "dtype": "bfloat16", "prompt_len": 512, "new_tokens": 128, "repeats": 3, "device": "cuda:0",
                 "model_dir": None, "preset": "solar-10.7b", "copy_bandwidth_GBps": 3000.0, "notes": []},
        "engines": {
            "fastsolar": {"status": "ok", "notes": [], "results": {"1": {
                "prefill_tokens_per_s": 9000.0, "ttft_ms": 56.0, "decode_tokens_per_s": 120.0, "ms_per_token": 8.3,
                "weights_GB": 21.2, "achieved_GBps": 2600.0, "share_of_copy_bw": 0.87, "peak_memory_GiB": 21.9, "token_match": 1.0,
                "match_baseline": "fastsolar"}}},
            "hf-compile": {"status": "failed", "reason": "BackendCompilerFailed: boom", "notes": [], "results": {}},
        },
    }
    table = run.markdown(data)
    assert "| fastsolar | 1 | 9,000 | 56.0 | 120.0 | 8.30 | 21.2 | 2,600 | 87 | 21.9 | 1.000 |" in table
    assert "| hf-compile | failed: BackendCompilerFailed: boom |" in table
    assert "INCOMPLETE" in table


@pytest.mark.gpu("the CUDA engines need a CUDA device")
@pytest.mark.heavy(90)  # 6 engines x 2 batch sizes in a subprocess: 60-100 s on an H200
def test_bench_cuda_engines_small(tmp_path):
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    names = ["fastsolar", "fastsolar-eager", "torch-ref", "hf-eager", "fastsolar-int8", "fastsolar-int4"] + (
        ["fastsolar-fp8"] if fp8 else [])
    data, _, _ = _run_bench(tmp_path, "--engines", ",".join(names), "--batch-sizes", "1,3")
    for name in names:
        e = data["engines"][name]
        assert e["status"] == "ok", (name, e.get("reason"), e.get("traceback"))
        assert e["peak_memory_GiB"] > 0
    assert data["engines"]["fastsolar-eager"]["results"]["1"]["token_match"] == 1.0  # same kernels, same tokens
    full = data["engines"]["fastsolar"]["results"]["1"]["weights_GB"]
    for name in names[4:]:  # bf16 -> one byte per weight
        assert data["engines"][name]["results"]["1"]["weights_GB"] < 0.55 * full, name
