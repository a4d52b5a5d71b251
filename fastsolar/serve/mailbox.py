"""Engine events handed to the HTTP event loop with one wake-up per batch of events, not one per event.

The engine thread produces an event per request per step; `loop.call_soon_threadsafe` for each writes to the
loop's self-pipe every time (about 12 us per event measured with the loop thread awake, and each write hands the
GIL to the loop thread: the engine's host work per step doubled at 64 rows). A Mailbox queues (queue, event)
pairs under a lock and `flush()` (which the engine calls once a step's events are all out) schedules one drain
on the loop; the drain moves them into their asyncio queues in order. Each request's events keep their order:
one producer thread, one FIFO.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any


class Mailbox:
    """`put(queue, item)` then `flush()` from any thread; the items reach `queue.put_nowait` on `loop`, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Queue `item` for `queue`; it is delivered after the next `flush()`."""
        with self._lock:
            self._items.append((queue, item))

    def flush(self) -> None:
        """Wake the loop to deliver what is queued (one wake-up however many items; none when nothing waits)."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
