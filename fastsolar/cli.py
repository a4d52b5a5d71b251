"""Command line: `fastsolar <command> ...` (also `python -m fastsolar`).

Commands:
    generate MODEL_DIR --prompt TEXT   stream a completion (`--chat` wraps the prompt in the chat format)
    chat MODEL_DIR                     interactive SOLAR-Instruct chat on stdin / stdout
    upscale BASE_DIR OUT_DIR --drop N  Depth Up-Scaling of a Llama/Mistral checkpoint (`--dry-run` prints the map)
    serve MODEL_DIR                    OpenAI-compatible HTTP server with continuous batching (the `serve` extra)

Adding a command is one function plus one decorator: write `def cmd_x(args) -> int` decorated with
`@command("x", help=..., arguments=add_x_arguments)` where `add_x_arguments(parser)` adds its options.
Errors a user can fix (a wrong path, a bad value) surface as FileNotFoundError / ValueError / TypeError
and are printed as one line, `fastsolar: error: ...`, with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command runs, so --help stays fast
    from fastsolar.api import Solar, Tokenizer, TokenizerFast

logger = logging.getLogger("fastsolar")

PROG = "fastsolar"
EXIT_USAGE = 2


class CLIError(ValueError):
    """A usage error found by argparse or by our own checks."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (`fastsolar: error: ...`) raised to main instead of printed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None],
            description: str | None = None):
    """Register `fn(args) -> exit status` as the subcommand `name`."""

    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, arguments, fn, description or fn.__doc__)
        return fn

    return register


# -- shared options ---------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="checkpoint directory (config.json, *.safetensors, tokenizer.model or tokenizer.json)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto",
                   help="weight dtype: auto (the checkpoint's), float16, bfloat16 or float32")
    p.add_argument("--quantize", default=None, type=str.lower, choices=("fp8", "int8", "int4"),
                   help="quantise the linear layers as they load: fp8 / int8 per output channel (half the memory "
                        "and the bytes read per token), int4 per group of 128 inputs (about a quarter); fp8 needs "
                        "an sm_89+ GPU, int8 and int4 sm_80+")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (one GPU each; gloo on a CPU): starts them itself, or "
                        "takes its rank from torchrun's environment (default 1)")


def _add_sampling_options(p: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int) -> None:
    # No argparse defaults: an option not given comes from the checkpoint's generation_config.json (applied by
    # model.stream), else from the command's own default (_with_defaults).
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else those below)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K likeliest tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass; 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.set_defaults(default_temperature=temperature, default_max_new_tokens=max_new_tokens)


def _check_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (checked), by generate's names."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from fastsolar.decoding.sampling import check_sampling_args

    try:  # the one check generate and the server make too, its message naming the option
        check_sampling_args(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    _check_dtype(args)
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 repetition_penalty=args.repetition_penalty, seed=args.seed)
    return {k: v for k, v in given.items() if v is not None}


