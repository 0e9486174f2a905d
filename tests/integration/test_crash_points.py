"""SIGKILL at every step of Remove and of a network policy change (SetBandwidth), with
the network policy on: the restarted daemon's reconcile converges (the tenant is
whole or entirely gone, the host table and shaping match the store) and the next
reconcile is a no-op. Create's crash points are in test_reconcile.py.

Crash points are derived when the module is collected, from the code as it is: each
operation runs once under strace against a real daemon, and the points are picked by
role from what it did (``derive_crash_points`` in the harness). Counts are per thread, as strace's
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
    derive_crash_points,
    mounts_under,
    netns_inode,
    parametrize_crash_points,
    run,
    uid_of,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, nftables"),
]

T = "io.nsd.Tenant."

# Calls that each mark a step: umount2 and unlink, the namespace's bind mount and file
# (Remove); setns, into a tenant's namespace and back (the policy change); sendmsg,
# an nftables batch.
EVERY = ["umount2", "unlink", "setns", "sendmsg"]


def _operation(d: Daemon, operation: str, name: str) -> Callable[[], object]:
    if operation == "remove":
        return lambda: d.call(T + "Remove", name=name)
    return lambda: d.call(T + "SetBandwidth", name=name, egressRate="10mbit")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    operation = "remove" if "remove" in metafunc.function.__name__ else "policy"
    parametrize_crash_points(
        metafunc,
        lambda: derive_crash_points(
            EVERY, lambda d, name: _operation(d, operation, name), create=True
        ),
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
