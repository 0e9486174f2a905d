"""The package's life on a host with tenants (phase 2, the very last tests).

Version N has been installed since test_00_package.py (and survived the
reboot). Here 20 more tenants get running services, one of each kind: the
systemd-native template ``tenant-app@USER`` (``NetworkNamespacePath=``,
``User=``) and ``tenant-app-exec@USER`` (launched through nsd-exec). Then:

1. ``apt install ./nsd_<N+1>.deb`` (the same tree, ``scripts/build-deb
   --version``): nsd is restarted and serves, and every tenant's namespace inode,
   addresses and service PIDs are what they were (recorded in the figures,
   before and after);
2. ``apt remove nsd``: nsd stops, pam_nsd leaves the PAM stacks pam-auth-update
   manages; its configuration, its state and every tenant's namespace stay, and
   the services keep running;
3. installing again: nsd finds every tenant as it was;
4. ``apt purge nsd``: /etc/nsd and /var/lib/nsd are gone; the namespaces stay
   mounted until reboot (docs/packaging.md), with their services in them.

Placed last because it stops, removes and purges nsd.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NETNS_DIR,
    NSD,
    apt,
    inode,
    installed_version,
    is_active,
    mounted_netns,
    netns_inode_of,
    package_files,
    run,
    show,
    tenants,
    version_of,
    wait_active,
    wait_for,
)

pytestmark = pytest.mark.phase2

# Made by scripts/vm/prepare-guest, each with ~/bin/tenant-app (sleeps).
FLEET = tuple(f"upg{i:02d}" for i in range(1, 21))
KINDS = ("tenant-app@{}.service", "tenant-app-exec@{}.service")
STATE = Path("/var/lib/nsd")
CONFIG = Path("/etc/nsd/nsd.toml")
COMMON_SESSION = Path("/etc/pam.d/common-session")


def services(user: str) -> list[str]:
    return [kind.format(user) for kind in KINDS]


def main_pids() -> dict[str, int]:
    """MainPID of every fleet service, in one ``systemctl show`` (40 calls cost
    half a minute under TCG)."""
    units = [unit for user in FLEET for unit in services(user)]
    out = run("systemctl", "show", "-p", "Id,MainPID", *units).stdout
    pids: dict[str, int] = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        pids[props["Id"]] = int(props["MainPID"])
    return pids


def netns_or_zero(pid: int) -> int:
    try:
        return netns_inode_of(pid)
    except OSError:
        return 0


def snapshot() -> dict[str, dict[str, Any]]:
    """Per fleet tenant: what nsd reports, the namespace file's inode, and each
    service's main PID with the namespace that PID is in."""
    listed = tenants()
    all_pids = main_pids()
    out: dict[str, dict[str, Any]] = {}
    for user in FLEET:
        t = listed[user]
        pids = [all_pids[unit] for unit in services(user)]
        out[user] = {
            "namespaceInode": t["namespaceInode"],
            "fileInode": inode(NETNS_DIR / user),
            "ipv4": t["ipv4Address"],
            "ipv6": t["ipv6Address"],
            "pids": pids,
            "pidNetns": [netns_or_zero(pid) for pid in pids],
            "state": t["state"],
            "problems": t["problems"],
        }
    return out


def host_view() -> dict[str, dict[str, Any]]:
    """The same without nsd (removed): namespace files and the services' PIDs."""
    all_pids = main_pids()
    out: dict[str, dict[str, Any]] = {}
    for user in FLEET:
        pids = [all_pids[unit] for unit in services(user)]
        out[user] = {"fileInode": inode(NETNS_DIR / user), "pids": pids,
                     "pidNetns": [netns_or_zero(pid) for pid in pids]}  # fmt: skip
    return out


