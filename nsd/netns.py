"""The network namespace adapter: namespace files, veth pairs, addresses, routes, sysctls.

Threading model
---------------
All netlink and namespace work runs on ONE dedicated worker thread, reached from asyncio
through ``loop.run_in_executor``. Namespaces are a property of a *thread*, so ``setns()``
on the event-loop thread would silently move every coroutine of the daemon into a
tenant's namespace; on the worker it only moves the worker, and the worker always goes
back (see ``_Worker.go_home``). One thread also serialises every change, so concurrent
``ensure()`` calls can never race each other into two namespaces or two veth pairs.

The worker talks netlink through nsd/rtnl.py (``Rtnl``, plain blocking sockets; that
module says why not pyroute2's synchronous ``IPRoute``, which is kept here for the one
request it builds for us, the creation of a veth pair). A netlink socket belongs to the
network namespace it was created in, for its whole life: so a socket for a tenant's
namespace is made by entering the namespace, creating the socket and leaving again.
That is what pyroute2's ``netns=`` argument would do by forking a helper process per
socket; doing it on the worker thread costs a ``setns()`` instead of a ``fork()``.

Namespace files follow iproute2's ``ip netns add`` protocol (ip/ipnetns.c, netns_add), so
``ip netns``, ``nsenter --net=``, ``NetworkNamespacePath=`` all work on them:

1. ``mkdir`` the run dir (0755), ``flock(LOCK_EX)`` it;
2. make the run dir a mount point in a shared peer group of its own:
   ``mount --make-rshared``; on EINVAL (not a mount point yet) ``mount --rbind dir dir``,
   ``mount --make-rprivate dir`` (leaves the peer group the bind inherited from its parent,
   Debian bug 949235) and try ``--make-rshared`` again;
3. create the file (``O_CREAT|O_EXCL``, mode 0);
4. ``unshare(CLONE_NEWNET)`` on the worker thread and bind-mount
   ``/proc/thread-self/ns/net`` (not ``/proc/self``: that is the main thread's) onto it;
5. switch the thread back to the host namespace; unlock.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nsd import linux
from nsd.names import SYSCTL_KEY, SYSCTL_VALUE, valid_ifname
from nsd.rtnl import (
    IFA_F_DADFAILED,
    RT_SCOPE_LINK,
    RT_TABLE_MAIN,
    RouteSpec,
    Rtnl,
    dump_addrs,
    dump_routes,
    get_link,
    is_up,
    link_kind,
    netnsid,
    route_dst,
    route_table,
)

__all__ = [
    "EnsureResult",
    "NetnsAdapter",
    "NetnsError",
    "NetworkRef",
    "NetworkSpec",
    "valid_ifname",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: exit status when the worker thread cannot return to the host namespace (EX_SOFTWARE)
EXIT_WRONG_NAMESPACE = 70

NAME_MAX = 255

#: how long ensure() waits for another process (``ip netns add``) to drop the run dir lock
LOCK_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# data model


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


def _not_ours(st: os.stat_result) -> str | None:
    """What the object at a namespace path is, if it cannot be the empty regular file
    nsd creates as a mount point (None if it can)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None if st.st_size == 0 else "a file with content"
    kinds = {
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "an unknown kind of file")


