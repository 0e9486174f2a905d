"""SIGKILL at every step of Remove and of a network policy change (SetBandwidth), with
the network policy on: the restarted daemon's reconcile converges (the tenant is
whole or entirely gone, the host table and shaping match the store) and the next
reconcile is a no-op. Create's crash points are in test_reconcile.py.

Crash points are derived when the module is collected, from the code as it is: each
operation runs once under strace against a real daemon, and the points are picked by
role from what it did (see ``_points``). Counts are per thread, as strace's
``inject ... when=n`` counts them: SQLite writes run on the event loop's thread,
netlink, mounts and nftables on the netns worker; a pool thread's ``sendto`` calls
are its wake-ups of the loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.harness import (
    Daemon,
    TestUsers,
    crash_at,
    daemon_env,
    mounts_under,
    netns_inode,
    run,
    spread,
    syscall_counts,
    uid_of,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, nftables"),
]

T = "io.nsd.Tenant."

# Calls that each mark a step: every one is a crash point. umount2 and unlink: the
# namespace's bind mount and file (Remove); setns: into a tenant's namespace and
# back (the policy change); sendmsg: an nftables batch.
EVERY = ["umount2", "unlink", "setns", "sendmsg"]
# Frequent calls, spread from the first to the last: pwrite64 (SQLite's WAL frames:
# an intent, a commit) and sendto (netlink: veth, addresses, tc; a pool thread's
# wake-up of the loop). sendto gets what is left of the budget.
PWRITE_SLOTS = 4
BUDGET = 13  # points per operation, as many as the runtime allows


def _points(counts: dict[str, int]) -> list[tuple[str, str, int]]:
    """(test id, syscall, n) for one operation's per-thread syscall counts."""
    points = [(f"{s}-{n}", s, n) for s in EVERY for n in range(1, counts[s] + 1)]
    points += [
        (f"pwrite64-{label}", "pwrite64", n)
        for label, n in spread(counts["pwrite64"], PWRITE_SLOTS)
    ]
    points += [
        (f"sendto-{label}", "sendto", n)
        for label, n in spread(counts["sendto"], max(3, BUDGET - len(points)))
    ]
    return points


def _profile(operation: str) -> list[tuple[str, str, int]]:
    """Run the operation once, as the test does up to the crash, and derive its points."""
    with daemon_env() as (d, users):
        name = users.add()
        d.start()
        d.call(T + "Create", name=name)
        counts = syscall_counts(d, [*EVERY, "pwrite64", "sendto"], _operation(d, operation, name))
        if operation != "remove":
            d.call(T + "Remove", name=name)
        assert d.stop() == 0, d.log_text()
    # An empty profile would parametrize nothing, and pytest would skip quietly.
    assert counts["sendto"] > 0 and counts["pwrite64"] > 0, (operation, counts)
    return _points(counts)


def _operation(d: Daemon, operation: str, name: str) -> Callable[[], object]:
    if operation == "remove":
        return lambda: d.call(T + "Remove", name=name)
    return lambda: d.call(T + "SetBandwidth", name=name, egressRate="10mbit")


_derived: dict[str, list[tuple[str, str, int]]] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    operation = "remove" if "remove" in metafunc.function.__name__ else "policy"
    if os.geteuid() != 0:
        # No daemon to profile; the root mark skips the one placeholder.
        metafunc.parametrize(("syscall", "n"), [("sendto", 1)], ids=["not-root"])
        return
    if operation not in _derived:
        _derived[operation] = _profile(operation)
    points = _derived[operation]
    metafunc.parametrize(
        ("syscall", "n"), [(s, n) for _, s, n in points], ids=[i for i, _, _ in points]
    )


@pytest.fixture
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env() as (d, users):
        yield d, users


def _host_table(d: Daemon) -> str:
    return run("nft", "list", "table", "inet", "nsd", netns=d.host).stdout


def _second_reconcile_is_a_no_op(d: Daemon) -> None:
    # The start-up reconcile was the first.
    assert d.call("io.nsd.Daemon.Reconcile")["actions"] == [], d.log_text()


def _gone(d: Daemon, name: str, uid: int) -> None:
    path = f"/run/netns/{name}"
    assert d.db_rows(f"SELECT state FROM tenants WHERE uid = {uid}") == []
    assert d.db_rows(f"SELECT count(*) FROM leases WHERE uid = {uid} AND released_us IS NULL") == [
        (0,)
    ]
    assert netns_inode(path) is None and not os.path.exists(path)
    assert [m for m in mounts_under("/run/netns") if m == path] == []
    assert f"nsd{uid}" not in d.host_links()
    assert f"nsd{uid}" not in _host_table(d)


def test_crash_during_remove_converges(env: tuple[Daemon, TestUsers], syscall: str, n: int) -> None:
    d, users = env
    name = users.add()
    uid = uid_of(name)
    d.start()
    d.call(T + "Create", name=name)
    assert crash_at(d, syscall, n, _operation(d, "remove", name)), (
        f"the daemon never reached {syscall} #{n}: the crash point tests nothing"
    )
    d.start()  # reconcile runs at start
    rows = d.db_rows(f"SELECT state FROM tenants WHERE uid = {uid}")
    # Never half-removed: the intent either was not recorded (the tenant is whole
    # again) or the start-up reconcile finished the removal.
    assert rows in ([], [("ready",)]), (rows, d.log_text())
    if rows:
        t = d.call(T + "Get", name=name)["tenant"]
        assert t["problems"] == [] and netns_inode(t["namespacePath"]) is not None
        assert f"nsd{uid}" in d.host_links() and f"nsd{uid}" in _host_table(d)
        run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    _second_reconcile_is_a_no_op(d)
    if rows:
        d.call(T + "Remove", name=name)
    _gone(d, name, uid)
    assert d.stop() == 0


def test_crash_during_policy_change_converges(
    env: tuple[Daemon, TestUsers], syscall: str, n: int
) -> None:
    d, users = env
    name = users.add()
    uid = uid_of(name)
    d.start()
    d.call(T + "Create", name=name)
    assert crash_at(d, syscall, n, _operation(d, "policy", name)), (
        f"the daemon never reached {syscall} #{n}: the crash point tests nothing"
    )
    d.start()
    net = d.call(T + "GetNetwork", name=name)["network"]
    # The store decides (the override was committed or not) and the host matches it:
    # GetNetwork compares the live shaping of both directions with it.
    assert net["egressOverride"] in (None, 10_000_000), net
    assert net["problems"] == [], (net, d.log_text())
    assert f"nsd{uid}" in _host_table(d)
    _second_reconcile_is_a_no_op(d)
    # And the change, made again, lands.
    d.call(T + "SetBandwidth", name=name, egressRate="10mbit")
    net = d.call(T + "GetNetwork", name=name)["network"]
    assert net["egressOverride"] == 10_000_000 and net["problems"] == []
    d.call(T + "Remove", name=name)
    _gone(d, name, uid)
    assert d.stop() == 0
