"""Prometheus exposition: collectors over the sampler's snapshot, daemon self-metrics,
and a small asyncio HTTP endpoint for ``/metrics``.

Cost model: the sampler reads the host once per interval (nsd.sampler); a
scrape only serialises. The snapshot's part of the body is rendered once per
snapshot and format (on the sampler's thread right after the sample, or on a
worker thread by the first scrape that wants another format) and then reused,
so N scrapers cost about what one does; only the daemon's own few hundred
series are rendered per scrape. Nothing here touches the host.

Rules: tenant series carry exactly the labels ``tenant`` (user name) and ``uid``
plus, for some, one label with a fixed, documented set of values - nothing
unbounded. A value that could not be read is absent, never zero;
``nsd_metrics_source_available`` says which sources are missing.
``docs/metrics.md`` documents every metric defined in :data:`CATALOGUE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from . import limits as limits_mod
from .cgroupstats import MEMORY_EVENTS, MEMORY_STAT_KINDS, PRESSURE_RESOURCES, CgroupStats
from .model import ReconcileAction
from .procscan import CLASSES, DEFAULT_HELPERS, ESCAPES
from .sampler import SOURCES, Sampler, Snapshot, Target, TenantUsage

log = logging.getLogger("nsd.metrics")

DEFAULT_LISTEN = "127.0.0.1:9917"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TENANT_LABELS = ("tenant", "uid")


@dataclass(frozen=True)
class MetricDef:
    name: str  # as exposed (counters end in _total)
    type: str  # gauge, counter, histogram, info
    labels: tuple[str, ...]  # besides tenant/uid for per-tenant metrics
    source: str
    help: str
    per_tenant: bool = True


def _m(name: str, kind: str, source: str, text: str, *labels: str) -> MetricDef:
    return MetricDef(name, kind, labels, source, text)


def _h(name: str, kind: str, source: str, text: str, *labels: str) -> MetricDef:
    return MetricDef(name, kind, labels, source, text, per_tenant=False)


_PRESSURE = [
    _m(f"nsd_tenant_pressure_{r}_{what}_seconds_total", "counter", f"{r}.pressure",
       f"Time {'some' if what == 'waiting' else 'all'} of the tenant's tasks were stalled on "
       f"{r} (PSI '{'some' if what == 'waiting' else 'full'}' total).")
    for r in PRESSURE_RESOURCES
    for what in ("waiting", "stalled")
]  # fmt: skip

CATALOGUE: tuple[MetricDef, ...] = (
    _m("nsd_tenant_memory_current_bytes", "gauge", "memory.current",
       "Memory charged to the tenant's slice (memory.current)."),
    _m("nsd_tenant_memory_working_set_bytes", "gauge", "memory.current, memory.stat",
       "memory.current minus inactive_file, floored at 0 (the working set as kubelet "
       "computes it)."),
    _m("nsd_tenant_memory_stat_bytes", "gauge", "memory.stat",
       "Selected memory.stat kinds of the slice; kinds overlap, do not sum them.", "kind"),
    _m("nsd_tenant_memory_page_faults_total", "counter", "memory.stat",
       "Page faults in the slice (memory.stat pgfault)."),
    _m("nsd_tenant_memory_major_page_faults_total", "counter", "memory.stat",
       "Major page faults (needing IO) in the slice (memory.stat pgmajfault)."),
    _m("nsd_tenant_memory_swap_current_bytes", "gauge", "memory.swap.current",
       "Swap used by the slice."),
    _m("nsd_tenant_memory_peak_bytes", "gauge", "memory.peak",
       "Highest memory.current since the slice was created (Linux 5.19+)."),
    _m("nsd_tenant_memory_events_total", "counter", "memory.events",
       "Memory events in the slice and below: low, high (throttled), max (limit hit), "
       "oom, oom_kill, oom_group_kill.", "event"),
    *_PRESSURE,
    _m("nsd_tenant_cpu_usage_seconds_total", "counter", "cpu.stat",
       "CPU time used by the slice (usage_usec)."),
    _m("nsd_tenant_cpu_user_seconds_total", "counter", "cpu.stat",
       "CPU time in user mode (user_usec)."),
    _m("nsd_tenant_cpu_system_seconds_total", "counter", "cpu.stat",
       "CPU time in kernel mode (system_usec)."),
    _m("nsd_tenant_cpu_periods_total", "counter", "cpu.stat",
       "Enforcement periods of the CPU quota that had runnable tasks (nr_periods)."),
    _m("nsd_tenant_cpu_throttled_periods_total", "counter", "cpu.stat",
       "Periods in which the slice was throttled by its CPU quota (nr_throttled)."),
    _m("nsd_tenant_cpu_throttled_seconds_total", "counter", "cpu.stat",
       "Time the slice's tasks were throttled by its CPU quota (throttled_usec)."),
    _m("nsd_tenant_tasks", "gauge", "pids.current",
       "Tasks (processes and threads) in the slice."),
    _m("nsd_tenant_io_bytes_total", "counter", "io.stat",
       "Bytes read, written and discarded by the slice, summed over devices.", "operation"),
    _m("nsd_tenant_io_operations_total", "counter", "io.stat",
       "Read, write and discard operations of the slice, summed over devices.", "operation"),
    _m("nsd_tenant_limit_memory_min_bytes", "gauge", "configuration",
       "Configured MemoryMin (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_memory_low_bytes", "gauge", "configuration",
       "Configured MemoryLow (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_memory_high_bytes", "gauge", "configuration",
       "Configured MemoryHigh (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_memory_max_bytes", "gauge", "configuration",
       "Configured MemoryMax (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_memory_swap_max_bytes", "gauge", "configuration",
       "Configured MemorySwapMax (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_cpu_weight", "gauge", "configuration",
       "Configured CPUWeight (absent if not set)."),
    _m("nsd_tenant_limit_cpu_quota_cpus", "gauge", "configuration",
       "Configured CPUQuota in CPUs (150% is 1.5; +Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_tasks_max", "gauge", "configuration",
       "Configured TasksMax (+Inf for infinity; absent if not set)."),
    _m("nsd_tenant_limit_io_weight", "gauge", "configuration",
       "Configured IOWeight (absent if not set)."),
    *(
        _m(f"nsd_tenant_network_{d}_{what}_total", "counter", "/proc/net/dev",
           f"{what.capitalize()} the tenant {'received' if d == 'receive' else 'sent'} "
           "through its veth (host end counters, directions seen from the tenant).")
        for d in ("receive", "transmit")
        for what in ("bytes", "packets", "drops", "errors")
    ),
    _m("nsd_tenant_helper_processes", "gauge", "/proc/PID/status, cgroup",
       "Helper processes (sd-pam, su, sudo, ...) that launch or babysit the tenant's work."),
    _m("nsd_tenant_helper_rss_bytes", "gauge", "/proc/PID/status VmRSS",
       "Resident memory of the tenant's helper processes."),
    _m("nsd_tenant_helper_pss_bytes", "gauge", "/proc/PID/smaps_rollup Pss",
       "Proportional set size of the tenant's helper processes (shared pages divided among "
       "sharers); absent if a helper's smaps_rollup was unreadable."),
    _m("nsd_tenant_processes", "gauge", "/proc/PID/{status,cgroup,ns/net,loginuid}",
       "The tenant's processes by where they legitimately run: contained (its slice and "
       "namespace), session (a login session), user_manager (user@UID.service).", "class"),
    _m("nsd_tenant_escaped_processes", "gauge", "/proc/PID/{status,cgroup,ns/net,loginuid}",
       "The tenant's processes outside its slice, its namespace, or both (nsctl audit "
       "lists them).", "reason"),
    # Live, not from the snapshot: counted as the kernel reports each event (nsd.faultrecord).
    _h("nsd_tenant_faults_total", "counter", "memory.events, pids.events (inotify)",
       "Limit events of the tenant's slice by fault kind: oom_kill, memory_max, "
       "memory_high, pids_max (docs/metrics.md, Faults).", "tenant", "uid", "kind"),
    _h("nsd_tenants", "gauge", "store", "Tenants nsd manages (at the last sample)."),
    _h("nsd_helper_processes", "gauge", "/proc/PID/status",
       "Processes named like a configured helper on the whole host, tenants' or not.", "helper"),
    _h("nsd_helper_rss_bytes", "gauge", "/proc/PID/status VmRSS",
       "Resident memory of those processes.", "helper"),
    _h("nsd_metrics_source_available", "gauge", "sampler",
       "1 if the source could be read in the last sample (for at least one tenant), else 0: "
       "the series that come from it are absent.", "source"),
    _h("nsd_sampler_snapshot_timestamp_seconds", "gauge", "sampler",
       "When the snapshot being served was taken (Unix time)."),
    _h("nsd_sampler_processes", "gauge", "/proc",
       "User-space processes looked at by the last /proc scan."),
    _h("nsd_audit_omitted_processes", "gauge", "sampler",
       "Flagged or helper processes counted but not kept for nsctl audit (list full)."),
    _h("nsd_build_info", "info", "nsd", "nsd's version.", "version"),
    _h("nsd_api_calls_total", "counter", "varlink server",
       "Finished varlink calls by method and error name (empty for success).",
       "interface", "method", "error"),
    _h("nsd_api_call_duration_seconds", "histogram", "varlink server",
       "Duration of varlink calls (not of streaming methods: Watch, GetUsage).",
       "interface", "method"),
    _h("nsd_reconcile_duration_seconds", "histogram", "manager", "Duration of reconcile runs."),
    _h("nsd_reconcile_actions_total", "counter", "manager",
       "Changes reconcile made, by kind.", "kind"),
    _h("nsd_reconcile_problems", "gauge", "manager",
       "Problems the last reconcile reported that need an operator."),
    _h("nsd_sampler_duration_seconds", "histogram", "sampler", "Duration of samples."),
    _h("nsd_sampler_errors_total", "counter", "sampler",
       "Samples that failed (the previous snapshot stays served)."),
)  # fmt: skip
_BY_NAME = {d.name: d for d in CATALOGUE}


def per_tenant_series() -> int:
    """The most series one tenant can have (all sources available, all limits set)."""
    n = 0
    fixed = {"kind": len(MEMORY_STAT_KINDS), "event": len(MEMORY_EVENTS), "operation": 3,
             "class": len(CLASSES), "reason": len(ESCAPES)}  # fmt: skip
    for d in CATALOGUE:
        if d.per_tenant:
            n += fixed[d.labels[0]] if d.labels else 1
    return n


# -- the snapshot collector -----------------------------------------------------------


_Family = GaugeMetricFamily | CounterMetricFamily


def _family(name: str) -> _Family:
    d = _BY_NAME[name]
    labels = [*TENANT_LABELS, *d.labels] if d.per_tenant else list(d.labels)
    if d.type == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), d.help, labels=labels)
    return GaugeMetricFamily(name, d.help, labels=labels)


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
        fam: dict[str, _Family] = {d.name: _family(d.name) for d in CATALOGUE if d.per_tenant}
        for t in snap.tenants:
            _tenant_samples(fam, t.name, str(t.uid), t)
        for f in fam.values():
            if f.samples:
                yield f
        yield from self._host(snap)

    def _host(self, snap: Snapshot) -> Iterator[Metric]:
        tenants = _family("nsd_tenants")
        tenants.add_metric([], len(snap.tenants))
        yield tenants
        procs, rss = _family("nsd_helper_processes"), _family("nsd_helper_rss_bytes")
        for name, total in sorted(snap.helpers.items()):
            procs.add_metric([name], total.processes)
            rss.add_metric([name], total.rss_bytes)
        yield procs
        yield rss
        sources = _family("nsd_metrics_source_available")
        for name in SOURCES:
            sources.add_metric([name], 1 if snap.sources.get(name) else 0)
        yield sources
        ts = _family("nsd_sampler_snapshot_timestamp_seconds")
        ts.add_metric([], snap.taken_at)
        yield ts
        if snap.processes is not None:
            scanned = _family("nsd_sampler_processes")
            scanned.add_metric([], snap.processes)
            yield scanned
        omitted = _family("nsd_audit_omitted_processes")
        omitted.add_metric([], snap.findings_dropped)
        yield omitted


def _tenant_samples(fam: Mapping[str, _Family], name: str, uid: str, t: TenantUsage) -> None:
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

    # Collector -----------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("nsd_build", _BY_NAME["nsd_build_info"].help)
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
        fam = _family("nsd_api_calls_total")
        for (iface, method, error), n in calls:
            fam.add_metric([iface, method, error], n)
        yield fam
        hist = HistogramMetricFamily(
            "nsd_api_call_duration_seconds",
            _BY_NAME["nsd_api_call_duration_seconds"].help,
            labels=["interface", "method"],
        )
        for (iface, method), buckets, total in latency:
            hist.add_metric([iface, method], buckets, total)
        yield hist
        yield HistogramMetricFamily(
            "nsd_reconcile_duration_seconds",
            _BY_NAME["nsd_reconcile_duration_seconds"].help,
            buckets=reconcile[0],
            sum_value=reconcile[1],
        )
        fam = _family("nsd_reconcile_actions_total")
        for kind, n in actions:
            fam.add_metric([kind], n)
        yield fam
        if problems is not None:
            g = _family("nsd_reconcile_problems")
            g.add_metric([], problems)
            yield g
        yield HistogramMetricFamily(
            "nsd_sampler_duration_seconds",
            _BY_NAME["nsd_sampler_duration_seconds"].help,
            buckets=sampler[0],
            sum_value=sampler[1],
        )
        fam = _family("nsd_sampler_errors_total")
        fam.add_metric([], sampler_errors)
        yield fam


# -- rendering -------------------------------------------------------------------------


def wants_openmetrics(accept: str | None) -> bool:
    """OpenMetrics if the client lists application/openmetrics-text with q > 0.

    Deliberately two formats only, with fixed Content-Type strings: nothing from
    the request is echoed into the response or used as a cache key.
    """
    for item in (accept or "").split(","):
        parts = [p.strip() for p in item.split(";")]
        if parts[0].lower() != "application/openmetrics-text":
            continue
        q = next((p[2:] for p in parts[1:] if p.lower().startswith("q=")), "1")
        try:
            if float(q) > 0:
                return True
        except ValueError:
            continue
    return False


def wants_gzip(accept_encoding: str | None) -> bool:
    for item in (accept_encoding or "").split(","):
        parts = [p.strip().lower() for p in item.split(";")]
        if parts[0] == "gzip":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
                           for p in parts[1:])  # fmt: skip
    return False


_EOF = b"# EOF\n"


class Exposition:
    """Renders the body of a scrape: the snapshot's part (cached per snapshot and
    format) followed by the live registry's part (rendered each time)."""

    def __init__(self, snapshot: Callable[[], Snapshot | None], live: Collector) -> None:
        self._snapshot = snapshot
        self._live = live
        self._lock = threading.Lock()
        # (generation, openmetrics) -> (plain, gzip member or None)
        self._cache: dict[tuple[int, bool], tuple[bytes, bytes | None]] = {}
        self._formats_wanted = {False}

    def prerender(self, snap: Snapshot) -> None:
        """Render the formats scrapers asked for recently; called on the sampler's thread."""
        for om in tuple(self._formats_wanted):
            self._snapshot_part(snap, om, want_gzip=True)

    def _snapshot_part(
        self, snap: Snapshot | None, om: bool, want_gzip: bool
    ) -> tuple[bytes, bytes | None]:
        if snap is None:
            return b"", (gzip.compress(b"", 1) if want_gzip else None)
        key = (snap.generation, om)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and (hit[1] is not None or not want_gzip):
                return hit
            render = generate_openmetrics if om else generate_text
            plain = hit[0] if hit is not None else render(SnapshotCollector(lambda: snap))
            if om:
                plain = plain.removesuffix(_EOF)
            packed = gzip.compress(plain, compresslevel=6, mtime=0) if want_gzip else None
            # Keep only the current generation: a cache, not a history.
            for k in [k for k in self._cache if k[0] != snap.generation]:
                del self._cache[k]
            self._cache[key] = (plain, packed)
            return plain, packed

    def render(self, *, openmetrics: bool, use_gzip: bool) -> bytes:
        """The complete body; with ``use_gzip`` a gzip stream of two members (RFC 1952
        allows several; Go's reader, which Prometheus uses, reads them all)."""
        self._formats_wanted.add(openmetrics)
        plain, packed = self._snapshot_part(self._snapshot(), openmetrics, use_gzip)
        live = (generate_openmetrics if openmetrics else generate_text)(self._live)
        if use_gzip:
            assert packed is not None
            return packed + gzip.compress(live, compresslevel=6, mtime=0)
        return plain + live


