"""Reconcile repairs what was changed behind nsd's back, and crashes converge."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    TestUsers,
    close_notify,
    crash_at,
    daemon_env,
    derive_crash_points,
    mounts_under,
    netns_inode,
    parametrize_crash_points,
    run,
    uid_of,
    unmount_files,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
]

T = "io.nsd.Tenant."


@pytest.fixture
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env() as (d, users):
        yield d, users


def test_repairs_and_strays(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    d.start()
    a, b = users.add(), users.add()
    ta = d.call(T + "Create", name=a)["tenant"]
    tb = d.call(T + "Create", name=b)["tenant"]
    assert d.stop() == 0

    run("ip", "link", "del", ta["hostInterface"], netns=d.host)  # veth gone
    run("umount", tb["namespacePath"])  # namespace gone (file stays, as after a crash)
    # (this kernel has no dummy driver: veth pairs serve as stray links)
    run("ip", "link", "add", "nsd999999", "type", "veth", "peer", "name", "strayp", netns=d.host)
    run("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1", netns=d.host)
    foreign = f"{users.prefix}foreign"
    run("ip", "netns", "add", foreign)  # a namespace nsd does not own
    try:
        d.start()
        links = d.host_links()
        assert ta["hostInterface"] in links and tb["hostInterface"] in links
        assert "nsd999999" not in links and "other0" in links and "other1" in links
        assert netns_inode(ta["namespacePath"]) == ta["namespaceInode"]
        new_b = netns_inode(tb["namespacePath"])
        assert new_b is not None and new_b != tb["namespaceInode"]
        for t in (ta, tb):
            run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
            run("ping", "-6", "-c1", "-W2", t["ipv6Address"], netns=d.host)
        assert netns_inode(f"/run/netns/{foreign}") is not None  # left alone
        log = d.log_text()
        assert "remove-stray-link" in log and "nsd999999" in log
        # A second reconcile right after changes nothing.
        again = d.call("io.nsd.Daemon.Reconcile")
        assert again == {"actions": [], "problems": []}
        for name in (a, b):
            d.call(T + "Remove", name=name)
        assert d.stop() == 0
    finally:
        run("ip", "netns", "del", foreign, check=False)


def test_reconcile_repairs_address_and_route_live(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    d.start()
    name = users.add()
    t = d.call(T + "Create", name=name)["tenant"]
    run("ip", "addr", "del", f"{t['ipv4Address']}/32", "dev", "eth0", netns=t["namespacePath"])
    run("ip", "route", "del", f"{t['ipv4Address']}/32", netns=d.host)
    report = d.call("io.nsd.Daemon.Reconcile")
    assert [a["kind"] for a in report["actions"]] and all(
        a["tenant"] == name for a in report["actions"]
    )
    run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    assert d.call("io.nsd.Daemon.Reconcile")["actions"] == []
    d.call(T + "Remove", name=name)
    assert d.stop() == 0


def test_reboot_recreates_from_store(env: tuple[Daemon, TestUsers]) -> None:
    """/run cleared (as by a reboot): every namespace is recreated with the same addresses."""
    d, users = env
    d.start()
    names = [users.add() for _ in range(3)]
    before = {n: d.call(T + "Create", name=n)["tenant"] for n in names}
    assert d.stop() == 0
    for t in before.values():
        run("ip", "link", "del", t["hostInterface"], netns=d.host, check=False)
        run("umount", t["namespacePath"])
        os.unlink(t["namespacePath"])
    d.start()
    for n, t in before.items():
        after = d.call(T + "Get", name=n)["tenant"]
        assert after["ipv4Address"] == t["ipv4Address"] and after["ipv6Prefix"] == t["ipv6Prefix"]
        assert after["namespaceInode"] is not None
        run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    for n in names:
        d.call(T + "Remove", name=n)
    assert d.stop() == 0


# -- crash consistency ----------------------------------------------------------


# (syscall, n): SIGKILL the daemon at the n-th such call after attaching, while
# it creates one tenant, derived from an strace of Create (see derive_crash_points):
# every mount (the mount protocol) and unshare (namespace creation), the netlink
# messages that build the veth/addresses/routes and the SQLite commits spread from
# first to last. Counts are per thread: mounts, unshare and netlink run on the worker
# thread, SQLite writes on the event-loop thread (the intent commit is the first
# write; the state change to "ready" comes after the host work).
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ == "test_crash_during_create_converges":
        parametrize_crash_points(
            metafunc,
            lambda: derive_crash_points(
                ["mount", "unshare"],
                lambda d, name: lambda: d.call(T + "Create", name=name),
                create=False,
            ),
        )


@pytest.mark.slow
def test_crash_during_create_converges(env: tuple[Daemon, TestUsers], syscall: str, n: int) -> None:
    d, users = env
    name = users.add()
    uid = uid_of(name)
    d.start()
    crashed = crash_at(d, syscall, n, lambda: d.call(T + "Create", name=name))
    assert crashed, f"the daemon never reached {syscall} #{n}: the crash point tests nothing"
    d.start()  # reconcile runs at start

    rows = d.db_rows(f"SELECT state FROM tenants WHERE uid = {uid}")
    leases = d.db_rows(
        f"SELECT family FROM leases WHERE uid = {uid} AND released_us IS NULL ORDER BY family"
    )
    path = f"/run/netns/{name}"
    link = f"nsd{uid}"
    if rows:
        # The intent was committed: reconcile finished the tenant.
        assert rows == [("ready",)], (crashed, d.log_text())
        assert leases == [(4,), (6,)]
        assert netns_inode(path) is not None and link in d.host_links()
        assert len([m for m in mounts_under("/run/netns") if m == path]) == 1
        t = d.call(T + "Get", name=name)["tenant"]
        run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
        d.call(T + "Remove", name=name)
    else:
        # Nothing was recorded, so nothing may exist on the host either.
        assert leases == []
    assert netns_inode(path) is None and not os.path.exists(path), d.log_text()
    assert link not in d.host_links()
    assert [m for m in mounts_under("/run/netns") if m == path] == []
    assert d.db_rows(f"SELECT count(*) FROM leases WHERE uid = {uid} AND released_us IS NULL") == [
        (0,)
    ]
    assert d.stop() == 0


def reboot(d: Daemon, tenants: list[dict[str, Any]]) -> None:
    """What a reboot leaves of nsd's tenants (nsd stopped): every namespace, and with
    it every veth, gone; the store as it was."""
    for t in tenants:
        run("umount", t["namespacePath"])
        os.unlink(t["namespacePath"])
    deadline = time.monotonic() + 30
    while any(t["hostInterface"] in d.host_links() for t in tenants):
        assert time.monotonic() < deadline, d.host_links()
        time.sleep(0.1)


#: enough tenants that the start-up reconcile takes a while (four batches and more,
#: ~1 s after a reboot here)
EARLY_TENANTS = 200


def enter_during_startup(
    d: Daemon, name: str, at_reply: Callable[[], None]
) -> tuple[int, list[dict[str, Any]]]:
    """Start nsd; as soon as it listens, ask an operator's Reconcile (in a thread) and
    ``Enter`` ``name``; when the Enter reply comes, assert that the start-up reconcile
    still runs (no summary line, no READY=1) and call ``at_reply()``. Waits for READY=1.
    Returns the inode of the namespace handed out and the Reconcile's answer."""
    logged = len(d.log_text())
    notify = d.spawn()
    reconciled: list[dict[str, Any]] = []
    operator = threading.Thread(target=lambda: reconciled.append(d.call("io.nsd.Daemon.Reconcile")))
    try:
        client = None
        deadline = time.monotonic() + 30
        while client is None:  # connect as soon as nsd listens
            try:
                client = d.client().__enter__()
            except OSError:
                assert time.monotonic() < deadline, d.log_text()[logged:]
                time.sleep(0.005)
        operator.start()
        try:
            reply, fds = client.call_with_fds(T + "Enter", {"name": name})
            at_reply()
            during = d.log_text()[logged:]
            assert not re.search(r"reconcile: \d+ tenant", during), during
            notify.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    assert "READY=1" not in notify.recv(4096).decode().split("\n")
        finally:
            client.__exit__(None, None, None)
        notify.setblocking(True)
        d.wait_ready(notify)
    finally:
        close_notify(notify)
        if operator.ident is not None:
            operator.join(30)
    entered = os.fstat(fds[reply["namespaceFileDescriptor"]]).st_ino
    for fd in fds:
        os.close(fd)
    return entered, reconciled