def _with_defaults(model: Any, args: argparse.Namespace, sampling: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(options for stream_text, max_new_tokens): the command's own defaults where neither the command line nor
    the model's generation_config (which model.stream applies) sets a value, and its EOS ids."""
    gc = getattr(model, "generation_config", None)  # the tests' stub models have none
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = gc.max_new_tokens if gc is not None and gc.max_new_tokens else args.default_max_new_tokens
    options = dict(sampling)
    if "temperature" not in options and (gc is None or gc.do_sample is None) and args.default_temperature:
        options["temperature"] = args.default_temperature
    if gc is not None and gc.eos_token_id is not None:
        options["eos_token_ids"] = gc.eos_ids()
    return options, max_new


def _check_dtype(args: argparse.Namespace) -> None:
    if args.dtype != "auto":
        from fastsolar.checkpoint.loader import resolve_dtype

        try:
            resolve_dtype(args.dtype)
        except ValueError as e:
            raise ValueError(f"--dtype: {e}") from None


def load_tokenizer(model_dir: str) -> "Tokenizer | TokenizerFast":
    from fastsolar.api import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


def load_model(args: argparse.Namespace) -> "Solar":
    """The model on `--device` in `--dtype`, quantised with `--quantize` (tests replace this with a stub)."""
    from fastsolar.api import Solar

    t0 = time.perf_counter()
    tp = args.tensor_parallel_size
    model = Solar.from_pretrained(args.model_dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                                  quantize=args.quantize, tensor_parallel_size=tp if tp > 1 else None)
    if tp > 1 and args.command != "generate" and model.shard.rank == 0:  # the other ranks follow rank 0's passes
        from fastsolar.parallel.driver import drive

        drive(model)
    logger.info("loaded %s on %s in %.1f s", args.model_dir, model.device, time.perf_counter() - t0)
    return model


def _context_limit(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- generate ---------------------------------------------------------------------------------------

def _generate_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--prompt", "-p", default=None,
                   help="prompt text; '-' or omitted reads it from stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user turn in the model's chat format and stop at its turn markers")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    _add_sampling_options(p, temperature=0.0, max_new_tokens=256)


@command("generate", help="stream a completion of a prompt to stdout", arguments=_generate_arguments)
def cmd_generate(args: argparse.Namespace) -> int:
    """Stream the model's continuation of a prompt to stdout (greedy unless --temperature > 0)."""
    from fastsolar.text.chat import stream_text

    sampling = _check_options(args)
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    tokenizer = load_tokenizer(args.model_dir)
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    stop_strings: tuple[str, ...] = ()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.encode_chat(messages)
        stop_strings = tokenizer.chat_stop_strings
    else:
        ids = tokenizer.encode(prompt)
    model = load_model(args)
    sampling, max_new = _with_defaults(model, args, sampling)
    limit = _context_limit(model)
    if limit is not None:
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
        if len(ids) + max_new > limit:
            max_new = limit - len(ids)
            logger.warning("--max-new-tokens lowered to %d to fit the %d-token context", max_new, limit)
    logger.debug("prompt: %d tokens", len(ids))
    t0 = time.perf_counter()
    n_chars = 0
    for piece in stream_text(model, tokenizer, ids, max_new, stop_strings=stop_strings, **sampling):
        n_chars += len(piece)
        _write(piece)
    _write("\n")
    logger.info("generated %d characters in %.2f s", n_chars, time.perf_counter() - t0)
    return 0


# -- chat -------------------------------------------------------------------------------------------

def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--system", default=None, help="system message that starts the conversation")
    _add_sampling_options(p, temperature=0.7, max_new_tokens=1024)


_CHAT_HELP = "commands: /exit (or end of input) quits, /reset clears the conversation"


def _fit_conversation(tokenizer: Any, messages: list[dict[str, str]], limit: int | None,
                      max_new: int) -> tuple[list[int], int]:
    """Encode the conversation, dropping the oldest turns (never the system message or the newest
    user message) until prompt + reply fit the context; returns (ids, max_new_tokens)."""
    while True:
        ids = tokenizer.encode_chat(messages)
        if limit is None or len(ids) + max_new <= limit:
            return ids, max_new
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first > 1:
            del messages[first]
            if len(messages) - first > 1 and messages[first]["role"] == "assistant":
                del messages[first]
            continue
        if len(ids) < limit:
            return ids, limit - len(ids)
        raise ValueError(f"the message needs {len(ids)} tokens; the model's context is {limit}")


@command("chat", help="interactive chat with a SOLAR-Instruct model", arguments=_chat_arguments)
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the model: each stdin line is a user message; the reply streams to stdout.
    /exit or end of input quits, /reset clears the conversation."""
    from fastsolar.text.chat import stream_text

    sampling = _check_options(args)
    tokenizer = load_tokenizer(args.model_dir)
    model = load_model(args)
    sampling, max_new_tokens = _with_defaults(model, args, sampling)
    limit = _context_limit(model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(_CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write(">>> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids, max_new = _fit_conversation(tokenizer, messages, limit, max_new_tokens)
        except ValueError as e:
            messages.pop()
            print(f"{PROG}: error: {e}", file=sys.stderr)
            continue
        reply: list[str] = []
        try:
            for piece in stream_text(model, tokenizer, ids, max_new, stop_strings=tokenizer.chat_stop_strings,
                                     cuda_graphs=False if args.tensor_parallel_size > 1 else None, **sampling):
                reply.append(piece)
                _write(piece)
        except KeyboardInterrupt:
            _write("\n")
            messages.pop()  # the interrupted turn is forgotten
            # A driven tensor-parallel pass cannot be abandoned halfway (the other ranks wait in its collectives):
            # there an interrupt ends the chat, and the launcher ends the ranks.
            if not interactive or args.tensor_parallel_size > 1:
                raise
            continue
        _write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


# -- upscale -----------------------------------------------------------------------------------------

def _upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base_dir", metavar="BASE_DIR", help="Hugging Face model directory (safetensors) of the base model")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory for the up-scaled checkpoint")
    p.add_argument("--drop", type=int, default=8, help="layers dropped from each copy (default 8)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the layer map; write nothing")
    p.add_argument("--max-shard-size", default="5GB", help="shard size limit, e.g. 5GB (default)")


@command("upscale", arguments=_upscale_arguments,
         help="depth-up-scale a Llama/Mistral checkpoint (how SOLAR-10.7B was made from Mistral-7B)")
def cmd_upscale(args: argparse.Namespace) -> int:
    """Depth Up-Scaling: stack base layers 0..n-drop-1 and drop..n-1 into a deeper checkpoint; prints the map."""
    from fastsolar.checkpoint.upscale import upscale

    mapping = upscale(
        args.base_dir, args.out_dir, drop=args.drop, dry_run=args.dry_run, max_shard_size=args.max_shard_size
    )
    for new_i, base_i in enumerate(mapping):
        _write(f"new {new_i} <- base {base_i}\n")
    _write(f"dry run: {len(mapping)} layers, nothing written\n" if args.dry_run
           else f"wrote {args.out_dir} ({len(mapping)} layers)\n")
    return 0


# -- serve -------------------------------------------------------------------------------------------

SERVE_MAX_BATCH = 8  # cache rows without --max-batch / --gpu-memory-utilization
SERVE_MAX_ROWS = 256  # vLLM's default --max-num-seqs: the cap on rows --gpu-memory-utilization sizes

def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    # The second names are vLLM's, so that its command lines work here.
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=None, metavar="N",
                   help=f"requests decoded together: rows of the KV cache (default {SERVE_MAX_BATCH}; with "
                        f"--gpu-memory-utilization as many as fit, at most this or {SERVE_MAX_ROWS})")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a row; beyond that new requests get 429 (default 64)")
    p.add_argument("--max-seq", "--max-model-len", dest="max_seq", type=int, default=None, metavar="N",
                   help="prompt + completion tokens per request (default: the model's context)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="size the KV cache so that weights + cache + activations take this fraction of the "
                        "device's total memory (on CPU: of the machine's RAM, or the container's limit)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="the chat template for /v1/chat/completions: a file, or the Jinja text itself "
                        "(default: the checkpoint's, else SOLAR-Instruct's)")
    p.add_argument("--max-n", type=int, default=8, metavar="N",
                   help="most choices (`n`) one request may ask for, each a row of the batch (default 8)")
    p.add_argument("--api-key", default=os.environ.get("FASTSOLAR_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FASTSOLAR_API_KEY, else none)")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", default=None,
                   help="the model id clients send and /v1/models lists (default: MODEL_DIR's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds in-flight requests get to finish at SIGINT/SIGTERM; then they end with an error "
                        "(a 503, or an SSE error event and [DONE])")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="torch's intra-op threads (default on a CPU: $OMP_NUM_THREADS if set, else cores - 1, "
                        "leaving a core to the HTTP loop)")


def _set_chat_template(tokenizer: Any, value: str) -> None:
    """`--chat-template`: a file's text, or `value` itself when it is Jinja; checked by rendering one turn."""
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        template = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    tokenizer.chat_template = template
    try:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    except ValueError as e:  # render_chat_template's: a Jinja error or the template's own raise_exception
        raise ValueError(f"--chat-template does not render a user turn: {e}") from None


@command("serve", help="OpenAI-compatible HTTP server with continuous batching", arguments=_serve_arguments)
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP with OpenAI's API (POST /v1/chat/completions, /v1/completions; GET /v1/models,
    /health, /metrics, /stats), decoding concurrent requests together. SIGINT / SIGTERM shut it down cleanly."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_n < 1:
        raise ValueError(f"--max-n must be at least 1, got {args.max_n}")
    if args.max_seq is not None and args.max_seq < 2:
        raise ValueError(f"--max-seq must be at least 2, got {args.max_seq}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise ValueError(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    _check_dtype(args)
    try:
        from fastsolar.serve.api import create_app
        from fastsolar.serve.server import run
    except ImportError as e:
        raise CLIError(f"fastsolar serve needs the serve extra ({e.name} is not installed): "
                       "pip install 'fastsolar[serve]'") from None
    from fastsolar.serve.engine import Engine
    from fastsolar.serve.threads import server_threads

    if not args.verbose:  # a server's log: one line per request, startup and shutdown
        logging.getLogger(PROG).setLevel(logging.INFO)
    tokenizer = load_tokenizer(args.model_dir)
    if args.chat_template is not None:
        _set_chat_template(tokenizer, args.chat_template)
    model = load_model(args)
    max_batch = SERVE_MAX_BATCH if args.max_batch is None else args.max_batch
    if args.gpu_memory_utilization is not None:
        from fastsolar.serve.sizing import rows_that_fit

        context = args.max_seq or model.config.max_position_embeddings
        fit = rows_that_fit(model, args.gpu_memory_utilization, context)
        max_batch = min(fit, SERVE_MAX_ROWS if args.max_batch is None else args.max_batch)
        logger.info("--gpu-memory-utilization %g: %d cache rows fit, using %d", args.gpu_memory_utilization, fit,
                    max_batch)
    server_threads(model.device, args.cpu_threads)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=args.max_queue, max_seq=args.max_seq,
                    max_n=args.max_n, cuda_graphs=False if args.tensor_parallel_size > 1 else None)  # driven ranks run eagerly
    engine.start()  # here, so that a cache that does not fit is a one-line error, not a failed app startup
    name = args.model_name or Path(args.model_dir).resolve().name
    logger.info("serving %s as '%s': max batch %d, max queue %d, context %d%s", args.model_dir, name,
                max_batch, args.max_queue, engine.context, ", API key required" if args.api_key else "")
    run(create_app(engine, tokenizer, name, api_key=args.api_key), args.host, args.port,
        shutdown_timeout=args.shutdown_timeout)
    return 0