# -- HTTP endpoint ------------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int] | None:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses); "" disables (None).

    Raises ValueError with a reason for anything else.
    """
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError('an IPv6 address needs brackets and a port, e.g. "[::1]:9917"')
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError('expected host:port, e.g. "127.0.0.1:9917"')
        if ":" in host:
            raise ValueError('put IPv6 addresses in brackets, e.g. "[::1]:9917"')
    if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port (tests)
        raise ValueError(f"invalid port {port!r}")
    if any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"invalid host {host!r}")
    return host, int(port)


_INDEX = (b"<html><head><title>nsd</title></head><body><h1>nsd</h1>"
          b'<p><a href="/metrics">Metrics</a></p></body></html>\n')  # fmt: skip
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


class MetricsServer:
    """A deliberately small HTTP/1.1 server: GET/HEAD of ``/metrics`` (and ``/``) only,
    one request per connection, bounded request size, read timeout and connection
    count. Rendering runs on a worker thread, so the event loop never serialises."""

    def __init__(
        self,
        exposition: Exposition,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_connections: int = 32,
        max_request_bytes: int = 8192,
    ) -> None:
        self.exposition = exposition
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            self.host or None,
            self.port,
            limit=self.max_request_bytes,
            backlog=64,
            reuse_address=True,
        )
        log.info("metrics on http://%s:%d/metrics", self.host or "*", self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        self._writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError, ValueError):  # fmt: skip
                return
            status, headers, body, head_only = await self._respond(head)
            lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *headers,
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]  # fmt: skip
            writer.write("\r\n".join(lines).encode("ascii"))
            if not head_only:
                writer.write(body)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("metrics: request failed")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, list[str], bytes, bool]:
        try:
            text = head.decode("latin-1")
            request_line, *header_lines = text.split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            return 400, ["Content-Type: text/plain"], b"bad request\n", False
        if not version.startswith("HTTP/1."):
            return 400, ["Content-Type: text/plain"], b"bad request\n", False
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, ["Allow: GET, HEAD", "Content-Type: text/plain"], b"GET only\n", False
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if path == "/":
            return 200, ["Content-Type: text/html; charset=utf-8"], _INDEX, head_only
        if path != "/metrics":
            return 404, ["Content-Type: text/plain"], b"not found; try /metrics\n", head_only
        om = wants_openmetrics(headers.get("accept"))
        use_gzip = wants_gzip(headers.get("accept-encoding"))
        body = await asyncio.to_thread(self.exposition.render, openmetrics=om, use_gzip=use_gzip)
        out = [f"Content-Type: {OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE}",
               "Vary: Accept, Accept-Encoding"]  # fmt: skip
        if use_gzip:
            out.append("Content-Encoding: gzip")
        return 200, out, body, head_only


# -- wiring for the daemon ------------------------------------------------------------------


class MetricsService:
    """Sampler + self-metrics + exposition + HTTP endpoint, started and stopped together.

    ``listen`` "" disables the HTTP endpoint only: the sampler still runs, because
    GetUsage, Audit and ``nsctl top`` read its snapshot.
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[Target]],
        *,
        interval: float,
        listen: str = DEFAULT_LISTEN,
        helpers: Sequence[str] = DEFAULT_HELPERS,
        cgroup_root: str | None = None,
        proc_root: str = "/proc",
        probe_cgroup: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.daemon = DaemonMetrics(self.registry)
        self.exposition = Exposition(lambda: self.sampler.snapshot, self.registry)
        self.sampler = Sampler(
            targets,
            interval,
            cgroup_root=cgroup_root,
            proc_root=proc_root,
            helpers=helpers,
            probe_cgroup=probe_cgroup,
            after_sample=self.exposition.prerender,
            on_sample=self.daemon.on_sample,
            on_error=self.daemon.on_sample_error,
        )
        address = parse_listen(listen)
        self.server = MetricsServer(self.exposition, *address) if address is not None else None
        #: why the HTTP endpoint is not serving (e.g. the port is taken); "" if it is
        self.listen_error = ""

    async def start(self) -> None:
        """Start sampling (the first sample begins at once, in the background) and serving.

        A listen address that cannot be bound is logged and reported in
        :attr:`listen_error`, not raised: namespaces matter more than metrics, so
        the daemon starts anyway (and can show it as degraded).
        """
        self.sampler.start()
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as e:
                self.listen_error = (
                    f"metrics endpoint {self.server.host}:{self.server.port}: {e.strerror or e}"
                )
                log.error("%s; serving no /metrics", self.listen_error)
                self.server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        await self.sampler.stop()
