"""The two systemd protocols nsd speaks directly: sd_notify and LISTEN_FDS.

Both are small and stable (see sd_notify(3) and sd_listen_fds(3)); no asyncio
library implements them, and libsystemd would be a build dependency for ~60 lines.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send ``message`` (e.g. "READY=1") to the service manager; False if there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace socket
    elif not path.startswith("/"):
        return False  # vsock and other address families are not for a host daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(message.encode(), path)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the timeout), or None if none is wanted."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


def listen_fds() -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, by name ("unknown" when unnamed).

    The variables are removed from the environment afterwards, as
    sd_listen_fds(1) does, so no child process mistakes them for its own.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != str(os.getpid()) or not count or not count.isdigit():
        return {}
    n = int(count)
    labels = names.split(":") if names else []
    out: dict[str, list[socket.socket]] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        label = labels[i] if i < len(labels) and labels[i] else "unknown"
        out.setdefault(label, []).append(socket.socket(fileno=fd))
    return out
