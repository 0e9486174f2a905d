"""The netns worker: the one thread that does all netlink and namespace work.

Namespaces are a property of a *thread*, so ``setns()`` on the event-loop thread would
silently move every coroutine of the daemon into a tenant's namespace; on the worker it
only moves the worker, and the worker always goes back (see :meth:`Worker.go_home`). One
thread also serialises every change, so concurrent ``ensure()`` calls can never race each
other into two namespaces or two veth pairs. Every method here runs on that thread; the
asyncio facade that hands jobs to it is nsd/netns.py. The one exception is a batch's new
namespaces: the worker has its maker thread (nsd/netns_maker.py) create them ahead, each
of them for a tenant the batch holds, while it configures the ones before.

A netlink socket belongs to the network namespace it was created in, for its whole life:
so a socket for a tenant's namespace is made by entering the namespace, creating the
socket and leaving again (what pyroute2's ``netns=`` argument would do by forking a
helper process per socket; here it costs a ``setns()`` instead of a ``fork()``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar

from nsd.net import linux, netns_links
from nsd.net.netns_maker import Ahead, NamespaceMaker
from nsd.net.netns_mount import NamespaceFiles
from nsd.net.netns_spec import (
    EnsureResult,
    NetnsError,
    NetworkRef,
    NetworkSpec,
    kernel_step,
)
from nsd.net.rtnl import Rtnl, dump_routes, get_link, route_dst
from nsd.net.rtnl_wire import NetlinkError, netlink_errors
from nsd.net.sysctl_files import SysctlFiles

log = logging.getLogger(__name__)

T = TypeVar("T")

#: exit status when the worker thread cannot return to the host namespace (EX_SOFTWARE)
EXIT_WRONG_NAMESPACE = 70


def out_of_step(e: BaseException) -> bool:
    """Whether a failed job may have left the host's netlink socket out of step. A
    refusal by the kernel (NetlinkError) or one of nsd's own checks leaves it fine;
    anything else (a socket error, a pyroute2 hiccup) may not."""
    if isinstance(e, NetnsError):
        return e.__cause__ is not None and not isinstance(e.__cause__, netlink_errors())
    return True


class WrongThread(RuntimeError):
    """A netns job was called off the worker thread: a bug in nsd, never a user error."""


def new_ipr() -> Any:
    """A sync IPRoute bound to the calling thread's current network namespace, for
    ``run_in_namespace`` callers (tc); nsd's own reads and changes go through
    :class:`Rtnl`. pyroute2 is imported here, on first use: importing it costs
    0.3-0.5 s that a start without tc need not pay (nsd/rtnl_wire.py).

    groups=0: no multicast subscriptions. pyroute2's default (RTMGRP_DEFAULTS) would
    queue every link/address/route event of the namespace on a socket nobody reads.
    strict_check: NETLINK_GET_STRICT_CHK, so that the kernel itself filters dumps by
    ifindex/oif/table (see nsd.net.rtnl.dump_addrs/dump_routes).
    """
    from pyroute2 import IPRoute  # noqa: PLC0415 -- see above

    ipr = IPRoute(groups=0, strict_check=True)
    # pyroute2 0.9.7: the sync nlm_request() reads status['nlm_generator'], which its
    # constructor never sets (KeyError). False = return a tuple.
    ipr.status["nlm_generator"] = False
    return ipr


# --------------------------------------------------------------------------------------


class Worker:
    def __init__(self, files: NamespaceFiles, link_re: re.Pattern[str]) -> None:
        self.files = files
        #: the names of nsd's host links (``<prefix><uid>``)
        self.link_re = link_re
        self.ident: int | None = None
        self.host_fd = -1
        self.host_inode = 0
        self._ipr: Any | None = None  # pyroute2 IPRoute: run_in(), made when first asked
        self._nl: Rtnl | None = None  # everything else
        #: jobs run so far, and the listing of the host kept for consecutive batches
        #: (ensure_many) with the job that last used it: any other job may change the
        #: host, so the listing is kept only while nothing but batches run
        self.jobs = 0
        self._view: netns_links.HostView | None = None
        self._view_job = -1
        self.sysctl_files = SysctlFiles()
        #: makes a batch's new namespaces ahead of the tenants being built (ensure_many)
        self.maker = NamespaceMaker(files, self.mount_new_namespace, self.go_home)

    # -- lifecycle ----------------------------------------------------------------

    def start(self, host_netns_path: str | None) -> None:
        self.ident = threading.get_ident()
        if host_netns_path is not None:
            fd = self.files.open_namespace(host_netns_path)
            try:
                with kernel_step("open", "enter host namespace %s", host_netns_path):
                    linux.setns(fd, linux.CLONE_NEWNET)
            finally:
                os.close(fd)
        # The thread's own namespace, not /proc/self (the main thread's): with
        # host_netns_path they differ.
        self.host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.host_inode = os.fstat(self.host_fd).st_ino
        self.host_nl()

    def close(self) -> None:
        self.maker.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self.host_fd >= 0:
            os.close(self.host_fd)
            self.host_fd = -1
        self.sysctl_files.close()

    def host_ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = new_ipr()
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
        if threading.get_ident() != self.ident:
            raise WrongThread("netns job off the worker thread")
        self.jobs += 1
        try:
            return fn()
        except Exception as e:
            if out_of_step(e):
                self.reset_host_ipr()
            raise
        finally:
            if self._view_job != self.jobs:
                self._view = None  # another job ran: what it listed may not hold

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
        with kernel_step("open", "enter %s", what):
            linux.setns(fd, linux.CLONE_NEWNET)
        try:
            yield
        finally:
            self.go_home()

    # -- namespace files --------------------------------------------------------------

    def mount_new_namespace(self, path: str) -> None:
        """Create a network namespace and bind it onto the file at ``path``; on the
        calling thread, the worker's or its namespace maker's."""
        with kernel_step("unshare", "create a network namespace"):
            linux.unshare(linux.CLONE_NEWNET)
        try:
            with kernel_step("mount", "bind the namespace to %s", path):
                linux.mount("/proc/thread-self/ns/net", path, "none", linux.MS_BIND)
        finally:
            # Leaving drops the thread's reference; the bind mount keeps it alive.
            self.go_home()

    # -- ensure -------------------------------------------------------------------------

    def ensure_many(self, specs: list[NetworkSpec], adopt: bool) -> list[EnsureResult | NetnsError]:
        """``ensure`` for each of ``specs`` in one job: one listing of the host
        (:class:`netns_links.HostView`) for all of them, and no hand-over to the event
        loop between tenants. A tenant that fails gets its NetnsError in its place;
        the others go on. Namespaces missing when the batch starts are made ahead on
        the maker's thread (nsd/netns_maker.py says why)."""
        view = self._view if self._view_job == self.jobs - 1 else None
        if view is None:
            view = netns_links.HostView(self.host_nl())
        self._view, self._view_job = view, self.jobs
        out: list[EnsureResult | NetnsError] = []
        with self.files.batch():
            ahead = self.make_ahead([(s, adopt) for s in specs])
            try:
                self._ensure_each(specs, adopt, view, ahead, out)
            finally:
                if ahead is not None:
                    ahead.finish()
        return out

    def make_ahead(self, items: list[tuple[NetworkSpec, bool]]) -> Ahead | None:
        """Have the maker make the namespaces of ``items`` (spec, adopt) that are missing
        now, or None if fewer than two are: one has nothing to overlap with."""
        missing: dict[str, bool] = {}
        for spec, adopt in items:
            path = spec.netns_path
            if path not in missing and self.files.namespace_inode(path) is None:
                missing[path] = adopt
        return self.maker.make(list(missing.items())) if len(missing) > 1 else None

    def ensure_group(
        self,
        items: list[tuple[NetworkSpec, bool]],
        deliver: Callable[[int, EnsureResult | Exception], None],
    ) -> None:
        """``ensure(spec, adopt)`` for each of ``items``, the calls of several callers
        that queued up while the worker was busy (NetnsAdapter.ensure), in one job: each
        outcome, a result or the exception, goes to ``deliver(index, outcome)`` as soon
        as it is known. With several new namespaces among them, the maker makes them
        ahead, as for a batch."""
        if len(items) == 1:
            self._ensure_one(0, *items[0], None, deliver)
            return
        with self.files.batch():
            ahead = self.make_ahead(items)
            try:
                for i, (spec, adopt) in enumerate(items):
                    self._ensure_one(i, spec, adopt, ahead, deliver)
            finally:
                if ahead is not None:
                    ahead.finish()

    def _ensure_one(
        self,
        index: int,
        spec: NetworkSpec,
        adopt: bool,
        ahead: Ahead | None,
        deliver: Callable[[int, EnsureResult | Exception], None],
    ) -> None:
        try:
            result = self.ensure(spec, adopt, None, ahead)
        except Exception as e:
            if out_of_step(e):  # as run() does for a job of its own
                self.reset_host_ipr()
            deliver(index, e)
        else:
            deliver(index, result)

    def _ensure_each(
        self,
        specs: list[NetworkSpec],
        adopt: bool,
        view: netns_links.HostView | None,
        ahead: Ahead | None,
        out: list[EnsureResult | NetnsError],
    ) -> None:
        for spec in specs:
            try:
                out.append(self.ensure(spec, adopt, view, ahead))
            except NetnsError as e:
                out.append(e)
                if out_of_step(e):
                    # as run() does; and what the listing says may no longer hold
                    self.reset_host_ipr()
                    view = self._view = None

    def ensure(
        self,
        spec: NetworkSpec,
        adopt: bool,
        view: netns_links.HostView | None = None,
        ahead: Ahead | None = None,
    ) -> EnsureResult:
        """``ahead``: namespaces the maker is making for this batch (ensure_many)."""
        actions: list[str] = []
        made = ahead.take(spec.netns_path) if ahead is not None else None
        if made is not None:
            ns_fd, adopted, actions = made
        else:
            ns_fd, adopted = self.files.ensure(
                spec.netns_path, adopt, actions, self.mount_new_namespace
            )
        tenant: Rtnl | None = None
        try:
            inode = os.fstat(ns_fd).st_ino
            # Taken before entering: a socket made inside would belong to the tenant.
            host_nl = self.host_nl()
            # One visit to the namespace per tenant, not one per task (a restart visits
            # every namespace): its socket, which stays there for its life; the pair,
            # through the host's socket; then its sysctls, some of which (route_localnet)
            # are the peer's.
            with self.entered(ns_fd, spec.netns_path):
                with kernel_step("open", "netlink socket in %s", spec.netns_path):
                    tenant = Rtnl()
                links = netns_links.links_of(tenant, spec.netns_path)
                host, peer, created = netns_links.ensure_veth(
                    host_nl, spec, ns_fd, tenant, actions=actions, tenant_links=links
                )
                self.sysctl_files.next_namespace()
                for key, value in spec.sysctls:
                    if self.set_sysctl(key, value):
                        actions.append(f"set {key}={value} in {spec.netns_path}")
            # A pair made just now has no addresses or routes, and a namespace made just
            # now has nothing else: nothing to list (Create, and reconcile after a reboot).
            netns_links.ensure_tenant_side(
                spec, tenant, peer, actions, fresh=created and not adopted, tenant_links=links
            )
            netns_links.ensure_host_side(
                host_nl,
                spec,
                host,
                actions,
                lambda: {i for i, _ in self.prefixed_links()},
                fresh=created,
                view=view,
            )
        finally:
            if tenant is not None:
                tenant.close()
            os.close(ns_fd)
        return EnsureResult(inode=inode, adopted_existing=adopted, actions=tuple(actions))

    def set_sysctl(self, key: str, value: str) -> bool:
        """Write ``value`` to sysctl ``key`` of the thread's current namespace unless it
        holds that already; whether it wrote."""
        with kernel_step("sysctl", key):
            return self.sysctl_files.ensure(key, value)

    # -- running foreign work inside a namespace ---------------------------------------

    def run_in(self, path: str | None, fn: Callable[[Any], T]) -> T:
        if path is None:
            return fn(self.host_ipr())
        fd = self.files.open_namespace(path)
        try:
            with self.entered(fd, path):
                with kernel_step("open", "netlink socket in %s", path):
                    ipr = new_ipr()
                try:
                    return fn(ipr)
                finally:
                    ipr.close()
        finally:
            os.close(fd)

    # -- remove and host queries ------------------------------------------------------

    def remove(self, ref: NetworkRef) -> tuple[str, ...]:
        actions: list[str] = []
        if ref.host_ifname is not None:
            self.delete_link(ref.host_ifname, actions)
        self.files.remove(ref.netns_path, actions)
        return tuple(actions)

    def delete_link(self, name: str, actions: list[str]) -> None:
        ipr = self.host_nl()
        with kernel_step("link", "delete %s", name):
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
        with kernel_step("link", "list host links"):
            return [(i, n) for i, n in self.host_nl().link_names() if self.link_re.fullmatch(n)]

    def host_routes(self) -> list[IPv4Network | IPv6Network]:
        ours = {i for i, _ in self.prefixed_links()}
        with kernel_step("route", "list host routes"):
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
