"""Continuous batching: one thread owns the model and serves every request from one static KV cache.

Each running request lives in its own row of the engine's own decode session (`DecodeSession(model, max_batch,
context)`: its KV cache, graphs and row allocation, shared with no other user of the model). The loop:

1. admit: waiting requests claim free rows and are prefilled together (right-padded, `session.prefill(...,
   rows=)`, at most `prefill_tokens` padded tokens per prefill so a burst of long prompts cannot exhaust
   memory); the logits of each prompt's last token give its first token at once;
2. decode: all running requests advance one token in one step, batch row i mapped onto its cache row
   through a device tensor -- `fastsolar.decoding.graphs.CudaGraphStep`, which on CUDA replays one captured graph
   per batch size (and sampling mode) and elsewhere runs the same static-buffer path eagerly;
3. a request leaves at its EOS, a stop string or `max_tokens` (or when its client cancels, at the next
   step); its row is free for the next admission.

Host work overlaps the device: each iteration queues its prefill and its decode step first, and only then
turns the previous iteration's tokens into text (detokenization, stop strings, delivery to the sinks). The
step's input tokens never visit the host: the last token of every cache row stays on the device (`_last`,
written by each prefill and step, read by the next step), and sampled tokens come back through pinned memory
behind an event (`fastsolar.serve.transfer`), so on CUDA step k+1 runs while step k's tokens are processed.
The host therefore learns that a request ended one step late: a request that met its EOS or a stop string has
already been given one more step, whose token is discarded (never emitted, never counted). `max_tokens` is
known ahead, so a request is never stepped past it, and a position never leaves the cache.

So a new request joins the running batch at the next step instead of waiting for the batch to drain.
Sampling state is per cache row (`fastsolar.decoding.sampling.Sampler`, the one generate uses): each request
keeps its own parameters and seed, and greedy
requests get exactly what `generate` gives them alone. Text is produced here too (`chat.TextStream`: stop
strings must end a row as soon as they appear); each event goes to the request's `sink` callback, called
on the engine thread.

Prefill is not chunked: a long prompt delays the running requests' next token by its prefill time.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fastsolar.decoding.graphs import CudaGraphStep
from fastsolar.decoding.sampling import RowParams, Sampler, check_sampling_args
from fastsolar.decoding.session import DecodeSession
from fastsolar.model import check_token_ids
from fastsolar.serve.transfer import ToHost, to_device
from fastsolar.text.chat import TextStream

if TYPE_CHECKING:
    from fastsolar.text.tokenizer import SentencePieceTokenizer as Tokenizer

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill call (one prompt is always admitted, whatever its length)
RATE_WINDOW_S = 10.0  # the aggregate tokens/s of `metrics()` is measured over this window


class InvalidRequest(ValueError):
    """A request the engine cannot run, with the OpenAI-style parameter it concerns."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is at its bound."""


class EngineClosed(RuntimeError):
    """The engine is shutting down (or never started) and takes no new requests."""


