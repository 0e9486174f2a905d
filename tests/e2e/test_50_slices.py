"""Tenant slices and limits on a real cgroup v2 host (phase 1).

Limits are set with ``nsctl limits`` and read back from the cgroup files the
kernel enforces; an allocation past MemoryMax is OOM-killed and counted; a
launched process lands in a scope of the tenant's slice, placed with PIDFDs
(systemd 257 has them); a template instance (``tenant-app@web-shop``) runs in
its tenant's namespace and slice. The limits set here are checked again after
the reboot in test_90_reboot.py: they must hold at boot.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NSD_EXEC,
    netns_inode_of,
    nsctl,
    run,
    show,
    slice_cgroup,
    slice_of,
    uid_of,
    wait_for,
)

pytestmark = pytest.mark.phase1

# web-shop keeps these for phase 2 (limits in force at boot, before anyone asks nsd).
BOOT_LIMITS = {"memory.max": str(96 << 20), "pids.max": "150"}


def slice_dir(user: str) -> Path:
    return Path("/sys/fs/cgroup" + slice_cgroup(user))


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().split(":", 2)[2]


def test_every_tenant_has_an_active_slice(tenants_ready: dict[str, dict[str, Any]]) -> None:
    for name, t in tenants_ready.items():
        unit = slice_of(name)
        assert t["slice"] == unit
        assert show(unit, "ActiveState")["ActiveState"] == "active"
        assert slice_dir(name).is_dir()  # realized in the cgroup v2 tree


def test_limits_reach_the_cgroup_files(tenants_ready: dict[str, dict[str, Any]]) -> None:
    nsctl("limits", "alice", "--memory-max", "128M", "--tasks-max", "200", "--cpu-weight", "50")
    d = slice_dir("alice")
    assert (d / "memory.max").read_text().strip() == str(128 << 20)
    assert (d / "pids.max").read_text().strip() == "200"
    assert (d / "cpu.weight").read_text().strip() == "50"
    nsctl("limits", "web-shop", "--memory-max", "96M", "--tasks-max", "150")
    d = slice_dir("web-shop")
    assert {f: (d / f).read_text().strip() for f in BOOT_LIMITS} == BOOT_LIMITS
    # Persistent: systemd keeps them as drop-ins, no unit file, no daemon-reload.
    control = Path(f"/etc/systemd/system.control/{slice_of('web-shop')}.d")
    assert (control / "50-MemoryMax.conf").is_file()


def test_allocation_past_memory_max_is_oom_killed(
    tenants_ready: dict[str, dict[str, Any]], figures: dict[str, Any]
) -> None:
    nsctl("limits", "bob", "--memory-max", "64M", "--memory-swap-max", "0")
    events = slice_dir("bob") / "memory.events"

    def oom_kills() -> int:
        fields = dict(line.split() for line in events.read_text().splitlines())
        return int(fields["oom_kill"])

    before = oom_kills()
    hog = "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    res = nsctl("run", "bob", "--wait", "--", "/usr/bin/python3", "-c", hog, check=False)
    assert res.returncode == 128 + 9, res.stderr  # SIGKILL from the OOM killer
    after = oom_kills()
    assert after > before
    figures["oom_kill_count_after_hog"] = after


def test_launched_process_is_placed_with_pidfds(tenants_ready: dict[str, dict[str, Any]]) -> None:
    log = run("journalctl", "-b", "-u", "nsd.service", "-o", "cat").stdout
    assert "PIDFDs for scopes: yes" in log
    # A root session (systemd-run --scope) starts nsd-exec: nsd's policy moves it
    # into a scope in alice's slice before it execs the workload.
    proc = subprocess.Popen(
        ["systemd-run", "--quiet", "--scope", NSD_EXEC, "alice", "--", "/bin/sleep", "120"]
    )
    try:
        wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep",
                 "the workload to exec")  # fmt: skip
        cg = cgroup_of(proc.pid)
        assert cg.startswith(f"{slice_cgroup('alice')}/nsd-enter-"), cg
        assert netns_inode_of(proc.pid) == os.stat("/run/netns/alice").st_ino
    finally:
        proc.kill()
        proc.wait()


def test_template_instance_runs_in_its_namespace_and_slice(
    tenants_ready: dict[str, dict[str, Any]],
) -> None:
    """contrib's tenant-app@ (native: NetworkNamespacePath=, User=) by user name; the
    Slice= comes from the drop-in nsd wrote when it created the tenant."""
    home = Path("/home/web-shop/bin")
    home.mkdir(exist_ok=True)
    app = home / "tenant-app"
    app.write_text("#!/bin/sh\nexec /bin/sleep infinity\n")
    app.chmod(0o755)
    os.chown(home, uid_of("web-shop"), uid_of("web-shop"))
    run("systemctl", "enable", "--now", "tenant-app@web-shop.service")
    pid = int(show("tenant-app@web-shop.service", "MainPID")["MainPID"])
    assert cgroup_of(pid) == (f"{slice_cgroup('web-shop')}/tenant-app@web-shop.service")
    assert netns_inode_of(pid) == os.stat("/run/netns/web-shop").st_ino
    assert Path(f"/proc/{pid}/status").read_text().count(f"\t{uid_of('web-shop')}\t") >= 1
