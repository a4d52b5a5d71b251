"""bench/serve.py: `fastsolar serve` under N concurrent clients, beside sequential `generate` on the same weights.

    python bench/serve.py                                   # tiny random model; 1, 4 and 8 clients
    python bench/serve.py --clients 1,8 --new-tokens 64 --json out.json
    python bench/serve.py --model SOLAR-10.7B-Instruct-v1.0  # a real checkpoint (needs its tokenizer.model)
    python bench/serve.py --url http://127.0.0.1:8000 --model-name NAME   # a server already running
    python bench/serve.py --write-checkpoint DIR            # only write the random checkpoint (for a peer server)
    python bench/serve.py --model DIR --peer-url http://127.0.0.1:8001 --peer-model-name NAME --peer-label vLLM \
        --rounds 3                                          # fastsolar and peers (vLLM ...) in alternate rounds

Without --url it starts `fastsolar serve` on 127.0.0.1 (an ephemeral port) in a subprocess and stops it with
SIGTERM at the end; without --model it first writes a checkpoint of random weights at the --preset shape
(bench/engines.random_solar, saved in the Hugging Face format) with Mistral-7B's real tokenizer.model, the one
SOLAR inherits, from the mistral-common package (the bench extra installs it).

Each request is a completion of --prompt-len random token ids, greedy, EOS ignored (`ignore_eos`, which vLLM
takes too), streamed: exactly --new-tokens tokens. For each concurrency N, N closed-loop clients send
--requests-per-client requests each. Reported per N: aggregate tokens/s (all completion tokens / wall time from
the first request to the last reply), time to first token, inter-token latency (the gaps between a stream's
chunks) and per-request latency (p50, p90, p99), and the decode batch sizes the server ran (from fastsolar's JSON
/stats; skipped for servers without it). Any OpenAI-compatible server takes the same load: --url instead of starting
fastsolar, or --peer-url beside it, run in alternate rounds (--rounds; each N's figures are the round with the
median tokens/s, every round kept in the JSON). The baseline is the same prompts one after another through `model.stream` (generate's
loop) in this process, on the same checkpoint, before the server starts: its tokens/s is what one user gets
and what a server without batching would give. `--json` writes everything; a markdown table is printed last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common

log = logging.getLogger("bench")
METHOD = ("completions of random prompt ids, greedy, EOS ignored, streamed; N closed-loop clients; aggregate "
          "tokens/s = completion tokens / wall time; TTFT = first streamed chunk; baseline = the same prompts one "
          "after another through model.stream in the bench process on the same checkpoint")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a Hugging Face checkpoint dir (default: random weights)")
    p.add_argument("--preset", default="tiny", help='config preset for random weights (default "tiny")')
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random weights only)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--model-name", default="bench", help="the model id to send (with --url: the server's)")
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels (default 1,4,8)")
    p.add_argument("--requests-per-client", type=int, default=None, help="default 4 on CUDA, 2 on CPU")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 128 on CUDA, 32 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the baseline and the server (default: the server's policy, "
                        "fastsolar.serve.threads: cores - 1 on a CPU)")
    p.add_argument("--peer-url", action="append", default=[],
                   help="also load this OpenAI-compatible server (vLLM, ...); repeatable")
    p.add_argument("--peer-model-name", action="append", default=[],
                   help="the model id each peer serves, in --peer-url order (default --model-name)")
    p.add_argument("--peer-label", action="append", default=[],
                   help="each peer's name in the report, in --peer-url order (default its URL)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over every N and server, alternating (default 1)")
    p.add_argument("--no-baseline", action="store_true", help="skip the sequential generate baseline")
    p.add_argument("--write-checkpoint", type=Path, default=None, metavar="DIR",
                   help="write the random checkpoint to DIR and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on any one wait, in seconds")
    return p.parse_args(argv)


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:  # nearest rank
        return xs[min(len(xs) - 1, max(0, round(p * len(xs) + 0.5) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(xs)}


def summary(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in records)
    gaps = [g * 1e3 for r in records for g in r.get("gaps", ())]
    return {"requests": len(records), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": percentiles([r["ttft"] * 1e3 for r in records]),
            "itl_ms": percentiles(gaps) if gaps else None,
            "latency_ms": percentiles([r["latency"] * 1e3 for r in records])}


# ------------------------------------------------------------------------------------ weights and prompts


def write_random_checkpoint(args: argparse.Namespace, out: Path, device, dtype) -> dict[str, Any]:
    import torch
    from engines import hf_sharing_weights, random_solar

    from fastsolar.config import SolarConfig

    config = SolarConfig.preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    tok = common.mistral_tokenizer("bench/serve.py")
    model = random_solar(config, torch.device("cpu"), dtype, args.seed)  # saved from the host either way
    hf_sharing_weights(model, dtype).save_pretrained(out)
    (out / "tokenizer.model").write_bytes(tok.read_bytes())
    del model
    return {"preset": args.preset, "layers": config.num_hidden_layers, "tokenizer": str(tok)}


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(n)]


def baseline(model_dir: Path, device, dtype, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """The prompts one after another through generate's streaming loop: what one user at a time gets."""
    import torch

    from fastsolar import Solar

    model = Solar.from_pretrained(model_dir, device=device, dtype=dtype)
    records = []
    for i, ids in enumerate([prompts[0]] + prompts):  # the first run warms up (graph capture) and is dropped
        x = torch.tensor([ids], device=model.device)
        t0 = time.perf_counter()
        first = None
        n = 0
        for step in model.stream(x, new_tokens, eos_token_id=[]):
            step.tolist()  # waits for the token, as a client would
            n += 1
            first = first or time.perf_counter()
        if i:
            records.append({"ttft": first - t0, "latency": time.perf_counter() - t0, "tokens": n})
    wall = sum(r["latency"] for r in records)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary(records, wall)


