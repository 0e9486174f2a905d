"""nsd under systemd: socket activation, Type=notify readiness, watchdog."""

from __future__ import annotations

import os
import stat
import time
from typing import Any

import pytest

from tests.e2e.guest import SOCKET, inode, is_active, nsctl, run, show, wait_active, wait_for

pytestmark = pytest.mark.phase1


def listeners(path: str) -> str:
    """The `ss -xlp` line of the listening socket at ``path`` (with its holders' pids)."""
    for line in run("ss", "-xlpn").stdout.splitlines():
        if f" {path} " in line:
            return line
    raise AssertionError(f"no listening socket at {path} in `ss -xlpn`")


def test_first_call_starts_nsd_through_the_socket(figures: dict[str, Any]) -> None:
    # nsd.service is also enabled for boot, so it runs already: stop it. The
    # socket unit keeps listening (nsd.service has no RuntimeDirectory= that
    # would remove /run/nsd with it).
    run("systemctl", "stop", "nsd.service")
    assert is_active("nsd.service") == "inactive"
    assert is_active("nsd.socket") == "active"
    assert stat.S_ISSOCK(os.stat(SOCKET).st_mode)
    socket_file = inode(SOCKET)
    assert "pid=1," in listeners(SOCKET)

    t0 = time.monotonic()
    out = nsctl("list").stdout  # queued by the kernel until nsd accepts it
    figures["socket_activation_first_call_seconds"] = round(time.monotonic() - t0, 3)
    assert "tenant(s)" in out

    wait_active("nsd.service")
    props = show(
        "nsd.service",
        "ActiveState", "SubState", "Type", "NotifyAccess", "MainPID", "TriggeredBy", "StatusText",
    )  # fmt: skip
    # Type=notify and active/running: systemd got READY=1 (else: activating/start).
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert "nsd.socket" in props["TriggeredBy"].split()
    assert props["StatusText"].startswith("Serving"), props["StatusText"]
    # nsd serves the socket systemd passed it (LISTEN_FDS): the same listening
    # socket is held by PID 1 and by nsd, and the file was not re-created.
    main_pid = int(props["MainPID"])
    assert f"pid={main_pid}," in listeners(SOCKET)
    assert inode(SOCKET) == socket_file


def test_watchdog_pings_arrive() -> None:
    wait_active("nsd.service")
    props = show("nsd.service", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert props["WatchdogUSec"] == "30s"
    first = int(props["WatchdogTimestampMonotonic"])

    def pinged() -> bool:
        now = int(show("nsd.service", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        return now > first

    # nsd pings at half the timeout (15 s); the timestamp moves on each WATCHDOG=1.
    wait_for(pinged, "a WATCHDOG=1 from nsd", timeout=25)
