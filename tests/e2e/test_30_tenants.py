"""Tenants made with nsctl: namespaces under /run/netns, veths, addresses, pings."""

from __future__ import annotations

import json
import pwd
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NETNS_DIR,
    NSD_EXEC,
    TENANTS,
    inode,
    mounted_netns,
    nsctl,
    ping,
    run,
    show,
    tenants,
    uid_of,
)

pytestmark = pytest.mark.phase1


def test_nsctl_create(figures: dict[str, Any]) -> None:
    for name in TENANTS:
        out = nsctl("create", name).stdout
        assert out.startswith(f"created {name}:"), out
    listed = tenants()
    assert set(listed) == set(TENANTS)
    assert mounted_netns() >= set(TENANTS)
    v4 = {t["ipv4Address"] for t in listed.values()}
    v6 = {t["ipv6Address"] for t in listed.values()}
    assert len(v4) == len(v6) == len(TENANTS), "addresses must be distinct"
    for name, t in listed.items():
        uid = uid_of(name)
        assert t["uid"] == uid
        assert t["state"] == "ready"
        assert t["problems"] == []
        assert t["namespacePath"] == str(NETNS_DIR / name)
        assert t["namespaceInode"] == inode(NETNS_DIR / name)
        assert t["hostInterface"] == f"nsd{uid}"
        assert Path(f"/sys/class/net/nsd{uid}").exists()
    pid = int(show("nsd.service", "MainPID")["MainPID"])
    rss_kb = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
    figures["nsd_rss_kib_with_3_tenants"] = rss_kb


@pytest.mark.parametrize("name", TENANTS)
def test_ping_host_to_tenant(name: str, tenants_ready: dict[str, dict[str, Any]]) -> None:
    t = tenants_ready[name]
    ping(t["ipv4Address"])
    ping(t["ipv6Address"])


@pytest.mark.parametrize("name", TENANTS)
def test_ping_tenant_to_gateways(name: str, tenants_ready: dict[str, dict[str, Any]]) -> None:
    t = tenants_ready[name]
    ping(t["ipv4Gateway"], netns=name)
    ping(f"{t['ipv6Gateway']}%{t['tenantInterface']}", netns=name)


def test_ip_netns_sees_the_tenants(tenants_ready: dict[str, dict[str, Any]]) -> None:
    listed = run("ip", "netns", "list").stdout.split()
    for name, t in tenants_ready.items():
        assert name in listed
        links = json.loads(run("ip", "-n", name, "-j", "addr", "show").stdout)
        addrs = {a["local"] for link in links for a in link.get("addr_info", [])}
        assert {t["ipv4Address"], t["ipv6Address"]} <= addrs, addrs


def test_nsd_exec_joins_namespace_as_the_user(tenants_ready: dict[str, dict[str, Any]]) -> None:
    probe = "import os; print(os.getuid(), os.getgid(), os.stat('/proc/self/ns/net').st_ino)"
    for name in TENANTS:
        out = run(NSD_EXEC, name, "--", "/usr/bin/python3", "-c", probe).stdout.split()
        uid, gid, ns = (int(x) for x in out)
        assert uid == uid_of(name)
        assert gid == pwd.getpwnam(name).pw_gid
        assert ns == inode(NETNS_DIR / name) == tenants_ready[name]["namespaceInode"]
