from __future__ import annotations

import pytest

from nsd import limits as L
from nsd.slices import MOVE, MOVE_UNLESS_MAIN, STAY, placement


@pytest.mark.parametrize(
    ("field", "raw", "canonical"),
    [
        ("memory_max", "512M", "536870912"),
        ("memory_max", "1.5G", "1610612736"),
        ("memory_max", "4096", "4096"),
        ("memory_max", "infinity", "infinity"),
        ("memory_low", "2k", "2048"),
        ("cpu_weight", "100", "100"),
        ("io_weight", 10000, "10000"),
        ("cpu_quota", "150%", "150%"),
        ("cpu_quota", "infinity", "infinity"),
        ("tasks_max", "512", "512"),
        ("tasks_max", "infinity", "infinity"),
    ],
)
def test_canonical(field: str, raw: str, canonical: str) -> None:
    assert L.canonical(field, raw) == canonical


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("memory_max", "lots"), ("memory_max", "-1"), ("memory_max", "1P"),
        ("memory_max", "99999999999T"), ("cpu_weight", "0"), ("cpu_weight", "10001"),
        ("cpu_quota", "0%"), ("cpu_quota", "1.5"), ("tasks_max", "0"), ("bogus", "1"),
    ],
)  # fmt: skip
def test_invalid_values_name_the_field(field: str, raw: str) -> None:
    with pytest.raises(L.InvalidLimit) as info:
        L.canonical(field, raw)
    assert info.value.parameters["field"] == field and info.value.parameters["reason"]


def test_overlay_and_consistency() -> None:
    defaults = L.from_mapping({"memory_max": "1G", "tasks_max": "512"})
    mine = L.from_mapping({"memory_max": "2G"})
    assert defaults.overlay(mine).items() == {"memory_max": str(2 << 30), "tasks_max": "512"}
    L.check_consistent(L.from_mapping({"memory_low": "1G", "memory_max": "infinity"}))
    with pytest.raises(L.InvalidLimit, match="must not be below memory_high"):
        L.check_consistent(L.from_mapping({"memory_high": "2G", "memory_max": "1G"}))


def test_to_systemd() -> None:
    kw = L.to_systemd(L.from_mapping({"memory_max": "infinity", "cpu_quota": "50%"}))
    assert kw == {"memory_max": 2**64 - 1, "cpu_quota_percent": 50.0}


T = "tenant-1001.slice"


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        ("/user.slice/user-0.slice/session-3.scope", MOVE),  # a root shell
        # A service's other processes move, or the tenant's work escapes its budget:
        # root's crontab (no logind session for cron jobs on Debian), a root
        # supervisord's programs, a oneshot script's child. Its main process stays.
        ("/system.slice/cron.service", MOVE_UNLESS_MAIN),
        ("/system.slice/supervisor.service", MOVE_UNLESS_MAIN),
        ("/system.slice/cron.service/nested", MOVE_UNLESS_MAIN),
        ("/tenant.slice/tenant-1001.slice/php-fpm@alice.service", STAY),  # already there
        ("/tenant.slice/tenant-1001.slice/nsd-enter-1001-5-ab.scope", STAY),
        ("/user.slice/user-1001.slice/user@1001.service/app.slice/x.service", STAY),
        ("/user.slice/user-0.slice/user@0.service/app.slice/x.service", MOVE_UNLESS_MAIN),
        ("/system.slice/x.service/sub.scope", MOVE),
        ("/", MOVE),  # in no unit
        (None, MOVE),
    ],
)
def test_auto_scope_policy(cgroup: str | None, expected: str) -> None:
    assert placement("auto", None, cgroup, T, 1001) == expected


def test_explicit_scope_request_wins() -> None:
    assert placement("never", True, "/system.slice/x.service", T, 1001) == MOVE
    assert placement("always", False, "/", T, 1001) == STAY
    assert placement("auto", False, "/system.slice/x.service", T, 1001) == STAY
    assert placement("always", None, "/system.slice/x.service", T, 1001) == MOVE
    assert placement("never", None, "/", T, 1001) == STAY