def assert_unchanged(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    keys = ("namespaceInode", "fileInode", "ipv4", "ipv6", "pids", "pidNetns")
    changed = {
        user: {k: (before[user][k], after[user][k]) for k in keys if k in after[user]
               and before[user][k] != after[user][k]}
        for user in FLEET
    }  # fmt: skip
    assert {u: c for u, c in changed.items() if c} == {}
    for user, t in after.items():
        assert t.get("state", "ready") == "ready" and not t.get("problems"), (user, t)
        assert t["pidNetns"] == [t["fileInode"]] * len(KINDS), (user, t)


def summary(snap: dict[str, dict[str, Any]]) -> dict[str, str]:
    """One line per tenant for the figures: inode, addresses, service PIDs."""
    return {
        user: f"netns {t['fileInode']} ipv4 {t.get('ipv4', '-')} ipv6 {t.get('ipv6', '-')} "
        f"pids {t['pids'][0]},{t['pids'][1]}"
        for user, t in snap.items()
    }


@pytest.fixture(scope="module")
def record(figures: dict[str, Any]) -> dict[str, Any]:
    """What the tests of this module found, in order (``before`` is the fleet's
    snapshot before the upgrade); its figures go to the results."""
    data: dict[str, Any] = {"figures": {"steps_with_every_tenant_unchanged": []}}
    figures["package_upgrade"] = data["figures"]
    return data


def test_fleet_of_twenty_tenants_with_running_services(record: dict[str, Any]) -> None:
    n, _ = package_files()
    assert installed_version("nsd") == version_of(n)
    wait_active("nsd.service")
    t0 = time.monotonic()
    # nsd-tenant@ (nsd-ensure) creates each tenant and its templates' Slice=
    # drop-ins; the services' start jobs wait for it (Requires=, After=). In
    # batches: 40 start jobs at once ran into their 90 s start timeout under TCG.
    run("systemctl", "start", *[f"nsd-tenant@{u}.service" for u in FLEET], timeout=300)
    for kind in KINDS:
        for batch in (FLEET[:10], FLEET[10:]):
            run("systemctl", "start", *[kind.format(u) for u in batch], timeout=300)
    for user in FLEET:
        for unit in services(user):
            assert is_active(unit) == "active", unit

    # Type=exec is done when nsd-exec has been executed, not when it has joined
    # the namespace and executed the program: wait for that.
    def settled() -> dict[str, dict[str, Any]] | None:
        snap = snapshot()
        ok = all(t["pidNetns"] == [t["fileInode"]] * len(KINDS) for t in snap.values())
        return snap if ok else None

    before = wait_for(settled, "every fleet service in its tenant's namespace", timeout=120)
    assert_unchanged(before, before)
    record["before"] = before
    record["figures"]["fleet_start_seconds"] = round(time.monotonic() - t0, 1)
    record["figures"]["before_upgrade"] = summary(before)


def test_upgrade_restarts_nsd_and_keeps_every_tenant(record: dict[str, Any]) -> None:
    _, next_deb = package_files()
    old_pid = int(show("nsd.service", "MainPID")["MainPID"])
    t0 = time.monotonic()
    out = apt("install", f"./{next_deb.name}").stdout
    fig = record["figures"]
    fig["upgrade_seconds"] = round(time.monotonic() - t0, 1)
    assert installed_version("nsd") == version_of(next_deb), out
    fig["versions"] = [version_of(package_files()[0]), version_of(next_deb)]
    new_pid = int(wait_active("nsd.service")["MainPID"])
    fig["nsd_main_pid_before_after"] = [old_pid, new_pid]
    assert new_pid != old_pid  # restarted (--restart-after-upgrade)
    after = snapshot()  # nsctl list: the new nsd serves
    fig["after_upgrade"] = summary(after)
    assert_unchanged(record["before"], after)
    fig["steps_with_every_tenant_unchanged"].append("upgrade")
    # The operator's edit of the conffile survived (the conffile did not change).
    assert 'parent_slice = "user.slice"\n' in CONFIG.read_text()


def test_remove_stops_nsd_and_keeps_state_and_namespaces(record: dict[str, Any]) -> None:
    # test_80 left the PAM profile on: the removal must take it out of the stacks,
    # or every login through common-session would fail on the missing module.
    assert "pam_nsd.so" in COMMON_SESSION.read_text()
    apt("remove", "nsd")
    assert "pam_nsd.so" not in COMMON_SESSION.read_text()
    assert installed_version("nsd") is None
    assert not Path(NSD).exists()
    assert is_active("nsd.service") == "inactive" and is_active("nsd.socket") == "inactive"
    assert (STATE / "nsd.db").is_file() and CONFIG.is_file()
    assert mounted_netns() >= set(FLEET)
    view = host_view()
    assert_unchanged(record["before"], view)  # services run on in their namespaces
    record["figures"]["steps_with_every_tenant_unchanged"].append("remove")


def test_reinstall_finds_every_tenant(record: dict[str, Any]) -> None:
    _, next_deb = package_files()
    apt("install", f"./{next_deb.name}")
    assert installed_version("nsd") == version_of(next_deb)
    assert is_active("nsd.socket") == "active"
    after = snapshot()  # the first nsctl call starts nsd through the socket if needed
    assert_unchanged(record["before"], after)
    record["figures"]["steps_with_every_tenant_unchanged"].append("reinstall")
    assert set(tenants()) >= {"alice", "bob", "web-shop", *FLEET}
    # The profile stays off until the operator enables it again (docs/packaging.md).
    assert "pam_nsd.so" not in COMMON_SESSION.read_text()


def test_purge_removes_configuration_and_state_not_namespaces(record: dict[str, Any]) -> None:
    apt("purge", "nsd")
    assert run("dpkg-query", "-W", "nsd", check=False).returncode != 0  # not even config-files
    assert not STATE.exists() and not Path("/etc/nsd").exists()
    assert is_active("nsd.service") == "inactive"
    # docs/packaging.md: what stays after a purge. Nothing removes the namespaces:
    # they stay mounted, with their veths and running services, until reboot.
    assert mounted_netns() >= set(FLEET)
    view = host_view()
    assert_unchanged(record["before"], view)
    record["figures"]["steps_with_every_tenant_unchanged"].append("purge")
    links = run("ip", "-o", "link", "show").stdout
    record["figures"]["nsd_host_links_after_purge"] = sum(
        1 for line in links.splitlines() if ": nsd" in line
    )
