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

Constrained rows (`Request.constraint`: a grammar matcher, `fastsolar.serve.grammar`) write the tokens they
allow into the step's token mask before each prefill and decode (`fastsolar.serve.token_mask`: a device bitmask
the step applies to the logits before sampling; free rows allow everything); each accepted token advances the
matcher, and the row ends ("stop") as soon as its grammar is complete and nothing else may follow, or at an EOS,
which the mask allows only where the grammar is complete. An `observer` (`add_observer`) hears of each step's
tokens and each request's end, on the engine thread (the Prometheus metrics, `fastsolar.serve.metrics`).

A request with `n` choices runs as n rows of the batch (n tickets of one group, admitted together): the
prompt is prefilled once, in the first choice's row, and its KV cache copied to its siblings' rows
(`DecodeSession.copy_rows`); choice i samples with the request's seed + i, as row i of a `generate` call
with that seed does. A request with `logprobs` gets each token's logprob and its step's top 20 (the
sampler computes them on the device inside the step; fastsolar.serve.logprobs formats them).

Prefill is not chunked: a long prompt delays the running requests' next token by its prefill time.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from fastsolar.decoding.graphs import CudaGraphStep
from fastsolar.decoding.logprobs import MAX_TOP_LOGPROBS
from fastsolar.decoding.sampling import MODE_FLAGS, RowParams, Sampler, check_sampling_args
from fastsolar.decoding.session import DecodeSession
from fastsolar.model import check_token_ids
from fastsolar.serve.token_mask import MaskedSampler, TokenMask
from fastsolar.serve.logprobs import TokenLogprob
from fastsolar.serve.transfer import ToHost, to_device
from fastsolar.text.chat import TextStream

if TYPE_CHECKING:
    from fastsolar.text.tokenizer import SentencePieceTokenizer as Tokenizer

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill call (one prompt is always admitted, whatever its length)
RATE_WINDOW_S = 10.0  # the aggregate tokens/s of `metrics()` is measured over this window
MAX_N = 8  # default bound on a request's choices (`n`), each a row of the batch
_LOGPROBS = MODE_FLAGS.index("logprobs")


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


class Constraint(Protocol):
    """A request's grammar state (fastsolar.serve.grammar.Constraint): what the engine needs of it."""

    finished: bool  # complete, and nothing but EOS may follow

    def copy(self) -> "Constraint": ...  # an independent matcher in the same state

    def fill(self, row: torch.Tensor) -> None: ...  # the allowed next tokens, as one int32 bitmask row

    def advance(self, token: int) -> None: ...  # accept a token (RuntimeError if the grammar refuses it)


class Observer(Protocol):
    """What hears of the engine's work, on the engine thread (must not block)."""

    def on_tokens(self, prompt_tokens: int, new_tokens: int, first_token_s: Sequence[float],
                  inter_token_s: Sequence[float]) -> None:
        """A prefill's or a decode step's tokens reached the host: its prompt tokens (once per request), the
        tokens generated, each request's time from submission to its first token, each running choice's time
        since its previous token."""

    def on_finish(self, reason: str, prompt_tokens: int, choice_tokens: int, e2e_s: float,
                  first_token_s: float | None) -> None:
        """A request ended: reason "stop", "length", "abort" (its client went away) or "error";
        `choice_tokens` is its longest choice's token count (the steps it ran)."""


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
    constraint: Constraint | None = None  # a grammar matcher at its start; each row advances its own copy
    n: int = 1  # choices: rows sharing one prefill, choice i sampling with seed + i
    logprobs: int | None = None  # None: no logprobs; k in 0..20: each token's logprob and the k most likely


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
    index: int = 0  # which of the request's n choices
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind `text` (with request.logprobs)


Sink = Callable[[Output], None]
Flush = Callable[[], None]