class NetnsError(Exception):
    """A namespace or netlink operation failed.

    ``step`` names what failed ("validate", "exists", "lock", "mount", "unshare", "open",
    "veth", "link", "address", "route", "sysctl", "remove"); ``errno`` is the kernel's
    error number when there is one (pyroute2's ``NetlinkError.code`` or ``OSError.errno``).
    """

    def __init__(self, step: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message
        self.errno = errno


# --------------------------------------------------------------------------------------
# validation


def _validate_sysctl(key: str, value: str) -> None:
    # Only net.* keys: those are the ones a network namespace has its own copy of, and
    # they are written from inside the tenant's namespace, where /proc/sys/net shows
    # only that namespace's table. The regex rules out '/', '..' and empty components.
    if not SYSCTL_KEY.fullmatch(key):
        raise NetnsError("validate", f"sysctl key {key!r} is not a net.* key", errno.EINVAL)
    if not SYSCTL_VALUE.fullmatch(value):
        raise NetnsError("validate", f"sysctl {key}: bad value {value!r}", errno.EINVAL)


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _sysctl_tokens(value: str) -> list[str]:
    """Compare sysctl values as the kernel prints them: whitespace-separated, numbers
    as numbers ("00" is written, "0" read back)."""
    out = []
    for token in value.split():
        try:
            out.append(str(int(token)))
        except ValueError:
            out.append(token)
    return out


# --------------------------------------------------------------------------------------
# netlink helpers (all run on the worker thread)


@contextmanager
def _step(step: str, what: str) -> Iterator[None]:
    """Turn pyroute2's and the kernel's errors into NetnsError(step), keeping errno."""
    try:
        yield
    except NetnsError:
        raise
    except NetlinkError as e:
        raise NetnsError(step, f"{what}: {e.args[1] if len(e.args) > 1 else e}", e.code) from e
    except OSError as e:
        raise NetnsError(step, f"{what}: {e.strerror or e}", e.errno) from e


def _new_ipr() -> Any:
    """A sync IPRoute bound to the calling thread's current network namespace: for the
    creation of veth pairs (a nested request pyroute2 builds for us, once per tenant)
    and for ``run_in_namespace`` callers; nsd's own reads and changes go through
    :class:`Rtnl`.

    groups=0: no multicast subscriptions. pyroute2's default (RTMGRP_DEFAULTS) would
    queue every link/address/route event of the namespace on a socket nobody reads.
    strict_check: NETLINK_GET_STRICT_CHK, so that the kernel itself filters dumps by
    ifindex/oif/table (see nsd.rtnl.dump_addrs/dump_routes).
    """
    ipr = IPRoute(groups=0, strict_check=True)
    # pyroute2 0.9.7: the sync nlm_request() reads status['nlm_generator'], which its
    # constructor never sets (KeyError). False = return a tuple.
    ipr.status["nlm_generator"] = False
    return ipr


# --------------------------------------------------------------------------------------
# the worker: state and code that only ever runs on the one worker thread


class _Worker:
    def __init__(self, adapter: NetnsAdapter) -> None:
        self.a = adapter
        self.ident: int | None = None
        self.host_fd = -1
        self.host_inode = 0
        self._ipr: Any | None = None  # pyroute2 IPRoute: veth creation, run_in()
        self._nl: Rtnl | None = None  # everything else

    # -- lifecycle ----------------------------------------------------------------

    def start(self, host_netns_path: str | None) -> None:
        self.ident = threading.get_ident()
        if host_netns_path is not None:
            fd = self.a.open_namespace(host_netns_path)
            try:
                with _step("open", f"enter host namespace {host_netns_path}"):
                    linux.setns(fd, linux.CLONE_NEWNET)
            finally:
                os.close(fd)
        # The thread's own namespace, not /proc/self (the main thread's): with
        # host_netns_path they differ.
        self.host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.host_inode = os.fstat(self.host_fd).st_ino
        self.host_ipr()
        self.host_nl()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self.host_fd >= 0:
            os.close(self.host_fd)
            self.host_fd = -1

    def host_ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = _new_ipr()
        return self._ipr

    def host_nl(self) -> Rtnl:
        if self._nl is None:
            self._nl = Rtnl()
        return self._nl

    def reset_host_ipr(self) -> None:
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception:  # best effort on an already broken socket
                log.debug("closing a broken netlink socket failed", exc_info=True)
            self._ipr = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def run(self, fn: Callable[[], T]) -> T:
        """Run a job; any failure that is not a clean kernel refusal resets the host socket."""
        assert threading.get_ident() == self.ident, "netns job off the worker thread"
        try:
            return fn()
        except NetnsError as e:
            # A refusal by the kernel (NetlinkError) leaves the socket fine; anything
            # else (a socket error, a pyroute2 hiccup) may have left it out of step.
            if e.__cause__ is not None and not isinstance(e.__cause__, NetlinkError):
                self.reset_host_ipr()
            raise
        except Exception:
            self.reset_host_ipr()
            raise

    # -- namespace switching --------------------------------------------------------

    def go_home(self) -> None:
        """Return this thread to the host namespace, or end the process.

        If this fails the thread stays in a tenant's namespace, and every later job
        would run there: host routes would be added inside a tenant, the next tenant's
        namespace would be created from inside another's, sockets would be opened in
        the wrong place, all silently. Nothing inside the process can repair that (the
        one tool for it just failed) and the asyncio callers cannot even see which
        thread they run on. Exiting lets systemd restart nsd with a clean thread;
        reconciliation then finishes whatever this job was doing.
        """
        try:
            linux.setns(self.host_fd, linux.CLONE_NEWNET)
            home = os.stat("/proc/thread-self/ns/net").st_ino == self.host_inode
        except BaseException:
            log.critical("cannot return the netns worker to the host namespace", exc_info=True)
            os._exit(EXIT_WRONG_NAMESPACE)
        if not home:
            log.critical("the netns worker is not in the host namespace after setns()")
            os._exit(EXIT_WRONG_NAMESPACE)

    @contextmanager
    def entered(self, fd: int, what: str) -> Iterator[None]:
        with _step("open", f"enter {what}"):
            linux.setns(fd, linux.CLONE_NEWNET)
        try:
            yield
        finally:
            self.go_home()

    def open_nl_in(self, fd: int, what: str) -> Rtnl:
        with self.entered(fd, what), _step("open", f"netlink socket in {what}"):
            return Rtnl()

    # -- namespace files --------------------------------------------------------------

    @contextmanager
    def run_dir_locked(self, actions: list[str]) -> Iterator[None]:
        run_dir = self.a.run_dir
        with _step("mount", f"create {run_dir}"):
            os.makedirs(os.path.dirname(run_dir), mode=0o755, exist_ok=True)
            try:
                os.mkdir(run_dir, 0o755)
                # explicit: the daemon's umask must not decide who can reach the files
                os.chmod(run_dir, 0o755)  # noqa: S103 -- world-readable like iproute2
            except FileExistsError:
                pass
            st = os.lstat(run_dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NetnsError("mount", f"{run_dir} is not a directory", errno.ENOTDIR)
            lock_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NetnsError(
                            "lock", f"{run_dir} stays locked by another process", errno.EAGAIN
                        ) from None
                    time.sleep(0.01)
            self.make_run_dir_shared(actions)
            yield
        finally:
            os.close(lock_fd)  # also drops the lock

    def make_run_dir_shared(self, actions: list[str]) -> None:
        run_dir = self.a.run_dir
        made_mount = False
        while True:
            try:
                linux.mount("", run_dir, "none", linux.MS_SHARED | linux.MS_REC)
                return
            except OSError as e:
                if e.errno != errno.EINVAL or made_mount:
                    raise NetnsError(
                        "mount", f"make {run_dir} shared: {e.strerror}", e.errno
                    ) from e
            with _step("mount", f"make {run_dir} a mount point"):
                linux.mount(run_dir, run_dir, "none", linux.MS_BIND | linux.MS_REC)
                linux.mount("", run_dir, "none", linux.MS_PRIVATE | linux.MS_REC)
            made_mount = True
            actions.append(f"made {run_dir} a shared mount point")

    def ensure_namespace(self, path: str, adopt: bool, actions: list[str]) -> tuple[int, bool]:
        """Return (fd of the namespace, adopted_existing)."""
        if self.a.namespace_inode(path) is not None:
            return self.adopt(path, adopt), True
        with self.run_dir_locked(actions):
            # Look again under the lock: another process may have been quicker.
            try:
                st: os.stat_result | None = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_dev == self.a.nsfs_dev:
                return self.adopt(path, adopt), True
            created_file = False
            foreign = _not_ours(st) if st is not None else None
            if st is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
                except FileExistsError:
                    if self.a.namespace_inode(path) is not None:
                        return self.adopt(path, adopt), True
                    raise NetnsError(
                        "mount", f"{path} is being created by someone else", errno.EEXIST
                    ) from None
                except OSError as e:
                    raise NetnsError("mount", f"create {path}: {e.strerror}", e.errno) from e
                os.close(fd)
                created_file = True
            elif foreign is not None:
                raise NetnsError(
                    FOREIGN, f"{path} is {foreign} that nsd did not make; left in place "
                    "(remove it, or choose another netns.name_template)", errno.EEXIST,
                )  # fmt: skip
            else:
                # A plain file where a namespace should be mounted: left over from a
                # namespace whose mount is gone (e.g. /run persisted, or someone
                # unmounted it). Mount a fresh namespace onto it.
                actions.append(f"found stale namespace file {path}")
            try:
                self.mount_new_namespace(path)
            except BaseException:
                if created_file:
                    try:
                        os.unlink(path)
                    except OSError:
                        log.warning("could not remove %s after a failure", path, exc_info=True)
                raise
        actions.append(f"created namespace {path}")
        return self.a.open_namespace(path), False

    def mount_new_namespace(self, path: str) -> None:
        with _step("unshare", "create a network namespace"):
            linux.unshare(linux.CLONE_NEWNET)
        try:
            with _step("mount", f"bind the namespace to {path}"):
                linux.mount("/proc/thread-self/ns/net", path, "none", linux.MS_BIND)
        finally:
            # Leaving drops the thread's reference; the bind mount keeps it alive.
            self.go_home()

    def adopt(self, path: str, adopt: bool) -> int:
        if not adopt:
            raise NetnsError("exists", f"{path} already holds a namespace", errno.EEXIST)
        return self.a.open_namespace(path)

    # -- ensure -------------------------------------------------------------------------

    def ensure(self, spec: NetworkSpec, adopt: bool) -> EnsureResult:
        actions: list[str] = []
        ns_fd, adopted = self.ensure_namespace(spec.netns_path, adopt, actions)
        tenant: Rtnl | None = None
        try:
            inode = os.fstat(ns_fd).st_ino
            tenant = self.open_nl_in(ns_fd, spec.netns_path)
            host, peer = self.ensure_veth(spec, ns_fd, tenant, actions)
            self.ensure_sysctls(spec, ns_fd, actions)
            self.ensure_tenant_side(spec, tenant, peer, actions)
            self.ensure_host_side(spec, host, actions)
        finally:
            if tenant is not None:
                tenant.close()
            os.close(ns_fd)
        return EnsureResult(inode=inode, adopted_existing=adopted, actions=tuple(actions))

    def find_pair(self, spec: NetworkSpec, ns_fd: int, tenant: Rtnl) -> tuple[Any, Any]:
        """(host link or None, its peer if that peer is a veth inside ``ns_fd`` or None)."""
        ipr = self.host_nl()
        with _step("veth", f"inspect {spec.host_ifname}"):
            host = get_link(ipr, ifname=spec.host_ifname)
            if host is None or link_kind(host) != "veth":
                return host, None
            # The peer is identified by the namespace id the host assigned to the
            # tenant's namespace plus its ifindex there: names prove nothing.
            nsid = netnsid(ipr, ns_fd)
            peer_index = host.get_attr("IFLA_LINK")
            if nsid is None or host.get_attr("IFLA_LINK_NETNSID") != nsid or not peer_index:
                return host, None
            peer = get_link(tenant, index=peer_index)
            if (
                peer is None
                or link_kind(peer) != "veth"
                or peer.get_attr("IFLA_LINK") != host["index"]
            ):
                return host, None
            return host, peer

    def clear_name(self, tenant: Rtnl, name: str, where: str, actions: list[str]) -> None:
        """Delete whatever link is called ``name`` inside a tenant's namespace (all of it
        is nsd's) so that the name can be given to the veth peer."""
        with _step("veth", f"clear {name} in {where}"):
            squatter = get_link(tenant, ifname=name)
            if squatter is not None:
                tenant.link_del(int(squatter["index"]))
                actions.append(f"deleted stray {name} in {where}")

    def create_pair(
        self, spec: NetworkSpec, ns_fd: int, tenant: Rtnl, actions: list[str]
    ) -> tuple[Any, Any]:
        host_name, peer_name = spec.host_ifname, spec.peer_ifname
        self.clear_name(tenant, peer_name, spec.netns_path, actions)
        peer_args: dict[str, Any] = {"ifname": peer_name, "net_ns_fd": ns_fd}
        host_args: dict[str, Any] = {}
        if spec.mtu is not None:
            peer_args["mtu"] = host_args["mtu"] = spec.mtu
        with _step("veth", f"create {host_name}"):
            # The peer is created directly in the namespace (IFLA_NET_NS_FD inside the
            # peer's attributes): there is never a half-moved pair.
            self.host_ipr().link("add", ifname=host_name, kind="veth", peer=peer_args, **host_args)
            host = get_link(self.host_nl(), ifname=host_name)
            peer = get_link(tenant, ifname=peer_name)
        if host is None or peer is None:
            raise NetnsError("veth", f"{host_name} vanished right after creation")
        actions.append(f"created veth {host_name} <-> {peer_name} in {spec.netns_path}")
        return host, peer

    def ensure_veth(
        self, spec: NetworkSpec, ns_fd: int, tenant: Rtnl, actions: list[str]
    ) -> tuple[Any, Any]:
        """Return the (host, peer) link messages, current after any change made here."""
        ipr = self.host_nl()
        host, peer = self.find_pair(spec, ns_fd, tenant)
        if host is not None and peer is None:
            # Not a veth, or its peer lives elsewhere (e.g. the namespace was recreated
            # while the old one was still pinned): the name is ours, start over.
            with _step("veth", f"delete {spec.host_ifname}"):
                try:
                    ipr.link_del(int(host["index"]))
                except NetlinkError as e:
                    # the kernel may be tearing it down already (its peer's namespace
                    # is being destroyed)
                    if e.code != errno.ENODEV:
                        raise
            actions.append(f"deleted {spec.host_ifname}: its peer was not in {spec.netns_path}")
        if peer is None:
            host, peer = self.create_pair(spec, ns_fd, tenant, actions)
        peer_idx = int(peer["index"])
        old = peer.get_attr("IFLA_IFNAME")
        if old != spec.peer_ifname:
            self.clear_name(tenant, spec.peer_ifname, spec.netns_path, actions)
            with _step("veth", f"rename {old} to {spec.peer_ifname} in {spec.netns_path}"):
                # a link must be down to be renamed; ensure_tenant_side brings it up again
                tenant.link_set(peer_idx, up=False)
                tenant.link_set(peer_idx, ifname=spec.peer_ifname)
                peer = get_link(tenant, index=peer_idx)
            if peer is None:
                raise NetnsError("veth", f"{spec.peer_ifname} vanished", errno.ENODEV)
            actions.append(f"renamed {old} to {spec.peer_ifname} in {spec.netns_path}")
        if spec.mtu is not None:
            for ipr_, link, where in ((ipr, host, "host"), (tenant, peer, spec.netns_path)):
                if link.get_attr("IFLA_MTU") != spec.mtu:
                    name = link.get_attr("IFLA_IFNAME")
                    with _step("link", f"set mtu of {name}"):
                        ipr_.link_set(int(link["index"]), mtu=spec.mtu)
                    actions.append(f"set mtu {spec.mtu} on {name} ({where})")
        return host, peer

    def ensure_sysctls(self, spec: NetworkSpec, ns_fd: int, actions: list[str]) -> None:
        if not spec.sysctls:
            return
        with self.entered(ns_fd, spec.netns_path):
            for key, value in spec.sysctls:
                path = _sysctl_path(key)
                with _step("sysctl", key):
                    with open(path, encoding="ascii") as f:
                        current = f.read()
                    if _sysctl_tokens(current) == _sysctl_tokens(value):
                        continue
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, value.encode("ascii"))
                    finally:
                        os.close(fd)
                actions.append(f"set {key}={value} in {spec.netns_path}")

    def ensure_up(self, ipr: Rtnl, link: Any, where: str, actions: list[str]) -> None:
        if not is_up(link):
            name = link.get_attr("IFLA_IFNAME")
            with _step("link", f"set {name} up"):
                ipr.link_set(int(link["index"]), up=True)
            actions.append(f"set {name} up ({where})")

    def ensure_addresses(
        self,
        ipr: Rtnl,
        *,
        index: int,
        ifname: str,
        where: str,
        want: list[tuple[IPv4Address | IPv6Address, int]],
        actions: list[str],
    ) -> None:
        """Make ``want`` the addresses of link ``index``, besides the kernel's own
        IPv6 link-local ones (which are regenerated anyway and harm nobody)."""
        with _step("address", f"list addresses of {ifname}"):
            have = [
                a
                for family in (socket.AF_INET, socket.AF_INET6)
                for a in dump_addrs(ipr, family, index)
                if a["index"] == index
            ]
        present: set[tuple[IPv4Address | IPv6Address, int]] = set()
        for a in have:
            addr = ip_address(a.get_attr("IFA_ADDRESS"))
            key = (addr, int(a["prefixlen"]))
            flags = a.get_attr("IFA_FLAGS")
            flags = int(flags if flags is not None else a["flags"])
            if key in want and not flags & IFA_F_DADFAILED:
                present.add(key)
                continue
            if addr.version == 6 and addr.is_link_local and all(addr != w for w, _ in want):
                continue
            with _step("address", f"delete {addr}/{key[1]} from {ifname}"):
                try:
                    ipr.addr_change(False, index, addr, key[1])
                except NetlinkError as e:
                    # deleting an IPv4 primary also deletes its secondaries
                    if e.code != errno.EADDRNOTAVAIL:
                        raise
            actions.append(f"deleted {addr}/{key[1]} from {ifname} ({where})")
        for addr, plen in want:
            if (addr, plen) in present:
                continue
            with _step("address", f"add {addr}/{plen} to {ifname}"):
                ipr.addr_change(True, index, addr, plen)
            actions.append(f"added {addr}/{plen} to {ifname} ({where})")

    def ensure_routes(
        self,
        ipr: Rtnl,
        *,
        oif: int | None,
        ifname: str,
        where: str,
        want: list[RouteSpec],
        actions: list[str],
        on_conflict: Callable[[RouteSpec], None] | None = None,
    ) -> None:
        """Make the main table hold each route in ``want``, replacing routes to the same
        destination that differ. With ``oif``, only routes through that link are looked
        at (the kernel filters the dump, so this stays cheap with thousands of tenants);
        a clash with a route elsewhere then surfaces as EEXIST and goes to
        ``on_conflict``."""
        with _step("route", f"list routes via {ifname}"):
            have = [
                r
                for family in (socket.AF_INET, socket.AF_INET6)
                for r in dump_routes(ipr, family, oif)
                if route_table(r) == RT_TABLE_MAIN and (oif is None or r.get_attr("RTA_OIF") == oif)
            ]
        have_dst = [(route_dst(r), r) for r in have]
        for w in want:
            same_dst = [r for dst, r in have_dst if dst == w.dst]
            for r in same_dst:
                if w.matches(r):
                    continue
                with _step("route", f"delete a wrong route to {w.dst}"):
                    ipr.route_del(r)
                actions.append(f"deleted a wrong route to {w.dst} ({where})")
            if any(w.matches(r) for r in same_dst):
                continue
            with _step("route", f"add route {w} dev {ifname}"):
                try:
                    ipr.route_add(w)
                except NetlinkError as e:
                    if e.code != errno.EEXIST or on_conflict is None:
                        raise
                    on_conflict(w)
                    ipr.route_add(w)
            actions.append(f"added route {w} dev {ifname} ({where})")

    def ensure_tenant_side(
        self, spec: NetworkSpec, tenant: Rtnl, peer: Any, actions: list[str]
    ) -> None:
        where = spec.netns_path
        peer_idx = int(peer["index"])
        with _step("link", f"inspect lo in {where}"):
            lo = get_link(tenant, ifname="lo")
        if lo is None:
            raise NetnsError("link", f"no lo in {where}", errno.ENODEV)
        self.ensure_up(tenant, lo, where, actions)
        # Up before addresses: taking an interface down flushes its IPv6 addresses.
        self.ensure_up(tenant, peer, where, actions)
        self.ensure_addresses(
            tenant,
            index=peer_idx,
            ifname=spec.peer_ifname,
            where=where,
            want=[(spec.ipv4_address, 32), (spec.ipv6_address, spec.ipv6_prefix.prefixlen)],
            actions=actions,
        )
        gw4 = ip_network(f"{spec.ipv4_gateway}/32")
        self.ensure_routes(
            tenant,
            oif=None,  # the whole namespace is ours: replace clashing routes on any link
            ifname=spec.peer_ifname,
            where=where,
            want=[
                RouteSpec(dst=gw4, oif=peer_idx, scope=RT_SCOPE_LINK),
                RouteSpec(
                    dst=IPv4Network("0.0.0.0/0"),
                    oif=peer_idx,
                    gateway=spec.ipv4_gateway,
                    onlink=True,
                ),
                RouteSpec(dst=IPv6Network("::/0"), oif=peer_idx, gateway=spec.ipv6_gateway),
            ],
            actions=actions,
        )

    def ensure_host_side(self, spec: NetworkSpec, host: Any, actions: list[str]) -> None:
        ipr = self.host_nl()
        name = spec.host_ifname
        host_idx = int(host["index"])
        self.ensure_up(ipr, host, "host", actions)
        self.ensure_addresses(
            ipr,
            index=host_idx,
            ifname=name,
            where="host",
            want=[(spec.ipv4_gateway, 32), (spec.ipv6_gateway, 64)],
            actions=actions,
        )

        def on_conflict(w: RouteSpec) -> None:
            # Some other link already has a route to exactly this destination. If it is
            # one of ours (a tenant whose addresses moved), take it over; never touch
            # anyone else's.
            ours = {i for i, _ in self.prefixed_links()}
            family = socket.AF_INET if w.dst.version == 4 else socket.AF_INET6
            for r in dump_routes(ipr, family):
                if route_table(r) != RT_TABLE_MAIN or route_dst(r) != w.dst:
                    continue
                if r.get_attr("RTA_OIF") not in ours:
                    raise NetnsError(
                        "route",
                        f"{w.dst} is already routed elsewhere in the host namespace",
                        errno.EEXIST,
                    )
                ipr.route_del(r)
                actions.append(f"deleted route to {w.dst} via another nsd link")

        self.ensure_routes(
            ipr,
            oif=host_idx,
            ifname=name,
            where="host",
            want=[
                RouteSpec(
                    dst=ip_network(f"{spec.ipv4_address}/32"),
                    oif=host_idx,
                    prefsrc=spec.ipv4_gateway,
                    scope=RT_SCOPE_LINK,
                ),
                RouteSpec(dst=spec.ipv6_prefix, oif=host_idx),
            ],
            actions=actions,
            on_conflict=on_conflict,
        )

    # -- running foreign work inside a namespace ---------------------------------------

    def run_in(self, path: str | None, fn: Callable[[Any], T]) -> T:
        if path is None:
            return fn(self.host_ipr())
        fd = self.a.open_namespace(path)
        try:
            with self.entered(fd, path):
                with _step("open", f"netlink socket in {path}"):
                    ipr = _new_ipr()
                try:
                    return fn(ipr)
                finally:
                    ipr.close()
        finally:
            os.close(fd)

    # -- remove and host queries ------------------------------------------------------

    def remove(self, ref: NetworkRef) -> tuple[str, ...]:
        """Delete the veth, unmount the namespace, unlink the empty file under it.

        Only what nsd makes is removed: network namespace bind mounts, and then the
        empty regular file nsd created as their mount point. Anything else at the
        path (a symbolic link, FIFO, directory, a file with content, another mount)
        was put there by someone else: it is left alone, and after everything of
        nsd's is gone a NetnsError with step ``FOREIGN`` says what it is.
        """
        actions: list[str] = []
        if ref.host_ifname is not None:
            self.delete_link(ref.host_ifname, actions)
        path = ref.netns_path
        with _step("remove", f"unmount {path}"):
            for _ in range(64):  # also undoes mounts stacked by old bugs
                if self.a.namespace_inode(path) is None:
                    break
                if not self.a.is_network_namespace(path):
                    raise NetnsError(
                        FOREIGN, f"{path} is a mount of another kind of namespace that "
                        "nsd did not make; left in place", errno.EEXIST,
                    )  # fmt: skip
                linux.umount2(path, linux.MNT_DETACH)
                actions.append(f"unmounted {path}")
        with _step("remove", f"unlink {path}"):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return tuple(actions)
            foreign = _not_ours(st)
            if foreign is None:
                try:
                    os.unlink(path)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    foreign = "a mount point of something else"
            if foreign is not None:
                raise NetnsError(
                    FOREIGN, f"{path} is {foreign} that nsd did not make; left in place",
                    errno.EEXIST,
                )  # fmt: skip
            actions.append(f"removed {path}")
        return tuple(actions)

    def delete_link(self, name: str, actions: list[str]) -> None:
        ipr = self.host_nl()
        with _step("link", f"delete {name}"):
            link = get_link(ipr, ifname=name)
            if link is None:
                return
            try:
                ipr.link_del(int(link["index"]))
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
                return
        actions.append(f"deleted {name}")

    def prefixed_links(self) -> list[tuple[int, str]]:
        with _step("link", "list host links"):
            links = self.host_nl().link_dump()
            return [
                (int(link["index"]), str(name))
                for link in links
                if (name := link.get_attr("IFLA_IFNAME")) and self.a.link_re.fullmatch(name)
            ]

    def host_routes(self) -> list[IPv4Network | IPv6Network]:
        ours = {i for i, _ in self.prefixed_links()}
        with _step("route", "list host routes"):
            routes = [
                r
                for family in (socket.AF_INET, socket.AF_INET6)
                for r in dump_routes(self.host_nl(), family, table=0)
            ]
        out: list[IPv4Network | IPv6Network] = []
        seen: set[IPv4Network | IPv6Network] = set()
        for r in routes:
            # Every table, not only main: VPN meshes such as Tailscale route
            # 100.64.0.0/10 from a table of their own (52).
            if int(r["dst_len"]) == 0:
                continue
            if r.get_attr("RTA_OIF") in ours:
                continue
            dst = route_dst(r)
            if dst not in seen:
                seen.add(dst)
                out.append(dst)
        return out


# --------------------------------------------------------------------------------------
# the adapter


class NetnsAdapter:
    """Async facade; every method that touches netlink or namespaces hops to the worker."""

    def __init__(
        self,
        run_dir: str = "/run/netns",
        link_prefix: str = "nsd",
        host_netns_path: str | None = None,
    ) -> None:
        if not link_prefix or not valid_ifname(link_prefix) or link_prefix[-1].isdigit():
            # a trailing digit would make prefix+uid ambiguous (nsd1+23 == nsd12+3)
            raise ValueError(f"bad link prefix {link_prefix!r}")
        self.run_dir = os.path.abspath(run_dir)
        self.link_prefix = link_prefix
        self.link_re = re.compile(re.escape(link_prefix) + r"(0|[1-9][0-9]*)")
        self.host_netns_path = host_netns_path
        self.nsfs_dev = os.stat("/proc/self/ns/net").st_dev
        self._executor: ThreadPoolExecutor | None = None
        self._worker = _Worker(self)
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None or self._closed:
            raise RuntimeError("NetnsAdapter.start() called twice")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsd-netns")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._worker.start, self.host_netns_path)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # queued jobs run first: close is graceful
            await loop.run_in_executor(executor, self._worker.close)
        finally:
            executor.shutdown(wait=False)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("NetnsAdapter is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._worker.run, fn))

    # -- validation -------------------------------------------------------------------

    def check_path(self, path: str) -> None:
        name = os.path.basename(path)
        if (
            os.path.dirname(path) != self.run_dir
            or name in ("", ".", "..")
            or "\x00" in name
            or len(os.fsencode(name)) > NAME_MAX
        ):
            raise NetnsError(
                "validate", f"{path!r} is not a file directly in {self.run_dir}", errno.EINVAL
            )

    def check_link_name(self, name: str) -> None:
        if not self.link_re.fullmatch(name) or not valid_ifname(name):
            raise NetnsError(
                "validate",
                f"{name!r} is not an nsd link name ({self.link_prefix}<uid>)",
                errno.EINVAL,
            )

    def validate(self, spec: NetworkSpec) -> None:
        self.check_path(spec.netns_path)
        self.check_link_name(spec.host_ifname)
        if not valid_ifname(spec.peer_ifname) or spec.peer_ifname in ("lo", "all", "default"):
            raise NetnsError("validate", f"bad peer name {spec.peer_ifname!r}", errno.EINVAL)
        if not (
            isinstance(spec.ipv4_address, IPv4Address)
            and isinstance(spec.ipv4_gateway, IPv4Address)
            and isinstance(spec.ipv6_prefix, IPv6Network)
            and isinstance(spec.ipv6_address, IPv6Address)
            and isinstance(spec.ipv6_gateway, IPv6Address)
        ):
            raise NetnsError("validate", "address fields have the wrong types", errno.EINVAL)
        if spec.ipv4_address == spec.ipv4_gateway:
            raise NetnsError("validate", "tenant address equals the gateway", errno.EINVAL)
        if spec.ipv6_address not in spec.ipv6_prefix:
            raise NetnsError(
                "validate", f"{spec.ipv6_address} is not in {spec.ipv6_prefix}", errno.EINVAL
            )
        if not spec.ipv6_gateway.is_link_local:
            raise NetnsError(
                "validate", f"IPv6 gateway {spec.ipv6_gateway} is not link-local", errno.EINVAL
            )
        if spec.mtu is not None and not 68 <= spec.mtu <= 65535:
            raise NetnsError("validate", f"bad mtu {spec.mtu}", errno.EINVAL)
        for key, value in spec.sysctls:
            _validate_sysctl(key, value)

    # -- operations ---------------------------------------------------------------------

    async def ensure(self, spec: NetworkSpec, *, adopt: bool = True) -> EnsureResult:
        """Create or repair the tenant's namespace and network; idempotent.

        With ``adopt=False`` an already mounted namespace at ``spec.netns_path`` is an
        error (``NetnsError(step="exists", errno=EEXIST)``) instead of being reused.
        """
        self.validate(spec)
        return await self._call(functools.partial(self._worker.ensure, spec, adopt))

    async def remove(self, target: NetworkSpec | NetworkRef) -> tuple[str, ...]:
        """Delete the host veth (its peer goes with it), detach and unlink the namespace
        file; idempotent. Processes still inside keep the namespace alive, unreachable."""
        ref = target.ref if isinstance(target, NetworkSpec) else target
        self.check_path(ref.netns_path)
        if ref.host_ifname is not None:
            self.check_link_name(ref.host_ifname)
        return await self._call(functools.partial(self._worker.remove, ref))

    def namespace_inode(self, path: str) -> int | None:
        """Inode of the namespace mounted at ``path``, or None if nothing (nsfs) is mounted
        there. Only stats the path; it does not check that the namespace is a *network*
        namespace (``open_namespace`` does)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st.st_ino if st.st_dev == self.nsfs_dev else None

    def is_network_namespace(self, path: str) -> bool:
        try:
            os.close(self.open_namespace(path))
        except NetnsError:
            return False
        return True

    def open_namespace(self, path: str) -> int:
        """An ``O_RDONLY|O_CLOEXEC`` fd of the network namespace mounted at ``path``."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise NetnsError("open", f"{path}: {e.strerror}", e.errno) from e
        try:
            if os.fstat(fd).st_dev != self.nsfs_dev:
                raise NetnsError("open", f"{path} is not a mounted namespace", errno.EINVAL)
            if linux.ns_get_nstype(fd) != linux.CLONE_NEWNET:
                raise NetnsError("open", f"{path} is not a network namespace", errno.EINVAL)
        except OSError as e:
            os.close(fd)
            raise NetnsError("open", f"{path}: {e.strerror}", e.errno) from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def list_prefixed_links(self) -> list[str]:
        """Host links named exactly ``<prefix><decimal uid>`` (no leading zeros)."""
        links = await self._call(self._worker.prefixed_links)
        return sorted(name for _, name in links)

    async def delete_link(self, name: str) -> None:
        """Delete a host link; refuses names that are not nsd's. Missing is fine."""
        self.check_link_name(name)
        await self._call(functools.partial(self._worker.delete_link, name, []))

    async def run_in_namespace(self, netns_path: str | None, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ipr)`` on the worker thread while the thread is inside the network
        namespace mounted at ``netns_path`` (None: the host namespace), with ``ipr`` a
        sync pyroute2 ``IPRoute`` of that namespace (do not close or keep it).

        For work that must happen inside a namespace and must not block the event loop:
        tc through ``ipr``, libnftables (its netlink socket opens in the thread's
        namespace), /proc/sys/net files (they show the thread's namespace). ``fn`` must
        not switch namespaces itself; the worker always returns home afterwards.
        """
        if netns_path is not None:
            self.check_path(netns_path)
        return await self._call(functools.partial(self._worker.run_in, netns_path, fn))

    async def host_routes(self) -> list[IPv4Network | IPv6Network]:
        """Destinations of the host's routes in every table, without default routes and
        without routes through nsd's own links (for IPAM overlap checks)."""
        return await self._call(self._worker.host_routes)