@pytest.mark.slow
def test_served_while_the_startup_reconcile_runs(env: tuple[Daemon, TestUsers]) -> None:
    """After a reboot nsd answers at once, before READY=1: an Enter gets its tenant
    built ahead of the others; an operator's Reconcile waits for the start-up one."""
    d, users = env
    d.start()
    names = [users.add() for _ in range(EARLY_TENANTS)]
    before = {nm: d.call(T + "Create", name=nm)["tenant"] for nm in names}
    assert d.stop() == 0
    reboot(d, list(before.values()))
    last = names[-1]  # the reconcile's order is the store's: this one comes last
    entered, reconciled = enter_during_startup(d, last, lambda: None)
    t = d.call(T + "Get", name=last)["tenant"]
    assert t["state"] == "ready" and t["namespaceInode"] == entered
    assert t["ipv4Address"] == before[last]["ipv4Address"]
    run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    # The operator's Reconcile ran after the start-up one had repaired everything.
    assert reconciled == [{"actions": [], "problems": []}], reconciled
    assert d.stop() == 0


@pytest.mark.slow
def test_enter_during_startup_checks_a_namespace_that_exists(
    env: tuple[Daemon, TestUsers],
) -> None:
    """A namespace that survived the restart is not handed out unchecked while the
    start-up reconcile has not reached it: Enter repairs its tenant first."""
    d, users = env
    d.start()
    names = [users.add() for _ in range(EARLY_TENANTS)]
    before = {nm: d.call(T + "Create", name=nm)["tenant"] for nm in names}
    assert d.stop() == 0
    last = before[names[-1]]
    run("ip", "link", "del", last["hostInterface"], netns=d.host)  # its veth pair, gone

    def repaired() -> None:
        assert last["hostInterface"] in d.host_links()

    entered, _ = enter_during_startup(d, names[-1], repaired)
    assert entered == last["namespaceInode"]
    run("ping", "-c1", "-W2", last["ipv4Address"], netns=d.host)
    assert d.stop() == 0