@dataclass
class Launched:
    """A queued prefill or decode step: its requests in batch order and their sampled tokens on the way to the
    host (processed one iteration later, while the next step runs)."""

    tickets: list["Ticket"]
    tokens: ToHost
    logprobs: tuple[ToHost, ToHost, ToHost] | None = None  # chosen [b], top [b, 20], their ids [b, 20]
    prompt_tokens: int = 0  # a prefill's prompt tokens, once per request


class Choices(list):
    """A request's tickets, one per choice (`n`), with what they share: one cancel flag (a single write, so a
    cancel from the event loop is never seen half done) and whether the request's end was recorded."""

    cancelled = False
    ended = False


class Ticket:
    """A submitted request's state, owned by the engine thread; `cancel()` is the one call safe from any
    thread (the engine drops the request at its next step and frees its row)."""

    def __init__(self, request: Request, max_tokens: int, sink: Sink, text: TextStream, index: int = 0,
                 flush: Flush | None = None) -> None:
        self.request = request
        self.max_tokens = max_tokens
        self.sink = sink
        self.flush = flush
        self.text = text
        self.index = index  # the choice this ticket generates
        self.group = Choices([self])  # the request's choices, this one among them
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text has not been emitted yet
        self.error: str | None = None
        self.reason: str | None = None  # how this choice ended ("abort": dropped after a cancel)
        self.done = False
        self.row = -1
        self.pos = 0  # cache position of the next decode input
        self.launched = 0  # tokens asked of the device (prefill and steps), some perhaps not yet processed
        self.generated = 0  # tokens processed on the host
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = 0.0  # when its latest token came
        self.constraint = request.constraint.copy() if request.constraint is not None else None

    def cancel(self) -> None:
        """Cancel the request: every one of its choices."""
        self.group.cancelled = True

    @property
    def cancelled(self) -> bool:
        return self.group.cancelled

    @property
    def sampling(self) -> RowParams:
        """This choice's sampling: the request's, with seed + index, and logprobs when asked for."""
        s = self.request.sampling
        return dataclasses.replace(s, seed=s.seed + self.index, logprobs=self.request.logprobs is not None)

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        out, self.logprobs = tuple(self.logprobs), []
        return out


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
        max_n: int = MAX_N,
    ) -> None:
        config = model.config
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
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
        self.max_n = max_n
        self.context = max_seq or context
        self.cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.prefill_tokens = prefill_tokens
        self.vocab_size = config.vocab_size
        # The checkpoint's generation_config.json, when the model has one, sets the EOS ids and the default
        # max_tokens (a Solar's; a bare Transformer has none).
        generation = getattr(model, "generation_config", None)
        eos = generation.eos_ids() if generation is not None and generation.eos_token_id is not None else None
        self.eos = frozenset(config.eos_token_ids if eos is None else eos) or frozenset({tokenizer.eos_id})
        self.default_max_tokens = generation.max_new_tokens if generation is not None else None
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
        self.mask: TokenMask | None = None
        self._masked: MaskedSampler | None = None
        self._observers: list[Observer] = []
        self._last: torch.Tensor | None = None  # [max_batch] the last sampled token of each cache row (device)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        # Its own session: its cache rows and graphs are the engine's alone; a graph per batch size and mode
        # (the sampler's modes, each with and without a token mask).
        self.session = DecodeSession(self.model, self.max_batch, self.context, max_graphs=max(16, 16 * self.max_batch))
        self.sampler = Sampler(self.max_batch, self.vocab_size, self.model.device, coarse_modes=True)
        self.mask = TokenMask(self.max_batch, self.vocab_size, self.model.device)
        self._masked = MaskedSampler(self.mask, self.sampler)
        self.step = CudaGraphStep(self.session, self._masked, capture=self.cuda_graphs)
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

    def add_observer(self, observer: Observer) -> None:
        """`observer` hears of every step's tokens and every request's end from now on."""
        with self._cond:
            self._observers.append(observer)

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
            m = self.context - n if self.default_max_tokens is None else min(self.default_max_tokens, self.context - n)
        elif isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {m!r}", "max_tokens")
        elif n + m > self.context:
            raise InvalidRequest(
                f"the prompt has {n} tokens and max_tokens is {m}: {n + m} tokens exceed the model's context "
                f"of {self.context} tokens", "max_tokens", "context_length_exceeded")
        s = request.sampling
        try:
            check_sampling_args(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                repetition_penalty=s.repetition_penalty, seed=s.seed,
                                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)
        except ValueError as e:
            raise InvalidRequest(str(e), str(e).split()[0]) from None
        n = request.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_n:
            raise InvalidRequest(f"n must be an integer in [1, {self.max_n}] (the server's --max-n), got {n!r}", "n")
        if n > self.max_batch:
            raise InvalidRequest(f"n={n} choices need {n} rows of the batch, but the server decodes at most "
                                 f"{self.max_batch} rows (--max-batch)", "n")
        k = request.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"logprobs (top logprobs per token) must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                                 f"got {k!r}", "logprobs")
        if any(not isinstance(x, str) or not x for x in request.stop):
            raise InvalidRequest("stop strings must be non-empty strings", "stop")
        return m

    def submit(self, request: Request, sink: Sink, flush: Flush | None = None) -> Ticket:
        """Queue a request; `sink` receives its Outputs on the engine thread (it must not block). `flush`, if
        given, is called once the events of a step (or a request's last event) are all given to the sinks, so
        that a sink may buffer them and hand them on together (fastsolar.serve.mailbox)."""
        max_tokens = self.validate(request)
        group = Choices(Ticket(request, max_tokens, sink, TextStream(self.tokenizer, request.stop, request.prompt), i,
                               flush) for i in range(request.n))
        for t in group:
            t.group = group
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down" if self._thread else "the engine is not started")
            if len(self._active) + len(self._waiting) + len(group) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity: {len(self._active)} rows running (max batch "
                    f"{self.max_batch}) and {len(self._waiting)} waiting (max queue {self.max_queue}); retry later")
            self._waiting.extend(group)  # a group stays together in the queue: it is admitted at once
            self.stats["requests_submitted"] += 1
            self._cond.notify_all()
        return group[0]

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
                    # A grammar's mask for the next call needs the token its row just drew: while a constrained
                    # row runs, each call's tokens are processed before the next call is queued (no overlap).
                    sync = any(t.constraint is not None for t in self._active)
                    if sync:
                        for item in pending:
                            self._process(item)
                        pending = []
                    launched: list[Launched] = []
                    queue = self._process if sync else launched.append
                    if admitted:
                        queue(self._prefill(admitted))
                    self._drop_cancelled()
                    batch = [t for t in self._active if t.launched < t.max_tokens]
                    if batch:
                        queue(self._decode(batch))
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
                t.done, t.reason = True, "abort"
                self._ended(t)
            self._cond.notify_all()

    def _admit(self) -> list[Ticket]:
        """Waiting requests that get a row now, within the prefill token budget (caller holds the lock)."""
        taken: list[Ticket] = []
        width = prompts = 0
        while self._waiting:
            group = self._waiting[0].group  # at the head of the queue, with all its choices
            if len(group) > self.max_batch - len(self.session.rows_in_use):
                break
            w = max(width, len(group[0].request.prompt))
            if taken and (prompts + 1) * w > self.prefill_tokens:
                break
            for t in group:
                self._waiting.popleft()
                (t.row,) = self.session.claim(1)
                self.rows_used.add(t.row)
                self._active.append(t)
                taken.append(t)
            width, prompts = w, prompts + 1
        return taken

    def _prefill(self, tickets: list[Ticket]) -> Launched:
        """Queue the prefill of each request's prompt, once (in its first choice's row), the copy of its cache
        rows to the other choices' rows, and every choice's first token; processed next iteration."""
        device = self.model.device
        firsts = [t for t in tickets if t.index == 0]
        lens = [len(t.request.prompt) for t in firsts]
        width = max(lens)
        for t in tickets:
            self.sampler.assign(t.row, t.sampling, t.request.prompt)
        ids = to_device([list(t.request.prompt) + [0] * (width - n) for t, n in zip(firsts, lens)], device)
        seqlens, first_rows = to_device([lens, [t.row for t in firsts]], device)
        logits = self.session.prefill(ids, seqlens, rows=first_rows)
        for t, n in zip(firsts, lens):
            if len(t.group) > 1:
                self.session.copy_rows(t.row, [s.row for s in t.group[1:]], n)
        if len(firsts) < len(tickets):  # each choice samples from its request's prompt logits
            which = {id(t): i for i, t in enumerate(firsts)}
            logits = logits[to_device([which[id(t.group[0])] for t in tickets], device)]
        host_rows = [t.row for t in tickets]
        rows = to_device(host_rows, device)
        self.sampler.select(rows, host_rows)
        self.mask.set([t.constraint and t.constraint.fill for t in tickets])
        tokens = self._masked(logits)
        self._last.index_copy_(0, rows, tokens)
        for t in tickets:
            t.pos, t.launched = len(t.request.prompt), 1
        self.stats["prompt_tokens"] += sum(lens)  # once per request, not per choice
        return Launched(tickets, ToHost(tokens), self._logprobs_to_host(len(tickets)), sum(lens))

    def _decode(self, batch: list[Ticket]) -> Launched:
        """Queue one decode step of `batch`; its input tokens are the rows' last tokens, read on the device."""
        host_rows = [t.row for t in batch]
        inp = to_device([[t.pos for t in batch], host_rows], self.model.device)
        positions, rows = inp[0], inp[1]
        self.sampler.select(rows, host_rows)
        self.mask.set([t.constraint and t.constraint.fill for t in batch])
        tokens = self.step(self._last.index_select(0, rows), positions, rows)
        self._last.index_copy_(0, rows, tokens)
        for t in batch:
            t.pos += 1
            t.launched += 1
        self._count_step(len(batch))
        return Launched(batch, ToHost(tokens), self._logprobs_to_host(len(batch)))

    def _process(self, item: Launched) -> None:
        """A queued call's tokens, now on the host, for the requests still running (a request that ended at
        the previous token had one more step queued: that token is dropped here)."""
        tokens = item.tokens.tolist()
        logprobs = self._logprobs(item, tokens)
        now = time.perf_counter()
        live = [(t, tok, lp) for t, tok, lp in zip(item.tickets, tokens, logprobs) if not t.done]
        self._count(now, len(live))
        for obs in self._observers:
            # A request's first token is its first choice's (the choices are prefilled together).
            obs.on_tokens(item.prompt_tokens, len(live),
                          [now - t.t_submit for t, _, _ in live if t.generated == 0 and t.index == 0],
                          [now - t.t_last for t, _, _ in live if t.generated > 0])
        for t, tok, lp in live:
            self._accept(t, tok, now, lp)
        for flush in {t.flush for t, _, _ in live if t.flush is not None}:
            self._flush(flush)

    def _logprobs_to_host(self, b: int) -> tuple[ToHost, ToHost, ToHost] | None:
        """The last sampler call's logprob outputs for its `b` rows, on their way to the host, when some row
        asked for them (the sampler overwrites its buffers at the next call)."""
        if not self.sampler.mode[_LOGPROBS]:
            return None
        return ToHost(self.sampler.logprob[:b]), ToHost(self.sampler.top_logprobs[:b]), ToHost(self.sampler.top_ids[:b])

    def _logprobs(self, item: Launched, tokens: list[int]) -> list[TokenLogprob | None]:
        """Each row's TokenLogprob for `tokens` (item's sampled tokens), with its request's k top ones; None for
        rows that did not ask."""
        if item.logprobs is None:
            return [None] * len(item.tickets)
        chosen, top, ids = (x.tolist() for x in item.logprobs)
        return [None if (k := t.request.logprobs) is None else
                TokenLogprob(tokens[i], chosen[i], tuple(zip(ids[i][:k], top[i][:k])))
                for i, t in enumerate(item.tickets)]

    def _accept(self, t: Ticket, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """One new token for a running request: emit its text, or end it."""
        if t.t_first is None:
            t.t_first = now
        t.generated += 1
        t.t_last = now
        constraint = t.constraint
        if constraint is not None and token not in self.eos:
            try:
                constraint.advance(token)
            except RuntimeError as e:  # the mask let through a token the grammar refuses: fail this request only
                logger.error("%s: %s", t.request.id, e)
                self._finish(t, "error", "", error="internal error: the output left its response_format grammar")
                return
        if token in self.eos and (constraint is not None or not t.request.ignore_eos):
            tail, _ = t.text.finish()
            self._finish(t, "stop", tail)
            return
        if logprob is not None:  # with the token's text, whenever that is emitted
            t.logprobs.append(logprob)
        text, stopped = t.text.push(token)
        if stopped or (constraint is not None and constraint.finished):
            tail = t.text.finish()[0] if not stopped else ""
            self._finish(t, "stop", text + tail)
        elif t.generated >= t.max_tokens:
            tail, stopped = t.text.finish()
            self._finish(t, "stop" if stopped else "length", text + tail)
        elif text:
            self._emit(t, Output(text, t.generated, len(t.request.prompt), index=t.index,
                                 logprobs=t.take_logprobs()))

    def _drop_cancelled(self) -> None:
        for t in [t for t in self._active if t.cancelled]:
            self._release(t)
            t.reason = "abort"
            self._ended(t)

    def _finish(self, t: Ticket, reason: str, text: str, error: str | None = None) -> None:
        self._emit(t, Output(text, t.generated, len(t.request.prompt), finish_reason=reason, error=error,
                             index=t.index, logprobs=t.take_logprobs()))
        if t.flush is not None:
            self._flush(t.flush)
        with self._cond:
            if t in self._waiting:
                self._waiting.remove(t)
        self._release(t)
        t.error = error
        if error is None:
            self.stats["completion_tokens"] += t.generated
        t.reason = reason
        self._ended(t)

    def _ended(self, t: Ticket) -> None:
        """Record the end of `t`'s request, once, when its last choice is done (whichever way each ended): the
        counters, the observers and the request's one log line. An error in any choice makes it "error", a
        choice dropped after a cancel "abort", else it is the reason its last choice ended with."""
        group = t.group
        if group.ended or not all(s.done for s in group):
            return
        group.ended = True
        generated = sum(s.generated for s in group)
        errors = [s.error for s in group if s.error is not None]
        reason = "error" if errors else "abort" if any(s.reason == "abort" for s in group) else t.reason
        now = time.perf_counter()
        t_first = min((s.t_first for s in group if s.t_first is not None), default=None)
        for obs in self._observers:
            obs.on_finish(reason, len(t.request.prompt), max(s.generated for s in group), now - t.t_submit,
                          None if t_first is None else t_first - t.t_submit)
        if errors:
            self.stats["requests_failed"] += 1
            logger.warning("%s: failed after %d tokens: %s", t.request.id, generated, errors[0])
            return
        if reason == "abort":
            self.stats["requests_cancelled"] += 1
            logger.info("%s: cancelled after %d tokens", t.request.id, generated)
            return
        self.stats["requests_finished"] += 1
        ttft = (t_first or now) - t.t_submit
        later = generated - len(group)  # tokens after each choice's first
        rate = later / (now - t_first) if t_first is not None and later > 0 else 0.0
        user = f" (user {t.request.user!r})" if t.request.user is not None else ""
        choices = f" in {len(group)} choices" if len(group) > 1 else ""
        logger.info("%s: %s, prompt %d tokens, completion %d tokens%s, time to first token %.3f s, %.1f tokens/s, "
                    "total %.3f s%s", t.request.id, reason, len(t.request.prompt), generated, choices, ttft, rate,
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
