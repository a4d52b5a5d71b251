"""The HTTP surface: OpenAI's chat and text completion endpoints over an `Engine`, on FastAPI.

    POST /v1/chat/completions   messages rendered with the checkpoint's chat template (SOLAR-Instruct's by
                                default); its turn headers are stop strings besides the request's own
    POST /v1/completions        a prompt string (encoded with bos, as `tokenizer(text)` does) or token ids
    GET  /v1/models             the one model served
    GET  /health                200 while the server runs
    GET  /metrics               Prometheus metrics under vLLM's names (fastsolar.serve.metrics)
    GET  /stats                 running / queued requests, totals, aggregate tokens/s, decode steps per batch
                                size (JSON: `Engine.metrics()`)

`response_format` (json_object / json_schema) is compiled into a grammar (fastsolar.serve.grammar) that the
engine enforces token by token; a schema it cannot enforce is a 400 naming what is unsupported.

With an API key, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health, /metrics and
/stats stay open for probes. `stream: true` answers server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`; both forms come from the same engine events, so the streamed text is the whole text. A
client that goes away cancels its request: Starlette cancels a stream when the connection drops, and a
non-streamed request polls for the disconnect while it waits.

`n` choices answer with indexes 0..n-1 (streamed chunks carry theirs); `usage` counts the prompt once and
every choice's completion tokens. Logprobs (fastsolar.serve.logprobs) come with the text they belong to:
in the whole response for all of it, in each streamed chunk for that chunk's tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event

from fastsolar.decoding.sampling import RowParams
from fastsolar.serve import errors
from fastsolar.serve.engine import Engine, EngineClosed, InvalidRequest, Output, QueueFull
from fastsolar.serve.engine import Request as EngineRequest
from fastsolar.serve.errors import APIError
from fastsolar.serve.grammar import GrammarError, Grammars
from fastsolar.serve.logprobs import Formatter, TokenLogprob
from fastsolar.serve.mailbox import Mailbox
from fastsolar.serve.metrics import ServeMetrics
from fastsolar.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

if TYPE_CHECKING:
    from fastsolar.text.tokenizer import SentencePieceTokenizer as Tokenizer

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


class _Events:
    """One submitted request's Outputs, handed from the engine thread to this event loop."""

    def __init__(self, engine: Engine, request: EngineRequest, prompt_param: str, mailbox: Mailbox) -> None:
        self.loop = asyncio.get_running_loop()
        self.n = request.n
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.mailbox = mailbox
        try:
            self.ticket = engine.submit(request, self._put, mailbox.flush)
        except InvalidRequest as e:
            param = prompt_param if e.param == "prompt" else e.param
            raise APIError(400, str(e), param=param, code=e.code) from None
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except EngineClosed as e:
            raise APIError(503, str(e), code="shutting_down") from None

    def _put(self, out: Output) -> None:  # engine thread
        self.mailbox.put(self.queue, out)

    async def stream(self) -> AsyncIterator[Output]:
        """Every choice's Outputs as they come, until each has finished (or one failed)."""
        finished = 0
        try:
            while True:
                out = await self.queue.get()
                yield out
                if out.error is not None:
                    return
                finished += out.finish_reason is not None
                if finished == self.n:
                    return
        finally:
            self.ticket.cancel()  # a no-op once finished; frees the rows when the client went away

    async def collect(self, request: Request) -> list[Output] | None:
        """Wait for the whole reply: one Output per choice, by index (or the one that failed); None when the
        client disconnected first."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]
        done: dict[int, Output] = {}
        next_check = self.loop.time() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    out = await asyncio.wait_for(self.queue.get(), max(0.0, next_check - self.loop.time()))
                except TimeoutError:
                    out = None
                if self.loop.time() >= next_check:  # checked on a clock: outputs may arrive without pause
                    if await request.is_disconnected():
                        return None
                    next_check = self.loop.time() + DISCONNECT_POLL_S
                if out is None:
                    continue
                if out.error is not None:
                    return [out]
                parts[out.index].append(out.text)
                logprobs[out.index].extend(out.logprobs)
                if out.finish_reason is not None:
                    done[out.index] = out
                if len(done) == self.n:
                    return [dataclasses.replace(done[i], text="".join(parts[i]), logprobs=tuple(logprobs[i]))
                            for i in range(self.n)]
        finally:
            self.ticket.cancel()


def _usage(finals: list[Output]) -> dict[str, int]:
    """The prompt once (the choices share it), every choice's completion tokens."""
    prompt, completion = finals[0].prompt_tokens, sum(o.completion_tokens for o in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_status(out: Output) -> APIError:
    shutting = "shutting down" in (out.error or "")
    return APIError(503 if shutting else 500, out.error or "generation failed")


class _Shape:
    """OpenAI's response objects for one endpoint: chat ("chat.completion") or text ("text_completion").
    `logprobs`: the request's Formatter, None without logprobs; a stream's text offsets per choice are kept
    here, so the streamed logprobs add up to the whole response's."""

    def __init__(self, chat: bool, rid: str, model: str, logprobs: Formatter | None = None) -> None:
        self.chat, self.rid, self.model, self.created = chat, rid, model, int(time.time())
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}

    def _wrap(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _logprobs(self, index: int, items: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return self.logprobs.chat(items)
        body, self._offsets[index] = self.logprobs.completion(items, self._offsets.get(index, 0))
        return body

    def _choice(self, index: int, text: str | None, finish: str | None, *, delta: bool,
                logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        lp = self._logprobs(index, logprobs) if (logprobs or finish is None or not delta) else None
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if delta:
            body = {} if text is None else {"content": text}
            return {"index": index, "delta": body, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish}

    def whole(self, finals: list[Output]) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        choices = [self._choice(o.index, o.text, o.finish_reason, delta=False, logprobs=o.logprobs) for o in finals]
        return self._wrap(obj, choices, usage=_usage(finals))

    def chunk(self, index: int, text: str | None, finish: str | None = None, *, role: bool = False,
              logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        choice = self._choice(index, text, finish, delta=True, logprobs=logprobs)
        if role:
            choice["delta"]["role"] = "assistant"
            choice["logprobs"] = None
        return self._wrap(obj, [choice])

    def usage_chunk(self, finals: list[Output]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._wrap(obj, [], usage=_usage(finals))


def _sse(data: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


async def _sse_stream(events: _Events, shape: _Shape, include_usage: bool) -> AsyncIterator[bytes]:
    if shape.chat:
        for i in range(events.n):
            yield _sse(shape.chunk(i, "", role=True))
    finals: list[Output] = []
    async for out in events.stream():
        if out.error is not None:
            yield _sse(_error_status(out).body())
            break
        if out.text or out.logprobs:
            yield _sse(shape.chunk(out.index, out.text, logprobs=out.logprobs))
        if out.finish_reason is not None:
            yield _sse(shape.chunk(out.index, None if shape.chat else "", out.finish_reason))
            finals.append(out)
            if include_usage and len(finals) == events.n:
                yield _sse(shape.usage_chunk(finals))
    yield _sse("[DONE]")


def _sampling(body: GenerationRequest, defaults: dict[str, Any]) -> RowParams:
    """The request's sampling; what it leaves out comes from `defaults` (the model's generation_config.json,
    GenerationConfig.sampling_defaults), else OpenAI's (temperature 1) and the neutral values."""
    def pick(value: Any, name: str, neutral: Any) -> Any:
        return value if value is not None else defaults.get(name, neutral)

    return RowParams(
        temperature=pick(body.temperature, "temperature", 1.0),
        top_k=pick(body.top_k, "top_k", None),
        top_p=pick(body.top_p, "top_p", None),
        repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        # Unseeded requests draw a fresh seed: the counter-based noise is then as random as any.
        seed=secrets.randbits(64) if body.seed is None else body.seed,
    )


def create_app(engine: Engine, tokenizer: "Tokenizer", model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts the engine and stops it at shutdown. `app.state.engine`
    is the engine (fastsolar.serve.server drains it when shutdown begins)."""
    grammars = Grammars(tokenizer, engine.vocab_size, sorted(engine.eos))
    prometheus = ServeMetrics(engine, model_name)

    box: list[Mailbox] = []  # the engine's events into the serving loop (made on it; a new loop, a new box)

    def mailbox() -> Mailbox:
        loop = asyncio.get_running_loop()
        if not box or box[0].loop is not loop:
            box[:] = [Mailbox(loop)]
        return box[0]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.step is None:
            await anyio.to_thread.run_sync(engine.start)
        try:
            yield
        finally:
            # uvicorn has already let in-flight responses finish (or cancelled them after its grace period).
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="fastsolar", summary="OpenAI-compatible server for SOLAR", lifespan=lifespan)
    generation_config = getattr(engine.model, "generation_config", None)  # a Solar's; a bare Transformer has none
    sampling_defaults = generation_config.sampling_defaults() if generation_config is not None else {}
    app.state.engine = engine
    errors.install(app)
    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def generate(body: GenerationRequest, request: Request, ids: list[int], stop: tuple[str, ...], chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        constraint = None
        if body.response_format is not None and body.response_format.type != "text":
            try:  # off the event loop: a large schema's grammar takes a while to build
                constraint = await anyio.to_thread.run_sync(grammars.constraint, body.response_format.grammar_input())
            except GrammarError as e:
                raise APIError(400, str(e), param=e.param) from None
        k = body.logprob_count
        ereq = EngineRequest(id=rid, prompt=ids, max_tokens=body.token_budget, sampling=_sampling(body, sampling_defaults),
                             stop=stop, ignore_eos=body.ignore_eos, user=body.user, constraint=constraint,
                             n=body.n or 1, logprobs=k)
        events = _Events(engine, ereq, "messages" if chat else "prompt", mailbox())
        shape = _Shape(chat, rid, model_name, None if k is None else Formatter(tokenizer, k))
        if body.stream:
            return EventSourceResponse(_sse_stream(events, shape, body.include_usage),
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = await events.collect(request)
        if finals is None:  # the client is gone; nobody reads this
            return JSONResponse(errors.error_body("client disconnected"), status_code=499)
        if finals[0].error is not None:
            raise _error_status(finals[0])
        return JSONResponse(shape.whole(finals))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        # The template's turn headers end free text; a constrained reply ends where its grammar does.
        constrained = body.response_format is not None and body.response_format.type != "text"
        stop = tuple(body.stop or ()) + (() if constrained else tuple(tokenizer.chat_stop_strings))
        return await generate(body, request, ids, stop, chat=True)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return await generate(body, request, ids, tuple(body.stop or ()), chat=False)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "fastsolar", "max_model_len": engine.context}]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(prometheus.render(), media_type=prometheus.content_type)

    @app.get("/stats")
    async def stats():
        return engine.metrics()

    return app
