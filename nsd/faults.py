"""Faults: a tenant hitting one of its limits, as the kernel reports it.

The kernel counts limit hits per cgroup in ``memory.events`` and ``pids.events``
and signals every change of those files through inotify (``IN_MODIFY``, at most
once per 10 ms per file). nsd.faultwatch watches the files of every tenant's
slice; this module is the part without I/O loops: which counters are faults,
the difference between two readings, what a fault record holds, and the
process snapshot taken when one happens (CloudLinux LVE's "fault" with a
process list, which shared hosts are used to).

Fault kinds (the ``kind`` label of ``nsd_tenant_faults_total``):

==============  =====================  ==================================================
kind            file, key              meaning
==============  =====================  ==================================================
``oom_kill``    memory.events oom_kill  the kernel killed a process: MemoryMax reached
``memory_max``  memory.events max       usage reached MemoryMax (reclaim forced; may OOM)
``memory_high`` memory.events high      usage went over MemoryHigh (the slice throttled)
``pids_max``    pids.events max         a fork or clone failed at TasksMax
==============  =====================  ==================================================

``memory.events`` counts events of the slice and everything below it (the
scopes and services in it), so one watch per tenant sees them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .cgroupstats import parse_flat_keyed, parse_int, read_bytes
from .procscan import parse_status

#: (file, key in it) -> fault kind, in the order they are reported
FAULT_KEYS: tuple[tuple[str, str, str], ...] = (
    ("memory.events", "oom_kill", "oom_kill"),
    ("memory.events", "max", "memory_max"),
    ("memory.events", "high", "memory_high"),
    ("pids.events", "max", "pids_max"),
)
FAULT_KINDS: tuple[str, ...] = tuple(k for _, _, k in FAULT_KEYS)
WATCHED_FILES: tuple[str, ...] = ("memory.events", "pids.events")
#: kind -> (the limit's file, the current value's file) read when the fault is recorded
_LIMIT_FILES: dict[str, tuple[str, str]] = {
    "oom_kill": ("memory.max", "memory.current"),
    "memory_max": ("memory.max", "memory.current"),
    "memory_high": ("memory.high", "memory.current"),
    "pids_max": ("pids.max", "pids.current"),
}


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process of the tenant's slice when the fault was recorded."""

    pid: int
    comm: str
    rss_bytes: int
    #: the process's cgroup below the tenant's slice, e.g. "/php-fpm@alice.service"
    cgroup: str


@dataclass(frozen=True, slots=True)
class Fault:
    uid: int
    tenant: str
    kind: str
    at_us: int  # Unix time, microseconds
    #: kernel events since the previous record of this tenant and kind (records are
    #: coalesced: a tenant at its limit can cause a hundred events a second)
    count: int
    #: the limit in force (bytes or tasks); None when unlimited ("max") or unreadable
    limit: int | None
    #: the usage at that moment (memory.current or pids.current); None if unreadable
    value: int | None
    processes: tuple[ProcessSample, ...]  # largest RSS first, at most faults.processes
    id: int | None = None  # the store's row id once stored


def increases(
    before: Mapping[str, int], after: Mapping[str, int], file: str
) -> list[tuple[str, int]]:
    """(kind, how many new events) for ``file``'s counters that grew.

    A counter that went down belongs to a new cgroup (the slice was stopped and
    started again): its whole value is new.
    """
    out = []
    for f, key, kind in FAULT_KEYS:
        if f != file:
            continue
        new, old = after.get(key, 0), before.get(key, 0)
        delta = new - old if new >= old else new
        if delta > 0:
            out.append((kind, delta))
    return out


def read_counters(path: str) -> dict[str, int] | None:
    data = read_bytes(path)
    return None if data is None else parse_flat_keyed(data)


def limit_and_value(slice_dir: str, kind: str) -> tuple[int | None, int | None]:
    limit_file, value_file = _LIMIT_FILES[kind]
    return (
        parse_int(read_bytes(f"{slice_dir}/{limit_file}")),
        parse_int(read_bytes(f"{slice_dir}/{value_file}")),
    )


def snapshot_processes(
    slice_dir: str, limit: int, proc_root: str = "/proc"
) -> tuple[ProcessSample, ...]:
    """The ``limit`` processes with the most RSS in the slice and below.

    Reads each cgroup's ``cgroup.procs`` (processes, not threads) and each
    process's ``/proc/PID/status``: the cost is in the tenant's processes, never
    in the host's.
    """
    found: list[ProcessSample] = []
    for dirpath, _dirs, files in os.walk(slice_dir):
        if "cgroup.procs" not in files:
            continue
        data = read_bytes(f"{dirpath}/cgroup.procs")
        if not data:
            continue
        where = dirpath[len(slice_dir) :] or "/"
        for line in data.split():
            try:
                pid = int(line)
            except ValueError:
                continue
            status = read_bytes(f"{proc_root}/{pid}/status")
            parsed = parse_status(status) if status is not None else None
            if parsed is None:
                continue  # exited meanwhile, or a zombie
            comm, _ppid, _ruid, _euid, rss = parsed
            found.append(ProcessSample(pid, comm, rss, where))
    found.sort(key=lambda p: (-p.rss_bytes, p.pid))
    return tuple(found[:limit])