@dataclass(frozen=True)
class Request:
    """What to generate: prompt token ids, a token budget (None: whatever fits the context), sampling."""

    id: str
    prompt: Sequence[int]
    max_tokens: int | None = None
    sampling: RowParams = field(default_factory=RowParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    user: str | None = None  # the client's end-user id (OpenAI's `user`), only logged


@dataclass(frozen=True, slots=True)  # slots: one is made per request per step
class Output:
    """One event for a request: new text, and on the last one why it ended.

    finish_reason: None while running; "stop" (EOS or a stop string), "length" (max_tokens) or "error"
    (then `error` says why: an engine failure or shutdown).
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    error: str | None = None


Sink = Callable[[Output], None]
Flush = Callable[[], None]


@dataclass
class Launched:
    """A queued prefill or decode step: its requests in batch order and their sampled tokens on the way to the
    host (processed one iteration later, while the next step runs)."""

    tickets: list["Ticket"]
    tokens: ToHost


class Ticket:
    """A submitted request's state, owned by the engine thread; `cancel()` is the one call safe from any
    thread (the engine drops the request at its next step and frees its row)."""

    def __init__(self, request: Request, max_tokens: int, sink: Sink, text: TextStream,
                 flush: Flush | None = None) -> None:
        self.request = request
        self.max_tokens = max_tokens
        self.sink = sink
        self.flush = flush
        self.text = text
        self.cancelled = False
        self.done = False
        self.row = -1
        self.pos = 0  # cache position of the next decode input
        self.launched = 0  # tokens asked of the device (prefill and steps), some perhaps not yet processed
        self.generated = 0  # tokens processed on the host
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The continuous-batching loop for one model; see the module docstring.

    `start()` allocates the cache and starts the thread; `submit(request, sink)` validates and queues a request
    (raising InvalidRequest, QueueFull or EngineClosed); `stop(drain)` lets running requests finish for up
    to `drain` seconds, cancels the rest and joins the thread. `cuda_graphs`: None means on CUDA.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: "Tokenizer",
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq: int | None = None,
        cuda_graphs: bool | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        config = model.config
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        context = config.max_position_embeddings
        if max_seq is not None and not 2 <= max_seq <= context:
            raise ValueError(f"max_seq must be in [2, {context}] (the model's context), got {max_seq!r}")
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this model is on {model.device}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = max_seq or context
        self.cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.prefill_tokens = prefill_tokens
        self.vocab_size = config.vocab_size
        self.eos = frozenset(config.eos_token_ids) or frozenset({tokenizer.eos_id})
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._active: list[Ticket] = []
        self._accepting = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._t_start = time.perf_counter()
        # Keys fixed up front: metrics() copies the counters from another thread.
        self.stats = collections.Counter(dict.fromkeys(
            ("requests_submitted", "requests_finished", "requests_cancelled", "requests_failed", "prompt_tokens",
             "completion_tokens", "decode_steps"), 0))
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode steps per batch size
        self.rows_used: set[int] = set()
        self.session: DecodeSession | None = None
        self.sampler: Sampler | None = None
        self.step = None
        self._last: torch.Tensor | None = None  # [max_batch] the last sampled token of each cache row (device)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        # Its own session: its cache rows and graphs are the engine's alone; a graph per batch size and mode.
        self.session = DecodeSession(self.model, self.max_batch, self.context, max_graphs=max(16, 4 * self.max_batch))
        self.sampler = Sampler(self.max_batch, self.vocab_size, self.model.device, coarse_modes=True)
        self.step = CudaGraphStep(self.session, self.sampler, capture=self.cuda_graphs)
        self._last = torch.zeros(self.max_batch, dtype=torch.int64, device=self.model.device)
        self._accepting = True
        self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="fastsolar-engine", daemon=True)
        self._thread.start()
        logger.info("engine started: %d rows x %d positions on %s (CUDA graphs: %s)", self.max_batch,
                    self.context, self.model.device, self.cuda_graphs)
        return self

    def stop(self, drain: float = 0.0, join_timeout: float = 30.0) -> None:
        """Stop accepting; wait up to `drain` s for running and queued requests to finish; cancel the rest."""
        deadline = time.monotonic() + drain
        with self._cond:
            self._accepting = False
            while (self._active or self._waiting) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %.0f s", join_timeout)

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, request: Request) -> int:
        """Check a request against the model; returns its max_tokens (the default filled in)."""
        prompt = list(request.prompt)
        n = len(prompt)
        if n == 0:
            raise InvalidRequest("the prompt is empty: at least one token is needed", "prompt")
        try:
            check_token_ids(prompt, self.vocab_size)
        except ValueError as e:
            raise InvalidRequest(str(e), "prompt") from None
        if n >= self.context:
            raise InvalidRequest(
                f"the prompt has {n} tokens but the model's context is {self.context} tokens, which leaves no "
                "room for a completion", "prompt", "context_length_exceeded")
        m = request.max_tokens
        if m is None:
            m = self.context - n
        elif isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {m!r}", "max_tokens")
        elif n + m > self.context:
            raise InvalidRequest(
                f"the prompt has {n} tokens and max_tokens is {m}: {n + m} tokens exceed the model's context "
                f"of {self.context} tokens", "max_tokens", "context_length_exceeded")
        s = request.sampling
        try:
            check_sampling_args(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                repetition_penalty=s.repetition_penalty, seed=s.seed)
        except ValueError as e:
            raise InvalidRequest(str(e), str(e).split()[0]) from None
        if any(not isinstance(x, str) or not x for x in request.stop):
            raise InvalidRequest("stop strings must be non-empty strings", "stop")
        return m

    def submit(self, request: Request, sink: Sink, flush: Flush | None = None) -> Ticket:
        """Queue a request; `sink` receives its Outputs on the engine thread (it must not block). `flush`, if
        given, is called once the events of a step (or a request's last event) are all given to the sinks, so
        that a sink may buffer them and hand them on together (fastsolar.serve.mailbox)."""
        max_tokens = self.validate(request)
        ticket = Ticket(request, max_tokens, sink, TextStream(self.tokenizer, request.stop, request.prompt), flush)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down" if self._thread else "the engine is not started")
            if len(self._active) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity: {len(self._active)} requests running (max batch "
                    f"{self.max_batch}) and {len(self._waiting)} waiting (max queue {self.max_queue}); retry later")
            self._waiting.append(ticket)
            self.stats["requests_submitted"] += 1
            self._cond.notify_all()
        return ticket

    def metrics(self) -> dict:
        """Running and queued requests, totals, and the aggregate generation rate over the last window."""
        now = time.perf_counter()
        with self._cond:
            running, queued = len(self._active), len(self._waiting)
            while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
                self._rate.popleft()
            recent = sum(n for _, n in self._rate)
            stats = dict(self.stats)
            batch_sizes = dict(sorted(self.batch_sizes.items()))
        window = min(RATE_WINDOW_S, max(now - self._t_start, 1e-9))
        return {
            "running": running, "queued": queued, "max_batch": self.max_batch, "max_queue": self.max_queue,
            "tokens_per_second": recent / window,
            **{k: stats[k] for k in ("requests_submitted", "requests_finished", "requests_cancelled",
                                     "requests_failed", "decode_steps")},
            "prompt_tokens_total": stats["prompt_tokens"], "completion_tokens_total": stats["completion_tokens"],
            "decode_steps_by_batch_size": batch_sizes,
            "graphs_recorded": self.step.pool.captures if self.step is not None else 0,
            "cuda_graphs": self.cuda_graphs,
        }

    # -- the loop (engine thread) -------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[Launched] = []  # queued last iteration, processed in this one
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._reap_waiting()
                    while not self._closed and not self._waiting and not self._active and not pending:
                        self._cond.wait()
                        self._reap_waiting()
                    if self._closed:
                        break
                    admitted = self._admit()
                try:
                    launched = [self._prefill(admitted)] if admitted else []
                    self._drop_cancelled()
                    batch = [t for t in self._active if t.launched < t.max_tokens]
                    if batch:
                        launched.append(self._decode(batch))
                    for item in pending:  # the device runs `launched` meanwhile
                        self._process(item)
                    pending = launched
                except Exception as e:  # a failed step must not kill the server: fail its requests, go on
                    logger.exception("engine step failed")
                    pending = []
                    for t in list(self._active):  # admitted requests are among them
                        self._finish(t, "error", "", error=f"internal error: {type(e).__name__}: {e}")
            for t in list(self._active) + list(self._waiting):
                self._finish(t, "error", "", error="the server is shutting down")

    def _reap_waiting(self) -> None:
        """Drop queued requests whose clients went away (caller holds the lock)."""
        if any(t.cancelled for t in self._waiting):
            for t in [t for t in self._waiting if t.cancelled]:
                self._waiting.remove(t)
                t.done = True
                self.stats["requests_cancelled"] += 1
                logger.info("%s: cancelled while queued", t.request.id)
            self._cond.notify_all()

    def _admit(self) -> list[Ticket]:
        """Waiting requests that get a row now, within the prefill token budget (caller holds the lock)."""
        taken: list[Ticket] = []
        width = 0
        while self._waiting and len(self.session.rows_in_use) < self.max_batch:
            nxt = self._waiting[0]
            w = max(width, len(nxt.request.prompt))
            if taken and (len(taken) + 1) * w > self.prefill_tokens:
                break
            self._waiting.popleft()
            (nxt.row,) = self.session.claim(1)
            self.rows_used.add(nxt.row)
            self._active.append(nxt)
            taken.append(nxt)
            width = w
        return taken

    def _prefill(self, tickets: list[Ticket]) -> Launched:
        """Queue the prompts' prefill; their first tokens are processed next iteration."""
        device = self.model.device
        lens = [len(t.request.prompt) for t in tickets]
        width = max(lens)
        for t in tickets:
            self.sampler.assign(t.row, t.request.sampling, t.request.prompt)
        host_rows = [t.row for t in tickets]
        ids = to_device([list(t.request.prompt) + [0] * (width - n) for t, n in zip(tickets, lens)], device)
        seqlens, rows = to_device([lens, host_rows], device)
        self.sampler.select(rows, host_rows)
        tokens = self.sampler(self.session.prefill(ids, seqlens, rows=rows))
        self._last.index_copy_(0, rows, tokens)
        for t, n in zip(tickets, lens):
            t.pos, t.launched = n, 1
            self.stats["prompt_tokens"] += n
        return Launched(tickets, ToHost(tokens))

    def _decode(self, batch: list[Ticket]) -> Launched:
        """Queue one decode step of `batch`; its input tokens are the rows' last tokens, read on the device."""
        host_rows = [t.row for t in batch]
        inp = to_device([[t.pos for t in batch], host_rows], self.model.device)
        positions, rows = inp[0], inp[1]
        self.sampler.select(rows, host_rows)
        tokens = self.step(self._last.index_select(0, rows), positions, rows)
        self._last.index_copy_(0, rows, tokens)
        for t in batch:
            t.pos += 1
            t.launched += 1
        self._count_step(len(batch))
        return Launched(batch, ToHost(tokens))

    def _process(self, item: Launched) -> None:
        """A queued call's tokens, now on the host, for the requests still running (a request that ended at
        the previous token had one more step queued: that token is dropped here)."""
        tokens = item.tokens.tolist()
        live = [(t, tok) for t, tok in zip(item.tickets, tokens) if not t.done]
        self._count(time.perf_counter(), len(live))
        for t, tok in live:
            self._accept(t, tok)
        for flush in {t.flush for t, _ in live if t.flush is not None}:
            self._flush(flush)

    def _accept(self, t: Ticket, token: int) -> None:
        """One new token for a running request: emit its text, or end it."""
        if t.t_first is None:
            t.t_first = time.perf_counter()
        t.generated += 1
        if token in self.eos and not t.request.ignore_eos:
            tail, _ = t.text.finish()
            self._finish(t, "stop", tail)
            return
        text, stopped = t.text.push(token)
        if stopped:
            self._finish(t, "stop", text)
        elif t.generated >= t.max_tokens:
            tail, stopped = t.text.finish()
            self._finish(t, "stop" if stopped else "length", text + tail)
        elif text:
            self._emit(t, Output(text, t.generated, len(t.request.prompt)))

    def _drop_cancelled(self) -> None:
        for t in [t for t in self._active if t.cancelled]:
            self._release(t)
            self.stats["requests_cancelled"] += 1
            logger.info("%s: cancelled after %d tokens", t.request.id, t.generated)

    def _finish(self, t: Ticket, reason: str, text: str, error: str | None = None) -> None:
        self._emit(t, Output(text, t.generated, len(t.request.prompt), finish_reason=reason, error=error))
        if t.flush is not None:
            self._flush(t.flush)
        with self._cond:
            if t in self._waiting:
                self._waiting.remove(t)
        self._release(t)
        if error is not None:
            self.stats["requests_failed"] += 1
            logger.warning("%s: failed after %d tokens: %s", t.request.id, t.generated, error)
            return
        self.stats["requests_finished"] += 1
        self.stats["completion_tokens"] += t.generated
        now = time.perf_counter()
        ttft = (t.t_first or now) - t.t_submit
        rate = (t.generated - 1) / (now - t.t_first) if t.t_first is not None and t.generated > 1 else 0.0
        user = f" (user {t.request.user!r})" if t.request.user is not None else ""
        logger.info("%s: %s, prompt %d tokens, completion %d tokens, time to first token %.3f s, %.1f tokens/s, "
                    "total %.3f s%s", t.request.id, reason, len(t.request.prompt), t.generated, ttft, rate,
                    now - t.t_submit, user)

    def _release(self, t: Ticket) -> None:
        """Take a request out of the batch and free its row (engine thread)."""
        t.done = True
        with self._cond:
            if t in self._active:
                self._active.remove(t)
                self.session.release([t.row])
                self.sampler.release(t.row)
            self._cond.notify_all()

    def _emit(self, t: Ticket, out: Output) -> None:
        if t.done:
            return
        try:
            t.sink(out)
        except Exception:  # a sink that cannot take events (its event loop is gone) means its client is gone
            logger.debug("%s: sink failed; cancelling", t.request.id, exc_info=True)
            t.cancel()

    def _flush(self, flush: Flush) -> None:
        try:
            flush()
        except Exception:  # its event loop is gone: its clients are gone, and their sinks cancel them
            logger.debug("flush failed", exc_info=True)

    def _count(self, now: float, n: int) -> None:
        with self._cond:
            self._rate.append((now, n))

    def _count_step(self, batch: int) -> None:
        with self._cond:
            self.stats["decode_steps"] += 1
            self.batch_sizes[batch] += 1
