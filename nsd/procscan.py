"""One pass over /proc: helper processes, escapes, and the host's veth counters.

For every process (thread-group leader) the scan reads ``/proc/PID/status``
once: its name (comm), parent, real and effective UID and RSS are all there,
and a process without ``VmRSS`` has no memory of its own (a kernel thread or a
zombie) and is skipped at that point. Only processes that matter - those
running as a tenant, and helper processes by name - cost more: their
``/proc/PID/cgroup`` and, for tenant processes, ``readlink /proc/PID/ns/net``;
``smaps_rollup`` (PSS) is read for helpers only, ``cmdline`` and ``loginuid``
only for the few processes that end up listed or need classifying.

Helpers are processes that exist only to launch or babysit a tenant's work
(configurable names, matched against the 15-byte comm): ``(sd-pam)`` runs as
the user, but ``su``, ``sudo`` and ``runuser`` stay root while their child runs
as the tenant. A helper belongs to a tenant by, in this order: cgroup (it lives
in the tenant's slice), UID (it runs as the tenant), process tree (a
descendant, reached through helpers only, runs as the tenant).

A tenant's own (non-helper) processes are classified by where they run:

- ``contained``: inside the tenant's slice and namespace (where nsd puts work);
- ``session``: the tenant's own login (its audit login UID is the tenant's) in
  a logind session scope (``session-*.scope``) in the tenant's namespace but not
  its slice - what pam_nsd makes of a login under the default layout, where
  logind's session scopes are not in the tenant's slice (docs/logins.md); not
  flagged;
- ``user_manager``: the tenant's systemd instance (``user@UID.service``) -
  legitimately elsewhere, not flagged;
- escapes, which are flagged: ``outside_slice`` (in the namespace but not the
  slice: its memory is neither limited nor counted with the tenant - a unit's
  main process with ``User=`` the tenant but no ``Slice=``, or a job of root's
  crontab, a root supervisord's program, an administrator's ``su`` that was not
  moved into the tenant's slice), ``outside_namespace`` (in the slice but
  another network namespace), ``outside_slice_and_namespace``, and
  ``session_outside_namespace``: a login of the tenant
  left in another network namespace (pam_nsd is not in that service's PAM stack,
  or skipped the login because nsd was unreachable).

When the host has no tenant slices (no systemd) only the namespace is judged;
when a tenant's namespace is not mounted, only the slice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .cgroupstats import read_bytes

CONTAINED = "contained"
SESSION = "session"
USER_MANAGER = "user_manager"
OUTSIDE_SLICE = "outside_slice"
OUTSIDE_NAMESPACE = "outside_namespace"
OUTSIDE_BOTH = "outside_slice_and_namespace"
SESSION_OUTSIDE_NAMESPACE = "session_outside_namespace"
HELPER = "helper"
#: Where a tenant's process may be; the first three are legitimate.
CLASSES: tuple[str, ...] = (CONTAINED, SESSION, USER_MANAGER)
ESCAPES: tuple[str, ...] = (
    OUTSIDE_SLICE,
    OUTSIDE_NAMESPACE,
    OUTSIDE_BOTH,
    SESSION_OUTSIDE_NAMESPACE,
)

DEFAULT_HELPERS: tuple[str, ...] = ("(sd-pam)", "su", "sudo", "runuser", "nsenter")
COMM_LEN = 15  # TASK_COMM_LEN - 1: /proc/PID/status "Name:" is truncated to this
_MAX_COMMAND = 512
_HELPER_DEPTH = 4  # sudo -> sudo (pty monitor) -> command: a short chain at most

_SESSION = re.compile(r"/session-[^/]+\.scope(?:/|$)")


@dataclass(frozen=True, slots=True)
class ScanTenant:
    """What the scan needs to know about a tenant."""

    uid: int
    #: the slice's cgroup path, e.g. ``/tenant.slice/tenant-1001.slice``; None: no slices
    cgroup: str | None
    #: inode of the tenant's network namespace; None: not mounted
    netns_inode: int | None


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One listed process: an escape or a helper (``nsctl audit``)."""

    tenant_uid: int
    pid: int
    ppid: int
    uid: int  # the process's effective UID
    comm: str
    command: str  # the command line, NULs as spaces, at most 512 characters; comm if unreadable
    cgroup: str | None
    netns_inode: int | None
    reason: str  # one of ESCAPES, or "helper"
    rss_bytes: int | None
    pss_bytes: int | None


