"""The collectors: per-tenant and host series from the sampler's snapshot
(:class:`SnapshotCollector`), and nsd's own counters and histograms
(:class:`DaemonMetrics`). A value that could not be read is absent, never zero;
``nsd_metrics_source_available`` says which sources are missing. Nothing here touches
the host: the sampler (nsd/sampler.py) did that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.metrics_core import HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from nsd import __version__
from nsd import limits as limits_mod
from nsd.model import ReconcileAction
from nsd.observe.catalogue import BY_NAME, CATALOGUE, Family, family
from nsd.observe.cgroupstats import MEMORY_EVENTS, MEMORY_STAT_KINDS, CgroupStats
from nsd.observe.procscan import CLASSES, ESCAPES
from nsd.observe.sampler import SOURCES, Snapshot, TenantUsage

# -- the snapshot collector -----------------------------------------------------------


_LIMITS = (
    ("memory_min", "nsd_tenant_limit_memory_min_bytes"),
    ("memory_low", "nsd_tenant_limit_memory_low_bytes"),
    ("memory_high", "nsd_tenant_limit_memory_high_bytes"),
    ("memory_max", "nsd_tenant_limit_memory_max_bytes"),
    ("memory_swap_max", "nsd_tenant_limit_memory_swap_max_bytes"),
    ("tasks_max", "nsd_tenant_limit_tasks_max"),
    ("cpu_weight", "nsd_tenant_limit_cpu_weight"),
    ("io_weight", "nsd_tenant_limit_io_weight"),
    ("cpu_quota", "nsd_tenant_limit_cpu_quota_cpus"),
)
_CPU = (
    ("usage_usec", "nsd_tenant_cpu_usage_seconds_total", 1e-6),
    ("user_usec", "nsd_tenant_cpu_user_seconds_total", 1e-6),
    ("system_usec", "nsd_tenant_cpu_system_seconds_total", 1e-6),
    ("nr_periods", "nsd_tenant_cpu_periods_total", 1),
    ("nr_throttled", "nsd_tenant_cpu_throttled_periods_total", 1),
    ("throttled_usec", "nsd_tenant_cpu_throttled_seconds_total", 1e-6),
)


def limit_value(field: str, value: str) -> float:
    """A canonical limit (nsd.limits) as a number: bytes, count, weight, or CPUs."""
    if value == limits_mod.INFINITY:
        return math.inf
    if field == "cpu_quota":
        return int(value.removesuffix("%")) / 100
    return float(int(value))


class SnapshotCollector(Collector):
    """Metric families from the snapshot ``source()`` returns (None: nothing sampled yet)."""

    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return ()  # names are not known before a snapshot; skip registry duplicate checks

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        if snap is None:
            return
        yield from tenant_families(snap.tenants)
        yield from host_families(snap)


class TenantCollector(Collector):
    """The per-tenant families of the given tenants only (exposition renders each
    tenant apart and keeps the result while the tenant's readings do not change)."""

    def __init__(self, tenants: Iterable[TenantUsage]) -> None:
        self._tenants = tuple(tenants)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        yield from tenant_families(self._tenants)


class HostCollector(Collector):
    """The snapshot's families that are not per tenant."""

    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        yield from host_families(self._snap)


#: per-tenant family names in the order they are exposed
TENANT_FAMILIES: tuple[str, ...] = tuple(d.name for d in CATALOGUE if d.per_tenant)


def tenant_families(tenants: Iterable[TenantUsage]) -> Iterator[Family]:
    """The per-tenant families with a sample of any of ``tenants``, in TENANT_FAMILIES
    order, each tenant's samples in ``tenants`` order."""
    fam: dict[str, Family] = {name: family(name) for name in TENANT_FAMILIES}
    for t in tenants:
        _tenant_samples(fam, t.name, str(t.uid), t)
    for f in fam.values():
        if f.samples:
            yield f


def host_families(snap: Snapshot) -> Iterator[Metric]:
    """The snapshot's families that are not per tenant."""
    tenants = family("nsd_tenants")
    tenants.add_metric([], len(snap.tenants))
    yield tenants
    procs, rss = family("nsd_helper_processes"), family("nsd_helper_rss_bytes")
    for name, total in sorted(snap.helpers.items()):
        procs.add_metric([name], total.processes)
        rss.add_metric([name], total.rss_bytes)
    yield procs
    yield rss
    sources = family("nsd_metrics_source_available")
    for name in SOURCES:
        sources.add_metric([name], 1 if snap.sources.get(name) else 0)
    yield sources
    ts = family("nsd_sampler_snapshot_timestamp_seconds")
    ts.add_metric([], snap.taken_at)
    yield ts
    if snap.processes is not None:
        scanned = family("nsd_sampler_processes")
        scanned.add_metric([], snap.processes)
        yield scanned
    omitted = family("nsd_audit_omitted_processes")
    omitted.add_metric([], snap.findings_dropped)
    yield omitted


def _tenant_samples(fam: Mapping[str, Family], name: str, uid: str, t: TenantUsage) -> None:
    lv = [name, uid]

    def add(metric: str, value: float | None, *extra: str) -> None:
        if value is not None:
            fam[metric].add_metric([*lv, *extra], value)

    _memory_samples(add, t.cgroup)
    _cpu_io_samples(add, t.cgroup)
    _limit_samples(add, t.limits)
    if t.net is not None:
        n = t.net
        # The host end's receive is what the tenant sent, and the other way round.
        for d, b, pk, dr, er in (
            ("receive", n.tx_bytes, n.tx_packets, n.tx_dropped, n.tx_errors),
            ("transmit", n.rx_bytes, n.rx_packets, n.rx_dropped, n.rx_errors),
        ):
            add(f"nsd_tenant_network_{d}_bytes_total", b)
            add(f"nsd_tenant_network_{d}_packets_total", pk)
            add(f"nsd_tenant_network_{d}_drops_total", dr)
            add(f"nsd_tenant_network_{d}_errors_total", er)
    procs = t.processes
    if procs is not None:
        add("nsd_tenant_helper_processes", procs.helpers)
        add("nsd_tenant_helper_rss_bytes", procs.helper_rss_bytes)
        add("nsd_tenant_helper_pss_bytes", procs.helper_pss_bytes)
        for cls in CLASSES:
            add("nsd_tenant_processes", procs.classes[cls], cls)
        for reason in ESCAPES:
            add("nsd_tenant_escaped_processes", procs.classes[reason], reason)


_Add = Callable[..., None]


def _memory_samples(add: _Add, c: CgroupStats) -> None:
    add("nsd_tenant_memory_current_bytes", c.memory_current)
    add("nsd_tenant_memory_working_set_bytes", c.working_set)
    add("nsd_tenant_memory_swap_current_bytes", c.memory_swap_current)
    add("nsd_tenant_memory_peak_bytes", c.memory_peak)
    if c.memory_stat is not None:
        for kind in MEMORY_STAT_KINDS:
            add("nsd_tenant_memory_stat_bytes", c.memory_stat.get(kind), kind)
        add("nsd_tenant_memory_page_faults_total", c.memory_stat.get("pgfault"))
        add("nsd_tenant_memory_major_page_faults_total", c.memory_stat.get("pgmajfault"))
    if c.memory_events is not None:
        for event in MEMORY_EVENTS:
            add("nsd_tenant_memory_events_total", c.memory_events.get(event), event)
    if c.pressure is not None:
        for resource, psi in c.pressure.items():
            add(f"nsd_tenant_pressure_{resource}_waiting_seconds_total", psi.some_seconds)
            add(f"nsd_tenant_pressure_{resource}_stalled_seconds_total", psi.full_seconds)


def _cpu_io_samples(add: _Add, c: CgroupStats) -> None:
    if c.cpu_stat is not None:
        for key, metric, scale in _CPU:
            value = c.cpu_stat.get(key)
            add(metric, value * scale if value is not None else None)
    add("nsd_tenant_tasks", c.pids_current)
    if c.io is not None:
        io = c.io
        for op, nbytes, ops in (
            ("read", io.read_bytes, io.reads),
            ("write", io.write_bytes, io.writes),
            ("discard", io.discard_bytes, io.discards),
        ):
            add("nsd_tenant_io_bytes_total", nbytes, op)
            add("nsd_tenant_io_operations_total", ops, op)


def _limit_samples(add: _Add, limits: limits_mod.Limits) -> None:
    for field, metric in _LIMITS:
        value = getattr(limits, field)
        if value is not None:
            add(metric, limit_value(field, value))


# -- daemon self-metrics ----------------------------------------------------------------

API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0)  # fmt: skip
RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SAMPLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Methods that may stream (called with "more"): counted, but their duration is a
#: stream's lifetime, not a latency, so they are kept out of the histogram.
STREAMING_METHODS = frozenset({("io.nsd.Tenant", "Watch"), ("io.nsd.Tenant", "GetUsage")})


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            acc += n
            out.append((_le(bound), acc))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class DaemonMetrics(Collector):
    """nsd's own metrics; the hooks are called on the event loop, collect() from any thread.

    Plain counters under a lock rather than prometheus_client's metric objects:
    no ``_created`` series per label set, and no process-global state.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = __version__,
        streaming: frozenset[tuple[str, str]] = STREAMING_METHODS,
    ) -> None:
        self._lock = threading.Lock()
        self._version = version
        self._streaming = streaming
        self._calls: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._reconcile = _Histogram(RECONCILE_BUCKETS)
        self._actions: dict[str, int] = {}
        self._problems: int | None = None
        self._sampler = _Histogram(SAMPLER_BUCKETS)
        self._sampler_errors = 0
        self._audit_suppressed = 0
        if registry is not None:
            registry.register(self)

    # Hooks -------------------------------------------------------------------------

    def on_call_done(
        self, interface: str, method: str, error_name: str | None, seconds: float
    ) -> None:
        """The varlink server's ``on_call_done`` hook (only called for existing methods)."""
        with self._lock:
            key = (interface, method, error_name or "")
            self._calls[key] = self._calls.get(key, 0) + 1
            if (interface, method) in self._streaming:
                return
            hist = self._latency.get((interface, method))
            if hist is None:
                hist = self._latency[(interface, method)] = _Histogram(API_BUCKETS)
            hist.observe(seconds)

    def on_reconcile(
        self, seconds: float, actions: Iterable[ReconcileAction], problems: int | None = None
    ) -> None:
        with self._lock:
            self._reconcile.observe(seconds)
            for action in actions:
                self._actions[action.kind] = self._actions.get(action.kind, 0) + 1
            if problems is not None:
                self._problems = problems

    def on_sample(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._sampler.observe(snapshot.duration_seconds)

    def on_sample_error(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._sampler_errors += 1

    def on_audit_suppressed(self) -> None:
        with self._lock:
            self._audit_suppressed += 1

    # Collector -----------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("nsd_build", BY_NAME["nsd_build_info"].help)
        info.add_metric([], {"version": self._version})
        yield info
        with self._lock:
            calls = sorted(self._calls.items())
            latency = sorted((k, h.buckets(), h.total) for k, h in self._latency.items())
            reconcile = (self._reconcile.buckets(), self._reconcile.total)
            actions = sorted(self._actions.items())
            problems = self._problems
            sampler = (self._sampler.buckets(), self._sampler.total)
            sampler_errors = self._sampler_errors
            audit_suppressed = self._audit_suppressed
        fam = family("nsd_api_calls_total")
        for (iface, method, error), n in calls:
            fam.add_metric([iface, method, error], n)
        yield fam
        hist = HistogramMetricFamily(
            "nsd_api_call_duration_seconds",
            BY_NAME["nsd_api_call_duration_seconds"].help,
            labels=["interface", "method"],
        )
        for (iface, method), buckets, total in latency:
            hist.add_metric([iface, method], buckets, total)
        yield hist
        yield HistogramMetricFamily(
            "nsd_reconcile_duration_seconds",
            BY_NAME["nsd_reconcile_duration_seconds"].help,
            buckets=reconcile[0],
            sum_value=reconcile[1],
        )
        fam = family("nsd_reconcile_actions_total")
        for kind, n in actions:
            fam.add_metric([kind], n)
        yield fam
        if problems is not None:
            g = family("nsd_reconcile_problems")
            g.add_metric([], problems)
            yield g
        yield HistogramMetricFamily(
            "nsd_sampler_duration_seconds",
            BY_NAME["nsd_sampler_duration_seconds"].help,
            buckets=sampler[0],
            sum_value=sampler[1],
        )
        fam = family("nsd_sampler_errors_total")
        fam.add_metric([], sampler_errors)
        yield fam
        fam = family("nsd_audit_lines_suppressed_total")
        fam.add_metric([], audit_suppressed)
        yield fam
