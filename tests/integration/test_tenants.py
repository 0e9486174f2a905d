"""The foundation end to end: a real daemon, real namespaces, veth, addresses, pings."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsd.doctor import systemd_is_pid1
from tests.harness import Daemon, TestUsers, mounts_under, netns_inode, run, running_daemon, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
]

T = "io.nsd.Tenant."


@pytest.fixture
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with running_daemon() as env:
        yield env


def addrs(netns: str, ifname: str) -> set[str]:
    out = json.loads(run("ip", "-j", "addr", "show", "dev", ifname, netns=netns).stdout)
    return {f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"]}


def test_twenty_tenants_lifecycle(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    names = [users.add() for _ in range(20)]
    tenants = {n: d.call(T + "Create", name=n)["tenant"] for n in names}

    listed = run("ip", "netns", "list").stdout
    links = d.host_links()
    for name, t in tenants.items():
        assert t["state"] == "ready" and t["uid"] == uid_of(name)
        assert name in listed  # default template: the user name, readable in `ip netns list`
        assert t["hostInterface"] == f"nsd{uid_of(name)}" and t["hostInterface"] in links
        ns = t["namespacePath"]
        assert netns_inode(ns) == t["namespaceInode"]
        inside = addrs(ns, "eth0")
        assert f"{t['ipv4Address']}/32" in inside and f"{t['ipv6Address']}/64" in inside
        assert "up" in run("ip", "-j", "link", "show", "lo", netns=ns).stdout.lower()
        host_side = addrs(d.host, t["hostInterface"])
        assert f"{t['ipv4Gateway']}/32" in host_side and f"{t['ipv6Gateway']}/64" in host_side
        assert (
            run("cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start", netns=ns).stdout.strip()
            == "0"
        )
        # A real ping over each veth, host -> tenant, both families.
        run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
        run("ping", "-6", "-c1", "-W2", t["ipv6Address"], netns=d.host)
    assert len({t["ipv4Address"] for t in tenants.values()}) == 20
    assert len({t["ipv6Prefix"] for t in tenants.values()}) == 20

    d.restart()
    for name, t in tenants.items():
        again = d.call(T + "Get", name=name)["tenant"]
        assert again["namespaceInode"] == t["namespaceInode"] == netns_inode(t["namespacePath"])
        assert (again["ipv4Address"], again["ipv6Address"]) == (t["ipv4Address"], t["ipv6Address"])

    for name in names:
        d.call(T + "Remove", name=name)
    assert not [link for link in d.host_links() if link.startswith("nsd")]
    assert not [m for m in mounts_under("/run/netns") if os.path.basename(m) in names]
    assert not [n for n in os.listdir("/run/netns") if n in names]
    assert d.db_rows("SELECT count(*) FROM tenants") == [(0,)]
    assert d.db_rows("SELECT count(*) FROM leases WHERE released_us IS NULL") == [(0,)]
    assert d.call(T + "List")["tenants"] == []


def test_concurrent_enter_creates_exactly_once(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    inodes: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(64)

    def enter() -> None:
        try:
            with d.client() as c:
                barrier.wait()
                reply, fds = c.call_with_fds(T + "Enter", {"name": name})
                inodes.append(os.fstat(fds[reply["namespaceFileDescriptor"]]).st_ino)
                for fd in fds:
                    os.close(fd)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=enter) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(inodes) == 64 and len(set(inodes)) == 1
    assert [n for n in os.listdir("/run/netns") if n == name] == [name]
    assert len([m for m in mounts_under("/run/netns") if m.endswith("/" + name)]) == 1
    assert [link for link in d.host_links() if link.startswith("nsd")] == [f"nsd{uid_of(name)}"]
    ns_links = json.loads(run("ip", "-j", "link", netns=f"/run/netns/{name}").stdout)
    assert sorted(link["ifname"] for link in ns_links) == ["eth0", "lo"]
    assert d.db_rows(
        f"SELECT family, count(*) FROM leases WHERE uid = {uid_of(name)} GROUP BY family"
    ) == [(4, 1), (6, 1)]
    d.call(T + "Remove", name=name)


def test_enter_without_create(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    from nsd.varlink.client import VarlinkError

    with pytest.raises(VarlinkError) as info, d.client() as c:
        c.call_with_fds(T + "Enter", {"name": name, "create": False})
    assert info.value.name == T + "NoSuchTenant"
    assert not os.path.exists(f"/run/netns/{name}")


def test_errors_are_named(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    from nsd.varlink.client import VarlinkError

    def error_of(method: str, **params: object) -> tuple[str, dict[str, object]]:
        with pytest.raises(VarlinkError) as info:
            d.call(T + method, **params)
        return info.value.name, info.value.parameters

    assert error_of("Get", name="nosuchuserhere")[0] == T + "NoSuchTenant"
    assert error_of("Create", name="nosuchuserhere") == (
        T + "NoSuchUser",
        {"name": "nosuchuserhere"},
    )
    assert error_of("Create", name="../etc")[0] == T + "InvalidTenantName"
    assert error_of("Create", name="root")[0] == T + "UidOutOfRange"
    assert error_of("Remove", name="nosuchuserhere")[0] == T + "NoSuchTenant"
    name = users.add()
    d.call(T + "Create", name=name)
    assert error_of("Create", name=name) == (T + "TenantExists", {"name": name})
    ensured = d.call(T + "Ensure", name=name)
    assert ensured["created"] is False
    d.call(T + "Remove", name=name)


def test_remove_refused_while_busy_unless_forced(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    import subprocess

    name = users.add()
    t = d.call(T + "Create", name=name)["tenant"]
    sleeper = subprocess.Popen(["nsenter", f"--net={t['namespacePath']}", "sleep", "300"])
    try:
        res = d.nsctl("remove", name, check=False)
        assert res.returncode == 1
        assert "still has 1 process" in res.stderr and "io.nsd.Tenant.TenantBusy" in res.stderr
        assert d.call(T + "Get", name=name)["tenant"]["state"] == "ready"
        d.nsctl("remove", "--force", name)
        assert sleeper.wait(15) == -15  # SIGTERM reached it
    finally:
        sleeper.kill()
    assert not os.path.exists(t["namespacePath"])


def test_user_renamed_is_reported_not_acted_on(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    from nsd.varlink.client import VarlinkError

    name = users.add()
    t = d.call(T + "Create", name=name)["tenant"]
    new = name + "r"
    run("usermod", "--login", new, name)
    users.names[users.names.index(name)] = new
    with pytest.raises(VarlinkError) as info:
        d.call(T + "Ensure", name=new)
    assert info.value.name == T + "TenantIdentityChanged"
    assert info.value.parameters["recordedName"] == name
    shown = d.call(T + "Get", name=name)["tenant"]
    assert any("renamed" in p for p in shown["problems"])
    report = d.call("io.nsd.Daemon.Reconcile")
    assert any(name in p for p in report["problems"]) and report["actions"] == []
    assert netns_inode(t["namespacePath"]) == t["namespaceInode"]  # untouched
    d.call(T + "Remove", name=name)  # an explicit operator action is allowed


def test_nsctl_against_daemon(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    out = d.nsctl("create", name).stdout
    assert out.startswith(f"created {name}: 100.64.")
    table = d.nsctl("list").stdout
    assert name in table and "1 tenant(s)" in table
    data = json.loads(d.nsctl("--json", "list").stdout)
    assert [t["name"] for t in data] == [name] and data[0]["ipv4Address"].startswith("100.64.")
    assert "Namespace" in d.nsctl("show", name).stdout
    assert "ok" in d.nsctl("ensure", name).stdout
    doctor = d.nsctl("doctor", check=False)
    assert "netns-propagation" in doctor.stdout and "core-pattern" in doctor.stdout
    status = d.nsctl("status").stdout
    assert "1 tenant(s)" in status
    res = d.nsctl("show", "nosuchuserhere", check=False)
    assert res.returncode == 1
    assert (
        res.stderr.strip() == "nsctl: no tenant named nosuchuserhere [io.nsd.Tenant.NoSuchTenant]"
    )
    d.nsctl("remove", name)
    assert d.nsctl("list").stdout.strip().endswith("0 tenant(s)")


def test_nsctl_without_daemon(tmp_path: Path) -> None:
    from tests.harness import PY

    res = run(PY, "-m", "nsd.cli", "--socket", str(tmp_path / "none"), "list", check=False)
    assert res.returncode == 1
    assert "cannot reach nsd" in res.stderr


def test_watch_streams_events(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    from nsd.varlink.client import VarlinkError

    name = users.add()
    events: list[tuple[str, str | None]] = []
    ended: list[str] = []
    synced = threading.Event()
    done = threading.Event()

    def watch() -> None:
        with d.client() as c:
            try:
                for reply in c.call_more(T + "Watch", {}):
                    t = reply.get("tenant")
                    events.append((reply["event"], t["name"] if t else None))
                    if reply["event"] == "synced":
                        synced.set()
                    if reply["event"] == "removed":
                        done.set()
            except VarlinkError as e:
                ended.append(e.name)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    assert synced.wait(10)
    d.call(T + "Create", name=name)
    d.call(T + "Remove", name=name)
    assert done.wait(10)
    assert events == [("synced", None), ("created", name), ("removed", name)]
    # A daemon that stops ends the stream with a named error, not a broken pipe.
    assert d.stop() == 0
    th.join(10)
    assert ended == [T + "ShuttingDown"]


def test_second_instance_refused_before_touching_host(env: tuple[Daemon, TestUsers]) -> None:
    d, _ = env
    res = run(*d.command(), check=False)
    assert res.returncode == 3  # EXIT_STARTUP: a refused start (nsd(8))
    assert "another nsd is running" in res.stderr
    assert d.call(T + "List")["tenants"] == []  # the first one still serves


@pytest.mark.skipif(
    systemd_is_pid1(),
    reason="checks the behaviour without systemd; on a systemd host tests/systemd covers it",
)
def test_without_systemd_namespaces_work_and_systemd_methods_say_why(
    env: tuple[Daemon, TestUsers],
) -> None:
    d, users = env
    from nsd.varlink.client import VarlinkError

    name = users.add()
    t = d.call(T + "Create", name=name)["tenant"]
    assert t["slice"] is None and t["namespaceInode"] is not None
    assert "systemd is not PID 1" in d.log_text()
    for method, params in (
        ("SetLimits", {"name": name, "limits": {"memoryMax": "1G"}}),
        ("Run", {"name": name, "command": ["/bin/true"]}),
    ):
        with pytest.raises(VarlinkError) as info:
            d.call(T + method, **params)
        assert info.value.name == T + "SystemdUnavailable"
        assert "not PID 1" in info.value.parameters["reason"]
    with pytest.raises(VarlinkError) as info, d.client() as c:
        c.call_with_fds(T + "Enter", {"name": name, "scope": True})
    assert info.value.name == T + "SystemdUnavailable"
    # Without an explicit request, Enter still hands out the namespace.
    with d.client() as c:
        reply, fds = c.call_with_fds(T + "Enter", {"name": name})
    assert reply["scope"] is None and os.fstat(fds[0]).st_ino == t["namespaceInode"]
    for fd in fds:
        os.close(fd)
    assert d.call(T + "GetLimits", name=name) == {"limits": {}, "overrides": {}}
    res = d.nsctl("limits", name, "--memory-max", "1G", check=False)
    assert res.returncode == 1
    assert "systemd is unavailable" in res.stderr and "SystemdUnavailable" in res.stderr
    d.call(T + "Remove", name=name)
