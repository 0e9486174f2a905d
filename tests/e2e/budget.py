"""Helpers for the budget tests (test_95_budget.py, test_96_prometheus.py): where a
workload started through nsd-exec ends up, limits set and restored, OOM kills, and
nsd's /metrics as an operator reads them."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.guest import NSD_EXEC, SCRATCH, nsctl, run, slice_cgroup, wait_for

CGROUP_ROOT = Path("/sys/fs/cgroup")
METRICS = "http://127.0.0.1:9917/metrics"
# Run as the tenant: report where this process runs (its cgroup, its PID), then
# become the workload.
REPORT = """#!/bin/sh
name=$1; shift
{ grep '^0::' /proc/self/cgroup | cut -d: -f3; echo $$; } > "/run/nsd-e2e/$name.tmp"
mv "/run/nsd-e2e/$name.tmp" "/run/nsd-e2e/$name"
exec "$@"
"""
# 300 MiB, every page written (bytes * n fills them): far over MemoryMax=64M.
HOG = ("/usr/bin/python3", "-c", "x = b'x' * (300 * 1024 * 1024)")


# Scripts live outside /run: the guest's /run refuses to execute files
# ("Unable to locate executable ...: Permission denied" from systemd).
BIN = Path("/var/lib/nsd-e2e-bin")


def _bin() -> Path:
    BIN.mkdir(mode=0o755, exist_ok=True)
    BIN.chmod(0o755)  # tenants run report.sh through nsd-exec
    return BIN


def report_script() -> Path:
    path = _bin() / "report.sh"
    path.write_text(REPORT)
    path.chmod(0o755)
    return path


def reporting(user: str, name: str, *cmd: str, flags: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs ``cmd`` as ``user`` through nsd-exec (with
    ``flags``) and reports where it runs."""
    return [NSD_EXEC, *flags, user, "--", "/bin/sh", str(report_script()), name, *cmd]


def reported(name: str, timeout: float = 60) -> tuple[str, int]:
    """(cgroup, pid) the workload ``name`` reported."""
    path = SCRATCH / name
    wait_for(path.exists, f"{name} to report where it runs", timeout)
    cgroup, pid = path.read_text().split()
    return cgroup, int(pid)


def in_tenant_scope(user: str, cgroup: str) -> bool:
    """Whether ``cgroup`` is an nsd-enter scope of ``user``'s slice."""
    return cgroup.startswith(f"{slice_cgroup(user)}/nsd-enter-")


def memory_events(user: str) -> dict[str, int]:
    text = (CGROUP_ROOT / slice_cgroup(user).lstrip("/") / "memory.events").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def working_set(user: str) -> int:
    d = CGROUP_ROOT / slice_cgroup(user).lstrip("/")
    stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
    return int((d / "memory.current").read_text()) - int(stat["inactive_file"])


@contextmanager
def memory_max(user: str, value: str) -> Iterator[None]:
    """``nsctl limits USER --memory-max VALUE`` for the block; the tenant's own
    override (or none) afterwards."""
    before = json.loads(nsctl("--json", "limits", user).stdout)["overrides"].get("memoryMax")
    nsctl("limits", user, "--memory-max", value)
    try:
        yield
    finally:
        if before is None:
            nsctl("limits", user, "--reset", "memoryMax")
        else:
            nsctl("limits", user, "--memory-max", str(before))


def scrape() -> str:
    with urllib.request.urlopen(METRICS, timeout=10) as r:
        return str(r.read().decode())


def fault_count(user: str, kind: str) -> float:
    """nsd_tenant_faults_total of ``user`` and ``kind`` (0 while absent)."""
    pattern = re.compile(
        r'^nsd_tenant_faults_total\{(?=[^}]*tenant="' + re.escape(user) + r'")'
        r'(?=[^}]*kind="' + re.escape(kind) + r'")[^}]*\} ([0-9.e+]+)$',
        re.M,
    )
    m = pattern.search(scrape())
    return float(m[1]) if m else 0.0


def oom_in_oneshot(user: str, name: str) -> subprocess.CompletedProcess[str]:
    """A oneshot service whose script (its main process) calls nsd-exec for ``user``
    with HOG: the issue's reproduction. Waits for the service to end."""
    script = _bin() / f"{name}.sh"
    line = " ".join(reporting(user, name, *HOG[:2], f'"{HOG[2]}"'))
    script.write_text(f"#!/bin/sh\n{line}\necho $? > /run/nsd-e2e/{name}.rc\n")
    script.chmod(0o755)
    return run("systemd-run", "--quiet", "--wait", f"--unit={name}.service",
               "-p", "Type=oneshot", str(script), timeout=180)  # fmt: skip
