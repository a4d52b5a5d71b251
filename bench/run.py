#!/usr/bin/env python
"""THE benchmark: fastsolar against its own eager paths and transformers, same weights, one process, one run.

    python bench/run.py                      # CUDA: SOLAR-10.7B shape in bf16, random weights; CPU: "tiny"
    python bench/run.py --model DIR          # a real checkpoint (fastsolar's loader and transformers' own)
    python bench/run.py --engines fastsolar,hf-eager --batch-sizes 1 --new-tokens 64 --json out.json

Engines (`--engines`, comma separated, default all; `--exclude` leaves some out):
  fastsolar        fastsolar.decoding.generate with the Triton kernels and CUDA graphs (cuda_graphs=True)
  fastsolar-eager  the same without CUDA graphs
  torch-ref        fastsolar's model on its torch reference ops (`ops.force_kernels(False)`), eager
  hf-eager         transformers LlamaForCausalLM, attn_implementation="sdpa", dynamic cache, generate()
  fastsolar-fp8    `fastsolar` with the linear layers quantised to FP8 e4m3 (per output channel, weight-only):
                   the same random bf16 weights quantised (fastsolar.model.quant.quantized_copy: embeddings and norms
                   shared, not copied), or the checkpoint loaded with quantize="fp8"; needs sm_89+ (skipped below)
  fastsolar-int8   the same with int8 weights; sm_80+
  fastsolar-int4   the same with int4 weights (groups of 128, round-to-nearest, quantize="int4"); sm_80+
  hf-compile       transformers with cache_implementation="static" + torch.compile(mode="reduce-overhead")
                   (generate's own auto-compile, the gpt-fast technique); CUDA only; a failure is reported
                   in the table, not raised
  fastsolar-tp     `fastsolar` split over --tp N tensor-parallel ranks (bench/tp_engine.py), run after the others;
                   by default when more than one GPU is visible (N: their count rounded down to a power of two),
                   or with --tp N on a CPU (gloo)
On a CPU, `fastsolar` and `hf-compile` are reported as skipped (they need CUDA), and so is `fastsolar-eager`:
without CUDA fastsolar runs its torch reference ops (the Triton kernels run on a CPU only under the slow
interpreter), which is the torch-ref engine. The quantised engines run there too, on the reference ops
(dequantise, then matmul) without graphs. Under --time-budget (what bench/gpu_check.sh passes) the quantised
engines measure the smallest batch size only: their targets are batch-1 decode, and at the SOLAR shape the
two of them would otherwise add ~20 s to a run whose budget the bf16 engines already mostly use.

Method, per engine and batch size b (all engines see the same random prompts of --prompt-len tokens):
- every engine generates greedily, EOS ignored, through its public generate();
- warm-up: one full generate (captures graphs / compiles), then --repeats timed pairs of generate() with 1
  and with N new tokens (CUDA events around each call; host clock on a CPU); medians T1, TN;
- prefill: tokens/s = b * prompt_len / T1 (T1 is the time to first token: prefill plus picking a token);
- decode: ms/token = (TN - T1) / (N - 1): the steady-state cost of one decode step for the whole batch,
  with prefill and per-call setup cancelled out; tokens/s = b / that;
- achieved GB/s = bytes one decode step must read (every weight except the embedding table, in its storage
  dtype: one byte per quantised weight plus its fp32 scales; plus the K/V cache up to the step's position,
  averaged over the N steps) / step time; `weights_GB` is the weight part; its share of the measured
  copy bandwidth (bytes read + written by a large copy_: bench/common.py's copy_bandwidth(), the one
  bench/kernel_bench.py reports; 1 GiB on CUDA, 64 MiB on a host);
- peak memory: torch.cuda.max_memory_allocated over the engine's runs, reset between engines (it includes
  the weights every engine shares);
- match: the fraction of generated token positions identical to the first unquantised engine's (fastsolar's on
  CUDA, torch-ref's on a CPU) tokens; the quantised engines, which run right after fastsolar, are matched too.

With --model, `load` rows come first (bench/load.py's phases, each on a cold page cache): the shards read
raw (filling the page cache, and dropping it behind), fastsolar's from_pretrained and transformers'
from_pretrained plus a first forward, with GB/s and the ratio to the faster raw read; the engines then run on
the models these loads made.

Random weights are shared by every engine, one copy (bench/engines.py says how). Progress goes to stderr; a
markdown table is printed last; `--json` writes every number (partial results are written after each engine).
Exit status: 1 when an engine failed (the table says why), 2 when interrupted, else 0 (skipped engines, e.g. the
CUDA-only ones on a CPU, are reported with their reason).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import math
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

import load as load_bench
from common import copy_bandwidth, decode_step_bytes, device_info, import_fastsolar, markdown_table, write_json
from engines import (Engine, FastsolarEngine, HFEngine, fit_layers, hf_from_pretrained, hf_sharing_weights,
                     random_solar)

log = logging.getLogger("bench")


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, but still write the JSON and print the table of what finished."""


