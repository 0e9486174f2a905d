"""Across a reboot: phase 1 records the tenants and installs tenant services
enabled for boot; phase 2 (the same disk, booted again) checks that nsd,
started at boot, recreated every namespace with the same addresses before the
tenant services needed them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NETNS_DIR,
    NSD_EXEC,
    TENANTS,
    boot_id,
    inode,
    is_active,
    load_state,
    mounted_netns,
    netns_inode_of,
    ping,
    proc_status,
    run,
    save_state,
    show,
    slice_cgroup,
    tenants,
    uid_of,
)

# Left in /run by phase 1: /run is a tmpfs, so it must be gone after the reboot.
RUN_SENTINEL = Path("/run/nsd-e2e-phase1")

# Tenant services enabled for boot, one per way of joining the namespace.
BOOT_UNITS = {
    # The launcher: needs only the socket (connections queue until nsd is ready).
    "nsd-e2e-boot-exec.service": (
        "bob",
        """\
[Unit]
Wants=nsd.socket
After=nsd.socket

[Service]
ExecStart=/usr/bin/nsd-exec bob -- /bin/sleep infinity

[Install]
WantedBy=multi-user.target
""",
    ),
    # No launcher: the namespace file must exist, i.e. nsd must be ready.
    "nsd-e2e-boot-native.service": (
        "web-shop",
        """\
[Unit]
Wants=nsd.service
After=nsd.service

[Service]
NetworkNamespacePath=/run/netns/web-shop
User=web-shop
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
""",
    ),
}


@pytest.mark.phase1
def test_record_state_for_phase2(tenants_ready: dict[str, dict[str, Any]]) -> None:
    for unit, (_, text) in BOOT_UNITS.items():
        Path("/etc/systemd/system", unit).write_text(text)
    run("systemctl", "daemon-reload")
    run("systemctl", "enable", "--quiet", *BOOT_UNITS)
    RUN_SENTINEL.write_text("phase 1\n")
    listed = tenants()
    assert set(listed) == set(TENANTS)
    state = {
        "bootId": boot_id(),
        "tenants": {
            name: {
                key: t[key]
                for key in ("uid", "ipv4Address", "ipv6Address", "ipv6Prefix", "hostInterface")
            }
            | {"namespaceInode": inode(NETNS_DIR / name)}
            for name, t in listed.items()
        },
    }
    save_state(state)


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    try:
        return load_state()
    except FileNotFoundError:
        pytest.fail("phase 1 recorded no state (did test_record_state_for_phase2 run?)")


@pytest.mark.phase2
def test_this_is_a_new_boot(recorded: dict[str, Any]) -> None:
    assert boot_id() != recorded["bootId"]
    assert not RUN_SENTINEL.exists(), "/run survived: this is not a fresh boot"


@pytest.mark.phase2
def test_nsd_recreated_namespaces_at_boot(
    recorded: dict[str, Any], figures: dict[str, Any]
) -> None:
    # Before talking to nsd at all: it was started at boot (enabled; ordered
    # before multi-user.target, hence before this payload) and has already
    # rebuilt every namespace, since it reports READY=1 only after reconciling.
    assert is_active("nsd.service") == "active"
    assert mounted_netns() >= set(recorded["tenants"])
    nsd = show("nsd.service", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
    payload = show("nsd-e2e.service", "ExecMainStartTimestampMonotonic")
    ready = int(nsd["ActiveEnterTimestampMonotonic"])
    assert 0 < ready < int(payload["ExecMainStartTimestampMonotonic"])
    figures["nsd_ready_after_kernel_start_seconds"] = round(ready / 1e6, 3)
    figures["nsd_start_to_ready_at_boot_seconds"] = round(
        (ready - int(nsd["ExecMainStartTimestampMonotonic"])) / 1e6, 3
    )


@pytest.mark.phase2
def test_same_addresses_after_reboot(recorded: dict[str, Any], figures: dict[str, Any]) -> None:
    listed = tenants()
    assert set(listed) == set(recorded["tenants"])
    figures["namespace_inodes_phase1_phase2"] = {}
    for name, before in recorded["tenants"].items():
        t = listed[name]
        assert t["state"] == "ready"
        assert t["problems"] == []
        for key in ("uid", "ipv4Address", "ipv6Address", "ipv6Prefix", "hostInterface"):
            assert t[key] == before[key], (name, key)
        # The namespace is a mount made in this boot (/run is new, see
        # test_this_is_a_new_boot). Its inode is NOT evidence either way: the
        # kernel hands out namespace inode numbers lowest-free-first, so the
        # same creation order on a fresh boot gives the same numbers.
        assert t["namespaceInode"] == inode(NETNS_DIR / name)
        figures["namespace_inodes_phase1_phase2"][name] = [
            before["namespaceInode"],
            t["namespaceInode"],
        ]


@pytest.mark.phase2
@pytest.mark.parametrize("name", TENANTS)
def test_pings_after_reboot(name: str, recorded: dict[str, Any]) -> None:
    t = recorded["tenants"][name]
    ping(t["ipv4Address"])
    ping(t["ipv6Address"])


@pytest.mark.phase2
@pytest.mark.parametrize("unit", sorted(BOOT_UNITS))
def test_tenant_service_enabled_for_boot_runs_in_its_namespace(unit: str) -> None:
    user = BOOT_UNITS[unit][0]
    assert is_active(unit) == "active", run("systemctl", "status", unit, check=False).stdout
    pid = int(show(unit, "MainPID")["MainPID"])
    assert netns_inode_of(pid) == inode(NETNS_DIR / user)
    assert proc_status(pid)["Uid"].split()[0] == str(uid_of(user))


@pytest.mark.phase2
def test_nsd_exec_after_reboot() -> None:
    out = run(NSD_EXEC, "alice", "--", "/usr/bin/python3", "-c",
              "import os; print(os.stat('/proc/self/ns/net').st_ino)").stdout  # fmt: skip
    assert int(out) == inode(NETNS_DIR / "alice")


@pytest.mark.phase2
def test_template_service_at_boot_has_its_slice_limits() -> None:
    """Enabled in phase 1: at boot it starts in the tenant's slice, whose limits
    (persistent drop-ins set through nsd in phase 1) are in force."""
    from tests.e2e.test_50_slices import BOOT_LIMITS, slice_dir

    unit = "tenant-app@web-shop.service"
    assert is_active(unit) == "active"
    pid = int(show(unit, "MainPID")["MainPID"])
    cg = Path(f"/proc/{pid}/cgroup").read_text().strip().split(":", 2)[2]
    assert cg == f"{slice_cgroup('web-shop')}/{unit}"
    assert netns_inode_of(pid) == os.stat("/run/netns/web-shop").st_ino
    d = slice_dir("web-shop")
    assert {f: (d / f).read_text().strip() for f in BOOT_LIMITS} == BOOT_LIMITS
