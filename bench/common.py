"""What the bench/ scripts share: importing fastsolar, the card and versions, timing, the copy-bandwidth
ceiling, JSON written as results come, and the markdown table. Scripts import it as `common` (Python puts
bench/ first on sys.path)."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
# torch is imported where it is used, so that `bench/kernel_bench.py --help` stays as quick as before.


def import_fastsolar(script: str):
    """`fastsolar` with its `fastsolar.kernels` (the installed package maps kernels/ there); without an
    install, one line on stderr saying how to get one, and exit status 2."""
    try:
        import fastsolar
        import fastsolar.kernels  # noqa: F401
    except ImportError as e:
        print(f"{script}: fastsolar is not importable ({e}); run `pip install -e .` from the repo root first",
              file=sys.stderr)
        raise SystemExit(2) from None
    return fastsolar


def mistral_tokenizer(script: str) -> "Path":
    """Mistral-7B's real tokenizer.model (SOLAR's) as the mistral-common package ships it (the bench extra)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise SystemExit(f"{script}: random weights need a tokenizer.model: pip install mistral-common "
                         "(in the bench extra), or pass --model DIR")
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise SystemExit(f"{script}: {path} is missing from mistral-common")
    return path


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The card (or the host's CPU), its capability, SMs and memory, the date and the versions; CPU-safe
    (capability, SMs and L2 are None there, memory is the host's)."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"card": None, "capability": None, "sms": None, "memory_gib": None, "l2_mib": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    else:
        info["card"] = f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        try:
            info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (AttributeError, ValueError, OSError):
            pass
    info.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=_version("triton"), transformers=_version("transformers"),
        cuda=torch.version.cuda, python=platform.python_version(), host=platform.node(),
    )
    return info


#: A timed row's input sets together hold more than this many times the L2 cache, so every set is streamed from
#: device memory, never replayed out of L2 (the H200 has 60 MB of it).
L2_MULTIPLE = 3
#: The most input sets one ring holds: a lap launches every set once, and capture time grows with the launches.
RING_MAX = 8192
SAMPLES = 3  # timed samples per row, median kept; spread = (slowest - fastest) / fastest
SAMPLE_S = 0.005  # each sample replays the lap graph this long at least


def ring_size(nbytes: int, l2_bytes: int | None, cap: int = RING_MAX) -> int:
    """How many copies of a case's inputs (`nbytes` each) a ring needs to hold more than L2_MULTIPLE x the L2
    (1 where the L2 size is unknown), at most `cap`."""
    if not l2_bytes:
        return 1
    return max(1, min(cap, L2_MULTIPLE * l2_bytes // max(1, nbytes) + 1))


def from_memory(ring: int, nbytes: int, l2_bytes: int | None) -> bool:
    """Whether a ring of `ring` input sets of `nbytes` each is read from device memory (it exceeds 3x the L2)."""
    return bool(l2_bytes) and ring * nbytes > L2_MULTIPLE * l2_bytes


def graph_ring_ms(fns: list[Callable[[], Any]], samples: int = SAMPLES, sample_s: float = SAMPLE_S) -> tuple[float, float]:
    """(median ms per call, spread %) of one lap over `fns` (each a call on its own inputs) captured in a CUDA graph
    and replayed: warm-up on a side stream (compiles, cuBLAS handles), capture, one replay to size the samples, then
    `samples` timings of enough replays to last `sample_s` each (CUDA events)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()

    def timed(laps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(laps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / laps

    lap_ms = timed(1)
    laps = max(1, min(1000, int(sample_s * 1e3 / max(lap_ms, 1e-6)) + 1))
    meds = sorted(timed(laps) / len(fns) for _ in range(samples))
    return statistics.median(meds), 100.0 * (meds[-1] - meds[0]) / meds[0]


def host_ms(fn: Callable[[], Any], *, warmup: int = 3, samples: int = 5, repeats: int = 2) -> tuple[float, float]:
    """Host-clock timing: the median of `samples` calls, `repeats` times, fastest kept, spread %."""
    for _ in range(warmup):
        fn()
    meds = []
    for _ in range(repeats):
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        meds.append(statistics.median(times) * 1e3)
    best = min(meds)
    return best, 100.0 * (max(meds) - best) / best


def copy_bandwidth(device: torch.device | str = "cuda", gib: float | None = None) -> dict[str, Any]:
    """The memory-bound ceiling: a copy_ of a `gib` GiB buffer on `device` (default 1 GiB on CUDA, 64 MiB on a
    host), GB/s = (bytes read + bytes written) / median time; timed by CUDA-graph replay on CUDA (the buffer is
    many times the L2), by the host clock elsewhere. Returns bytes, ms, spread_pct, gbs and a one-line method."""
    import torch

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    gib = gib if gib is not None else (1.0 if on_cuda else 1 / 16)
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device).normal_()  # not zeros
    dst = torch.empty_like(src)
    if on_cuda:
        with torch.cuda.device(device):
            ms, spread = graph_ring_ms([lambda: dst.copy_(src)])
    else:
        ms, spread = host_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    if on_cuda:
        torch.cuda.empty_cache()
    how = "CUDA-graph replay median" if on_cuda else "host clock median"
    return {"bytes": nbytes, "ms": ms, "spread_pct": spread, "gbs": nbytes / ms / 1e6,
            "method": f"bench/common.py copy_bandwidth(): copy_ of {gib:g} GiB, {how}, spread {spread:.1f}%"}


def decode_step_bytes(
    config: Any, itemsize: int, batch: int, context: float, weight_bytes: int | None = None
) -> dict[str, float]:
    """Bytes one decode step must read: every weight except the embedding table (one row of it per token), and
    the K/V cache of `context` positions per row. `config` is a fastsolar SolarConfig. `weight_bytes`: those
    weights' bytes as a model stores them (int8/fp8 ones: one byte each plus fp32 scales); default all in
    `itemsize`."""
    c = config
    if weight_bytes is None:
        embed_table = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        weight_bytes = (c.num_parameters() - embed_table) * itemsize
    weights = weight_bytes + batch * c.hidden_size * itemsize
    kv = 2 * c.num_hidden_layers * batch * context * c.num_key_value_heads * c.head_dim * itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file beside it, then a rename), so that a run
    killed at any moment leaves the previous complete file, never half of one."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def test_results(path: str | os.PathLike, label: str | None = None) -> dict[str, Any]:
    """What tests/conftest.py's --results-jsonl file says (for one phase `label`, or all): counts by outcome, the
    failed tests with their first message line, and tests that started but never reported (killed or hung)."""
    counts: dict[str, int] = {}
    failed: list[tuple[str, str]] = []
    started: dict[str, None] = {}
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if label is not None and r.get("label") != label:
            continue
        if r["outcome"] == "started":
            started[r["nodeid"]] = None
            continue
        if r["when"] == "teardown":
            started.pop(r["nodeid"], None)
        outcome = r["outcome"] if r["when"] == "call" or r["outcome"] != "passed" else None
        if outcome is None:
            continue
        if r["when"] != "call" and outcome == "failed":
            outcome = "error"
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in ("failed", "error"):
            failed.append((r["nodeid"], r.get("message", "")))
    return {"counts": counts, "failed": failed, "unfinished": list(started)}
