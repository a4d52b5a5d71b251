"""bench/load.py (checkpoint load: raw read, fastsolar, transformers) runs on a tiny checkpoint and writes its
JSON; its page-cache and memory probes say true things; bench/run.py --model reports the same phases as `load` rows."""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import hf_fixtures as F
import pytest

ROOT = Path(__file__).resolve().parent.parent
PHASE_FIELDS = {"status", "cold", "drop_attempted", "resident_before_GB", "load_s", "GBps", "ratio_to_raw",
                "rss_before_GB", "peak_rss_GB", "peak_anon_GB", "peak_file_GB"}



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return F.save(F.build_hf_model(num_hidden_layers=2, seed=4), tmp_path_factory.mktemp("load") / "ckpt",
                  max_shard_size="100KB")


def test_load_bench_runs_on_the_tiny_preset(tmp_path):
    out, ckpt = tmp_path / "load.json", tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--preset", "tiny", "--layers", "2", "--shard-size", "0.02",
           "--out", str(ckpt), "--keep", "--device", "cpu", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    data = json.loads(out.read_text())
    assert data["complete"] is True
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and {"torch", "transformers"} <= set(meta["versions"])
    c = meta["checkpoint"]
    assert c["shards"] == len(list(ckpt.glob("*.safetensors"))) >= 3  # --shard-size split it, --keep kept it
    assert c["checkpoint_GB"] > c["weights_GB"] > 0.03
    assert list(data["load"]) == ["raw", "raw-dropped", "fastsolar", "transformers"]
    for name, row in data["load"].items():
        assert row["status"] == "ok", (name, row.get("reason"))
        assert PHASE_FIELDS <= set(row), PHASE_FIELDS - set(row)
        assert row["load_s"] > 0 and row["GBps"] > 0 and row["peak_rss_GB"] >= row["peak_anon_GB"] > 0
        if hasattr(os, "posix_fadvise") and sys.platform == "linux":
            assert row["cold"] is True and row["resident_before_GB"] < 0.01 * c["checkpoint_GB"]
    fastest_raw = min(data["load"][r]["load_s"] for r in ("raw", "raw-dropped"))
    assert min(data["load"][r]["ratio_to_raw"] for r in ("raw", "raw-dropped")) == 1.0
    for name in ("fastsolar", "transformers"):
        row = data["load"][name]
        assert row["first_forward_s"] > 0 and row["to_first_logits_s"] >= row["load_s"]
        assert row["ratio_to_raw"] == pytest.approx(row["load_s"] / fastest_raw)
    assert "| phase | cache | load s |" in proc.stdout and "| fastsolar | cold |" in proc.stdout
    # The random checkpoint is a strict Hugging Face one: fastsolar's loader accepts it, config and all.
    from fastsolar import Solar

    model = Solar.from_pretrained(ckpt, device="cpu")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 256
    assert float(model.layers[0].attention.wqkv.weight.std()) == pytest.approx(0.02, rel=0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise as Linux has them")
def test_page_cache_probe_tells_cold_from_warm(tmp_path, bench_script):
    from fastsolar.checkpoint.shards import resident_bytes

    load = bench_script("load")
    path = tmp_path / "blob.safetensors"
    path.write_bytes(os.urandom(1 << 20))
    assert load.drop_page_cache([path]) == {"cold": True, "drop_attempted": True, "resident_before_GB": 0.0}
    path.read_bytes()
    assert resident_bytes(path) == 1 << 20
    assert load.drop_page_cache([path])["cold"] is True and resident_bytes(path) == 0
    os.chmod(path, 0o444)
    if os.geteuid() != 0:  # root may write anyway, and the kernel then tells
        assert resident_bytes(path) is None


def test_peak_memory_sees_an_allocation(bench_script):
    load = bench_script("load")
    fresh = mmap.mmap(-1, 64 * 2**20)  # a new anonymous mapping: its pages count only once written
    with load.PeakMemory() as mem:
        fresh.write(b"\x01" * len(fresh))
    fresh.close()
    r = mem.result()
    if r["peak_rss_GB"] is None:
        pytest.skip("no /proc/self/status")
    assert r["peak_rss_GB"] - r["rss_before_GB"] >= 0.06 and r["peak_rss_GB"] >= r["peak_anon_GB"]


def test_run_reports_load_rows_and_keeps_the_loaded_model(tiny_dir, bench_script):
    run = bench_script("run")
    args = run.parse_args(["--model", str(tiny_dir), "--device", "cpu", "--engines", "torch-ref", "--batch-sizes", "1",
                           "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1"])
    bench = run.Bench(args)
    data = bench.run()
    assert list(data["load"]) == ["raw", "raw-dropped", "fastsolar", "transformers"]
    assert all(r["status"] == "ok" for r in data["load"].values()), data["load"]
    assert data["meta"]["checkpoint"]["shards"] == len(F.shard_files(tiny_dir))
    assert data["engines"]["torch-ref"]["status"] == "ok"
    assert bench._model is not None and bench._model.config.num_hidden_layers == 2  # the load's model, reused
    table = run.markdown(data)
    # The raw row says the cache state that run measured (cold only where the page-cache drop worked).
    state, other = ("| raw | cold |", "| raw | warm") if data["load"]["raw"]["cold"] else ("| raw | warm", "| raw | cold |")
    assert "### load" in table and state in table and other not in table, table


def test_table_reports_failures(bench_script):
    load = bench_script("load")
    checkpoint = {"cpu_peak_rss_target_GB": 3.0}
    phases = {"raw": {"status": "ok", "cold": True, "drop_attempted": True, "resident_before_GB": 0.0, "load_s": 2.0,
                      "GBps": 1.5, "ratio_to_raw": 1.0},
              "transformers": {"status": "failed", "reason": "OSError: boom"}}
    text = "\n".join(load.table(checkpoint, phases, on_cuda=False))
    assert "| raw | cold | 2.00 | 1.50 | 1.00 | n/a |" in text
    assert "| transformers | failed: OSError: boom |" in text and "3.00 GB" in text
