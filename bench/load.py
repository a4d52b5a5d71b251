#!/usr/bin/env python
"""Checkpoint load time: the shards read raw, fastsolar's loader, transformers' from_pretrained; one run.

    python bench/load.py --model DIR                    # a Hugging Face checkpoint directory
    python bench/load.py --preset tiny                  # a random checkpoint of a preset, in a temp dir
    python bench/load.py --preset solar-10.7b --layers 32 --dtype bfloat16 --out /tmp/m7b --keep
                                                        # Mistral-7B's shape (14.5 GB bf16, 3 shards), kept

Phases, in this order (`--phases`, comma separated, default all), each after the shards' pages were
dropped from the page cache (`--warm` keeps them):
  raw           every shard read front to back with readinto into one 16 MB buffer, like `dd bs=16M`:
                what the disk gives a plain sequential reader
  raw-dropped   the same, each block dropped from the page cache right after it is read (posix_fadvise
                DONTNEED), as fastsolar's loader does behind a cold file: on a VM, filling the page cache
                costs fresh guest memory (measured: a first write at 0.5 GB/s on the 2-core dev VM), so
                this is what the disk itself gives, and often the faster of the two
  fastsolar     fastsolar.Solar.from_pretrained(DIR, device=, dtype=), then a first forward of 8 tokens
  transformers  AutoModelForCausalLM.from_pretrained(DIR, dtype=, device_map=) (bench/engines.py's
                hf_from_pretrained), then a first forward of 8 tokens
Reported per phase: seconds to load (and to the first forward's logits), GB/s (checkpoint bytes over
the load time), the ratio of the load time to the faster of the two raw reads (the stricter yardstick), peak resident memory sampled every 10 ms
from /proc/self/status (VmRSS, and its anonymous and file-backed parts), and on CUDA the peak allocated.

Cold cache: each shard is fsync'ed and dropped with posix_fadvise(POSIX_FADV_DONTNEED); mincore then
says how much of it is still resident (`resident_before_GB`; it can only tell for files this process may
write, the kernel's rule). Where the platform has no posix_fadvise the runs are warm, and say so.

A random checkpoint (--preset) has transformers' layout and initialisation (normal std 0.02, norms 1),
written shard by shard with safetensors (host memory: one shard), `--shard-size` bytes per shard (5 GB,
transformers' default). Progress goes to stderr, a markdown table to stdout, `--json` writes every number.
Used by bench/run.py too: with --model it reports these phases as its `load` rows.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from common import device_info, import_fastsolar, markdown_table, write_json

log = logging.getLogger("bench")

PHASES = ("raw", "raw-dropped", "fastsolar", "transformers")
RAW_BLOCK = 16 * 2**20
FORWARD_TOKENS = 8


# ------------------------------------------------------------------------------------------ the page cache


def shard_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def drop_page_cache(files: list[Path]) -> dict[str, Any]:
    """Drop `files` from the page cache where the platform allows; what is still resident afterwards
    (fastsolar.checkpoint.shards.resident_bytes: mincore, for files this process may write)."""
    from fastsolar.checkpoint.shards import resident_bytes

    attempted = hasattr(os, "posix_fadvise")
    if attempted:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a checkpoint just written) cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    resident = [resident_bytes(p) for p in files]
    known = None if None in resident else sum(resident)
    total = sum(p.stat().st_size for p in files)
    cold = attempted and known is not None and known <= 0.01 * total
    return {"cold": cold, "drop_attempted": attempted, "resident_before_GB": None if known is None else known / 1e9}


# ---------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak VmRSS / RssAnon / RssFile of this process (sampled every 10 ms from /proc/self/status) over a block."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self) -> None:
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.available = os.path.exists("/proc/self/status")
        self._stop = threading.Event()

    def sample(self) -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in self.FIELDS:
                    out[name] = int(rest.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> "PeakMemory":
        if self.available:
            self.before = self.sample()
            self.peak = dict(self.before)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)

    def result(self) -> dict[str, float | None]:
        if not self.available:
            return {"rss_before_GB": None, "peak_rss_GB": None, "peak_anon_GB": None, "peak_file_GB": None}
        return {"rss_before_GB": self.before["VmRSS"] / 1e9, "peak_rss_GB": self.peak["VmRSS"] / 1e9,
                "peak_anon_GB": self.peak["RssAnon"] / 1e9, "peak_file_GB": self.peak["RssFile"] / 1e9}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_raw(files: list[Path], drop_behind: bool = False) -> None:
    buf = memoryview(bytearray(RAW_BLOCK))
    for path in files:
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while n := f.readinto(buf):
                if drop_behind and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), pos, n, os.POSIX_FADV_DONTNEED)
                pos += n


def _first_forward(fn: Callable[[], Any], device) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    _sync(device)
    return time.perf_counter() - t0


def load_fastsolar(model_dir: Path, device, dtype, ids):
    from fastsolar import Solar

    model = Solar.from_pretrained(model_dir, device=device, dtype=dtype)
    _sync(device)
    return model, lambda: model(ids).logits


def load_transformers(model_dir: Path, device, dtype, ids):
    from engines import hf_from_pretrained

    model = hf_from_pretrained(model_dir, device, dtype)
    _sync(device)
    return model, lambda: model(input_ids=ids).logits


LOADERS = {"fastsolar": load_fastsolar, "transformers": load_transformers}
# Imported before the clock starts: a load is timed, not the first import of a library.
IMPORTS = {"fastsolar": ("fastsolar.model",), "transformers": ("transformers", "transformers.models.llama.modeling_llama")}


def measure_phase(name: str, model_dir: Path, device, dtype, *, cold: bool = True, keep: bool = False):
    """One phase on a cold (or warm) cache: `(row, model)`; the model is returned only with `keep`, else freed."""
    import torch

    files = shard_files(model_dir)
    row: dict[str, Any] = {"status": "ok", "reason": None}
    if name == "transformers" and importlib.util.find_spec("transformers") is None:
        row.update(status="skipped", reason="transformers is not installed (pip install -e '.[bench]')")
        log.info("[%s] skipped: %s", name, row["reason"])
        return row, None
    row.update(drop_page_cache(files) if cold else {"cold": False, "drop_attempted": False, "resident_before_GB": None})
    model = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("[%s] %s cache", name, "cold" if row["cold"] else "warm")
    try:
        for module in IMPORTS.get(name, ()):
            importlib.import_module(module)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            if name.startswith("raw"):
                read_raw(files, drop_behind=name == "raw-dropped")
                row["load_s"] = time.perf_counter() - t0
            else:
                ids = torch.randint(3, 1000, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(0))
                model, forward = LOADERS[name](model_dir, device, dtype, ids.to(device))
                row["load_s"] = time.perf_counter() - t0
                row["first_forward_s"] = _first_forward(forward, device)
                row["to_first_logits_s"] = time.perf_counter() - t0
        row.update(mem.result())
    except Exception as e:  # reported in the table: one failing library must not hide the others
        row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        log.exception("[%s] failed", name)
    if device.type == "cuda":
        row["cuda_peak_allocated_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    if row["status"] == "ok":
        row["GBps"] = sum(p.stat().st_size for p in files) / 1e9 / row["load_s"]
        log.info("[%s] %.2f s (%.2f GB/s), peak RSS %s GB", name, row["load_s"], row["GBps"],
                 _f(row.get("peak_rss_GB"), ".2f"))
    else:
        log.warning("[%s] %s: %s", name, row["status"], row["reason"])
    if not keep:
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row, model


def add_ratios(phases: dict[str, dict[str, Any]]) -> None:
    """Each phase's load time over the faster raw read's (raw or raw-dropped), when one ran."""
    raws = [r["load_s"] for n, r in phases.items() if n.startswith("raw") and r.get("status") == "ok"]
    for row in phases.values():
        row["ratio_to_raw"] = row["load_s"] / min(raws) if raws and row.get("status") == "ok" else None


def checkpoint_meta(model_dir: Path, dtype) -> dict[str, Any]:
    """Sizes the results are judged by: the checkpoint, its largest shard, the weights in the target dtype,
    and the issue's peak-RSS target for a CPU load (weights + one shard + 1 GB)."""
    from fastsolar.config import SolarConfig

    files = shard_files(model_dir)
    sizes = [p.stat().st_size for p in files]
    weights = SolarConfig.from_pretrained(model_dir).num_parameters() * dtype.itemsize
    return {"model_dir": str(model_dir), "shards": len(files), "checkpoint_GB": sum(sizes) / 1e9,
            "largest_shard_GB": max(sizes) / 1e9, "weights_GB": weights / 1e9,
            "cpu_peak_rss_target_GB": (weights + max(sizes)) / 1e9 + 1.0}