# ----------------------------------------------------------------------------------------------- server


class Server:
    """`fastsolar serve` in a subprocess on 127.0.0.1, port picked by the OS, stopped with SIGTERM."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, max_batch: int, timeout: float) -> None:
        cmd = [sys.executable, "-m", "fastsolar", "serve", str(model_dir), "--port", "0", "--max-batch",
               str(max_batch), "--model-name", args.model_name]
        if args.device:
            cmd += ["--device", args.device]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.threads:
            cmd += ["--cpu-threads", str(args.threads)]
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env)
        self.log: list[str] = []
        found = threading.Event()
        self.url = None

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                if "Application startup complete" in line:
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or self.url is None or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("fastsolar serve did not start:\n" + "".join(self.log[-30:]))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        return self.proc.returncode


async def one_request(client, url: str, model: str, ids: list[int], new_tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals = []  # when each chunk with a choice came
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and (chunk["choices"][0].get("text") or not arrivals):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": (arrivals[0] if arrivals else end) - t0, "latency": end - t0, "tokens": tokens, "gaps": gaps}


async def concurrent_run(url: str, model: str, prompts: list[list[int]], clients: int, new_tokens: int,
                         timeout: float) -> tuple[list[dict[str, float]], float]:
    import httpx

    todo = list(prompts)
    records: list[dict[str, float]] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while todo:
                records.append(await one_request(client, url, model, todo.pop(0), new_tokens))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
        return records, time.perf_counter() - t0


async def warm_up(url: str, model: str, prompts: list[list[int]], timeout: float) -> None:
    """Concurrent requests of 2, 3, ... tokens: the batch shrinks one row at a time, visiting every size."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        calls = [one_request(client, url, model, ids, 2 + i) for i, ids in enumerate(prompts)]
        await asyncio.wait_for(asyncio.gather(*calls), timeout)


