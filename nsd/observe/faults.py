"""Faults: a tenant hitting one of its limits, as the kernel reports it.

The kernel counts limit hits per cgroup in ``memory.events`` and ``pids.events``
and signals every change of those files through inotify (``IN_MODIFY``, at most
once per 10 ms per file). nsd.observe.faultwatch watches the files of every tenant's
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
``conntrack``   nft set ``ctdrops``     a new connection refused by network.conntrack_limit
==============  =====================  ==================================================

``memory.events`` counts events of the slice and everything below it (the
scopes and services in it), so one watch per tenant sees them all.

``conntrack`` counts packets, not cgroup events: each packet that would have
opened a connection over the tenant's limit and was dropped (a client's SYN
retransmissions are counted each). They are counted per tenant veth in the host
table's dynamic set ``ctdrops`` (nsd.net.policy_host), whose per-element counters
nftables cannot signal a change of: they are read once per metrics sample
(:class:`DropTracker` turns the readings into new events).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nsd import kerneltext
from nsd.model import ProcessSample
from nsd.observe.cgroupstats import parse_flat_keyed, parse_int, read_bytes
from nsd.observe.procscan import parse_status
from nsd.systemd.cgroup import walk_procs

#: (file, key in it) -> fault kind, in the order they are reported
FAULT_KEYS: tuple[tuple[str, str, str], ...] = (
    ("memory.events", "oom_kill", "oom_kill"),
    ("memory.events", "max", "memory_max"),
    ("memory.events", "high", "memory_high"),
    ("pids.events", "max", "pids_max"),
)
#: refused connections (nft counters, not a cgroup file)
CONNTRACK = "conntrack"
FAULT_KINDS: tuple[str, ...] = (*(k for _, _, k in FAULT_KEYS), CONNTRACK)
WATCHED_FILES: tuple[str, ...] = ("memory.events", "pids.events")
#: kind -> (the limit's file, the current value's file) read when the fault is recorded
_LIMIT_FILES: dict[str, tuple[str, str]] = {
    "oom_kill": ("memory.max", "memory.current"),
    "memory_max": ("memory.max", "memory.current"),
    "memory_high": ("memory.high", "memory.current"),
    "pids_max": ("pids.max", "pids.current"),
}


def counter_delta(old: int, new: int) -> int:
    """New events between two readings of a kernel counter. A counter that went down
    was made anew (a slice stopped and started, a set element deleted and added
    again): its whole value is new."""
    return new - old if new >= old else new


def increases(
    before: Mapping[str, int], after: Mapping[str, int], file: str
) -> list[tuple[str, int]]:
    """(kind, how many new events) for ``file``'s counters that grew (a counter that
    went down belongs to a new cgroup: counter_delta)."""
    out = []
    for f, key, kind in FAULT_KEYS:
        if f != file:
            continue
        delta = counter_delta(before.get(key, 0), after.get(key, 0))
        if delta > 0:
            out.append((kind, delta))
    return out


class DropTracker:
    """New conntrack drops per interface from successive readings of the counters.

    The first reading is the baseline (drops from before nsd read them, e.g. before a
    restart: the set outlives the daemon, are not new faults). After it, an interface
    seen for the first time is entirely new (the kernel added its element at its
    first drop), and a counter that went down was reset (the element was deleted
    and made again): its whole value is new.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] | None = None

    def update(self, counts: Mapping[str, int]) -> dict[str, int]:
        last, self._last = self._last, dict(counts)
        if last is None:
            return {}
        out = {}
        for ifname, n in counts.items():
            delta = counter_delta(last.get(ifname, 0), n)
            if delta > 0:
                out[ifname] = delta
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
    for dirpath, pids in walk_procs(slice_dir):
        # Below the slice the names are the tenant's (delegation): shown by the one
        # decode policy, never with lone surrogates.
        where = kerneltext.decode(os.fsencode(dirpath[len(slice_dir) :])) or "/"
        for pid in pids:
            status = read_bytes(f"{proc_root}/{pid}/status")
            parsed = parse_status(status) if status is not None else None
            if parsed is None:
                continue  # exited meanwhile, or a zombie
            comm, _ppid, _ruid, _euid, rss = parsed
            found.append(ProcessSample(pid, comm, rss, where))
    found.sort(key=lambda p: (-p.rss_bytes, p.pid))
    return tuple(found[:limit])
