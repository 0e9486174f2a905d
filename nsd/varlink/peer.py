"""Kernel credentials of the process at the other end of a Unix socket.

Identity comes from the kernel (SO_PEERCRED, SO_PEERGROUPS), never from a
message: tenants are untrusted local users.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

# Not every Python build exports these constants; the numbers are Linux ABI.
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
SO_PEERGROUPS = 59
SO_PEERPIDFD = 77  # Linux >= 6.5

_UCRED = struct.Struct("=iII")  # pid_t pid; uid_t uid; gid_t gid
# Python's getsockopt() caps buflen at 1024 bytes (256 groups); more needs libc.
_PY_GETSOCKOPT_MAX = 1024
_NGROUPS_MAX = 65536


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is connected: from SO_PEERCRED and SO_PEERGROUPS at connect time."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...]  # supplementary groups (may or may not include gid)


def peer_of(sock: socket.socket) -> Peer:
    """Reads the peer's credentials; OSError if the kernel cannot tell."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    return Peer(uid=uid, gid=gid, pid=pid, groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PY_GETSOCKOPT_MAX)
    except OSError as e:
        if e.errno == errno.ENOPROTOOPT:
            # Kernels before 4.13. Groups only ever add privileges, so not
            # knowing them fails safe.
            return ()
        if e.errno != errno.ERANGE:
            raise
        raw = _peer_groups_libc(sock.fileno())
    return struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _peer_groups_libc(fd: int) -> bytes:
    """SO_PEERGROUPS for peers in more than 256 groups (rare; costs a ctypes call)."""
    import ctypes  # noqa: PLC0415  (only here: ctypes is slow to import)

    libc = ctypes.CDLL(None, use_errno=True)
    size = _NGROUPS_MAX * 4
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt(SO_PEERGROUPS): {errno.errorcode.get(err, err)}")
    return buf.raw[: length.value]


def open_peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd for the peer process (Linux >= 6.5), owned by the caller; else None.

    Unlike the pid in :class:`Peer`, a pidfd cannot be recycled by another
    process, so it is what to use when acting on the peer process later.
    """
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        # Only "unsupported" maps to None. ESRCH (the peer exited) propagates:
        # falling back to the recyclable pid then would be exactly the wrong move.
        if e.errno == errno.ENOPROTOOPT:
            return None
        raise
