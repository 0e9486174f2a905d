"""One operation per tenant at a time, and a way to wait until none is running.

The manager holds a tenant's lock for every change to it (create, remove, limits,
bandwidth, reconcile's repair); shutdown refuses new operations and waits for the
running ones, so a tenant is never cut off mid-build by nsd's own exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nsd.errors import ShuttingDown, TenantLocked


class TenantLocks:
    def __init__(self) -> None:
        # Per-UID locks with a user count: a lock leaves the dict only when no
        # operation holds or awaits it (asyncio.Lock's waiter list is not a
        # reliable signal: wait_for() enqueues the acquire one loop turn later).
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self.closed = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        """UIDs with a lock held or awaited."""
        return len(self._locks)

    def busy(self, uid: int) -> bool:
        """Whether an operation holds or awaits ``uid``'s lock."""
        return uid in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, uid: int, name: str, timeout: float) -> AsyncIterator[None]:
        """The lock of tenant ``uid``; TenantLocked after ``timeout`` seconds."""
        if self.closed:
            raise ShuttingDown()
        lock, users_of_lock = self._locks.get(uid, (asyncio.Lock(), 0))
        self._locks[uid] = (lock, users_of_lock + 1)
        self._inflight += 1
        self._idle.clear()
        try:
            if users_of_lock == 0:
                # Nobody holds or awaits it: acquire() takes it without suspending;
                # wait_for would wrap it in a task and a loop turn (reconcile takes
                # 1,000 such locks at a restart).
                await lock.acquire()
            else:
                try:
                    await asyncio.wait_for(lock.acquire(), timeout)
                except TimeoutError:
                    raise TenantLocked(name) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users_of_lock = self._locks[uid]
            if users_of_lock == 1:
                del self._locks[uid]
            else:
                self._locks[uid] = (lock, users_of_lock - 1)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def close(self, timeout: float) -> bool:
        """Refuse new operations; wait for the running ones. True if all finished."""
        self.closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
