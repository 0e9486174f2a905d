"""Namespace descriptors nsd handed out that may not have reached their process yet.

Enter answers with an open descriptor of the tenant's namespace. Until the caller
has read that reply, no scan of ``/proc`` can see the descriptor: it is held by nsd
itself, queued in nsd's output, or in the socket between the two. A Remove that
scanned during that window found nobody, tore the namespace down and reported
success, and the caller then joined the torn-down namespace (no veth, no mount,
invisible to every later check). So every descriptor is recorded here from the
moment it is opened until the peer has read the reply that carries it, and Remove
waits for its tenant's records to land before it scans.

Why that is enough: a record is made in the same loop turn in which the
descriptor is opened, and Remove first bars new descriptors for the tenant
(``TenantManager._removing`` and the tenant's lock), then waits here. When it
continues, every descriptor nsd ever handed out for the tenant is in some process's
descriptor table, or that process has joined the namespace, or it was closed:
the scan of namespaces *and* open descriptors in ``procs`` sees the first two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from nsd.net.procs import start_time

__all__ = ["Handout", "Handouts"]

# How often Remove looks again while a reply is unread. The kernel offers no event
# for "the peer has read everything" (EPOLLOUT reports free space, not an empty
# queue), so this is polled; a peer that is alive reads its reply within
# microseconds, so the first or second look normally finds it landed.
_POLL = 0.005


@dataclass(eq=False)
class Handout:
    """One descriptor on its way to a process."""

    uid: int
    # What of the reply the peer has not read, nsd's own hold on the descriptor
    # (the call running, the reply not yet queued) counting as unread: 0 once the
    # reply was read (or dropped with the connection); None when that can no
    # longer be observed (nsd closed the connection with the reply unread).
    unread: Callable[[], int | None]
    # The receiving process, asked only when ``unread`` cannot tell: once it has
    # exited nothing it received can still be used. Its start time, read at the
    # first such look, tells a reused PID apart (a PID reused before that look
    # only makes Remove wait longer); no pidfd is kept, so records cost no
    # descriptors, and the common path reads nothing from /proc.
    pid: int | None
    started: int | None = None

    def landed(self) -> bool:
        unread = self.unread()
        if unread is not None:
            return unread == 0
        if self.pid is None:
            return True
        now = start_time(self.pid)
        if self.started is None:
            self.started = now
        return now is None or now != self.started


class Handouts:
    """Descriptors in flight, by tenant UID. Only the event loop's thread uses it."""

    def __init__(self) -> None:
        self._by_uid: dict[int, list[Handout]] = {}

    def add(self, uid: int, unread: Callable[[], int | None], pid: int | None) -> Handout:
        """Record a descriptor being handed out to process ``pid``. ``unread`` must
        count nsd's own hold on it too (the call still running, the reply not yet
        given to the server's connection)."""
        self._prune(uid)
        handout = Handout(uid, unread, pid)
        self._by_uid.setdefault(uid, []).append(handout)
        return handout

    def discard(self, handout: Handout) -> None:
        """The descriptor is being closed without being sent."""
        pending = self._by_uid.get(handout.uid, [])
        if handout in pending:
            pending.remove(handout)
            if not pending:
                del self._by_uid[handout.uid]

    def in_flight(self, uid: int) -> int:
        self._prune(uid)
        return len(self._by_uid.get(uid, ()))

    async def wait_landed(self, uid: int, timeout: float) -> int:
        """Wait until every descriptor of ``uid`` landed; how many had not after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.in_flight(uid)) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
        return left

    def _prune(self, uid: int) -> None:
        pending = self._by_uid.get(uid)
        if pending is None:
            return
        pending[:] = [h for h in pending if not h.landed()]
        if not pending:
            del self._by_uid[uid]
