"""Raw rtnetlink: a blocking ``NETLINK_ROUTE`` socket and the few messages nsd sends and reads.

nsd's own netlink reads and changes (the netns worker thread in nsd/netns_worker.py, the qdisc
reads in nsd/shaping.py) go through plain blocking sockets (:class:`Rtnl`); requests are
packed and replies unpacked with ``struct`` (the wire format is nsd/rtnl_wire.py), only the
fields nsd reads, under pyroute2's names for fields and attributes, with a
``NetlinkError`` like pyroute2's for failures (nsd/rtnl_wire.py).
:class:`Rtnl` says why this is not pyroute2's synchronous ``IPRoute``, which runs an event
loop per request; ``IPRoute`` is kept only for the tc changes (shaping.py), whose options
it builds for us.

Like every netlink socket, an :class:`Rtnl` belongs to the network namespace it was
created in, for its whole life: a socket for another namespace is made by entering that
namespace first (netns_worker.py does that).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)
from typing import Any

from nsd.net.rtnl_wire import (
    IFA_ADDRESS,
    IFA_F_NODAD,
    IFA_LOCAL,
    IFADDRMSG,
    IFF_UP,
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    IFLA_NET_NS_FD,
    NETLINK_EXT_ACK,
    NETLINK_GET_STRICT_CHK,
    NETNSA_FD,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    NSID_NOT_ASSIGNED,
    RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_COMPAT,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_PREFSRC,
    RTA_PRIORITY,
    RTA_TABLE,
    RTEXT_FILTER_SKIP_STATS,
    RTGENMSG,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNSID,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMSG,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    RTPROT_STATIC,
    S32,
    SOL_NETLINK,
    VETH_INFO_PEER,
    NetlinkError,
    NlMsg,
    attr_ip,
    attr_text,
    attr_u32,
    decode_addr,
    decode_link,
    decode_link_name,
    decode_nsid,
    decode_route,
    ifinfomsg,
    netlink_error,
    nlattr,
)

#: turns one reply message (its body, after the netlink header: ``data[offset:end]``)
#: into an :class:`NlMsg`
Decoder = Callable[[memoryview, int, int], NlMsg]


#: a plain int: ``socket.MSG_TRUNC`` is an IntFlag, and ``&`` on it builds a new
#: enum member per received datagram
MSG_TRUNC = int(socket.MSG_TRUNC)


class Rtnl:
    """A blocking rtnetlink socket; requests and replies are packed and unpacked here.

    pyroute2 0.9.7's synchronous API runs an asyncio event loop to completion for
    every request (``run_until_complete`` per call) and decodes every attribute of
    every reply: a profile of 100 no-op ``ensure()`` calls showed 4,400
    ``run_until_complete`` calls taking 70% of the time and message decoding most of
    the rest, ~6 ms per no-op ensure. Here a request is one ``send`` and a reply one
    ``recvmsg_into`` on the worker thread, and only the fields nsd reads are
    unpacked (with pyroute2's names, see :class:`NlMsg`).

    Errors are pyroute2's ``NetlinkError`` carrying the kernel's errno and its
    extended-ACK message, if any, as before. Like every netlink socket it belongs to
    the network namespace it was created in.
    """

    def __init__(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            # The kernel filters dumps by ifindex/oif/table (see dump_addrs and
            # dump_routes) and says why a request failed.
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))  # no multicast groups: nothing arrives unasked
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.seq = 0
        self.buf = bytearray(1 << 16)  # > the 32 KiB the kernel puts in one datagram

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(
        self, msg_type: int, flags: int, body: bytes, decode: Decoder | None = None
    ) -> list[NlMsg]:
        """Send one request; return its replies (a dump's messages, a get's answer, or
        nothing for an acknowledged change). A dump the kernel marks as interrupted
        (the table changed meanwhile) is repeated."""
        replies, interrupted = self._request(msg_type, flags, body, decode)
        for _ in range(4):
            if not interrupted:
                break
            replies, interrupted = self._request(msg_type, flags, body, decode)
        return replies

    def _request(
        self, msg_type: int, flags: int, body: bytes, decode: Decoder | None
    ) -> tuple[list[NlMsg], bool]:
        sock = self.sock
        if sock is None:
            raise OSError(errno.EBADF, "netlink socket is closed")
        self.seq = self.seq % 0x7FFFFFFF + 1
        seq = self.seq
        sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body)
        out: list[NlMsg] = []
        interrupted = False
        single = not flags & (NLM_F_DUMP | NLM_F_ACK)  # a get: one answer, no ACK
        view = memoryview(self.buf)
        while True:
            size, _, msg_flags, _ = sock.recvmsg_into([view])
            if msg_flags & MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, "netlink reply larger than the receive buffer")
            offset = 0
            while offset + NLMSGHDR.size <= size:
                length, kind, mflags, mseq, _pid = NLMSGHDR.unpack_from(view, offset)
                if length < NLMSGHDR.size or offset + length > size:
                    break
                start, end = offset + NLMSGHDR.size, offset + length
                offset = (end + 3) & ~3
                if mseq != seq:
                    continue  # the late answer to a request abandoned on an error
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    # ERROR: the ACK (0) or a failure; DONE: the end of a dump, which
                    # carries the dump's own result
                    code = -S32.unpack_from(view, start)[0] if end - start >= 4 else 0
                    if code:
                        raise netlink_error(view, start, end, flags=mflags, code=code, kind=kind)
                    return out, interrupted
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if decode is not None:
                    out.append(decode(view, start, end))
                if single:
                    return out, interrupted

    # -- the changes nsd makes (all acknowledged) -----------------------------------------

    def _change(self, msg_type: int, body: bytes, extra_flags: int = 0) -> None:
        self.request(msg_type, NLM_F_REQUEST | NLM_F_ACK | extra_flags, body)

    def link_set(
        self,
        index: int,
        *,
        up: bool | None = None,
        ifname: str | None = None,
        mtu: int | None = None,
    ) -> None:
        body = ifinfomsg(index, (IFF_UP if up else 0), (IFF_UP if up is not None else 0))
        if ifname is not None:
            body += attr_text(IFLA_IFNAME, ifname)
        if mtu is not None:
            body += attr_u32(IFLA_MTU, mtu)
        self._change(RTM_NEWLINK, body)

    def veth_add(self, name: str, peer: str, peer_ns_fd: int, mtu: int | None = None) -> None:
        """Create the veth pair ``name`` <-> ``peer`` with the peer made directly in the
        namespace ``peer_ns_fd`` (IFLA_NET_NS_FD inside the peer's attributes, as
        ``ip link add NAME type veth peer name PEER netns NS``): never a half-moved pair."""
        mtu_attr = attr_u32(IFLA_MTU, mtu) if mtu is not None else b""
        peer_msg = ifinfomsg() + attr_text(IFLA_IFNAME, peer) + mtu_attr
        peer_msg += attr_u32(IFLA_NET_NS_FD, peer_ns_fd)
        info = attr_text(IFLA_INFO_KIND, "veth")
        info += nlattr(IFLA_INFO_DATA, nlattr(VETH_INFO_PEER, peer_msg))
        body = ifinfomsg() + attr_text(IFLA_IFNAME, name) + mtu_attr + nlattr(IFLA_LINKINFO, info)
        self._change(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)

    def link_del(self, index: int) -> None:
        self._change(RTM_DELLINK, ifinfomsg(index))

    def links(self, decode: Decoder = decode_link) -> list[NlMsg]:
        """Every link of the socket's namespace, without their counters."""
        body = ifinfomsg() + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        return self.request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body, decode)

    def link_names(self) -> list[tuple[int, str]]:
        """(index, name) of every link of the socket's namespace."""
        msgs = self.links(decode_link_name)
        return [(int(m["index"]), name) for m in msgs if (name := m.get_attr("IFLA_IFNAME"))]

    def addr_change(
        self, add: bool, index: int, address: IPv4Address | IPv6Address, prefixlen: int
    ) -> None:
        # .packed, not text: formatting an IPv6 address takes ipaddress ~5 µs
        if address.version == 4:
            # as `ip addr add`: the local address and the peer address are the same
            body = IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            body += nlattr(IFA_LOCAL, address.packed)
            body += nlattr(IFA_ADDRESS, address.packed)
        else:
            # NODAD: usable at once, no 1-2 s of "tentative" after every setup
            flags = IFA_F_NODAD if add else 0
            body = IFADDRMSG.pack(socket.AF_INET6, prefixlen, flags, RT_SCOPE_UNIVERSE, index)
            body += nlattr(IFA_ADDRESS, address.packed)
        if add:
            self._change(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)
        else:
            self._change(RTM_DELADDR, body)

    def route_add(self, w: RouteSpec) -> None:
        family = socket.AF_INET if w.dst.version == 4 else socket.AF_INET6
        body = RTMSG.pack(
            family,
            w.dst.prefixlen,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            w.scope,
            RTN_UNICAST,
            RTNH_F_ONLINK if w.onlink else 0,
        )
        body += attr_u32(RTA_TABLE, RT_TABLE_MAIN)
        body += nlattr(RTA_DST, w.dst.network_address.packed)
        body += attr_u32(RTA_OIF, w.oif)
        if w.gateway is not None:
            body += nlattr(RTA_GATEWAY, w.gateway.packed)
        if w.prefsrc is not None:
            body += nlattr(RTA_PREFSRC, w.prefsrc.packed)
        self._change(RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_EXCL)

    def route_del(self, route: NlMsg) -> None:
        """Delete exactly ``route`` (a message from a dump), as `ip route del` would:
        matched by destination, table, tos, output link, gateway and metric."""
        family = route["family"]
        table = route_table(route)
        body = RTMSG.pack(
            family,
            route["dst_len"],
            0,
            route["tos"],
            table if table < 256 else RT_TABLE_COMPAT,
            0,
            RT_SCOPE_NOWHERE,
            0,
            0,
        )
        body += attr_u32(RTA_TABLE, table)
        for kind, name in ((RTA_DST, "RTA_DST"), (RTA_GATEWAY, "RTA_GATEWAY")):
            value = route.get_attr(name)
            if value is not None:
                body += attr_ip(kind, family, value)
        for kind, name in ((RTA_OIF, "RTA_OIF"), (RTA_PRIORITY, "RTA_PRIORITY")):
            value = route.get_attr(name)
            if value is not None:
                body += attr_u32(kind, value)
        self._change(RTM_DELROUTE, body)