# SIGKILL inside the start-up reconcile's batched path (reconcile.BATCH tenants checked
# in one job on the worker, after one listing of the host), as after a reboot: every
# namespace and veth gone. Counts are per thread. Mounts and unshare are the namespace
# maker's (the thread that makes a batch's new namespaces ahead of the worker,
# nsd/net/netns_maker.py): mount 1 makes the run dir a shared mount point (once for the
# batch, which holds its lock), mount 2 and 4 are the first and the third tenant's bind
# mounts, unshare 2 the second namespace; killed there, the namespaces made before are
# left without their pairs, and the worker may be in the middle of one. Netlink is the
# worker's; killed in the middle of the batch (sendto 85), namespaces made ahead wait
# for the rest of their build. The worker's sendto calls (counted
# with strace on this test's start, network policy on): 2-4 the pool check's dumps,
# 9-57 the policy's tc work (pyroute2), 62-63 the host listing (addresses, routes),
# 64-81 the first tenant, 85 the second tenant's veth pair; the others wake the event
# loop. So: the host listing's route dump, and a change in the middle of the batch.
BATCHED_CRASH_POINTS = [
    ("mount", 1),
    ("mount", 2),
    ("mount", 4),
    ("unshare", 2),
    ("sendto", 63),
    ("sendto", 85),
]


