"""The catalogue of every metric nsd exports: name, type, labels, source and help text.

``docs/metrics.md`` documents every metric defined in :data:`CATALOGUE` (a unit test
holds the two together). Rules: tenant series carry exactly the labels ``tenant`` (user
name) and ``uid`` plus, for some, one label with a fixed, documented set of values -
nothing unbounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from nsd.observe.cgroupstats import MEMORY_EVENTS, MEMORY_STAT_KINDS, PRESSURE_RESOURCES
from nsd.observe.procscan import CLASSES, ESCAPES

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
    # Live, not from the snapshot: counted as the kernel reports each event (nsd.core.faultrecord).
    _h("nsd_tenant_faults_total", "counter",
       "memory.events, pids.events (inotify); nft set ctdrops (each sample)",
       "Limit events of the tenant by fault kind: oom_kill, memory_max, memory_high, "
       "pids_max, conntrack (docs/metrics.md, Faults).", "tenant", "uid", "kind"),
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
    _h("nsd_audit_lines_suppressed_total", "counter", "audit log",
       "Audit lines of refused calls dropped by the per-UID rate limit."),
)  # fmt: skip
BY_NAME = {d.name: d for d in CATALOGUE}


def per_tenant_series() -> int:
    """The most series one tenant can have (all sources available, all limits set)."""
    n = 0
    fixed = {"kind": len(MEMORY_STAT_KINDS), "event": len(MEMORY_EVENTS), "operation": 3,
             "class": len(CLASSES), "reason": len(ESCAPES)}  # fmt: skip
    for d in CATALOGUE:
        if d.per_tenant:
            n += fixed[d.labels[0]] if d.labels else 1
    return n


Family = GaugeMetricFamily | CounterMetricFamily


def family(name: str) -> Family:
    """An empty family for the catalogued metric ``name``, with its help and labels."""
    d = BY_NAME[name]
    labels = [*TENANT_LABELS, *d.labels] if d.per_tenant else list(d.labels)
    if d.type == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), d.help, labels=labels)
    return GaugeMetricFamily(name, d.help, labels=labels)