# --------------------------------------------------------------------------------------
# requests and reading replies


#: the families nsd reads; an AF_UNSPEC dump asks every family that registered one
IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def dump_addrs(ipr: Rtnl, family: int, index: int) -> tuple[NlMsg, ...]:
    """Addresses of one link, filtered by the kernel (an unfiltered dump would mean
    thousands of messages parsed per call with thousands of tenants). ``family``
    AF_UNSPEC: IPv4 and IPv6 in one request."""
    body = IFADDRMSG.pack(family, 0, 0, 0, index)
    msgs = ipr.request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, body, decode_addr)
    return tuple(m for m in msgs if m["family"] in IP_FAMILIES)


def dump_routes(
    ipr: Rtnl, family: int, oif: int | None = None, table: int = RT_TABLE_MAIN
) -> tuple[NlMsg, ...]:
    """Routes of ``table`` (0: every table; optionally only via ``oif``), filtered by
    the kernel. ``family`` AF_UNSPEC: IPv4 and IPv6 in one request (the dump of every
    family: what MPLS or multicast routing answer is decoded without addresses and
    left out here)."""
    body = RTMSG.pack(family, 0, 0, 0, table, 0, 0, 0, 0)
    if oif is not None:
        body += attr_u32(RTA_OIF, oif)
    msgs = ipr.request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body, decode_route)
    return tuple(m for m in msgs if m["family"] in IP_FAMILIES)