# In order of value, so that a --time-budget skips the least valuable: fastsolar first (it also sets the tokens the
# others are matched against), then the quantised engines (their batch-1 targets), then the slow CPU-bound
# baselines, hf-compile (the slowest) last.
ENGINES = ("fastsolar", "fastsolar-fp8", "fastsolar-int8", "fastsolar-int4", "fastsolar-eager", "torch-ref", "hf-eager",
           "hf-compile")
QUANTIZED = {"fastsolar-fp8": "fp8", "fastsolar-int8": "int8", "fastsolar-int4": "int4"}
CUDA_ONLY = {
    "fastsolar": "CUDA graphs need a CUDA device",
    "fastsolar-eager": "without CUDA fastsolar runs its torch reference ops: that is the torch-ref engine",
    "hf-compile": "torch.compile(reduce-overhead) needs CUDA",
}


# ------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a Hugging Face checkpoint dir (default: random weights)")
    p.add_argument("--preset", default=None, help='config preset for random weights (default "solar-10.7b" on CUDA, "tiny" on CPU)')
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random weights only)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on CUDA, 16 on CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per generate (default 128 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions, median taken (default 3 on CUDA, 2 on CPU)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--exclude", default="", help="comma-separated engines to leave out of --engines "
                   "(bench/gpu_check.sh: every engine but hf-compile, whatever engines exist)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="add the fastsolar-tp row on N ranks (default: the visible GPUs, rounded down to a power of "
                        "two, when there are 2 or more; 0 = no row)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; engines and batch sizes not started by then are reported as skipped")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    on_cuda = args.device.type == "cuda"
    if args.preset is None:
        args.preset = "solar-10.7b" if on_cuda else "tiny"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    args.prompt_len = args.prompt_len or (512 if on_cuda else 16)
    args.new_tokens = args.new_tokens or (128 if on_cuda else 8)
    args.repeats = args.repeats or (3 if on_cuda else 2)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if args.tp is None:
        gpus = torch.cuda.device_count() if on_cuda else 0
        args.tp = 2 ** int(math.log2(gpus)) if gpus > 1 else 0
    excluded = [e.strip() for e in args.exclude.split(",") if e.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip() and e.strip() not in excluded]
    unknown = [e for e in args.engines + excluded if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is the difference between N and 1 new tokens)")
    return args


# -------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds taken by fn() (CUDA events around it on CUDA, the host clock otherwise) and its result."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------ bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device: torch.device = args.device
        self.on_cuda = self.device.type == "cuda"
        self._model = None
        self._hf = None
        self.notes: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.load: dict[str, dict[str, Any]] = {}  # the load rows (--model only)
        self.baseline: dict[int, tuple[str, torch.Tensor]] = {}
        self.tokens: dict[tuple[str, int], torch.Tensor] = {}  # each engine's greedy tokens per batch size
        self.t_start = time.perf_counter()

        from fastsolar.config import SolarConfig

        if args.model is not None:
            self.config = SolarConfig.from_pretrained(args.model)
        else:
            self.config = SolarConfig.preset(args.preset)
            if args.layers:
                self.config = self.config.replace(num_hidden_layers=args.layers)
            self.config = self.config.replace(eos_token_id=None)
            bmax = max(args.batch_sizes)
            c = self.config
            kv = 2 * c.num_hidden_layers * bmax * (args.prompt_len + args.new_tokens + 256) * c.num_key_value_heads * c.head_dim * args.dtype.itemsize
            # A quantised engine holds its quantised linears (about half the bf16 weights) next to the bf16 model.
            quantized = c.num_parameters() * args.dtype.itemsize // 2 if set(QUANTIZED) & set(args.engines) else 0
            self.config, note = fit_layers(self.config, self.device, args.dtype,
                                           extra_bytes=3 * kv + quantized + (4 << 30))
            if note:
                self.notes.append(note)
        gen = torch.Generator().manual_seed(args.seed + 1)
        self.prompts = {
            b: torch.randint(3, self.config.vocab_size, (b, args.prompt_len), generator=gen).to(self.device)
            for b in args.batch_sizes
        }

    # -- models (built once, shared by engines)

    def fastsolar_model(self):
        if self._model is None:
            t0 = time.perf_counter()
            if self.args.model is not None:
                from fastsolar import Solar

                log.info("loading %s with fastsolar", self.args.model)
                self._model = Solar.from_pretrained(self.args.model, device=self.device, dtype=self.args.dtype).eval()
            else:
                log.info("building random %s weights (%d layers) on %s in %s", self.args.preset,
                         self.config.num_hidden_layers, self.device, self.args.dtype)
                self._model = random_solar(self.config, self.device, self.args.dtype, self.args.seed)
            sync(self.device)
            log.info("fastsolar model ready in %.1f s", time.perf_counter() - t0)
        return self._model

    def make_room_for_hf(self) -> None:
        """On CUDA, free the fastsolar model when transformers' copy of the checkpoint would not fit beside it."""
        if self.on_cuda and self._model is not None:
            need = sum(p.numel() * p.element_size() for p in self._model.parameters()) * 1.1 + (4 << 30)
            if torch.cuda.mem_get_info(self.device)[0] < need:
                log.info("freeing the fastsolar model to make room for transformers' copy")
                self._model = None
                gc.collect()
                torch.cuda.empty_cache()

    def hf_model(self):
        if self._hf is None:
            t0 = time.perf_counter()
            if self.args.model is not None:
                self.make_room_for_hf()
                log.info("loading %s with transformers", self.args.model)
                self._hf = hf_from_pretrained(self.args.model, self.device, self.args.dtype)
            else:
                self._hf = hf_sharing_weights(self.fastsolar_model(), self.args.dtype)
            log.info("transformers model ready in %.1f s", time.perf_counter() - t0)
        return self._hf

    def measure_load(self) -> None:
        """The `load` rows (bench/load.py's phases, --model only): the shards read raw (twice: filling the page
        cache, and dropping it behind), fastsolar's load and
        transformers' load plus a first forward, each on a cold page cache. The engines then use these models."""
        args = self.args
        self.meta["checkpoint"] = load_bench.checkpoint_meta(args.model, args.dtype)
        for raw in ("raw", "raw-dropped"):
            self.load[raw], _ = load_bench.measure_phase(raw, args.model, self.device, args.dtype)
        self.load["fastsolar"], self._model = load_bench.measure_phase(
            "fastsolar", args.model, self.device, args.dtype, keep=True)
        self.make_room_for_hf()
        keep_hf = any(e.startswith("hf-") for e in args.engines)
        self.load["transformers"], self._hf = load_bench.measure_phase(
            "transformers", args.model, self.device, args.dtype, keep=keep_hf)
        load_bench.add_ratios(self.load)

    def quantized_model(self, mode: str):
        """A model with `mode` weights, built for one engine (the caller drops it when done): the random bf16
        model's weights quantised (sharing its other tensors), or the checkpoint loaded with quantize=mode."""
        from fastsolar.model import quant

        t0 = time.perf_counter()
        if self.args.model is not None:
            from fastsolar import Solar

            log.info("loading %s with fastsolar, quantize=%r", self.args.model, mode)
            model = Solar.from_pretrained(self.args.model, device=self.device, dtype=self.args.dtype, quantize=mode)
        else:
            log.info("quantising the random weights to %s", mode)
            model = quant.quantized_copy(self.fastsolar_model(), mode)
        sync(self.device)
        log.info("%s model ready in %.1f s (%.2f GB of parameters)", mode, time.perf_counter() - t0,
                 quant.parameter_bytes(model) / 1e9)
        return model

    # -- bytes a decode step must read

    def step_bytes(self, b: int, weight_bytes: int | None = None) -> dict[str, float]:
        """Bytes one decode step of batch b reads. `weight_bytes`: of the weights (all but the embedding table)
        in their storage dtypes, from the engine's own model; default the unquantised model's."""
        ctx = self.args.prompt_len + self.args.new_tokens / 2  # mean cached length read over the N steps
        return decode_step_bytes(self.config, self.args.dtype.itemsize, b, ctx, weight_bytes)

    # -- measuring

    def make_engine(self, name: str) -> Engine:
        if name == "fastsolar":
            return FastsolarEngine(self, name, graphs=True, kernels=None)
        if name == "fastsolar-eager":
            return FastsolarEngine(self, name, graphs=False, kernels=None)
        if name == "torch-ref":
            return FastsolarEngine(self, name, graphs=False, kernels=False)
        if name == "hf-eager":
            return HFEngine(self, name, compiled=False)
        if name == "hf-compile":
            return HFEngine(self, name, compiled=True)
        if name in QUANTIZED:
            return FastsolarEngine(self, name, graphs=self.on_cuda, kernels=None, quantize=QUANTIZED[name])
        if name == "fastsolar-tp":
            from tp_engine import TensorParallelEngine

            return TensorParallelEngine(self, name, self.args.tp)
        raise ValueError(name)

    def over_budget(self) -> bool:
        budget = self.args.time_budget
        return budget is not None and time.perf_counter() - self.t_start > budget

    def run_engine(self, name: str) -> None:
        entry: dict[str, Any] = {"status": "ok", "reason": None, "results": {}, "notes": []}
        self.results[name] = entry
        if self.over_budget():
            entry.update(status="skipped", reason=f"time budget of {self.args.time_budget:.0f} s spent")
            log.warning("[%s] skipped: %s", name, entry["reason"])
            return
        reason = CUDA_ONLY.get(name) if not self.on_cuda else None
        if reason is None and name.startswith("hf-") and importlib.util.find_spec("transformers") is None:
            reason = "transformers is not installed (pip install -e '.[bench]')"
        if reason is None and name in QUANTIZED:
            from fastsolar.model import quant

            try:
                quant.check_device(QUANTIZED[name], self.device)
            except ValueError as e:  # e.g. FP8 on an A100
                reason = str(e)
        if reason is not None:
            entry.update(status="skipped", reason=reason)
            log.info("[%s] skipped: %s", name, reason)
            return
        if self.on_cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        engine = None
        t_engine = time.perf_counter()
        batch_sizes = self.args.batch_sizes
        if name in QUANTIZED and self.args.time_budget is not None and len(batch_sizes) > 1:
            batch_sizes = [min(batch_sizes)]
            entry["notes"].append(f"batch {batch_sizes[0]} only under --time-budget (the targets are batch 1)")
        try:
            engine = self.make_engine(name)
            for b in batch_sizes:
                if self.over_budget():
                    entry["notes"].append(f"batch sizes from {b} on skipped: time budget spent")
                    break
                entry["results"][str(b)] = self.measure(engine, b)
        except Interrupted:
            entry.update(status="interrupted", reason="stopped by SIGTERM (time limit)")
            raise
        except Exception as e:
            entry.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            entry["traceback"] = traceback.format_exc()
            log.error("[%s] failed: %s", name, entry["reason"])
            log.debug("%s", entry["traceback"])
        finally:
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.close()
                entry["notes"].extend(engine.notes)
            entry["seconds"] = round(time.perf_counter() - t_engine, 2)
            peak = None
            if self.on_cuda:
                sync(self.device)
                peak = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            entry["peak_memory_GiB"] = peak
            for r in entry["results"].values():
                r["peak_memory_GiB"] = peak
            engine = None

    def measure(self, engine: Engine, b: int) -> dict[str, Any]:
        args, dev = self.args, self.device
        ids, n = self.prompts[b], args.new_tokens
        log.info("[%s] batch %d: warm-up (%d new tokens)", engine.name, b, n)
        t_warm, _ = timed(lambda: engine.gen(ids, n), dev)
        engine.gen(ids, 1)
        t1s, tns = [], []
        tokens = None
        for r in range(args.repeats):
            t1, _ = timed(lambda: engine.gen(ids, 1), dev)
            tn, tokens = timed(lambda: engine.gen(ids, n), dev)
            t1s.append(t1)
            tns.append(tn)
        t1, tn = statistics.median(t1s), statistics.median(tns)
        step_s = (tn - t1) / (n - 1)
        notes = []
        if step_s <= 0:
            step_s = tn / n
            notes.append("TN <= T1 (timing noise): decode estimated as TN / N")
        nbytes = self.step_bytes(b, engine.weight_bytes)
        gbps = nbytes["total"] / step_s / 1e9
        tokens = tokens.detach().to("cpu")
        if b not in self.baseline and engine.name not in QUANTIZED:  # the first unquantised engine is the reference
            self.baseline[b] = (engine.name, tokens)
        self.tokens[(engine.name, b)] = tokens
        res = {
            "batch": b,
            "warmup_s": round(t_warm, 4),
            "t1_s": [round(x, 6) for x in t1s],
            "tn_s": [round(x, 6) for x in tns],
            "ttft_ms": t1 * 1e3,
            "prefill_tokens_per_s": b * args.prompt_len / t1,
            "ms_per_token": step_s * 1e3,
            "decode_tokens_per_s": b / step_s,
            "bytes_per_step": nbytes,
            "weights_GB": nbytes["weights"] / 1e9,
            "achieved_GBps": gbps,
            "share_of_copy_bw": gbps * 1e9 / self.copy_bw if self.copy_bw else None,
            "token_match": None,  # set by match_tokens once this batch size has its reference
            "first_divergence_mean": None,
            "match_baseline": None,
            "tokens_head": tokens[:, : min(n, 16)].tolist(),
            "notes": notes,
        }
        log.info("[%s] batch %d: prefill %.0f tok/s, decode %.2f ms/token (%.1f tok/s, %.0f GB/s)",
                 engine.name, b, res["prefill_tokens_per_s"], res["ms_per_token"], res["decode_tokens_per_s"], gbps)
        return res

    def run(self) -> dict[str, Any]:
        args = self.args
        t0 = time.perf_counter()
        info = device_info(self.device)
        log.info("device %s (%s); measuring copy bandwidth", self.device, info["card"])
        try:
            copy = copy_bandwidth(self.device)
            self.copy_bw, self.copy_bw_method = copy["gbs"] * 1e9, copy["method"]
            log.info("copy bandwidth %.1f GB/s (read + write)", self.copy_bw / 1e9)
        except Exception as e:  # report the run without the ceiling rather than lose it
            self.copy_bw, self.copy_bw_method = None, f"failed: {type(e).__name__}: {e}"
            log.warning("copy bandwidth measurement failed (%s: %s)", type(e).__name__, e)
        self.meta = {
            "date": info["date"],
            "card": info["card"],
            "capability": info["capability"],
            "sms": info["sms"],
            "memory_gib": info["memory_gib"],
            "device": str(self.device),
            "versions": {k: info[k] for k in ("python", "torch", "triton", "transformers", "cuda")},
            "model_dir": str(args.model) if args.model else None,
            "preset": None if args.model else args.preset,
            "config": asdict(self.config),
            "num_parameters": self.config.num_parameters(),
            "dtype": str(args.dtype).replace("torch.", ""),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "engines": args.engines,
            "copy_bandwidth_GBps": self.copy_bw / 1e9 if self.copy_bw else None,
            "copy_bandwidth_method": self.copy_bw_method,
            "notes": self.notes,
        }
        if args.model is not None:
            log.info("=== load ===")
            self.measure_load()
            self.write_json(complete=False)
        for name in args.engines + (["fastsolar-tp"] if args.tp > 1 else []):
            log.info("=== engine %s ===", name)
            self.run_engine(name)
            self.match_tokens()
            self.write_json(complete=False)
            rest = args.engines[args.engines.index(name) + 1:] if name in args.engines else []
            if not any(e.startswith("hf-") for e in rest):
                self._hf = None  # no later engine needs transformers' model
        self._hf = None
        self.meta["seconds"] = round(time.perf_counter() - t0, 1)
        return self.write_json(complete=True)

    def match_tokens(self) -> None:
        """Fill token_match (the fraction of generated positions equal to the reference's) and the mean first
        divergence of every result whose batch size has its reference: the first unquantised engine to finish it
        (the quantised engines run early, value first, and are matched once it exists)."""
        for name, entry in self.results.items():
            for key, r in entry["results"].items():
                b = int(key)
                if r.get("match_baseline") is not None or b not in self.baseline or (name, b) not in self.tokens:
                    continue
                base_engine, base = self.baseline[b]
                tokens = self.tokens[(name, b)]
                same = tokens == base
                mismatch = (~same).int()
                n = tokens.shape[1]
                first = torch.where(mismatch.any(1), mismatch.argmax(1), torch.full((b,), n)).float()
                r.update(token_match=float(same.float().mean()), first_divergence_mean=float(first.mean()),
                         match_baseline=base_engine)
                log.info("[%s] batch %d: token match %.3f against %s", name, b, r["token_match"], base_engine)

    def payload(self, complete: bool) -> dict[str, Any]:
        return {"complete": complete, "meta": self.meta, "engines": self.results, "load": self.load}

    def write_json(self, complete: bool) -> dict[str, Any]:
        data = self.payload(complete)
        if self.args.json:
            write_json(self.args.json, data)
        return data


# ------------------------------------------------------------------------------------------------ table


def _gbps(x: Any) -> str:
    return _f(x, ",.0f" if x is not None and x >= 100 else ".3g")


def _f(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def markdown(data: dict[str, Any]) -> str:
    m = data["meta"]
    v = m["versions"]
    c = m["config"]
    on_cuda = m["device"].startswith("cuda")
    what = m["model_dir"] or f"random weights, preset {m['preset']}"
    lines = [
        f"## fastsolar benchmark: {m['card']}, {m['date']}",
        "",
        f"{what}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {m['num_parameters'] / 1e9:.3f} B params, "
        f"{m['dtype']}; prompt {m['prompt_len']} tokens, {m['new_tokens']} new tokens, {m['repeats']} repeats (median). "
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}.",
        f"Copy bandwidth ({'device' if on_cuda else 'host'}, read + write): {_f(m['copy_bandwidth_GBps'], '.0f')} GB/s.",
    ]
    header = ["engine", "batch", "prefill tok/s", "TTFT ms", "decode tok/s", "ms/token", "weights GB", "GB/s",
              "% copy BW", "peak GiB", "match"]
    rows = []
    for name, e in data["engines"].items():
        if e["status"] != "ok":
            rows.append([name, f"{e['status']}: {e['reason']}"] + [""] * (len(header) - 2))
        for b, r in e["results"].items():
            share = r.get("share_of_copy_bw")
            rows.append([name, b, _f(r["prefill_tokens_per_s"], ",.0f"), _f(r["ttft_ms"], ".1f"),
                         _f(r["decode_tokens_per_s"], ",.1f"), _f(r["ms_per_token"], ".2f"),
                         _f(r.get("weights_GB"), ".3g"), _gbps(r["achieved_GBps"]),
                         _f(share * 100 if share is not None else None, ".0f"), _f(r.get("peak_memory_GiB"), ".1f"),
                         _f(r["token_match"], ".3f")])
    lines += ["", markdown_table(header, rows)]
    engine_notes = [f"- {name}: {'; '.join(e['notes'])}" for name, e in data["engines"].items() if e.get("notes")]
    lines += [
        "",
        "prefill tok/s = batch x prompt / TTFT (time for generate() of 1 new token); ms/token = (T(N) - T(1)) / (N - 1) "
        "for the whole batch; decode tok/s = batch / that. GB/s = weights (all but the embedding table, in their "
        "storage dtype: weights GB, about half for fp8/int8) + the K/V cache read per decode step / step time" + ("" if on_cuda else " (host numbers)") + "; % copy BW = that over "
        "the measured copy bandwidth. peak GiB = torch.cuda.max_memory_allocated during the engine, reset between "
        "engines, shared weights included.",
        "match = fraction of generated token positions (greedy, EOS ignored) identical to the first engine's "
        f"({_baselines(data)}). On random weights the logits of the top tokens are close, "
        "so kernels, matmul orders and bf16 rounding can flip a near-tie, after which the continuations differ: "
        "match < 1 is then rounding, not a bug (and for fp8/int8 also the weight rounding); a real checkpoint "
        "(--model) gives the meaningful number.",
    ]
    if m.get("notes"):
        lines += [f"- note: {n}" for n in m["notes"]]
    lines += engine_notes
    if data.get("load"):
        lines += ["", "### load", "", *load_bench.table(m["checkpoint"], data["load"], on_cuda)]
    if not data.get("complete", True):
        lines.append("- INCOMPLETE run: some engines did not finish")
    return "\n".join(lines)


def _baselines(data: dict[str, Any]) -> str:
    names = sorted({r.get("match_baseline") for e in data["engines"].values() for r in e["results"].values()} - {None})
    return ", ".join(names) or "none ran"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    import_fastsolar("bench/run.py")
    t0 = time.perf_counter()

    def on_term(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        data = bench.run()
    except (Interrupted, KeyboardInterrupt):
        log.error("interrupted: writing what finished")
        if not hasattr(bench, "meta"):
            return 2
        data = bench.write_json(complete=False)
        print(markdown(data))
        return 2
    print(markdown(data))
    log.info("done in %.1f s%s", time.perf_counter() - t0, f"; results in {args.json}" if args.json else "")
    failed = [name for name, e in data["engines"].items() if e["status"] == "failed"]
    if failed:
        log.error("failed engine(s): %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