@dataclass(frozen=True, slots=True)
class TenantProcesses:
    """Counts for one tenant. ``classes`` has every key of CLASSES and ESCAPES."""

    classes: Mapping[str, int]
    helpers: int
    helper_rss_bytes: int
    #: None when a helper's smaps_rollup was unreadable (a partial sum would mislead)
    helper_pss_bytes: int | None

    @property
    def escaped(self) -> int:
        return sum(self.classes[e] for e in ESCAPES)


@dataclass(frozen=True, slots=True)
class HelperTotal:
    """All processes of one helper name on the host, whoever they belong to."""

    processes: int
    rss_bytes: int


@dataclass(frozen=True)
class ProcScan:
    processes: int  # user-space processes looked at
    tenants: Mapping[int, TenantProcesses]  # every tenant asked about
    helpers: Mapping[str, HelperTotal]  # every configured helper name
    findings: tuple[ProcessRecord, ...]  # escapes first, then helpers
    findings_dropped: int  # listed beyond max_findings, counted but not kept


@dataclass(frozen=True, slots=True)
class NetDev:
    """Counters of one interface from /proc/net/dev (the kernel's rtnl_link_stats64)."""

    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


# -- /proc/PID/status -----------------------------------------------------------


def _field(data: bytes, key: bytes, start: int = 0) -> tuple[bytes, int] | None:
    i = data.find(key, start)
    if i < 0:
        return None
    k = i + len(key)
    j = data.find(b"\n", k)
    return data[k : j if j >= 0 else len(data)], i


def parse_status(data: bytes) -> tuple[str, int, int, int, int] | None:
    """(comm, ppid, real uid, effective uid, rss bytes), or None for processes without
    memory of their own: kernel threads, zombies, exiting processes."""
    rss = _field(data, b"\nVmRSS:")
    if rss is None:
        return None
    if not data.startswith(b"Name:\t"):
        return None
    end = data.find(b"\n")
    # The kernel escapes "\n" and "\\" in Name:; helpers are matched on this form.
    comm = data[6:end].decode("utf-8", "replace")
    ppid = _field(data, b"\nPPid:\t", end)
    uid = _field(data, b"\nUid:\t", end)
    if ppid is None or uid is None:
        return None
    try:
        ids = uid[0].split()
        rss_kb = int(rss[0].split()[0])
        return comm, int(ppid[0]), int(ids[0]), int(ids[1]), rss_kb * 1024
    except (ValueError, IndexError):
        return None


def parse_cgroup(data: bytes) -> str | None:
    """The process's path in systemd's hierarchy: the v2 line ``0::/path``, or on
    hybrid hosts the v1 ``name=systemd`` line (both mirror systemd's units)."""
    v1 = None
    for line in data.splitlines():
        hid, _, rest = line.partition(b":")
        controllers, _, path = rest.partition(b":")
        if hid == b"0" and controllers == b"":
            return path.decode("utf-8", "surrogateescape")
        if controllers == b"name=systemd":
            v1 = path.decode("utf-8", "surrogateescape")
    return v1


def _netns_inode(proc_dir: str) -> int | None:
    try:
        link = os.readlink(proc_dir + "/ns/net")  # "net:[4026531840]"
    except OSError:
        return None
    try:
        return int(link[5:-1])
    except ValueError:
        return None


def _pss(proc_dir: str) -> int | None:
    data = read_bytes(proc_dir + "/smaps_rollup")
    if data is None:
        return None
    found = _field(data, b"\nPss:")
    if found is None:
        return None
    try:
        return int(found[0].split()[0]) * 1024
    except (ValueError, IndexError):
        return None


def _loginuid(proc_dir: str) -> int | None:
    data = read_bytes(proc_dir + "/loginuid")
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _command(proc_dir: str, comm: str) -> str:
    data = read_bytes(proc_dir + "/cmdline")
    if not data:
        return comm
    text = data.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text[:_MAX_COMMAND]


def _in(cgroup: str, base: str) -> bool:
    return cgroup == base or cgroup.startswith(base + "/")


# -- the scan ---------------------------------------------------------------------


@dataclass(slots=True)
class _Proc:
    pid: int
    ppid: int
    comm: str
    ruid: int
    euid: int
    rss: int
    tenant: ScanTenant | None  # by UID
    helper: str | None  # configured helper name
    cgroup: str | None = None
    netns: int | None = None


_IRRELEVANT = _Proc(0, 0, "", 0, 0, 0, None, None)