def batch_sizes(url: str) -> dict[str, int] | None:
    """Decode steps per batch size from fastsolar's JSON /stats (its /metrics is Prometheus text); None from a
    server without it (vLLM's)."""
    import httpx

    try:
        m = httpx.get(url + "/stats", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return None
    sizes = m.get("decode_steps_by_batch_size") if isinstance(m, dict) else None
    return {str(k): v for k, v in sizes.items()} if isinstance(sizes, dict) else None


# ---------------------------------------------------------------------------------------------- report


def markdown(data: dict[str, Any]) -> str:
    base = data["baseline"]
    header = ["engine", "clients", "tokens/s", "vs sequential", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
              "ITL p99 ms", "latency p50 ms", "latency p99 ms"]

    def row(name: str, clients: Any, r: dict[str, Any]) -> list:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        itl = r.get("itl_ms") or {}
        return [name, clients, f"{r['tokens_per_s']:.1f}", speed, f"{r['ttft_ms']['p50']:.1f}",
                f"{r['ttft_ms']['p99']:.1f}", f"{itl.get('p50', float('nan')):.1f}",
                f"{itl.get('p99', float('nan')):.1f}", f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p99']:.1f}"]

    rows = [row("generate, one request at a time", 1, base)] if base else []
    for label, results in [(data["meta"]["label"], data["serve"]), *data["peers"].items()]:
        rows += [row(label, n, r) for n, r in results.items()]
    return common.markdown_table(header, rows)


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tokens/s (the lower middle of an even count), every round kept beside it."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    common.import_fastsolar("bench/serve.py")
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    args.dtype = str(dtype).replace("torch.", "")
    # The baseline gets the thread count the server gives itself (fastsolar.serve.threads), so both sides of the
    # comparison have the same cores; --threads sets both.
    from fastsolar.serve.threads import server_threads

    args.threads = server_threads(device, args.threads)
    clients = [int(c) for c in args.clients.split(",") if c]
    per_client = args.requests_per_client or (4 if on_cuda else 2)
    prompt_len = args.prompt_len or (512 if on_cuda else 32)
    new_tokens = args.new_tokens or (128 if on_cuda else 32)
    label = "fastsolar serve" if args.url is None else f"server at {args.url}"
    data: dict[str, Any] = {
        "meta": {**common.device_info(device), "device": str(device), "dtype": args.dtype, "clients": clients,
                 "threads": args.threads, "rounds": args.rounds, "label": label,
                 "peers": args.peer_url,
                 "requests_per_client": per_client, "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "greedy": True, "ignore_eos": True, "method": METHOD},
        "baseline": None, "serve": {}, "peers": {}, "complete": False,
    }

    def write() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1, default=str))

    if args.write_checkpoint is not None:
        log.info("writing a %s checkpoint of random weights to %s", args.preset, args.write_checkpoint)
        write_random_checkpoint(args, args.write_checkpoint, device, dtype)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = args.model
        if args.url is None and model_dir is None:
            model_dir = Path(tmp) / "model"
            log.info("writing a %s checkpoint of random weights to %s", args.preset, model_dir)
            data["meta"]["weights"] = {"random": True, **write_random_checkpoint(args, model_dir, device, dtype)}
        elif model_dir is not None:
            data["meta"]["weights"] = {"random": False, "model": str(model_dir)}
        if model_dir is not None:
            from fastsolar.config import SolarConfig

            vocab = SolarConfig.from_pretrained(model_dir).vocab_size
        else:
            vocab = 32000
        prompts = {n: make_prompts(n * per_client, prompt_len, vocab, args.seed + n) for n in clients}
        if model_dir is not None and not args.no_baseline:
            log.info("baseline: %d requests one after another through generate", len(prompts[max(clients)]))
            data["baseline"] = baseline(model_dir, device, dtype, prompts[max(clients)], new_tokens)
            write()
        server = None
        url = args.url
        if url is None:
            server = Server(model_dir, args, max(clients), args.timeout)
            url = server.url
            log.info("server at %s", url)
        targets = [(data["serve"], url, args.model_name, label)]
        for i, peer in enumerate(args.peer_url):
            name = args.peer_label[i] if i < len(args.peer_label) else peer
            model = args.peer_model_name[i] if i < len(args.peer_model_name) else args.model_name
            targets.append((data["peers"].setdefault(name, {}), peer, model, name))
        rounds: dict[tuple[int, int], list[dict[str, Any]]] = {}
        try:
            # Warm-up: staggered lengths visit every batch size up to the largest, so graphs are captured.
            for _, target, model, _ in targets:
                asyncio.run(warm_up(target, model, make_prompts(max(clients), prompt_len, vocab, args.seed - 1),
                                    args.timeout))
            for r in range(args.rounds):
                for n in clients:
                    for t, (results, target, model, name) in enumerate(targets):
                        before = batch_sizes(target)
                        records, wall = asyncio.run(concurrent_run(target, model, prompts[n], n, new_tokens,
                                                                   args.timeout))
                        after = batch_sizes(target)
                        result = summary(records, wall)
                        if before is not None and after is not None:
                            result["decode_steps_by_batch_size"] = {
                                b: after[b] - before.get(b, 0) for b in after if after[b] != before.get(b, 0)}
                        rounds.setdefault((t, n), []).append(result)
                        results[str(n)] = median_round(rounds[(t, n)])
                        log.info("round %d, %s, %d clients: %.1f tokens/s", r + 1, name, n, result["tokens_per_s"])
                        write()
        finally:
            if server is not None:
                data["meta"]["server_exit_code"] = server.stop()
                data["meta"]["server_log_tail"] = server.log[-5:]
    data["complete"] = True
    write()
    print(markdown(data))
    return 0

if __name__ == "__main__":
    sys.exit(main())
