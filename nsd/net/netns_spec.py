"""What the network namespace adapter works on: the spec of one tenant's network, the
result of building it, the one error type, and the checks on per-namespace sysctls.

Shared by the adapter (nsd/netns.py), its worker thread (nsd/netns_worker.py), the
namespace files (nsd/netns_mount.py) and the link setup (nsd/netns_links.py)."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from types import TracebackType

from nsd.names import SYSCTL_KEY, SYSCTL_VALUE
from nsd.net.rtnl_wire import netlink_errors


@dataclass(frozen=True)
class NetworkSpec:
    """Everything the adapter needs to build one tenant's network."""

    #: the namespace file, e.g. /run/netns/alice; must sit directly in the run dir
    netns_path: str
    #: host end of the veth pair, e.g. nsd1001; must be ``<prefix><decimal uid>``
    host_ifname: str
    #: the other end, inside the namespace, e.g. eth0
    peer_ifname: str
    #: the tenant's address, configured as /32 on the peer
    ipv4_address: IPv4Address
    #: one shared gateway address, configured as /32 on every host-side veth
    ipv4_gateway: IPv4Address
    #: the prefix routed to the tenant
    ipv6_prefix: IPv6Network
    #: the tenant's address inside ``ipv6_prefix``, configured with its length on the peer
    ipv6_address: IPv6Address
    #: a link-local address, e.g. fe80::1, configured /64 on every host-side veth
    ipv6_gateway: IPv6Address
    #: per-namespace ``net.*`` sysctls, written inside the namespace, e.g.
    #: (("net.ipv4.ip_unprivileged_port_start", "0"),)
    sysctls: tuple[tuple[str, str], ...] = ()
    #: MTU of both veth ends; None leaves the kernel's default alone
    mtu: int | None = None

    @property
    def ref(self) -> NetworkRef:
        return NetworkRef(self.netns_path, self.host_ifname)


@dataclass(frozen=True)
class NetworkRef:
    """What :meth:`NetnsAdapter.remove` needs: the namespace file and the host link name."""

    netns_path: str
    host_ifname: str | None = None


@dataclass(frozen=True)
class EnsureResult:
    #: inode of the namespace (what ``/proc/PID/ns/net`` of its processes links to)
    inode: int
    #: the namespace file already held a namespace, which was kept
    adopted_existing: bool
    #: what was changed, human readable; empty when everything was already right
    actions: tuple[str, ...]


# NetnsError.step when something nsd did not make is where a namespace file belongs.
FOREIGN = "foreign"


class NetnsError(Exception):
    """A namespace or netlink operation failed.

    ``step`` names what failed ("validate", "exists", "lock", "mount", "unshare", "open",
    "veth", "link", "address", "route", "sysctl", "remove"); ``errno`` is the kernel's
    error number when there is one (``NetlinkError.code`` or ``OSError.errno``).
    """

    def __init__(self, step: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message
        self.errno = errno


def validate_sysctl(key: str, value: str) -> None:
    # Only net.* keys: those are the ones a network namespace has its own copy of, and
    # they are written from inside the tenant's namespace, where /proc/sys/net shows
    # only that namespace's table. The regex rules out '/', '..' and empty components.
    if not SYSCTL_KEY.fullmatch(key):
        raise NetnsError("validate", f"sysctl key {key!r} is not a net.* key", errno.EINVAL)
    if not SYSCTL_VALUE.fullmatch(value):
        raise NetnsError("validate", f"sysctl {key}: bad value {value!r}", errno.EINVAL)


class kernel_step:  # used like a function: ``with kernel_step(...)``
    """Turn pyroute2's and the kernel's errors into NetnsError(step), keeping errno.

    A class, not a ``@contextmanager`` generator: a restart's check enters ~15 of these
    per tenant, and the generator's machinery took 8 % of the netns worker's time.
    ``what`` is formatted with ``args`` (``%``, as logging does) only when it is needed,
    for an error: formatting the tenant's IPv6 addresses for messages that were never
    shown took ~10 % of the worker's time in a cold start."""

    __slots__ = ("args", "step", "what")

    def __init__(self, step: str, what: str, *args: object) -> None:
        self.step = step
        self.what = what
        self.args = args

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is None or isinstance(e, NetnsError):
            return
        if isinstance(e, netlink_errors()):
            code = getattr(e, "code", None)
            detail = e.args[1] if len(e.args) > 1 else e
            raise NetnsError(self.step, f"{self.text()}: {detail}", code) from e
        if isinstance(e, OSError):
            raise NetnsError(self.step, f"{self.text()}: {e.strerror or e}", e.errno) from e

    def text(self) -> str:
        return self.what % self.args if self.args else self.what
