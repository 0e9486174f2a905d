"""Host prerequisites, checked from facts rather than assumed.

Each check reads the host (mountinfo, cgroupfs, /proc/sys) and says what nsd
can and cannot do here. Used by ``nsctl doctor`` (through the daemon, because
some facts - its own mount namespace - are the daemon's) and at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from .ipam import Ipam

CGROUP_ROOT = "/sys/fs/cgroup"
WANTED_CONTROLLERS = ("memory", "cpu", "io", "pids")


@dataclass(frozen=True)
class Check:
    name: str
    severity: str  # ok, warning, error
    message: str


def systemd_is_pid1(proc: str = "/proc") -> bool:
    # sd_booted()'s test: /run/systemd/system exists only when systemd is PID 1.
    try:
        with open(f"{proc}/1/comm", encoding="ascii") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    return os.path.isdir("/run/systemd/system") and comm == "systemd"


def cgroup2_controllers(root: str = CGROUP_ROOT) -> set[str] | None:
    """Controllers of a unified (cgroup v2) hierarchy at ``root``; None if it is not one."""
    try:
        with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as f:
            return set(f.read().split())
    except OSError:
        return None


def mount_propagation(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """'shared', 'private', 'slave' for the mount at exactly ``path``; None if not a mount point."""
    found = None
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != path:
                continue
            optional = fields[6 : fields.index("-")]
            if any(o.startswith("shared:") for o in optional):
                found = "shared"
            elif any(o.startswith("master:") for o in optional):
                found = "slave"
            else:
                found = "private"  # the last mount at a path is the visible one
    return found


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def degradations() -> list[str]:
    """What this host lacks, one line each; logged once at start and shown in Status."""
    out = []
    if not systemd_is_pid1():
        out.append("systemd is not PID 1: tenant slices and scopes are unavailable")
    controllers = cgroup2_controllers()
    if controllers is None:
        out.append(f"{CGROUP_ROOT} is not a cgroup v2 hierarchy: per-tenant limits and "
                   "memory metrics are unavailable")  # fmt: skip
    else:
        missing = [c for c in WANTED_CONTROLLERS if c not in controllers]
        if missing:
            out.append(f"cgroup v2 lacks controllers {', '.join(missing)}: limits and metrics "
                       "for them are unavailable")  # fmt: skip
    return out


def run(run_dir: str, ipam: Ipam, routes: list[IPv4Network | IPv6Network]) -> list[Check]:
    return [
        _check_systemd(),
        _check_cgroup2(),
        _check_propagation(run_dir),
        _check_mount_namespace(),
        _check_core_pattern(),
        _check_ipv6(),
        _check_pools(ipam, routes),
    ]


def limit_checks(
    slices_reason: str | None,
    systemd_version: int | None,
    pidfds: bool | None,
    parent_slice: str,
    configured: list[set[str]],
    *,
    block_root: str = "/sys/block",
    cgroup_root: str = CGROUP_ROOT,
) -> list[Check]:
    """What of the configured limits is in effect on this host.

    ``slices_reason`` is None when slices are available, else why not;
    ``configured`` has, per tenant, the limit fields that are set (defaults or
    overrides), so settings nobody uses are not reported.
    """
    used = set().union(*configured) if configured else set()
    if slices_reason is not None:
        sev = "warning" if used else "ok"
        return [Check("slices", sev, f"tenant slices are unavailable: {slices_reason}"
                      + ("; configured limits are not in effect" if used else ""))]  # fmt: skip
    checks = [Check(
        "slices", "ok",
        f"systemd {systemd_version}: tenant slices under {parent_slice}; scope placement "
        + ("by PIDFDs" if pidfds else "by PIDs guarded with pidfds (this systemd has no PIDFDs)"),
    )]  # fmt: skip
    controllers = cgroup2_controllers(cgroup_root) or set()
    for field, controller in (("memory", "memory"), ("cpu", "cpu"), ("tasks", "pids"),
                              ("io", "io")):  # fmt: skip
        if any(f.startswith(field) for f in used) and controller not in controllers:
            checks.append(Check(f"{field}-limits", "warning",
                                f"{field} limits are configured but the cgroup v2 '{controller}' "
                                "controller is not available: they are not enforced"))  # fmt: skip
    if used & {"memory_min", "memory_low"}:
        checks.append(Check(
            "memory-protection", "ok",
            f"MemoryMin/MemoryLow are set; nsd gives {parent_slice} the sum of its tenants' "
            "protections, since a child is only protected as far as its parent is",
        ))  # fmt: skip
    if "io_weight" in used and not _io_weights_honoured(block_root, cgroup_root):
        checks.append(Check(
            "io-weight", "warning",
            "IOWeight is configured but no block device uses the BFQ scheduler and io.cost "
            "is not enabled: IO weights are not in effect",
        ))  # fmt: skip
    return checks


def _io_weights_honoured(block_root: str, cgroup_root: str) -> bool:
    try:
        with open(os.path.join(cgroup_root, "io.cost.qos"), encoding="ascii") as f:
            if "enable=1" in f.read():
                return True
    except OSError:
        pass
    try:
        devices = os.listdir(block_root)
    except OSError:
        return False
    for dev in devices:
        try:
            with open(os.path.join(block_root, dev, "queue", "scheduler"), encoding="ascii") as f:
                if "[bfq]" in f.read():
                    return True
        except OSError:
            continue
    return False


def _check_systemd() -> Check:
    if systemd_is_pid1():
        return Check("systemd", "ok", "systemd is PID 1")
    return Check(
        "systemd", "warning",
        "systemd is not PID 1: slices, scopes and limits are unavailable; namespaces work",
    )  # fmt: skip


def _check_cgroup2() -> Check:
    controllers = cgroup2_controllers()
    if controllers is None:
        return Check(
            "cgroup2", "warning",
            f"{CGROUP_ROOT} is not cgroup v2 (hybrid or v1 host): no per-tenant limits or "
            "memory metrics",
        )  # fmt: skip
    missing = [c for c in WANTED_CONTROLLERS if c not in controllers]
    text = f"cgroup v2 controllers: {' '.join(sorted(controllers)) or 'none'}"
    if missing:
        return Check("cgroup2", "warning", f"{text}; missing: {' '.join(missing)}")
    return Check("cgroup2", "ok", text)


def _check_propagation(run_dir: str) -> Check:
    prop = mount_propagation(run_dir.rstrip("/") or "/")
    if prop == "shared":
        return Check(
            "netns-propagation", "ok", f"{run_dir} is a mount point with shared propagation"
        )
    if prop is None:
        return Check(
            "netns-propagation", "ok",
            f"{run_dir} is not a mount point yet; nsd makes it one (shared) "
            "with the first namespace",
        )  # fmt: skip
    return Check(
        "netns-propagation", "warning",
        f"{run_dir} has {prop} propagation: namespace mounts may not reach other mount namespaces",
    )  # fmt: skip


def _check_mount_namespace() -> Check:
    try:
        same = os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError as e:
        return Check("mount-namespace", "warning", f"cannot compare with PID 1: {e.strerror}")
    if same:
        return Check("mount-namespace", "ok", "nsd shares PID 1's mount namespace")
    return Check(
        "mount-namespace", "error",
        "nsd runs in its own mount namespace: the namespaces it mounts are invisible to the host "
        "(remove PrivateMounts=, ProtectSystem= and similar from nsd.service)",
    )  # fmt: skip


def _check_core_pattern() -> Check:
    try:
        with open("/proc/sys/kernel/core_pattern", encoding="utf-8") as f:
            core = f.read().strip()
    except OSError:
        core = ""
    if core.startswith("|"):
        return Check(
            "core-pattern", "warning",
            f"core_pattern pipes to a handler ({core.split()[0][1:]}): RLIMIT_CORE "
            "(exec.rlimits.core) is not honoured for cores",
        )  # fmt: skip
    return Check("core-pattern", "ok", f"core_pattern is {core!r}")


def _check_ipv6() -> Check:
    if os.path.isdir("/proc/sys/net/ipv6"):
        return Check("ipv6", "ok", "IPv6 is enabled")
    return Check("ipv6", "error", "IPv6 is disabled in the kernel; tenants need it")


def _check_pools(ipam: Ipam, routes: list[IPv4Network | IPv6Network]) -> Check:
    overlaps = ipam.overlaps(routes)
    if overlaps:
        return Check("address-pools", "error", "; ".join(overlaps))
    return Check(
        "address-pools", "ok",
        f"pools {ipam.ipv4_pool} and {ipam.ipv6_base} do not overlap host routes",
    )  # fmt: skip


def escape_check(escaped: Mapping[str, int] | None) -> Check:
    """The audit summarised: tenants with processes outside their slice or namespace
    in the metrics sampler's last scan (``escaped``: tenant name -> count; None: no
    scan yet or metrics off)."""
    name = "tenant-processes"
    if escaped is None:
        return Check(name, "ok", "no process scan available (metrics off or not sampled yet)")
    flagged = {t: n for t, n in escaped.items() if n}
    if not flagged:
        return Check(name, "ok", "every tenant process is in its tenant's slice and namespace")
    worst = sorted(flagged.items(), key=lambda kv: (-kv[1], kv[0]))
    listed = ", ".join(f"{t} ({n})" for t, n in worst[:5])
    more = f" and {len(worst) - 5} more tenant(s)" if len(worst) > 5 else ""
    return Check(
        name,
        "warning",
        f"{sum(flagged.values())} process(es) outside their tenant's slice or namespace: "
        f"{listed}{more}; their memory escapes the tenant's limits - `nsctl audit` lists "
        "them with the fix",
    )
