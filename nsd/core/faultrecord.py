"""Turning limit events into fault records: counter, journal, Watch event, store.

nsd.observe.faultwatch reports new kernel events per tenant and kind as they happen.
Every event counts at once in ``nsd_tenant_faults_total``. Records are
coalesced: a tenant sitting at its limit makes the kernel report ``max`` or
``high`` up to a hundred times a second, and a record with a process snapshot
for each would cost more than the fault. So per tenant and kind at most one
record per ``faults.coalesce`` seconds: the first event is recorded at once, the
ones after it within the window become one record at the window's end, carrying
their ``count``.

Recording runs in one task on the event loop, in steps of a few milliseconds with
a yield in between (see record_due), and the records of a step are
stored in one transaction, so a burst of faults does not hold up the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from nsd.config import FaultsConfig
from nsd.core.events import WATCH_QUEUE
from nsd.core.store import Store
from nsd.model import Fault, ProcessSample
from nsd.observe.faults import CONNTRACK, DropTracker, limit_and_value, snapshot_processes
from nsd.observe.faultwatch import STEP, FaultWatcher
from nsd.systemd.journal import WARNING, Journal

log = logging.getLogger("nsd.faults")

#: faults stored in one transaction at most
COMMIT_BATCH = 64
#: journal records and Watch events sent per step: each costs about 0.25 ms of the
#: loop with its Watch reply (1,000 tenants); 16 per step held the loop for 5 ms
ANNOUNCE_STEP = 4
#: a burst waits while a Watch client is this many events behind ...
PACE_BACKLOG = WATCH_QUEUE // 4
#: ... for this many seconds at most per burst
PACE_WAIT = 2.0


@dataclass
class _Pending:
    uid: int
    name: str
    slice_dir: str  # "" when the tenant has no slice (no process snapshot then)
    kind: str
    count: int
    due: float
    #: (limit, value) known when the fault was seen; None: read from the slice's files
    measured: tuple[int | None, int | None] | None = None


class FaultRecorder:
    """Counts, coalesces and records faults; ``emit`` gets each stored fault (the
    manager's Watch event)."""

    def __init__(
        self,
        store: Store,
        cfg: FaultsConfig,
        emit: Callable[[Fault], None],
        *,
        journal: Journal | None = None,
        proc_root: str = "/proc",
        clock: Callable[[], float] = time.time,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self._backlog = backlog
        self.cfg = cfg
        self._emit = emit
        self._journal = journal if journal is not None else Journal()
        self._proc_root = proc_root
        self._clock = clock
        #: (tenant, uid, kind) -> kernel events counted
        self.counts: dict[tuple[str, int, str], int] = {}
        self._pending: dict[tuple[int, str], _Pending] = {}
        self._last: dict[tuple[int, str], float] = {}
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self.recorded = 0

    def on_faults(
        self,
        uid: int,
        name: str,
        slice_dir: str,
        new: list[tuple[str, int]],
        measured: tuple[int | None, int | None] | None = None,
    ) -> None:
        """New events of ``uid``; ``measured``: their (limit, value) when the caller knows
        them (conntrack), else they are read from the slice when the record is made."""
        now = self._clock()
        for kind, n in new:
            key = (name, uid, kind)
            self.counts[key] = self.counts.get(key, 0) + n
            pending = self._pending.get((uid, kind))
            if pending is not None:
                pending.count += n
                continue
            due = max(now, self._last.get((uid, kind), -self.cfg.coalesce) + self.cfg.coalesce)
            self._pending[(uid, kind)] = _Pending(uid, name, slice_dir, kind, n, due, measured)
            if due <= now:
                self._wake.set()
            else:
                self._schedule(due - now)

    def forget(self, keep_uids: set[int]) -> None:
        """Drop the counters of tenants that are gone (their series end)."""
        for key in [k for k in self.counts if k[1] not in keep_uids]:
            del self.counts[key]
        for last in [k for k in self._last if k[0] not in keep_uids]:
            del self._last[last]

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._timer is not None and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._wake.set)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._timer = None
            await self.record_due()

    async def record_due(self) -> list[Fault]:
        now = self._clock()
        due = [p for p in self._pending.values() if p.due <= now]
        for p in due:
            del self._pending[(p.uid, p.kind)]
            self._last[(p.uid, p.kind)] = now
        if self._pending:
            self._schedule(max(0.0, min(p.due for p in self._pending.values()) - now))
        if not due:
            return []
        at_us = int(now * 1e6)
        keep_after = at_us - int(self.cfg.keep_days * 86400e6)
        # On the loop, in steps of about STEP seconds with a yield in between: a
        # worker thread would fight the loop for the GIL for the whole burst (the
        # loop waits up to the interpreter's switch interval each time it wants the
        # GIL back), steps bound how long an API call waits. Every part is stepped:
        # the snapshots and limits (a snapshot of many processes takes a millisecond,
        # a fault without one - a conntrack drop of a tenant with no slice - a
        # hundredth of that), the store's transactions, and the journal records and
        # Watch events; a step that bounded only the snapshots held the loop for
        # 100 ms storing and announcing 1,000 cheap faults at once. The faults built
        # in a few steps are stored in one transaction (COMMIT_BATCH): a commit
        # costs about the same for 1 or 64 rows, and each is a chance for the disk
        # to stall the loop. One snapshot per tenant per call (an OOM kill comes with
        # "max" events of the same moment).
        snapshots: dict[str, tuple[ProcessSample, ...]] = {}
        pacer = _Pacer(self._backlog)
        stored: list[Fault] = []
        built: list[Fault] = []
        i = 0
        while i < len(due) or built:
            started = time.perf_counter()
            while i < len(due) and len(built) < COMMIT_BATCH:
                p = due[i]
                i += 1
                procs = snapshots.get(p.slice_dir)
                if procs is None:
                    procs = (
                        snapshot_processes(p.slice_dir, self.cfg.processes, self._proc_root)
                        if p.slice_dir
                        else ()
                    )
                    snapshots[p.slice_dir] = procs
                limit, value = p.measured or limit_and_value(p.slice_dir, p.kind)
                built.append(Fault(p.uid, p.name, p.kind, at_us, p.count, limit, value, procs))
                if time.perf_counter() - started > STEP:
                    break
            if built and (i == len(due) or len(built) >= COMMIT_BATCH):
                ids = self.store.add_faults(built, self.cfg.keep, keep_after)
                done = [_with_id(f, fault_id) for f, fault_id in zip(built, ids, strict=True)]
                built = []
                for k, f in enumerate(done):
                    if k % ANNOUNCE_STEP == 0:
                        await pacer.turn()
                    self._announce(f)
                stored += done
            await asyncio.sleep(0)
        self.recorded += len(stored)
        return stored

    def _announce(self, f: Fault) -> None:
        top = ", ".join(f"{p.comm} (pid {p.pid}, {p.rss_bytes >> 20} MiB)" for p in f.processes[:3])
        message = (
            f"tenant {f.tenant} (uid {f.uid}): {f.kind} x{f.count}, limit "
            f"{'max' if f.limit is None else f.limit}"
            + ("" if f.value is None else f", value {f.value}")
            + f"; largest: {top or 'no process left'}"
        )
        fields = {
            "NSD_TENANT": f.tenant, "NSD_UID": f.uid, "NSD_FAULT": f.kind,
            "NSD_FAULT_COUNT": f.count, "NSD_FAULT_ID": f.id,
            "NSD_LIMIT": "max" if f.limit is None else f.limit,
            "NSD_VALUE": "" if f.value is None else f.value,
        }  # fmt: skip
        if not self._journal.send(message, WARNING, fields):
            log.warning("fault: %s", message)
        self._emit(f)


class _Pacer:
    """Turns of the loop between announcements, waiting for Watch clients.

    Each Watch client has a queue of WATCH_QUEUE events and is dropped as too slow
    when it overflows. A burst of 2,000 faults (1,000 tenants' OOM kills with their
    ``max`` events) announced faster than a client's stream sends them would drop
    every client that keeps up. So while one is more than PACE_BACKLOG events
    behind, the burst waits for it: PACE_WAIT seconds at most in all, after which a
    client that does not read at all is dropped by its full queue, as before."""

    def __init__(self, backlog: Callable[[], int]) -> None:
        self._backlog = backlog
        self._left = PACE_WAIT

    async def turn(self) -> None:
        await asyncio.sleep(0)
        while self._left > 0 and self._backlog() > PACE_BACKLOG:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self._left -= time.perf_counter() - started


def _with_id(f: Fault, fault_id: int) -> Fault:
    return Fault(f.uid, f.tenant, f.kind, f.at_us, f.count, f.limit, f.value, f.processes,
                 fault_id)  # fmt: skip


class FaultCounter(Collector):
    """``nsd_tenant_faults_total{tenant,uid,kind}``, live from the recorder."""

    def __init__(self, recorder: FaultRecorder) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "nsd_tenant_faults_total",
            "Limit events of the tenant as the kernel reported them (inotify on "
            "memory.events, pids.events; packets dropped by the conntrack limit), by "
            "fault kind.",
            labels=["tenant", "uid", "kind"],
        )
        for (name, uid, kind), n in sorted(self._recorder.counts.items()):
            fam.add_metric([name, str(uid), kind], n)
        yield fam


