"""What each way of starting a tenant service costs in memory (phase 1).

N identical ``sleep`` services for alice, started three ways: with
``PAMName=su-l`` (the seed's setup: an ``(sd-pam)`` process per service), with
nsd's systemd-native way (``NetworkNamespacePath=`` + ``User=``, no launcher),
and with ``nsd-exec`` (which execs the workload in place). Recorded per variant:
the median MemoryCurrent of a service, and the count, RSS and PSS
(smaps_rollup) of ``(sd-pam)`` processes, plus which process forked them
(systemd >= 255: systemd-executor; older: PID 1). The figures go to the
results; the assertions hold the shape (one sd-pam per PAM service, none
otherwise), not absolute sizes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import NSD_EXEC, run, show, stop_unit, systemd_run

pytestmark = pytest.mark.phase1

N = 5
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pamname": (("PAMName=su-l", "User=alice"), ("/bin/sleep", "infinity")),
    "native": (("NetworkNamespacePath=/run/netns/alice", "User=alice"), ("/bin/sleep", "infinity")),
    "nsd-exec": ((), (NSD_EXEC, "alice", "--", "/bin/sleep", "infinity")),
}


def kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def sd_pam_of(unit: str) -> list[int]:
    """The unit's (sd-pam): in its cgroup, or the main process's child (systemd >= 255
    forks it from systemd-executor, which becomes the main process). With pam_systemd
    in the stack (libpam-systemd), logind registers a background session for the
    service and may take processes into the session's scope; the parent still tells."""
    main = show(unit, "MainPID")["MainPID"]
    cgroup = Path(f"/sys/fs/cgroup/system.slice/{unit}/cgroup.procs")
    members = set(cgroup.read_text().split()) if cgroup.exists() else set()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(x.split(":\t", 1) for x in status.splitlines() if ":\t" in x)
        if fields.get("Name") == "(sd-pam)" and (fields.get("PPid") == main or d.name in members):
            found.append(int(d.name))
    return found


def test_memory_per_service_pamname_vs_native_vs_nsd_exec(
    tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    units = {v: [f"memcmp-{v}-{i}.service" for i in range(N)] for v in VARIANTS}
    try:
        for variant, (props, cmd) in VARIANTS.items():
            for unit in units[variant]:
                systemd_run(unit, *cmd, properties=props)
        time.sleep(3)  # let the services settle (page cache, sd-pam's session setup)
        result: dict[str, Any] = {}
        for variant in VARIANTS:
            current = [int(show(u, "MemoryCurrent")["MemoryCurrent"]) for u in units[variant]]
            helpers = [pid for u in units[variant] for pid in sd_pam_of(u)]
            entry: dict[str, Any] = {
                "services": N,
                "memory_current_median_bytes": statistics.median(current),
                "sd_pam_processes": len(helpers),
                "sd_pam_rss_kib_total": sum(
                    kib(Path(f"/proc/{p}/status"), "VmRSS") for p in helpers
                ),
                "sd_pam_pss_kib_total": sum(
                    kib(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in helpers
                ),
            }
            if helpers:
                ppid = kib(Path(f"/proc/{helpers[0]}/status"), "PPid")
                entry["sd_pam_parent"] = Path(f"/proc/{ppid}/comm").read_text().strip()
            result[variant] = entry
        figures["memory_per_service"] = result
        version = run("systemctl", "--version").stdout.split()[1]
        figures["memory_per_service"]["systemd_version"] = version
        assert result["pamname"]["sd_pam_processes"] == N
        assert result["native"]["sd_pam_processes"] == 0
        assert result["nsd-exec"]["sd_pam_processes"] == 0
        # nsd-exec left nothing resident: each unit holds exactly its workload.
        for unit in units["nsd-exec"]:
            procs = Path(f"/sys/fs/cgroup/system.slice/{unit}/cgroup.procs").read_text().split()
            assert len(procs) == 1
        assert (
            result["native"]["memory_current_median_bytes"]
            < result["pamname"]["memory_current_median_bytes"]
        )
    finally:
        for unit in (u for us in units.values() for u in us):
            stop_unit(unit)
