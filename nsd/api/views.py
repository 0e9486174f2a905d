"""The wire format: every reply of the varlink API, rendered from the core's dataclasses.

This is the only module (with the IDL in nsd/varlink and the CLI, a client) that
knows the API's field names: lowerCamelCase, as the IDL writes them. The core
returns typed dataclasses; handlers in nsd.api.handlers pass them here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from nsd.config import ResourceLimit
from nsd.limits import Limits
from nsd.model import Check, NetworkStatus, ReconcileReport, TenantView
from nsd.observe.procscan import ESCAPES, ProcessRecord
from nsd.observe.sampler import Snapshot, TenantUsage
from nsd.systemd.slices import RunResult

# API limit name (as in the IDL) -> field of nsd.limits.Limits.
LIMIT_FIELDS: Mapping[str, str] = {
    "memoryMin": "memory_min", "memoryLow": "memory_low", "memoryHigh": "memory_high",
    "memoryMax": "memory_max", "memorySwapMax": "memory_swap_max", "cpuWeight": "cpu_weight",
    "cpuQuota": "cpu_quota", "tasksMax": "tasks_max", "ioWeight": "io_weight",
}  # fmt: skip
_LIMIT_NAMES = {field: api for api, field in LIMIT_FIELDS.items()}


def limit_name(field: str) -> str:
    """The IDL's name of a limit field (``memory_max`` -> ``memoryMax``)."""
    return _LIMIT_NAMES.get(field, field)


# procscan's reasons for flagging a process -> the IDL's AuditedProcess.reason.
_REASONS = {
    "helper": "helper",
    "outside_slice": "outsideSlice",
    "outside_namespace": "outsideNamespace",
    "outside_slice_and_namespace": "outsideSliceAndNamespace",
    "session_outside_namespace": "sessionOutsideNamespace",
}


@functools.lru_cache(maxsize=64)
def _text(address: IPv4Address | IPv6Address) -> str:
    # The gateways are the same for every tenant; formatting an IPv6 address costs.
    return str(address)


def tenant(view: TenantView) -> dict[str, Any]:
    """One ``Tenant`` record."""
    rec = view.record
    ipv4, ipv6, prefix = rec.address_texts
    return {
        "name": rec.name,
        "uid": rec.uid,
        "state": rec.state.value,
        "namespacePath": view.namespace_path,
        "namespaceInode": view.namespace_inode,
        "hostInterface": rec.host_ifname,
        "tenantInterface": view.tenant_interface,
        "ipv4Address": ipv4,
        "ipv4Gateway": _text(view.ipv4_gateway),
        "ipv6Address": ipv6,
        "ipv6Prefix": prefix,
        "ipv6Gateway": _text(view.ipv6_gateway),
        "adopted": rec.adopted,
        "createdUSec": rec.created_us,
        "slice": view.slice,
        "problems": list(view.problems),
    }


def limits(values: Limits) -> dict[str, str]:
    """A ``Limits`` record: the fields that are set, by their API names."""
    return {_LIMIT_NAMES[field]: value for field, value in values.items().items()}


def limits_reply(effective: Limits, overrides: Limits) -> dict[str, Any]:
    """GetLimits and SetLimits."""
    return {"limits": limits(effective), "overrides": limits(overrides)}


def network(status: NetworkStatus) -> dict[str, Any]:
    """One ``Network`` record."""
    return {
        "enabled": status.enabled,
        "uplinks": list(status.uplinks),
        "egress": status.egress,
        "isolation": status.isolation,
        "allowedTo": list(status.allowed_to),
        "allowedFrom": list(status.allowed_from),
        "conntrackLimit": status.conntrack_limit,
        "connections": status.connections,
        "routes": list(status.routes),
        "services": [
            {"name": s.name, "address": s.address, "host": s.host, "protocols": list(s.protocols)}
            for s in status.services
        ],
        "egressRate": status.egress_rate,
        "ingressRate": status.ingress_rate,
        "egressOverride": status.egress_override,
        "ingressOverride": status.ingress_override,
        "problems": list(status.problems),
    }


def _limit_bytes(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def usage(t: TenantUsage) -> dict[str, Any]:
    """One ``Usage`` record; null where the sample had no value."""
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


def audited_process(r: ProcessRecord, tenant_name: str) -> dict[str, Any]:
    """One ``AuditedProcess`` record."""
    return {
        "tenant": tenant_name,
        "uid": r.tenant_uid,
        "pid": r.pid,
        "parentPid": r.ppid,
        "processUid": r.uid,
        "command": r.command,
        "cgroup": r.cgroup,
        "namespaceInode": r.netns_inode,
        "reason": _REASONS[r.reason],
        "rssBytes": r.rss_bytes,
        "pssBytes": r.pss_bytes,
    }


def usage_reply(snap: Snapshot, uid: int | None = None) -> dict[str, Any]:
    """GetUsage: every tenant, or the one with ``uid``."""
    tenants = snap.tenants if uid is None else tuple(t for t in snap.tenants if t.uid == uid)
    return {"sampledUSec": int(snap.taken_at * 1e6), "tenants": [usage(t) for t in tenants]}


def audit_reply(snap: Snapshot, uid: int | None = None, helpers: bool = False) -> dict[str, Any]:
    """Audit: flagged processes (and helpers if asked), by tenant and PID."""
    names = {t.uid: t.name for t in snap.tenants}
    rows = [
        audited_process(r, names.get(r.tenant_uid, str(r.tenant_uid)))
        for r in snap.findings
        if (uid is None or r.tenant_uid == uid) and (helpers or r.reason != "helper")
    ]
    return {
        "sampledUSec": int(snap.taken_at * 1e6),
        "processes": rows,
        "omitted": snap.findings_dropped,
    }


def checks_reply(checks: Iterable[Check]) -> dict[str, Any]:
    """Doctor."""
    return {"checks": [{"name": c.name, "severity": c.severity, "message": c.message}
                       for c in checks]}  # fmt: skip


def reconcile_reply(report: ReconcileReport) -> dict[str, Any]:
    """Reconcile."""
    return {
        "actions": [
            {"kind": a.kind, "tenant": a.tenant, "detail": a.detail} for a in report.actions
        ],
        "problems": report.problems,
    }


def enter_reply(
    view: TenantView, umask: int, rlimits: Mapping[str, ResourceLimit], scope: str | None
) -> dict[str, Any]:
    """Enter, without its descriptor (the handler attaches it as fd 0)."""
    return {
        "tenant": tenant(view),
        "namespaceFileDescriptor": 0,
        "umask": umask,
        "resourceLimits": [
            {"name": name, "soft": lim.soft, "hard": lim.hard}
            for name, lim in sorted(rlimits.items())
        ],
        "scope": scope,
    }


def run_reply(result: RunResult) -> dict[str, Any]:
    """Run."""
    return {"unit": result.unit, "exitStatus": result.exit_status, "result": result.result}