def _read_process(
    proc_dir: str,
    pid: int,
    by_uid: Mapping[int, ScanTenant],
    helper_of: Mapping[str, str],
) -> _Proc | None:
    """One process: None if it is gone or has no memory of its own, _IRRELEVANT if it
    is neither a tenant's nor a helper (the common cheap case: one file read)."""
    data = read_bytes(proc_dir + "/status")
    if data is None:
        return None
    parsed = parse_status(data)
    if parsed is None:
        return None
    comm, ppid, ruid, euid, rss = parsed
    tenant = by_uid.get(euid) or by_uid.get(ruid)
    helper = helper_of.get(comm)
    if tenant is None and helper is None:
        return _IRRELEVANT
    cg_data = read_bytes(proc_dir + "/cgroup")
    if cg_data is None:
        return None
    p = _Proc(pid, ppid, comm, ruid, euid, rss, tenant, helper, parse_cgroup(cg_data))
    if tenant is not None and helper is None:
        p.netns = _netns_inode(proc_dir)
        if p.netns is None:
            return None  # exited (a zombie has no namespaces left)
    return p


def scan(
    tenants: Sequence[ScanTenant],
    helpers: Collection[str] = DEFAULT_HELPERS,
    proc_root: str = "/proc",
    *,
    max_findings: int = 1000,
) -> ProcScan | None:
    """Scan ``proc_root`` once; None if it cannot be listed at all."""
    try:
        names = os.listdir(proc_root)
    except OSError:
        return None
    by_uid = {t.uid: t for t in tenants}
    by_slice = {t.cgroup: t for t in tenants if t.cgroup is not None}
    helper_of = {h[:COMM_LEN]: h for h in helpers}
    relevant: dict[int, _Proc] = {}
    seen = 0
    for name in names:
        if not name.isdigit():
            continue
        found = _read_process(f"{proc_root}/{name}", int(name), by_uid, helper_of)
        if found is None:
            continue  # exited since the listing, a kernel thread or a zombie
        seen += 1
        if found is not _IRRELEVANT:
            relevant[found.pid] = found

    classes = {t.uid: dict.fromkeys(CLASSES + ESCAPES, 0) for t in tenants}
    listed: list[tuple[int, int, str, _Proc, int | None]] = []  # (tenant, pid, reason, ...)
    for p in relevant.values():
        if p.helper is not None or p.tenant is None:
            continue
        where = _classify(p, proc_root)
        classes[p.tenant.uid][where] += 1
        if where in ESCAPES:
            listed.append((p.tenant.uid, p.pid, where, p, None))

    helper_counts, helper_totals, helper_listed = _helpers(relevant, by_uid, by_slice, proc_root)
    per_tenant = {}
    for t in tenants:
        n, rss, pss = helper_counts.get(t.uid, (0, 0, 0))
        per_tenant[t.uid] = TenantProcesses(classes[t.uid], n, rss, pss)
    totals = {name: HelperTotal(*helper_totals.get(name, (0, 0))) for name in helpers}
    # Escapes first, then helpers, each by tenant and PID; only the kept ones cost
    # a cmdline read.
    listed.sort(key=lambda x: (x[0], x[1]))
    helper_listed.sort(key=lambda x: (x[0], x[1]))
    listed += helper_listed
    findings = tuple(
        _record(p, uid, reason, proc_root, pss)
        for uid, _pid, reason, p, pss in listed[:max_findings]
    )
    return ProcScan(
        processes=seen,
        tenants=per_tenant,
        helpers=totals,
        findings=findings,
        findings_dropped=max(0, len(listed) - max_findings),
    )


def _classify(p: _Proc, proc_root: str) -> str:
    t = p.tenant
    assert t is not None
    in_ns = t.netns_inode is None or p.netns == t.netns_inode
    # No slices on this host: judge the namespace only.
    in_slice = t.cgroup is None or (p.cgroup is not None and _in(p.cgroup, t.cgroup))
    if in_slice and in_ns:
        return CONTAINED
    cgroup = p.cgroup or ""
    if f"/user@{t.uid}.service/" in cgroup + "/":
        return USER_MANAGER
    # The tenant's own login: its audit login UID is the tenant's (ssh, su -l by
    # the tenant, the tenant's crontab). In a logind session scope in the
    # tenant's namespace it is where pam_nsd leaves it (under the default layout
    # session scopes are not in the tenant's slice, docs/logins.md); in another
    # namespace pam_nsd did not run for it. Anyone else's login running as the
    # tenant - root's crontab calling nsd-exec (cron.service: Debian's cron jobs
    # have no session), an administrator's su or sudo - is judged like any
    # process below: outside the slice, the tenant's work escapes its budget.
    own_login = _loginuid(f"{proc_root}/{p.pid}") == t.uid
    if own_login and (not in_ns or _SESSION.search(cgroup)):
        return SESSION if in_ns else SESSION_OUTSIDE_NAMESPACE
    if in_slice:  # or no slices on this host
        return OUTSIDE_NAMESPACE
    return OUTSIDE_SLICE if in_ns else OUTSIDE_BOTH


