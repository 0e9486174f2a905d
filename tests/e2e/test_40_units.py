"""Tenant services under systemd: nsd-exec in a unit, NetworkNamespacePath=, nsd restarts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NETNS_DIR,
    NSD_EXEC,
    cgroup_procs,
    inode,
    is_active,
    netns_inode_of,
    nsctl,
    ping,
    proc_status,
    run,
    show,
    stop_unit,
    systemd_run,
    tenants,
    uid_of,
    wait_active,
    wait_for,
)

pytestmark = pytest.mark.phase1

# A workload that reports who and where it is, and shuts down cleanly on SIGTERM.
WORKLOAD = """\
import json, os, signal, sys, time
out = sys.argv[1]

def on_term(signum, frame):
    with open(out + ".term", "w") as f:
        f.write(str(os.getpid()))
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
info = {"pid": os.getpid(), "uid": os.getuid(), "monotonic": time.monotonic(),
        "netns": os.stat("/proc/self/ns/net").st_ino}
with open(out + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(out + ".tmp", out + ".started")
while True:
    signal.pause()
"""

# ExecStopPost= of the test unit: how systemd saw the main process end.
RECORD_RESULT = """\
#!/bin/sh
echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" > "$1"
"""


@pytest.fixture
def workload(scratch: Path) -> Path:
    path = scratch / "workload.py"
    path.write_text(WORKLOAD)
    (scratch / "record-result").write_text(RECORD_RESULT)
    return path


@pytest.fixture
def units() -> Iterator[list[str]]:
    """Names of transient units a test starts; stopped afterwards in any case."""
    started: list[str] = []
    yield started
    for unit in started:
        stop_unit(unit)


def test_nsd_exec_unit_gets_sigterm_in_the_workload(
    workload: Path, units: list[str], tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    unit = "nsd-e2e-exec-alice.service"
    out = workload.parent / "exec-alice"
    result = workload.parent / "exec-alice.result"
    units.append(unit)
    # KillMode=mixed sends SIGTERM to the main process only: it reaches the
    # workload only if the workload IS the main process (no forking launcher).
    pid = systemd_run(
        unit, NSD_EXEC, "alice", "--", "/usr/bin/python3", str(workload), str(out),
        properties=("KillMode=mixed", "TimeoutStopSec=20s",
                    f"ExecStopPost=/bin/sh {workload.parent / 'record-result'} {result}"),
    )  # fmt: skip
    started = Path(f"{out}.started")
    wait_for(started.exists, "the workload to start", timeout=60)
    info = json.loads(started.read_text())
    props = show(unit, "MainPID", "ExecMainStartTimestampMonotonic", "ActiveState")
    figures["nsd_exec_start_to_workload_running_seconds"] = round(
        info["monotonic"] - int(props["ExecMainStartTimestampMonotonic"]) / 1e6, 3
    )
    # Same PID as nsd-exec had: the workload is the unit's main process, alone in its cgroup.
    assert info["pid"] == pid == int(props["MainPID"])
    assert cgroup_procs(unit) == [pid]
    assert "workload.py" in Path(f"/proc/{pid}/cmdline").read_text()
    uid = uid_of("alice")
    assert info["uid"] == uid
    assert proc_status(pid)["Uid"].split() == [str(uid)] * 4
    assert info["netns"] == netns_inode_of(pid) == inode(NETNS_DIR / "alice")

    t0 = time.monotonic()
    run("systemctl", "stop", unit)
    figures["nsd_exec_unit_stop_seconds"] = round(time.monotonic() - t0, 3)
    # The workload's handler ran in that same process and exited 0: the unit
    # ended with success, not killed (no SIGKILL after TimeoutStopSec).
    assert Path(f"{out}.term").read_text() == str(pid)
    assert result.read_text().split() == ["success", "exited", "0"]


def test_network_namespace_path_without_launcher(
    units: list[str], tenants_ready: dict[str, Any]
) -> None:
    unit = "nsd-e2e-native-alice.service"
    units.append(unit)
    pid = systemd_run(
        unit, "/bin/sleep", "600",
        properties=("NetworkNamespacePath=/run/netns/alice", "User=alice"),
    )  # fmt: skip
    assert netns_inode_of(pid) == inode(NETNS_DIR / "alice")
    assert proc_status(pid)["Uid"].split()[0] == str(uid_of("alice"))
    # No PAM, no (sd-pam), no launcher: the workload is all there is.
    assert cgroup_procs(unit) == [pid]
    addrs = json.loads(run("nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr").stdout)
    local = {a["local"] for link in addrs for a in link.get("addr_info", [])}
    assert tenants_ready["alice"]["ipv4Address"] in local


def test_nsd_restart_leaves_tenant_services_alone(
    units: list[str], tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    launched = {
        "nsd-e2e-restart-exec.service": systemd_run(
            "nsd-e2e-restart-exec.service", NSD_EXEC, "alice", "--", "/bin/sleep", "600"
        ),
        "nsd-e2e-restart-native.service": systemd_run(
            "nsd-e2e-restart-native.service", "/bin/sleep", "600",
            properties=("NetworkNamespacePath=/run/netns/bob", "User=bob"),
        ),
    }  # fmt: skip
    units.extend(launched)
    wait_for(
        lambda: (
            netns_inode_of(launched["nsd-e2e-restart-exec.service"]) == inode(NETNS_DIR / "alice")
        ),
        "the nsd-exec service to join alice's namespace",
    )
    before_ns = {name: inode(NETNS_DIR / name) for name in tenants_ready}
    before_pid = {u: netns_inode_of(pid) for u, pid in launched.items()}
    before = tenants()
    old_nsd = int(show("nsd.service", "MainPID")["MainPID"])

    t0 = time.monotonic()
    run("systemctl", "restart", "nsd.service", timeout=120)  # returns after READY=1
    figures["nsd_restart_seconds"] = round(time.monotonic() - t0, 3)
    new_nsd = int(wait_active("nsd.service")["MainPID"])
    assert new_nsd != old_nsd
    assert not os.path.exists(f"/proc/{old_nsd}")

    for unit, pid in launched.items():
        assert is_active(unit) == "active", unit
        assert int(show(unit, "MainPID")["MainPID"]) == pid
        assert netns_inode_of(pid) == before_pid[unit]
    assert {name: inode(NETNS_DIR / name) for name in tenants_ready} == before_ns
    after = tenants()
    for name, t in before.items():
        for key in ("uid", "ipv4Address", "ipv6Address", "namespaceInode", "hostInterface"):
            assert after[name][key] == t[key], (name, key)
    ping(after["alice"]["ipv4Address"])
    nsctl("list")