def get_link(ipr: Rtnl, *, ifname: str | None = None, index: int | None = None) -> NlMsg | None:
    """RTM_GETLINK for one link, or None if there is no such link.

    Sent without NLM_F_ACK: the kernel answers with the link alone, one datagram.
    """
    if ifname is not None:
        body = ifinfomsg() + attr_text(IFLA_IFNAME, ifname)
    else:
        body = ifinfomsg(index or 0)
    try:
        msgs = ipr.request(RTM_GETLINK, NLM_F_REQUEST, body, decode_link)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return msgs[0] if msgs else None


def netnsid(ipr: Rtnl, ns_fd: int) -> int | None:
    """The id the socket's namespace gave the namespace ``ns_fd`` (None if none yet)."""
    body = RTGENMSG.pack(socket.AF_UNSPEC) + attr_u32(NETNSA_FD, ns_fd)
    for reply in ipr.request(RTM_GETNSID, NLM_F_REQUEST, body, decode_nsid):
        nsid = reply.get_attr("NETNSA_NSID")
        if nsid is not None and nsid not in NSID_NOT_ASSIGNED:
            return int(nsid)
    return None


def link_kind(link: NlMsg) -> str | None:
    kind = link.get_attr("IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def is_up(link: Any) -> bool:
    return bool(int(link["flags"]) & IFF_UP)


def route_table(route: Any) -> int:
    table = route.get_attr("RTA_TABLE")
    return int(table if table is not None else route["table"])


def route_dst(route: Any) -> IPv4Network | IPv6Network:
    family = int(route["family"])
    dst = route.get_attr("RTA_DST")
    if dst is None:
        dst = "0.0.0.0" if family == socket.AF_INET else "::"  # noqa: S104 -- a default route
    return network(dst, int(route["dst_len"]))


# Parsed once per distinct text: a restart compares every tenant's routes, and most of
# their destinations and gateways are the same few (the gateways, the defaults, the
# link-local prefix); ipaddress takes 5-20 µs to parse one.
@lru_cache(maxsize=4096)
def network(text: str, prefixlen: int) -> IPv4Network | IPv6Network:
    return ip_network((address(text).packed, prefixlen), strict=False)


@lru_cache(maxsize=4096)
def address(text: str) -> IPv4Address | IPv6Address:
    # from the packed form: ten times faster than ipaddress parsing the text itself
    if ":" in text:
        return IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    return IPv4Address(socket.inet_pton(socket.AF_INET, text))


@dataclass(frozen=True)
class RouteSpec:
    """A route nsd wants in the main table: what :meth:`Rtnl.route_add` adds and what
    :meth:`matches` compares a dumped route with."""

    dst: IPv4Network | IPv6Network
    oif: int
    gateway: IPv4Address | IPv6Address | None = None
    prefsrc: IPv4Address | None = None
    scope: int = RT_SCOPE_UNIVERSE
    onlink: bool = False

    def matches(self, route: Any) -> bool:
        gateway = route.get_attr("RTA_GATEWAY")
        prefsrc = route.get_attr("RTA_PREFSRC")
        return (
            route.get_attr("RTA_OIF") == self.oif
            and (address(gateway) if gateway else None) == self.gateway
            and (self.prefsrc is None or (prefsrc is not None and address(prefsrc) == self.prefsrc))
            and int(route["scope"]) == self.scope
            and int(route["type"]) == RTN_UNICAST
        )

    def __str__(self) -> str:
        text = str(self.dst)
        if self.gateway is not None:
            text += f" via {self.gateway}"
        if self.prefsrc is not None:
            text += f" src {self.prefsrc}"
        return text
