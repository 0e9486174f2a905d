"""One tenant's links, addresses and routes, on both sides of its veth pair.

Plain functions over netlink sockets (nsd/rtnl.py), run on the netns worker thread
(nsd/netns_worker.py), which hands them the sockets: ``host_nl`` (an :class:`Rtnl` in the
host namespace) and ``tenant`` (an :class:`Rtnl` opened inside the tenant's namespace).
Each step compares what is with what should be and changes only the difference,
appending what it did to ``actions``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
)
from typing import Any

from nsd.net.netns_spec import NetnsError, NetworkSpec, kernel_step
from nsd.net.rtnl import (
    RouteSpec,
    Rtnl,
    address,
    dump_addrs,
    dump_routes,
    get_link,
    is_up,
    link_kind,
    netnsid,
    route_dst,
    route_table,
)
from nsd.net.rtnl_wire import IFA_F_DADFAILED, RT_SCOPE_LINK, RT_TABLE_MAIN, NetlinkError

#: parsed once (ipaddress takes ~10 µs per parse; a restart checks every tenant's routes)
DEFAULT4 = IPv4Network("0.0.0.0/0")
DEFAULT6 = IPv6Network("::/0")

#: every network namespace's loopback device has this index (it is registered first)
LOOPBACK_INDEX = 1


class HostView:
    """One listing of the host namespace's addresses and main-table routes, for batches
    of tenants checked on the worker (reconcile).

    A route dump walks every route of the namespace even when the kernel filters it by
    output link, so one per tenant made checking N tenants O(N²) (at 1,000 tenants,
    half the worker's time in a restart). The worker keeps a view only while nothing
    but batch jobs run (Worker.ensure_many), and a tenant's link is forgotten once its
    check has used (and maybe changed) it. Links the listing did not see (no address
    and no route then, or made since: ifindexes are not reused) are not answered from
    it.
    """

    def __init__(self, ipr: Rtnl) -> None:
        self.links: set[int] = set()
        self.addrs: dict[int, list[Any]] = {}
        self.routes: dict[int, list[Any]] = {}
        with kernel_step("route", "list host addresses and routes"):
            for a in dump_addrs(ipr, socket.AF_UNSPEC, 0):
                self.addrs.setdefault(int(a["index"]), []).append(a)
            for r in dump_routes(ipr, socket.AF_UNSPEC):
                oif = r.get_attr("RTA_OIF")
                if oif is not None:
                    self.routes.setdefault(int(oif), []).append(r)
        self.links = set(self.addrs) | set(self.routes)

    def addresses_of(self, index: int) -> list[Any] | None:
        return self.addrs.get(index, []) if index in self.links else None

    def routes_via(self, index: int) -> list[Any] | None:
        return self.routes.get(index, []) if index in self.links else None

    def forget(self, index: int) -> None:
        self.links.discard(index)
        self.addrs.pop(index, None)
        self.routes.pop(index, None)


def links_of(tenant: Rtnl, where: str) -> dict[int, Any]:
    """Every link of a tenant's namespace by index: one request for what the checks
    of its pair and of lo would otherwise ask one by one."""
    with kernel_step("link", "list links in %s", where):
        return {int(link["index"]): link for link in tenant.links()}


def find_pair(
    host_nl: Rtnl,
    spec: NetworkSpec,
    ns_fd: int,
    tenant_links: dict[int, Any],
) -> tuple[Any, Any]:
    """(host link or None, its peer if that peer is a veth inside ``ns_fd`` or None).
    ``tenant_links``: the namespace's links as listed just before (links_of)."""
    ipr = host_nl
    with kernel_step("veth", "inspect %s", spec.host_ifname):
        host = get_link(ipr, ifname=spec.host_ifname)
        if host is None or link_kind(host) != "veth":
            return host, None
        # The peer is identified by the namespace id the host assigned to the
        # tenant's namespace plus its ifindex there: names prove nothing.
        nsid = netnsid(ipr, ns_fd)
        peer_index = host.get_attr("IFLA_LINK")
        if nsid is None or host.get_attr("IFLA_LINK_NETNSID") != nsid or not peer_index:
            return host, None
        peer = tenant_links.get(peer_index)
        if peer is None or link_kind(peer) != "veth" or peer.get_attr("IFLA_LINK") != host["index"]:
            return host, None
        return host, peer


def clear_name(tenant: Rtnl, name: str, where: str, actions: list[str]) -> None:
    """Delete whatever link is called ``name`` inside a tenant's namespace (all of it
    is nsd's) so that the name can be given to the veth peer."""
    with kernel_step("veth", "clear %s in %s", name, where):
        squatter = get_link(tenant, ifname=name)
        if squatter is not None:
            tenant.link_del(int(squatter["index"]))
            actions.append(f"deleted stray {name} in {where}")


def create_pair(
    host_nl: Rtnl,
    spec: NetworkSpec,
    ns_fd: int,
    tenant: Rtnl,
    *,
    actions: list[str],
) -> tuple[Any, Any]:
    host_name, peer_name = spec.host_ifname, spec.peer_ifname
    clear_name(tenant, peer_name, spec.netns_path, actions)
    with kernel_step("veth", "create %s", host_name):
        # The peer is created directly in the namespace (IFLA_NET_NS_FD inside the
        # peer's attributes): there is never a half-moved pair.
        host_nl.veth_add(host_name, peer_name, ns_fd, spec.mtu)
        host = get_link(host_nl, ifname=host_name)
        peer = get_link(tenant, ifname=peer_name)
    if host is None or peer is None:
        raise NetnsError("veth", f"{host_name} vanished right after creation")
    actions.append(f"created veth {host_name} <-> {peer_name} in {spec.netns_path}")
    return host, peer


def ensure_veth(
    host_nl: Rtnl,
    spec: NetworkSpec,
    ns_fd: int,
    tenant: Rtnl,
    *,
    actions: list[str],
    tenant_links: dict[int, Any],
) -> tuple[Any, Any, bool]:
    """Return the (host, peer) link messages, current after any change made here, and
    whether the pair was created here (then it has no addresses or routes yet)."""
    ipr = host_nl
    created = False
    host, peer = find_pair(host_nl, spec, ns_fd, tenant_links)
    if host is not None and peer is None:
        # Not a veth, or its peer lives elsewhere (e.g. the namespace was recreated
        # while the old one was still pinned): the name is ours, start over.
        with kernel_step("veth", "delete %s", spec.host_ifname):
            try:
                ipr.link_del(int(host["index"]))
            except NetlinkError as e:
                # the kernel may be tearing it down already (its peer's namespace
                # is being destroyed)
                if e.code != errno.ENODEV:
                    raise
        actions.append(f"deleted {spec.host_ifname}: its peer was not in {spec.netns_path}")
    if peer is None:
        host, peer = create_pair(host_nl, spec, ns_fd, tenant, actions=actions)
        created = True
    peer_idx = int(peer["index"])
    old = peer.get_attr("IFLA_IFNAME")
    if old != spec.peer_ifname:
        clear_name(tenant, spec.peer_ifname, spec.netns_path, actions)
        with kernel_step("veth", "rename %s to %s in %s", old, spec.peer_ifname, spec.netns_path):
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
                with kernel_step("link", "set mtu of %s", name):
                    ipr_.link_set(int(link["index"]), mtu=spec.mtu)
                actions.append(f"set mtu {spec.mtu} on {name} ({where})")
    return host, peer, created


def ensure_up(ipr: Rtnl, link: Any, where: str, actions: list[str]) -> None:
    if not is_up(link):
        name = link.get_attr("IFLA_IFNAME")
        with kernel_step("link", "set %s up", name):
            ipr.link_set(int(link["index"]), up=True)
        actions.append(f"set {name} up ({where})")


def ensure_addresses(
    ipr: Rtnl,
    *,
    index: int,
    ifname: str,
    where: str,
    want: list[tuple[IPv4Address | IPv6Address, int]],
    actions: list[str],
    fresh: bool = False,
    known: Sequence[Any] | None = None,
) -> None:
    """Make ``want`` the addresses of link ``index``, besides the kernel's own
    IPv6 link-local ones (which are regenerated anyway and harm nobody). ``fresh``: the
    link was created by this call and has none of its own, so nothing is listed;
    ``known``: its addresses as a :class:`HostView` listed them."""
    with kernel_step("address", "list addresses of %s", ifname):
        if fresh:
            known = ()
        elif known is None:
            known = dump_addrs(ipr, socket.AF_UNSPEC, index)
        have = [a for a in known if a["index"] == index]
    present: set[tuple[IPv4Address | IPv6Address, int]] = set()
    for a in have:
        addr = address(a.get_attr("IFA_ADDRESS"))
        key = (addr, int(a["prefixlen"]))
        flags = a.get_attr("IFA_FLAGS")
        flags = int(flags if flags is not None else a["flags"])
        if key in want and not flags & IFA_F_DADFAILED:
            present.add(key)
            continue
        if addr.version == 6 and addr.is_link_local and all(addr != w for w, _ in want):
            continue
        with kernel_step("address", "delete %s/%s from %s", addr, key[1], ifname):
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
        with kernel_step("address", "add %s/%s to %s", addr, plen, ifname):
            ipr.addr_change(True, index, addr, plen)
        actions.append(f"added {addr}/{plen} to {ifname} ({where})")


def ensure_routes(
    ipr: Rtnl,
    *,
    oif: int | None,
    ifname: str,
    where: str,
    want: list[RouteSpec],
    actions: list[str],
    on_conflict: Callable[[RouteSpec], None] | None = None,
    fresh: bool = False,
    known: Sequence[Any] | None = None,
) -> None:
    """Make the main table hold each route in ``want``, replacing routes to the same
    destination that differ. With ``oif``, only routes through that link are looked
    at (the kernel filters the dump, but walks every route of the namespace for it);
    a clash with a route elsewhere then surfaces as EEXIST and goes to
    ``on_conflict``. ``fresh``: nothing routed through ``oif`` (or, without ``oif``, in
    the namespace) can be one of ``want`` yet, so nothing is listed: a dump walks every
    route of the namespace, which made each tenant's build O(tenants) on the host.
    ``known``: the routes via ``oif`` as a :class:`HostView` listed them."""
    with kernel_step("route", "list routes via %s", ifname):
        if fresh:
            known = ()
        elif known is None:
            known = dump_routes(ipr, socket.AF_UNSPEC, oif)
        have = [
            r
            for r in known
            if route_table(r) == RT_TABLE_MAIN and (oif is None or r.get_attr("RTA_OIF") == oif)
        ]
    have_dst = [(route_dst(r), r) for r in have]
    for w in want:
        same_dst = [r for dst, r in have_dst if dst == w.dst]
        for r in same_dst:
            if w.matches(r):
                continue
            with kernel_step("route", "delete a wrong route to %s", w.dst):
                ipr.route_del(r)
            actions.append(f"deleted a wrong route to {w.dst} ({where})")
        if any(w.matches(r) for r in same_dst):
            continue
        with kernel_step("route", "add route %s dev %s", w, ifname):
            try:
                ipr.route_add(w)
            except NetlinkError as e:
                if e.code != errno.EEXIST or on_conflict is None:
                    raise
                on_conflict(w)
                ipr.route_add(w)
        actions.append(f"added route {w} dev {ifname} ({where})")


def ensure_tenant_side(
    spec: NetworkSpec,
    tenant: Rtnl,
    peer: Any,
    actions: list[str],
    *,
    tenant_links: dict[int, Any],
    fresh: bool = False,
) -> None:
    """``fresh``: the namespace and the pair were both created by this call, so the
    namespace holds no address or route yet that could be one nsd wants.
    ``tenant_links``: the namespace's links as listed before the pair was checked
    (lo is among them)."""
    where = spec.netns_path
    peer_idx = int(peer["index"])
    with kernel_step("link", "inspect lo in %s", where):
        lo = tenant_links.get(LOOPBACK_INDEX)
        if lo is None or lo.get_attr("IFLA_IFNAME") != "lo":
            lo = get_link(tenant, ifname="lo")
    if lo is None:
        raise NetnsError("link", f"no lo in {where}", errno.ENODEV)
    ensure_up(tenant, lo, where, actions)
    # Up before addresses: taking an interface down flushes its IPv6 addresses.
    ensure_up(tenant, peer, where, actions)
    ensure_addresses(
        tenant,
        index=peer_idx,
        ifname=spec.peer_ifname,
        where=where,
        want=[(spec.ipv4_address, 32), (spec.ipv6_address, spec.ipv6_prefix.prefixlen)],
        actions=actions,
        fresh=fresh,
    )
    gw4 = IPv4Network((int(spec.ipv4_gateway), 32))
    ensure_routes(
        tenant,
        oif=None,  # the whole namespace is ours: replace clashing routes on any link
        ifname=spec.peer_ifname,
        where=where,
        want=[
            RouteSpec(dst=gw4, oif=peer_idx, scope=RT_SCOPE_LINK),
            RouteSpec(
                dst=DEFAULT4,
                oif=peer_idx,
                gateway=spec.ipv4_gateway,
                onlink=True,
            ),
            RouteSpec(dst=DEFAULT6, oif=peer_idx, gateway=spec.ipv6_gateway),
        ],
        actions=actions,
        fresh=fresh,
    )


def ensure_host_side(
    ipr: Rtnl,
    spec: NetworkSpec,
    host: Any,
    actions: list[str],
    our_links: Callable[[], set[int]],
    *,
    fresh: bool = False,
    view: HostView | None = None,
) -> None:
    """``our_links()``: the ifindexes of nsd's links in the host namespace. ``fresh``:
    the host link was created by this call (no address or route of its own yet);
    ``view``: a listing of the host taken for a batch of tenants, used for links it saw."""
    name = spec.host_ifname
    host_idx = int(host["index"])
    ensure_up(ipr, host, "host", actions)
    ensure_addresses(
        ipr,
        index=host_idx,
        ifname=name,
        where="host",
        want=[(spec.ipv4_gateway, 32), (spec.ipv6_gateway, 64)],
        actions=actions,
        fresh=fresh,
        known=view.addresses_of(host_idx) if view is not None else None,
    )

    def on_conflict(w: RouteSpec) -> None:
        # Some other link already has a route to exactly this destination. If it is
        # one of ours (a tenant whose addresses moved), take it over; never touch
        # anyone else's.
        ours = our_links()
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

    ensure_routes(
        ipr,
        oif=host_idx,
        ifname=name,
        where="host",
        want=[
            RouteSpec(
                dst=IPv4Network((int(spec.ipv4_address), 32)),
                oif=host_idx,
                prefsrc=spec.ipv4_gateway,
                scope=RT_SCOPE_LINK,
            ),
            RouteSpec(dst=spec.ipv6_prefix, oif=host_idx),
        ],
        actions=actions,
        on_conflict=on_conflict,
        fresh=fresh,
        known=view.routes_via(host_idx) if view is not None else None,
    )
    if view is not None:
        view.forget(host_idx)


# -- running foreign work inside a namespace ---------------------------------------