@pytest.mark.slow
@pytest.mark.parametrize(("syscall", "n"), BATCHED_CRASH_POINTS)
def test_crash_during_batched_reconcile_converges(
    env: tuple[Daemon, TestUsers], syscall: str, n: int
) -> None:
    d, users = env
    d.start()
    names = [users.add() for _ in range(3)]
    before = {nm: d.call(T + "Create", name=nm)["tenant"] for nm in names}
    assert d.stop() == 0
    reboot(d, list(before.values()))
    strace = ["strace", "-qq", "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
              "-e", f"inject={syscall}:signal=KILL:when={n}"]  # fmt: skip
    logged = len(d.log_text())
    d.start(prefix=strace, wait=False)
    assert d.proc is not None
    assert d.proc.wait(60) != 0, f"nsd never reached {syscall} #{n}:\n{d.log_text()}"
    # It died inside the reconcile: the tenants' build had begun, the summary not come.
    crashed_log = d.log_text()[logged:]
    assert "reconcile: " not in crashed_log, crashed_log
    d.start()  # reconcile runs at start
    for nm, t in before.items():
        after = d.call(T + "Get", name=nm)["tenant"]
        assert after["ipv4Address"] == t["ipv4Address"], d.log_text()
        assert after["state"] == "ready" and after["namespaceInode"] is not None
        assert len([m for m in mounts_under("/run/netns") if m == t["namespacePath"]]) == 1
        run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    assert d.call("io.nsd.Daemon.Reconcile")["actions"] == [], d.log_text()
    for nm in names:
        d.call(T + "Remove", name=nm)
    for t in before.values():
        path = t["namespacePath"]
        assert netns_inode(path) is None and not os.path.exists(path)
        assert t["hostInterface"] not in d.host_links()
        assert [m for m in mounts_under("/run/netns") if m == path] == []
    assert d.db_rows("SELECT count(*) FROM leases WHERE released_us IS NULL") == [(0,)]
    assert d.stop() == 0


def test_existing_namespace_refused_unless_adopting(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    from nsd.varlink.client import VarlinkError

    d.start()
    name = users.add()
    run("ip", "netns", "add", name)  # e.g. made by an old PAM module
    inode = netns_inode(f"/run/netns/{name}")
    with pytest.raises(VarlinkError) as info:
        d.call(T + "Create", name=name)
    assert info.value.name == T + "NamespaceExists"
    assert netns_inode(f"/run/netns/{name}") == inode  # left alone
    assert d.db_rows("SELECT count(*) FROM tenants") == [(0,)]
    assert d.stop() == 0
    run("ip", "netns", "del", name)


def test_wrapper_layout_adopted_at_start() -> None:
    """Migration from the sudo+nsenter layout: usr_$user namespaces are adopted.

    The namespaces live in a run dir of the test's own (made the way `ip netns add`
    makes them), so that nothing else on the machine with a usr_* namespace can
    take part in the test."""
    run_dir = tempfile.mkdtemp(prefix="nsdt-netns-")
    with daemon_env(run_dir=run_dir) as (d, users):
        d.config.write_text(
            d.config.read_text()
            + 'name_template = "usr_{user}"\n[tenants]\nadopt_existing = true\n'
        )
        a, b = users.add(), users.add()
        for n in (a, b, "nosuchuserhere"):  # the last has no user: not adopted
            path = os.path.join(run_dir, f"usr_{n}")
            open(path, "x").close()
            run("unshare", "--net", "--", "mount", "--bind", "/proc/self/ns/net", path)
        inodes = {n: netns_inode(os.path.join(run_dir, f"usr_{n}")) for n in (a, b)}
        try:
            d.start()
            listed = {t["name"]: t for t in d.call(T + "List")["tenants"]}
            assert set(listed) == {a, b}
            for n in (a, b):
                t = listed[n]
                assert t["adopted"] is True and t["namespaceInode"] == inodes[n]
                run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
            assert "adopt-namespace" in d.log_text()
            assert d.call("io.nsd.Daemon.Reconcile") == {"actions": [], "problems": []}
            for n in (a, b):
                d.call(T + "Remove", name=n)  # adopted namespaces are nsd's now
                assert not os.path.exists(os.path.join(run_dir, f"usr_{n}"))
            assert d.stop() == 0
        finally:
            unmount_files([os.path.join(run_dir, n) for n in os.listdir(run_dir)])
            run("umount", "--lazy", run_dir, check=False)  # nsd made it a mount point
            shutil.rmtree(run_dir, ignore_errors=True)