# -- entry point ------------------------------------------------------------------------------------

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastsolar")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="fastsolar: a lean runtime for SOLAR-10.7B")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        _add_common(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage / input error, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(args.verbose)
        if getattr(args, "device", None) is not None:  # a missing device is named before anything is read
            from fastsolar.devices import resolve_device

            resolve_device(args.device)
        if getattr(args, "tensor_parallel_size", 1) != 1:
            return _tensor_parallel(args, list(sys.argv[1:] if argv is None else argv))
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, TypeError, MemoryError) as e:
        sys.stdout.flush()
        lines = str(e).strip().splitlines() or [type(e).__name__]
        more = f" (+{len(lines) - 1} more lines: rerun with -v)" if len(lines) > 1 else ""
        print(f"{PROG}: error: {lines[0]}{more}", file=sys.stderr)
        logger.debug("details", exc_info=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _tensor_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command as rank 0 of --tensor-parallel-size ranks: under torchrun as the rank its environment
    names, else starting ranks 1..N-1 itself (fastsolar.parallel.launch; a rank that fails ends them all)."""
    from fastsolar.config import SolarConfig
    from fastsolar.model.sharding import ShardSizes
    from fastsolar.parallel import launch

    ShardSizes.of(SolarConfig.from_pretrained(args.model_dir), args.tensor_parallel_size)  # before any rank starts
    if "RANK" in os.environ:
        import torch.distributed as dist

        try:
            return _rank(args)
        finally:  # torchrun's ranks leave the group they joined (left to exit, gloo and NCCL may abort)
            if dist.is_initialized():
                dist.destroy_process_group()
    if args.command == "generate" and args.prompt in (None, "-"):  # only this process has the terminal
        args.prompt = sys.stdin.read()
        argv = [*argv, "--prompt", args.prompt]
    with launch.ranks_beside(_follower, (argv,), nprocs=args.tensor_parallel_size):
        return _rank(args)


def _follower(argv: list[str]) -> int:
    """A spawned rank 1..N-1 (module level: spawned processes import it)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return _rank(args)


def _rank(args: argparse.Namespace) -> int:
    """One rank of the group: `generate` runs everywhere (same prompt, same tokens; rank 0 prints); `chat` and
    `serve` run on rank 0, whose model passes the other ranks follow (fastsolar.parallel.driver)."""
    from fastsolar.parallel import init_from_env
    from fastsolar.parallel.driver import follow, release

    tp = init_from_env()
    if tp.world_size != args.tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} does not match the {tp.world_size} "
                         "ranks torchrun started")
    if args.command == "generate":
        if tp.rank != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank's process
        return int(args._run(args) or 0)
    if tp.rank != 0:
        follow(load_model(args))
        return 0
    code = int(args._run(args) or 0)
    release(tp)  # after a failure the launcher (or torchrun) ends the other ranks instead
    return code


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
