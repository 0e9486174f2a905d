"""The periodic sampler: everything nsd exports, read once per interval into a snapshot.

Scrapes, ``GetUsage`` and ``Audit`` only ever look at the latest snapshot, so
their cost does not depend on how many scrapers or clients there are, and the
host is read at a fixed rate. A sample runs on a worker thread
(``asyncio.to_thread``); the event loop only builds the list of targets (from
the store, which belongs to the loop thread) and swaps the finished snapshot
in with a single assignment.

What a sample reads, per tenant: the cgroup v2 files of its slice (see
nsd.cgroupstats), one pass over /proc for all tenants (nsd.procscan), and one
read of /proc/net/dev for every veth's counters.

Veth counters come from /proc/net/dev rather than netlink or
/sys/class/net/IF/statistics: one read returns every interface (N tenants cost
one file, not 8N sysfs files or a netlink dump); the numbers are the same
``dev_get_stats()`` counters netlink reports; it needs no trip through the
netns adapter's worker thread (which serialises tenant operations and must not
wait behind metrics); and it shows the namespace of the daemon's process,
whereas sysfs shows that of whoever mounted /sys - in tests, where the daemon
runs in a test-made "host" namespace, sysfs would show the real host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import limits as limits_mod
from .cgroupstats import FILES, CgroupStats, read_cgroup, slice_cgroup_path
from .errors import NsdError
from .procscan import (
    DEFAULT_HELPERS,
    ESCAPES,
    HelperTotal,
    NetDev,
    ProcessRecord,
    ScanTenant,
    TenantProcesses,
    read_net_dev,
    scan,
)

log = logging.getLogger("nsd.sampler")


class UsageUnavailable(NsdError):
    """GetUsage/Audit before the first sample, or with sampling disabled."""

    name = "UsageUnavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"usage is unavailable: {reason}", reason=reason)


#: Sources whose availability the exporter reports, besides the cgroup FILES.
OTHER_SOURCES: tuple[str, ...] = ("cgroup2", "proc", "smaps_rollup", "net_dev")
SOURCES: tuple[str, ...] = ("cgroup2", *FILES, "proc", "smaps_rollup", "net_dev")
_NO_CGROUP = CgroupStats(exists=False)


@dataclass(frozen=True)
class Target:
    """A tenant as the sampler needs it; built on the event loop by the daemon."""

    uid: int
    name: str
    #: the slice's cgroup path below the v2 root, e.g. "/tenant.slice/tenant-1001.slice";
    #: None when the host has no tenant slices
    cgroup: str | None
    #: inode of the tenant's network namespace; None if it is not mounted
    netns_inode: int | None
    #: the host end of the tenant's veth, e.g. "nsd1001"
    host_ifname: str | None
    #: effective configured limits
    limits: limits_mod.Limits = field(default_factory=limits_mod.Limits)


@dataclass(frozen=True)
class TenantUsage:
    uid: int
    name: str
    cgroup: CgroupStats
    processes: TenantProcesses | None  # None when /proc could not be scanned
    net: NetDev | None  # host end of the veth; None if not found
    limits: limits_mod.Limits


@dataclass(frozen=True)
class Snapshot:
    generation: int  # increases by one per sample
    taken_at: float  # time.time() at the start of the sample
    duration_seconds: float
    tenants: tuple[TenantUsage, ...]  # sorted by UID
    #: every name in SOURCES -> whether it could be read in this sample
    sources: Mapping[str, bool]
    helpers: Mapping[str, HelperTotal]  # host-wide, per configured helper name
    findings: tuple[ProcessRecord, ...]
    findings_dropped: int
    processes: int | None  # user-space processes scanned; None if /proc was unreadable

    def tenant(self, uid: int) -> TenantUsage | None:
        for t in self.tenants:
            if t.uid == uid:
                return t
        return None


def collect(
    targets: Sequence[Target],
    *,
    cgroup_root: str | None,
    proc_root: str = "/proc",
    helpers: Collection[str] = DEFAULT_HELPERS,
    probe_cgroup: str | None = None,
    generation: int = 0,
    max_findings: int = 1000,
) -> Snapshot:
    """One sample. Blocking file reads only: call it on a worker thread.

    ``probe_cgroup`` (the tenants' parent slice) is read too, only to tell
    which cgroup files this host has when no tenant slice exists yet.
    """
    started = time.time()
    t0 = time.perf_counter()
    ordered = sorted(targets, key=lambda t: t.uid)
    seen: set[str] = set()
    stats: list[CgroupStats] = []
    for t in ordered:
        if cgroup_root is None or t.cgroup is None:
            stats.append(_NO_CGROUP)
            continue
        s = read_cgroup(cgroup_root, t.cgroup)
        seen |= s.available()
        stats.append(s)
    if cgroup_root is not None and probe_cgroup is not None and len(seen) < len(FILES):
        seen |= read_cgroup(cgroup_root, probe_cgroup).available()

    procs = scan(
        [ScanTenant(t.uid, t.cgroup, t.netns_inode) for t in ordered],
        helpers,
        proc_root,
        max_findings=max_findings,
    )
    netdev = read_net_dev(proc_root)
    tenants = tuple(
        TenantUsage(
            uid=t.uid,
            name=t.name,
            cgroup=s,
            processes=procs.tenants.get(t.uid) if procs is not None else None,
            net=netdev.get(t.host_ifname) if netdev is not None and t.host_ifname else None,
            limits=t.limits,
        )
        for t, s in zip(ordered, stats, strict=True)
    )
    sources = {name: name in seen for name in FILES}
    sources["cgroup2"] = cgroup_root is not None
    sources["proc"] = procs is not None
    sources["smaps_rollup"] = procs is not None and all(
        p.processes.helper_pss_bytes is not None for p in tenants if p.processes is not None
    )
    sources["net_dev"] = netdev is not None
    return Snapshot(
        generation=generation,
        taken_at=started,
        duration_seconds=time.perf_counter() - t0,
        tenants=tenants,
        sources=sources,
        helpers=procs.helpers if procs is not None else {h: HelperTotal(0, 0) for h in helpers},
        findings=procs.findings if procs is not None else (),
        findings_dropped=procs.findings_dropped if procs is not None else 0,
        processes=procs.processes if procs is not None else None,
    )


class Sampler:
    """Takes a snapshot every ``interval`` seconds; the latest is :attr:`snapshot`.

    ``targets`` is called on the event loop (it may use the store);
    ``after_sample`` runs on the worker thread right after each sample (the
    exporter pre-renders the snapshot there, off the loop); ``on_sample`` and
    ``on_error`` run on the loop (self-metrics).
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[Target]],
        interval: float,
        *,
        cgroup_root: str | None,
        proc_root: str = "/proc",
        helpers: Collection[str] = DEFAULT_HELPERS,
        probe_cgroup: str | None = None,
        after_sample: Callable[[Snapshot], None] | None = None,
        on_sample: Callable[[Snapshot], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._targets = targets
        self._cgroup_root = cgroup_root
        self._proc_root = proc_root
        self._helpers = tuple(helpers)
        self._probe = probe_cgroup
        self._after = after_sample
        self._on_sample = on_sample
        self._on_error = on_error
        self._snapshot: Snapshot | None = None
        self._generation = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def sample_once(self) -> Snapshot:
        targets = list(self._targets())
        self._generation += 1
        generation = self._generation

        def work() -> Snapshot:
            snap = collect(
                targets,
                cgroup_root=self._cgroup_root,
                proc_root=self._proc_root,
                helpers=self._helpers,
                probe_cgroup=self._probe,
                generation=generation,
            )
            if self._after is not None:
                self._after(snap)
            return snap

        snap = await asyncio.to_thread(work)
        self._snapshot = snap  # one assignment: readers see the old or the new one
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_sample is not None:
            self._on_sample(snap)
        return snap

    async def next_snapshot(self, after: int) -> Snapshot:
        """The first snapshot with a generation above ``after`` (for streaming GetUsage)."""
        while self._snapshot is None or self._snapshot.generation <= after:
            await self._changed.wait()
        return self._snapshot

    async def run(self) -> None:
        """Sample forever at a fixed rate; a failed sample is logged and the old snapshot kept."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("metrics sample failed; keeping the previous snapshot")
                if self._on_error is not None:
                    self._on_error(e)
            next_at += self.interval
            now = loop.time()
            if next_at < now:
                # Slower than the interval: skip the missed ticks, never pile up.
                next_at = now + self.interval - (now - next_at) % self.interval
            await asyncio.sleep(next_at - now)

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="nsd-sampler")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Manager(Protocol):
    """What :func:`manager_targets` needs of nsd.manager.TenantManager."""

    @property
    def store(self) -> Any: ...
    @property
    def net(self) -> Any: ...
    @property
    def slices(self) -> Any: ...
    def netns_path(self, netns_name: str) -> str: ...


def manager_targets(manager: _Manager) -> list[Target]:
    """The sampler's targets from the daemon's manager; call on the event loop (store).

    It runs on the event loop, so it must stay short (a stall here is a stall of every
    API call; it took ~40 ms with 1,000 tenants, one SQLite query per tenant): the
    records come from the store's cache, the limit overrides from one query, and the
    effective limits of the tenants without overrides are computed once. What remains
    per tenant is one namespace lstat (~3 ms for 1,000 tenants).
    """
    slices = manager.slices.available
    overrides = manager.store.all_limit_overrides()
    defaults = manager.slices.effective({})
    out = []
    for rec in manager.store.all():
        own = overrides.get(rec.uid)
        out.append(
            Target(
                uid=rec.uid,
                name=rec.name,
                cgroup=slice_cgroup_path(manager.slices.slice_of(rec.uid)) if slices else None,
                netns_inode=manager.net.namespace_inode(manager.netns_path(rec.netns_name)),
                host_ifname=rec.host_ifname,
                limits=defaults if own is None else manager.slices.effective(own),
            )
        )
    return out


# -- replies for the varlink API (io.nsd.Tenant.GetUsage / Audit) --------------------

_REASONS_API = {
    "helper": "helper",
    "outside_slice": "outsideSlice",
    "outside_namespace": "outsideNamespace",
    "outside_slice_and_namespace": "outsideSliceAndNamespace",
    "session_outside_namespace": "sessionOutsideNamespace",
}


def _limit_bytes(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def usage_json(t: TenantUsage) -> dict[str, Any]:
    """One ``Usage`` record (see the IDL); null where the sample had no value."""
    c = t.cgroup
    p = t.processes
    events = c.memory_events or {}
    return {
        "name": t.name,
        "uid": t.uid,
        "memoryCurrentBytes": c.memory_current,
        "memoryWorkingSetBytes": c.working_set,
        "memoryPeakBytes": c.memory_peak,
        "memorySwapBytes": c.memory_swap_current,
        "memoryHighBytes": _limit_bytes(t.limits.memory_high),
        "memoryMaxBytes": _limit_bytes(t.limits.memory_max),
        "oomKills": events.get("oom_kill"),
        "tasks": c.pids_current,
        "cpuUsageUSec": (c.cpu_stat or {}).get("usage_usec"),
        "helperProcesses": p.helpers if p is not None else None,
        "helperRssBytes": p.helper_rss_bytes if p is not None else None,
        "helperPssBytes": p.helper_pss_bytes if p is not None else None,
        "escapedProcesses": sum(p.classes[e] for e in ESCAPES) if p is not None else None,
    }


def process_json(r: ProcessRecord, tenant_name: str) -> dict[str, Any]:
    """One ``AuditedProcess`` record (see the IDL)."""
    return {
        "tenant": tenant_name,
        "uid": r.tenant_uid,
        "pid": r.pid,
        "parentPid": r.ppid,
        "processUid": r.uid,
        "command": r.command,
        "cgroup": r.cgroup,
        "namespaceInode": r.netns_inode,
        "reason": _REASONS_API[r.reason],
        "rssBytes": r.rss_bytes,
        "pssBytes": r.pss_bytes,
    }


def usage_reply(snap: Snapshot, uid: int | None = None) -> dict[str, Any]:
    """GetUsage reply parameters: every tenant, or the one with ``uid``."""
    tenants = snap.tenants if uid is None else tuple(t for t in snap.tenants if t.uid == uid)
    return {
        "sampledUSec": int(snap.taken_at * 1e6),
        "tenants": [usage_json(t) for t in tenants],
    }


def audit_reply(snap: Snapshot, uid: int | None = None, helpers: bool = False) -> dict[str, Any]:
    """Audit reply parameters: flagged processes (and helpers if asked), by tenant and PID."""
    names = {t.uid: t.name for t in snap.tenants}
    rows = [
        process_json(r, names.get(r.tenant_uid, str(r.tenant_uid)))
        for r in snap.findings
        if (uid is None or r.tenant_uid == uid) and (helpers or r.reason != "helper")
    ]
    return {
        "sampledUSec": int(snap.taken_at * 1e6),
        "processes": rows,
        "omitted": snap.findings_dropped,
    }


def escaped_by_tenant(snap: Snapshot) -> dict[str, int]:
    """Escaped processes per tenant name in ``snap`` (tenants whose /proc scan failed
    are left out rather than reported as clean)."""
    return {t.name: t.processes.escaped for t in snap.tenants if t.processes is not None}
