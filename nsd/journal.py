"""Structured journal records through journald's native protocol.

nsd logs plain lines to stderr, which journald stores as MESSAGE only under
systemd. A fault needs fields an operator can select on
(``journalctl NSD_TENANT=alice NSD_FAULT=oom_kill``), so fault records are sent
as datagrams to ``/run/systemd/journal/socket`` in journald's native format
(systemd's "Native Journal Protocol", stable since systemd 38): ``KEY=value``
lines, or for values with a newline ``KEY``, a 64-bit little-endian length,
the value and a newline. No libsystemd binding is needed for that.

Without journald (the socket is absent, as in tests and on hosts without
systemd) :meth:`Journal.send` returns False and the caller logs the message the
ordinary way instead.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")
#: syslog priorities (LOG_WARNING, LOG_INFO)
WARNING, INFO = 4, 6


def encode(message: str, priority: int, fields: Mapping[str, object]) -> bytes:
    """One journal entry in the native protocol. Field names must be journal field
    names (upper case, digits, underscores, not starting with one)."""
    out = bytearray()
    entries = {"MESSAGE": message, "PRIORITY": str(priority), **fields}
    for key, value in entries.items():
        if not _FIELD.fullmatch(key):
            raise ValueError(f"not a journal field name: {key!r}")
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode(datagram: bytes) -> dict[str, str]:
    """The inverse of :func:`encode` (for tests and tools)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode("utf-8", "replace")
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            out[line.decode()] = datagram[nl + 9 : nl + 9 + size].decode("utf-8", "replace")
            i = nl + 9 + size + 1
    return out


class Journal:
    """A datagram socket to journald, opened lazily, never blocking the caller."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "nsd") -> None:
        self.path = path
        self.identifier = identifier
        self._sock: socket.socket | None = None

    def send(self, message: str, priority: int, fields: Mapping[str, object]) -> bool:
        """Send one entry; False if journald cannot take it (absent, full, too large)."""
        if not os.path.exists(self.path):
            return False
        data = encode(message, priority, {"SYSLOG_IDENTIFIER": self.identifier, **fields})
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.path)
        except OSError:
            # EAGAIN (journald behind), EMSGSIZE, ECONNREFUSED (journald restarting):
            # a fault record must never stall or fail the daemon.
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
