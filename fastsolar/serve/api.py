"""The HTTP surface: OpenAI's chat and text completion endpoints over an `Engine`, on FastAPI.

    POST /v1/chat/completions   messages rendered with the checkpoint's chat template (SOLAR-Instruct's by
                                default); its turn headers are stop strings besides the request's own
    POST /v1/completions        a prompt string (encoded with bos, as `tokenizer(text)` does) or token ids
    GET  /v1/models             the one model served
    GET  /health                200 while the server runs
    GET  /metrics               running / queued requests, totals, aggregate tokens/s (JSON)

With an API key, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health and /metrics
stay open for probes. `stream: true` answers server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`; both forms come from the same engine events, so the streamed text is the whole text. A
client that goes away cancels its request: Starlette cancels a stream when the connection drops, and a
non-streamed request polls for the disconnect while it waits.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event

from fastsolar.decoding.sampling import RowParams
from fastsolar.serve import errors
from fastsolar.serve.engine import Engine, EngineClosed, InvalidRequest, Output, QueueFull
from fastsolar.serve.engine import Request as EngineRequest
from fastsolar.serve.errors import APIError
from fastsolar.serve.mailbox import Mailbox
from fastsolar.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

if TYPE_CHECKING:
    from fastsolar.text.tokenizer import SentencePieceTokenizer as Tokenizer

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


class _Events:
    """One submitted request's Outputs, handed from the engine thread to this event loop."""

    def __init__(self, engine: Engine, request: EngineRequest, prompt_param: str, mailbox: Mailbox) -> None:
        self.loop = asyncio.get_running_loop()
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
        try:
            while True:
                out = await self.queue.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.ticket.cancel()  # a no-op once finished; frees the row when the client went away

    async def collect(self, request: Request) -> Output | None:
        """Wait for the whole reply as one Output; None when the client disconnected first."""
        parts: list[str] = []
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
                parts.append(out.text)
                if out.finish_reason is not None:
                    return Output("".join(parts), out.completion_tokens, out.prompt_tokens, out.finish_reason,
                                  out.error)
        finally:
            self.ticket.cancel()


def _usage(out: Output) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _error_status(out: Output) -> APIError:
    shutting = "shutting down" in (out.error or "")
    return APIError(503 if shutting else 500, out.error or "generation failed")


class _Shape:
    """OpenAI's response objects for one endpoint: chat ("chat.completion") or text ("text_completion")."""

    def __init__(self, chat: bool, rid: str, model: str) -> None:
        self.chat, self.rid, self.model, self.created = chat, rid, model, int(time.time())

    def _wrap(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _choice(self, text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            body = {} if text is None else {"content": text}
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, out: Output) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return self._wrap(obj, [self._choice(out.text, out.finish_reason, delta=False)], usage=_usage(out))

    def chunk(self, text: str | None, finish: str | None = None, *, role: bool = False) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        choice = self._choice(text, finish, delta=True)
        if role:
            choice["delta"]["role"] = "assistant"
        return self._wrap(obj, [choice])

    def usage_chunk(self, out: Output) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._wrap(obj, [], usage=_usage(out))


def _sse(data: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


async def _sse_stream(events: _Events, shape: _Shape, include_usage: bool) -> AsyncIterator[bytes]:
    if shape.chat:
        yield _sse(shape.chunk("", role=True))
    async for out in events.stream():
        if out.error is not None:
            yield _sse(_error_status(out).body())
            break
        if out.text:
            yield _sse(shape.chunk(out.text))
        if out.finish_reason is not None:
            yield _sse(shape.chunk(None if shape.chat else "", out.finish_reason))
            if include_usage:
                yield _sse(shape.usage_chunk(out))
    yield _sse("[DONE]")


def _sampling(body: GenerationRequest) -> RowParams:
    return RowParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        # Unseeded requests draw a fresh seed: the counter-based noise is then as random as any.
        seed=secrets.randbits(64) if body.seed is None else body.seed,
    )


def create_app(engine: Engine, tokenizer: "Tokenizer", model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts the engine and stops it at shutdown."""

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
        ereq = EngineRequest(id=rid, prompt=ids, max_tokens=body.token_budget, sampling=_sampling(body),
                             stop=stop, ignore_eos=body.ignore_eos, user=body.user)
        events = _Events(engine, ereq, "messages" if chat else "prompt", mailbox())
        shape = _Shape(chat, rid, model_name)
        if body.stream:
            return EventSourceResponse(_sse_stream(events, shape, body.include_usage),
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = await events.collect(request)
        if out is None:  # the client is gone; nobody reads this
            return JSONResponse(errors.error_body("client disconnected"), status_code=499)
        if out.error is not None:
            raise _error_status(out)
        return JSONResponse(shape.whole(out))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        stop = tuple(body.stop or ()) + tuple(tokenizer.chat_stop_strings)
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
        return engine.metrics()

    return app
