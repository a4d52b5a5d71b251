"""Running the app under uvicorn: bind, serve, and shut down cleanly on SIGINT / SIGTERM.

Shutdown: the listening socket closes (no new connections), idle connections close, and in-flight requests
get `shutdown_timeout` seconds to finish. When shutdown begins, the app's engine (`app.state.engine`) is told
to stop after that drain time (`Engine.stop(drain)`): whatever still runs then ends with an error, which each
request answers in OpenAI's shape -- a 503 `{"error": {...}}`, or for a stream an SSE event
`data: {"error": {...}}` then `data: [DONE]` -- so every client gets a well-formed ending, every time.
uvicorn's own graceful timeout (which would cancel the handlers mid-response) is set SHUTDOWN_MARGIN_S later,
as a backstop only. The app's lifespan then stops the engine thread. A second Ctrl-C forces the exit.
"""
from __future__ import annotations

import logging
import signal
import socket
from contextlib import contextmanager

import anyio
import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("fastsolar.serve")

SHUTDOWN_MARGIN_S = 5.0  # after the drain, how long handlers get to answer before uvicorn cancels them


class _DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown first asks the app's engine to end its requests after `drain` s."""

    def __init__(self, config: uvicorn.Config, drain: float) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        engine = getattr(getattr(self.config.app, "state", None), "engine", None)
        if engine is None:
            await super().shutdown(sockets)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, engine.stop, self.drain)
            await super().shutdown(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
                shutdown_timeout: float = 30.0) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for `app` and its bound socket (port 0 picks a free port: read it off the socket)."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_MARGIN_S,
                            log_config=None, log_level="info", access_log=False, lifespan="on")
    return _DrainingServer(config, shutdown_timeout), config.bind_socket()


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def _signals_end_quietly():
    """uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal once shut down (so that the
    process's previous handler decides). Our previous handler is a no-op: a graceful stop exits 0."""
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0) -> None:
    """Serve `app` until SIGINT / SIGTERM (main thread), then shut down gracefully."""
    server, sock = make_server(app, host, port, shutdown_timeout=shutdown_timeout)
    logger.info("listening on %s (Ctrl-C stops)", address(sock))
    with _signals_end_quietly():
        server.run(sockets=[sock])
    logger.info("shut down")