#: a tenant as the fault service watches it: (uid, name, slice cgroup path or None,
#: host veth or None)
Watched = tuple[int, str, str | None, str | None]


class FaultService:
    """Watcher + recorder, started and stopped with the daemon.

    Two sources: the cgroup event files (inotify, as they change; none without a cgroup
    v2 hierarchy) and, with a conntrack limit in force, the per-tenant drop counters of
    the host's nft table (``conntrack_drops``), read after every sample - nftables
    signals no counter change, and the metrics sampler calls :meth:`sampled` after each
    sample."""

    def __init__(
        self,
        cgroup_root: str | None,
        recorder: FaultRecorder,
        *,
        conntrack_drops: Callable[[], Awaitable[dict[str, int] | None]] | None = None,
        conntrack_limit: Callable[[], int] = lambda: 0,
    ) -> None:
        self.recorder = recorder
        self.cgroup_root = cgroup_root.rstrip("/") if cgroup_root is not None else None
        self.watcher = (
            FaultWatcher(cgroup_root, recorder.on_faults) if cgroup_root is not None else None
        )
        self._conntrack = conntrack_drops
        self._limit = conntrack_limit
        self._drops = DropTracker()
        #: host veth -> (uid, name, slice directory or "")
        self._by_ifname: dict[str, tuple[int, str, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._poll: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()
        self._task = asyncio.create_task(self.recorder.run(), name="nsd-faults")

    def sync(self, tenants: Iterable[Watched]) -> None:
        """Watch exactly these tenants (called with every sample's targets)."""
        listed = list(tenants)
        if self.watcher is not None:
            self.watcher.sync((uid, name, cg) for uid, name, cg, _ in listed)
        self.recorder.forget({uid for uid, _, _, _ in listed})
        self._by_ifname = {
            ifname: (uid, name, self._slice_dir(cg))
            for uid, name, cg, ifname in listed
            if ifname is not None
        }

    def sampled(self) -> None:
        """After a sample: read the conntrack drops in the background. After it, not
        with the targets: a burst of drops is then recorded while the sampler's
        thread is idle, not while it holds the interpreter lock in turns with the
        event loop."""
        if self._conntrack is not None and (self._poll is None or self._poll.done()):
            self._poll = asyncio.create_task(self.poll_conntrack(), name="nsd-faults-conntrack")

    def _slice_dir(self, cgroup: str | None) -> str:
        return self.cgroup_root + cgroup if self.cgroup_root is not None and cgroup else ""

    async def poll_conntrack(self) -> None:
        """One reading of the drop counters; new drops become ``conntrack`` faults."""
        if self._conntrack is None:
            return
        try:
            counts = await self._conntrack()
        except Exception:
            log.exception("reading the conntrack drops failed")
            return
        if counts is None:  # unreadable this time: the next reading counts them
            return
        limit = self._limit() or None
        for ifname, n in self._drops.update(counts).items():
            found = self._by_ifname.get(ifname)
            if found is None:
                continue  # a veth of a tenant that is gone
            uid, name, slice_dir = found
            self.recorder.on_faults(uid, name, slice_dir, [(CONNTRACK, n)], (limit, None))

    async def close(self) -> None:
        for task in (self._poll, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poll = self._task = None
        if self.watcher is not None:
            self.watcher.close()
