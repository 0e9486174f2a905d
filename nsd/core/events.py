"""Tenant events (created, changed, removed) fanned out to Watch streams.

Each watcher has a bounded queue: one that does not read is dropped (it gets
WatcherTooSlow) rather than making nsd buffer without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nsd.errors import ShuttingDown, WatcherTooSlow
from nsd.model import Fault, TenantEvent, TenantView

WATCH_QUEUE = 1024  # events buffered per watcher before it is dropped as too slow


class TenantEvents:
    def __init__(self, queue_size: int = WATCH_QUEUE) -> None:
        self._queue_size = queue_size
        self._watchers: set[asyncio.Queue[TenantEvent | None]] = set()
        self._closed = False

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[TenantEvent]]:
        """Events from now on, while the context is open (subscribe, then list the
        existing tenants: nothing falls in between)."""
        queue: asyncio.Queue[TenantEvent | None] = asyncio.Queue(self._queue_size)
        self._watchers.add(queue)
        try:
            yield self._drain(queue)
        finally:
            self._watchers.discard(queue)

    async def _drain(self, queue: asyncio.Queue[TenantEvent | None]) -> AsyncIterator[TenantEvent]:
        while True:
            event = await queue.get()
            if event is None:
                if self._closed:
                    raise ShuttingDown()
                raise WatcherTooSlow()
            yield event

    def backlog(self) -> int:
        """Events queued for the watcher furthest behind (0 without watchers)."""
        return max((q.qsize() for q in self._watchers), default=0)

    def emit(self, kind: str, view: TenantView, fault: Fault | None = None) -> None:
        event = TenantEvent(kind, view, fault)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A watcher that does not read must not make nsd buffer forever.
                self._watchers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    def close(self) -> None:
        """End every stream with ShuttingDown (the daemon stops)."""
        self._closed = True
        for queue in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
