"""Running the app under uvicorn: bind, serve, and shut down cleanly on SIGINT / SIGTERM.

Shutdown is uvicorn's graceful one: the listening socket closes (no new connections), idle connections
close, in-flight requests get `shutdown_timeout` seconds to finish (then uvicorn cancels them, which
cancels their engine requests), and the app's lifespan then stops the engine thread. A second Ctrl-C
forces the exit.
"""
from __future__ import annotations

import logging
import signal
import socket
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("fastsolar.serve")


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
                shutdown_timeout: float = 30.0) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for `app` and its bound socket (port 0 picks a free port: read it off the socket)."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                            log_config=None, log_level="info", access_log=False, lifespan="on")
    return uvicorn.Server(config), config.bind_socket()


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
