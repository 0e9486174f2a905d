"""nsd with ``parent_slice = "user.slice"`` (one budget per tenant, docs/logins.md)
under a real systemd 252: tenant slices are logind's ``user-<uid>.slice``.

nsd's limits must win over logind's ``user-.slice.d`` defaults, tenant services
get ``Slice=user-<uid>.slice`` (names.slice_name), and nsd never touches the slice of a user that
is not its tenant (root, an administrator with ``systemctl set-property``).
Run by tests/systemd/test_systemd_container.py; not collected elsewhere.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from tests.harness import Daemon, TestUsers, daemon_env, run, uid_of  # noqa: E402
from tests.harness import systemctl_show as show  # noqa: E402

T = "io.nsd.Tenant."
CONTROL = Path("/etc/systemd/system.control")
EXTRA = """
[limits]
tasks_max = 300
[systemd]
parent_slice = "user.slice"
use_pidfds = "never"
"""


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env(extra=EXTRA) as (d, users):
        d.start()
        yield d, users
        assert d.stop() == 0, d.log_text()


def test_tenant_slice_is_the_user_slice_and_nsd_limits_win(
    env: tuple[Daemon, TestUsers],
) -> None:
    d, users = env
    name = users.add()
    t = d.call(T + "Create", name=name)["tenant"]
    unit = f"user-{uid_of(name)}.slice"
    assert t["slice"] == unit
    props = show(unit, "TasksMax", "DropInPaths")
    # logind's default (user-.slice.d/10-defaults.conf: TasksMax=33%) is overridden.
    assert "/user-.slice.d/10-defaults.conf" in props["DropInPaths"]
    assert props["TasksMax"] == "300"
    assert (CONTROL / f"{unit}.d" / "50-TasksMax.conf").exists()


def test_reconcile_leaves_non_tenant_user_slices_alone(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    admin = users.add()  # a user in the tenant UID range that is no tenant
    for unit in (f"user-{uid_of(admin)}.slice", "user-0.slice"):
        run("systemctl", "set-property", unit, "MemoryHigh=1G")
    d.nsctl("reconcile")
    for unit in (f"user-{uid_of(admin)}.slice", "user-0.slice"):
        assert (CONTROL / f"{unit}.d" / "50-MemoryHigh.conf").exists(), unit
        run("systemctl", "revert", unit)
    assert "forget-stray-slice" not in d.log_text()
