"""Thin wrappers over the Linux namespace and mount system calls.

Python 3.11 has neither ``os.setns`` nor ``os.unshare`` (both arrived in 3.12) and has
never had ``mount``/``umount2``. Where ``os`` provides the call it is used; otherwise the
C library is called through ctypes. Every wrapper raises ``OSError`` carrying the real
errno (and the path, where there is one), exactly like the ``os`` functions do, so callers
can tell ``EINVAL`` from ``EPERM`` without parsing text.

Nothing here keeps state beyond the lazily loaded C library handle.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

__all__ = [
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_PRIVATE",
    "MS_REC",
    "MS_SHARED",
    "MS_SLAVE",
    "NS_GET_NSTYPE",
    "UMOUNT_NOFOLLOW",
    "detached_mount",
    "mount",
    "mount_id",
    "ns_get_nstype",
    "setns",
    "umount2",
    "unshare",
]

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_REC = 0x4000
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

# umount2() flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# <linux/mount.h>: the new mount API (Linux 5.2)
FSOPEN_CLOEXEC = 0x1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
# syscall numbers of the new mount API: the same on every architecture but alpha
# (glibc has wrappers only since 2.36)
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432

# <linux/nsfs.h>: _IO(0xb7, 0x3) -- returns the CLONE_NEW* type of a namespace fd.
NS_GET_NSTYPE = 0xB703

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 -- one process-wide handle, loaded on first use
    if _libc is None:
        # CDLL(None) is the C library the interpreter already has loaded.
        # ctypes.util.find_library() would fork `ldconfig -p` on first use.
        lib = ctypes.CDLL(None, use_errno=True)
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.setns.restype = ctypes.c_int
        lib.unshare.argtypes = [ctypes.c_int]
        lib.unshare.restype = ctypes.c_int
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


def _raise_errno(path: str | None = None) -> None:
    err = ctypes.get_errno()
    if path is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), path)


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def setns(fd: int, nstype: int = 0) -> None:
    """Move the *calling thread* into the namespace referred to by ``fd``."""
    native: Any = getattr(os, "setns", None)
    if native is not None:
        native(fd, nstype)
        return
    if _lib().setns(fd, nstype) != 0:
        _raise_errno()


def unshare(flags: int) -> None:
    """Give the *calling thread* new namespaces of the ``CLONE_NEW*`` kinds in ``flags``."""
    native: Any = getattr(os, "unshare", None)
    if native is not None:
        native(flags)
        return
    if _lib().unshare(flags) != 0:
        _raise_errno()


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """mount(2). ``source``/``fstype``/``data`` may be None (passed as NULL)."""
    raw_data = _encode(data)
    if (
        _lib().mount(
            _encode(source),
            os.fsencode(target),
            _encode(fstype),
            flags,
            ctypes.c_char_p(raw_data) if raw_data is not None else None,
        )
        != 0
    ):
        _raise_errno(target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    if _lib().umount2(os.fsencode(target), flags) != 0:
        _raise_errno(target)


def detached_mount(fstype: str) -> int:
    """A new instance of filesystem ``fstype`` with no options, mounted nowhere
    (fsopen + fsconfig + fsmount): an O_PATH-like fd to its root, for ``openat``. It
    is in no mount table, and goes away with the last fd that refers to it. Mounted
    nosuid, nodev, noexec."""
    lib = _lib()
    long = ctypes.c_long  # syscall(2) takes longs: no int in a variadic long slot
    fs = lib.syscall(long(_SYS_FSOPEN), ctypes.c_char_p(os.fsencode(fstype)), long(FSOPEN_CLOEXEC))
    if fs < 0:
        _raise_errno()
    try:
        create = long(FSCONFIG_CMD_CREATE)
        if lib.syscall(long(_SYS_FSCONFIG), long(fs), create, None, None, long(0)) < 0:
            _raise_errno()
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        mnt = lib.syscall(long(_SYS_FSMOUNT), long(fs), long(FSMOUNT_CLOEXEC), long(attrs))
        if mnt < 0:
            _raise_errno()
        return int(mnt)
    finally:
        os.close(fs)


def mount_id(fd: int) -> int:
    """The id of the mount that ``fd`` was opened through (its ``mnt_id`` in
    /proc/thread-self/fdinfo, as in mountinfo); Python 3.11 has no ``statx``."""
    with open(f"/proc/thread-self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line[7:])
    raise OSError(errno.ENOTSUP, f"no mnt_id in the fdinfo of fd {fd}")


def ns_get_nstype(fd: int) -> int:
    """The ``CLONE_NEW*`` type of the namespace behind ``fd`` (ioctl NS_GET_NSTYPE)."""
    return fcntl.ioctl(fd, NS_GET_NSTYPE)