# ---------------------------------------------------------------------------------------- random checkpoint


def write_random_checkpoint(config, out_dir: Path, dtype, *, shard_bytes: int = 5 * 10**9, seed: int = 0) -> Path:
    """A Hugging Face Llama checkpoint of `config`'s shape with random weights, written shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from engines import hf_config_from

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = hf_config_from(config, dtype)
    hf_config.save_pretrained(out_dir)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(hf_config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():  # greedy, in model order, like transformers' save_pretrained
        n = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    g = torch.Generator().manual_seed(seed)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        tensors = {}
        for k in keys:
            t = torch.empty(shapes[k], dtype=dtype)
            tensors[k] = t.fill_(1.0) if t.dim() == 1 else t.normal_(0.0, 0.02, generator=g)
        save_file(tensors, out_dir / name, metadata={"format": "pt"})
        log.info("wrote %s (%.2f GB)", name, sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9)
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------ report


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(checkpoint: dict[str, Any], phases: dict[str, dict[str, Any]], on_cuda: bool) -> list[str]:
    """The markdown table of the phases and the note saying how to read it (bench/run.py prints it too)."""
    header = ["phase", "cache", "load s", "GB/s", "x raw", "first forward s", "peak RSS GB", "anon GB", "file GB"]
    if on_cuda:
        header.append("CUDA peak GB")
    rows = []
    for name, r in phases.items():
        if r["status"] != "ok":
            rows.append([name, f"{r['status']}: {r['reason']}"] + [""] * (len(header) - 2))
            continue
        cache = "cold" if r["cold"] else ("warm (kept)" if not r["drop_attempted"] else
                                         f"warm ({_f(r['resident_before_GB'], '.2f')} GB resident)")
        row = [name, cache, f"{r['load_s']:.2f}", f"{r['GBps']:.2f}", _f(r.get("ratio_to_raw"), ".2f"),
               _f(r.get("first_forward_s"), ".2f"), _f(r.get("peak_rss_GB"), ".2f"), _f(r.get("peak_anon_GB"), ".2f"),
               _f(r.get("peak_file_GB"), ".2f")]
        if on_cuda:
            row.append(_f(r.get("cuda_peak_allocated_GB"), ".2f"))
        rows.append(row)
    return [
        markdown_table(header, rows),
        "",
        "load s: from the call to a model ready on the device (raw: every shard read once); GB/s: checkpoint bytes / "
        "load s; x raw: load s / the faster raw read's (raw, raw-dropped); first forward: 8 tokens, after the load (transformers maps the "
        "files and may read them only then); peak RSS: this process's resident memory, sampled every 10 ms "
        "(anonymous and file-backed maxima apart). Targets: x raw <= 1.25; a CPU load's peak RSS <= weights + one "
        f"shard + 1 GB = {checkpoint['cpu_peak_rss_target_GB']:.2f} GB. cold: the shards' pages dropped first "
        "(posix_fadvise DONTNEED), mincore confirming under 1% still resident.",
    ]


def markdown(data: dict[str, Any]) -> str:
    m, c = data["meta"], data["meta"]["checkpoint"]
    lines = [
        f"## checkpoint load: {m['card']}, {m['date']}",
        "",
        f"{c['model_dir']}: {c['checkpoint_GB']:.2f} GB in {c['shards']} shard(s) (largest {c['largest_shard_GB']:.2f} GB), "
        f"loaded onto {m['device']} as {m['dtype']} ({c['weights_GB']:.2f} GB of weights). "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}.",
        "",
        *table(c, data["load"], m["device"].startswith("cuda")),
    ]
    if not data.get("complete", True):
        lines.append("- INCOMPLETE run")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Hugging Face checkpoint directory")
    src.add_argument("--preset", help="write a random checkpoint of this fastsolar preset first (e.g. tiny, solar-10.7b)")
    p.add_argument("--layers", type=int, default=None, help="--preset only: override the number of layers")
    p.add_argument("--out", type=Path, default=None, help="--preset only: where to write it (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="--preset only: keep the written checkpoint")
    p.add_argument("--shard-size", type=float, default=5.0, help="--preset only: GB per shard (default 5)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="load dtype (and --preset's stored dtype); default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache before each phase")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = [s for s in args.phases if s not in PHASES]
    if unknown:
        p.error(f"unknown phase(s) {unknown}; choose from {PHASES}")
    if args.model is not None and (args.out or args.keep or args.layers):
        p.error("--out, --keep and --layers go with --preset")
    return args


def run(model_dir: Path, device, dtype, phases: list[str], *, cold: bool = True,
        json_path: Path | None = None) -> dict[str, Any]:
    info = device_info(device)
    data: dict[str, Any] = {
        "complete": False,
        "meta": {"date": info["date"], "card": info["card"], "device": str(device),
                 "dtype": str(dtype).replace("torch.", ""),
                 "versions": {k: info[k] for k in ("python", "torch", "transformers", "cuda")},
                 "checkpoint": checkpoint_meta(model_dir, dtype)},
        "load": {},
    }
    for name in phases:
        data["load"][name], _ = measure_phase(name, model_dir, device, dtype, cold=cold)
        add_ratios(data["load"])
        _write(data, json_path)
    data["complete"] = True
    _write(data, json_path)
    return data


def _write(data: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        write_json(path, data)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    import_fastsolar("bench/load.py")
    written = None
    model_dir = args.model
    if args.preset is not None:
        from fastsolar.config import SolarConfig

        config = SolarConfig.preset(args.preset)
        if args.layers:
            config = config.replace(num_hidden_layers=args.layers)
        written = args.out or Path(tempfile.mkdtemp(prefix=f"fastsolar-load-{args.preset}-"))
        if written.exists() and any(written.iterdir()):
            log.error("%s exists and is not empty", written)
            return 2
        log.info("writing a random %s checkpoint (%d layers, %.2f GB as %s) to %s", args.preset,
                 config.num_hidden_layers, config.num_parameters() * args.dtype.itemsize / 1e9, args.dtype, written)
        model_dir = write_random_checkpoint(config, written, args.dtype, shard_bytes=int(args.shard_size * 1e9))
    try:
        data = run(model_dir, args.device, args.dtype, args.phases, cold=not args.warm, json_path=args.json)
    finally:
        if written is not None and not args.keep:
            shutil.rmtree(written, ignore_errors=True)
    print(markdown(data))
    return 0 if any(r["status"] == "ok" for r in data["load"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