def _slice_owner(cgroup: str | None, by_slice: Mapping[str, ScanTenant]) -> ScanTenant | None:
    if not cgroup or not by_slice:
        return None
    path = cgroup
    while path and path != "/":
        owner = by_slice.get(path)
        if owner is not None:
            return owner
        path = path.rsplit("/", 1)[0]
    return None


def _helpers(
    relevant: Mapping[int, _Proc],
    by_uid: Mapping[int, ScanTenant],
    by_slice: Mapping[str, ScanTenant],
    proc_root: str,
) -> tuple[
    dict[int, tuple[int, int, int | None]],
    dict[str, tuple[int, int]],
    list[tuple[int, int, str, _Proc, int | None]],
]:
    children: dict[int, list[_Proc]] = {}
    for p in relevant.values():
        children.setdefault(p.ppid, []).append(p)
    counts: dict[int, tuple[int, int, int | None]] = {}
    totals: dict[str, tuple[int, int]] = {}
    records: list[tuple[int, int, str, _Proc, int | None]] = []
    for p in relevant.values():
        if p.helper is None:
            continue
        n, rss = totals.get(p.helper, (0, 0))
        totals[p.helper] = (n + 1, rss + p.rss)
        owner = _slice_owner(p.cgroup, by_slice) or p.tenant or _descendant_tenant(p, children)
        if owner is None:
            continue  # e.g. an admin's sudo for another admin: not a tenant's helper
        pss = _pss(f"{proc_root}/{p.pid}")
        n, rss, pss_sum = counts.get(owner.uid, (0, 0, 0))
        counts[owner.uid] = (
            n + 1,
            rss + p.rss,
            None if pss is None or pss_sum is None else pss_sum + pss,
        )
        records.append((owner.uid, p.pid, HELPER, p, pss))
    return counts, totals, records


def _descendant_tenant(p: _Proc, children: Mapping[int, list[_Proc]]) -> ScanTenant | None:
    """The tenant that a root helper (su, sudo, runuser) runs something for: the
    nearest descendant running as a tenant, looking through helpers only."""
    level = [p]
    for _ in range(_HELPER_DEPTH):
        below: list[_Proc] = []
        for q in level:
            for child in children.get(q.pid, ()):
                if child.tenant is not None:
                    return child.tenant
                if child.helper is not None:
                    below.append(child)
        if not below:
            return None
        level = below
    return None


def _record(
    p: _Proc, tenant_uid: int, reason: str, proc_root: str, pss: int | None
) -> ProcessRecord:
    return ProcessRecord(
        tenant_uid=tenant_uid,
        pid=p.pid,
        ppid=p.ppid,
        uid=p.euid,
        comm=p.comm,
        command=_command(f"{proc_root}/{p.pid}", p.comm),
        cgroup=p.cgroup,
        netns_inode=p.netns,
        reason=reason,
        rss_bytes=p.rss,
        pss_bytes=pss,
    )


# -- /proc/net/dev ----------------------------------------------------------------


def read_net_dev(proc_root: str = "/proc") -> dict[str, NetDev] | None:
    """Counters of every interface in the reading *process's* network namespace.

    ``/proc/net`` is ``/proc/self/net``: the namespace of the thread-group
    leader, i.e. the daemon's main thread, which never leaves the host
    namespace - so this is right even when called from a worker thread
    (``/proc/thread-self/net`` would be the thread's own).
    """
    data = read_bytes(f"{proc_root}/net/dev")
    if data is None:
        return None
    out: dict[str, NetDev] = {}
    for line in data.splitlines()[2:]:
        name, sep, rest = line.partition(b":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            continue
        try:
            v = [int(x) for x in fields[:16]]
        except ValueError:
            continue
        out[name.strip().decode("utf-8", "surrogateescape")] = NetDev(
            rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2], rx_dropped=v[3],
            tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10], tx_dropped=v[11],
        )  # fmt: skip
    return out
