"""Where the netns worker opens per-namespace sysctls: a procfs of nsd's own.

/proc/sys/net shows the network namespace of the thread that looks, and the kernel keeps
one dentry per namespace for each name there, all in one hash chain of the procfs that
was looked through: with 1,000 tenant namespaces, opening one tenant's
``ip_unprivileged_port_start`` through /proc took 0.41 ms instead of 0.05 ms (nsd-floor,
docs/benchmarks.md § 8), and a start visits every namespace. A procfs instance of
nsd's own (``linux.detached_mount``: mounted nowhere, gone with its fd) starts with none
of those dentries; renewed after every :data:`RENEW_AFTER` namespaces, its chains stay
short. Where the mount API is not allowed (an older kernel, a seccomp filter without
``@mount``), the sysctls are opened through /proc, as before: slower, not wrong.

Used on the worker thread only.
"""

from __future__ import annotations

import logging
import os

from nsd.net import linux

log = logging.getLogger(__name__)

#: namespaces looked at through one procfs instance before it is replaced: a new
#: instance costs ~0.13 ms, a lookup ~0.4 µs per namespace the instance has seen
RENEW_AFTER = 32


def sysctl_relpath(key: str) -> str:
    """``net.ipv4.ip_forward`` -> ``sys/net/ipv4/ip_forward`` (relative to a procfs). A
    key spelled with '/' (as sysctl(8) accepts it, for an interface name with a dot:
    ``net/ipv4/conf/eth0.100/forwarding``) is taken as it is."""
    return "sys/" + (key if "/" in key else key.replace(".", "/"))


def sysctl_tokens(value: str) -> list[str]:
    """Compare sysctl values as the kernel prints them: whitespace-separated, numbers
    as numbers ("00" is written, "0" read back)."""
    out = []
    for token in value.split():
        try:
            out.append(str(int(token)))
        except ValueError:
            out.append(token)
    return out


class SysctlFiles:
    """Opens sysctl files for the calling thread's current namespace."""

    def __init__(self, renew_after: int = RENEW_AFTER) -> None:
        self.renew_after = renew_after
        self._root: int | None = None
        self._visits = 0
        #: False once the mount API failed: /proc from then on
        self.own_procfs = True

    def next_namespace(self) -> None:
        """Say that what follows is about another namespace than before."""
        self._visits += 1
        if self._root is not None and self._visits > self.renew_after:
            os.close(self._root)
            self._root = None

    def open(self, key: str, flags: int) -> int:
        """An fd of sysctl ``key`` (spelled as :func:`sysctl_relpath` takes it; validated
        or made by nsd), opened with ``flags`` (O_CLOEXEC is added). Raises OSError as
        ``os.open`` does."""
        root = self._procfs()
        if root is None:
            return os.open("/proc/" + sysctl_relpath(key), flags | os.O_CLOEXEC)
        return os.open(sysctl_relpath(key), flags | os.O_CLOEXEC, dir_fd=root)

    def ensure(self, key: str, value: str) -> bool:
        """Write ``value`` to sysctl ``key`` unless it holds that already, compared as
        the kernel prints it (:func:`sysctl_tokens`); whether it wrote. Raises
        OSError."""
        fd = self.open(key, os.O_RDONLY)
        try:
            current = os.read(fd, 4096).decode("ascii")
        finally:
            os.close(fd)
        if sysctl_tokens(current) == sysctl_tokens(value):
            return False
        fd = self.open(key, os.O_WRONLY)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        if self._root is not None:
            os.close(self._root)
            self._root = None

    def _procfs(self) -> int | None:
        if self._root is None and self.own_procfs:
            try:
                self._root = linux.detached_mount("proc")
            except OSError as e:
                self.own_procfs = False
                log.info(
                    "sysctls are opened through /proc: no procfs of nsd's own (%s); "
                    "each start then takes ~0.4 ms longer per tenant at 1,000 tenants",
                    e.strerror,
                )
                return None
            self._visits = 1  # the namespace being looked at
        return self._root
