"""Audit lines: bounded, escaped, and refusals rate-limited per UID."""

from __future__ import annotations

import logging

import pytest

from nsd.api.auditlog import NAME_CHARS, AuditLog, short_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_names_are_truncated_and_escaped() -> None:
    assert short_name(None) == "-"
    assert short_name("alice") == "'alice'"
    assert short_name("x\nINFO forged") == "'x\\nINFO forged'"
    assert short_name("\ud800") == "'\\ud800'"
    assert short_name("\x1b[2J") == "'\\x1b[2J'"
    assert short_name(["not", "a", "name"]) == "<list>"
    long = short_name("a" * 65536)
    assert long == repr("a" * NAME_CHARS) + f"...(+{65536 - NAME_CHARS} chars)"
    assert len(long) < 100


def test_refusals_are_rate_limited_per_uid(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    suppressed: list[int] = []
    log = AuditLog(
        logging.getLogger("test.audit"),
        burst=3,
        rate=1.0,
        on_suppressed=lambda: suppressed.append(1),
        clock=clock,
    )
    caplog.set_level(logging.INFO, "test.audit")

    def refuse(uid: int) -> None:
        log.record(uid, 7, "io.nsd.Tenant.Remove", "x" * 70_000, "PermissionDenied", refused=True)

    for _ in range(100):
        refuse(1000)
    assert len(caplog.records) == 3  # the burst
    assert log.suppressed_total == 97 and len(suppressed) == 97
    # Another UID, root and successful calls are not affected by 1000's flood.
    refuse(1001)
    log.record(0, 1, "io.nsd.Tenant.Remove", "bob", "PermissionDenied", refused=True)
    log.record(1000, 7, "io.nsd.Tenant.Run", "t", "ok", refused=False)
    assert len(caplog.records) == 6
    # A second later one more line gets through and says what was dropped.
    clock.now += 1.0
    refuse(1000)
    last = caplog.records[-1].getMessage()
    assert last.endswith("result=PermissionDenied suppressed=97")
    assert len(last) < 200
    assert max(len(r.getMessage()) for r in caplog.records) < 200
