"""The rtnetlink wire format nsd reads and writes: constants (linux/netlink.h,
linux/rtnetlink.h, linux/if_link.h), the ``struct`` layouts, decoding of the replies nsd
reads into :class:`NlMsg` (under pyroute2's names) and encoding of request attributes.
The socket that sends and receives them is nsd/rtnl.py.

Nothing here imports pyroute2: importing any part of it runs its package's
``__init__``, which loads all of pyroute2 (NDB, IPDB, every message class), 0.3-0.5 s of
every daemon start on a 2-CPU host. Only the tc changes of nsd/shaping.py and
``NetnsAdapter.run_in_namespace`` still use pyroute2, and import it when first used."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Container, Iterator
from typing import Any

# linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_GETQDISC = 38
RTM_GETNSID = 90
IFA_F_NODAD = 0x02

IFF_UP = 0x1
IFA_F_DADFAILED = 0x08
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
RTNH_F_ONLINK = 0x4
RTN_UNICAST = 1
RTPROT_STATIC = 4
RT_SCOPE_NOWHERE = 255
RT_TABLE_COMPAT = 252
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
NSID_NOT_ASSIGNED = (-1, 0xFFFFFFFF)

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, proto, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
RTGENMSG = struct.Struct("=Bxxx")  # family
S32 = struct.Struct("=i")
U32 = struct.Struct("=I")
NLA_TYPE_MASK = 0x3FFF
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_EXT_MASK = 29
#: IFLA_EXT_MASK: leave the counters out of link messages
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_TABLE = 15
NETNSA_NSID = 1
NETNSA_FD = 3


class NetlinkError(Exception):
    """A request the kernel refused, as pyroute2's exception of that name: ``code`` is
    the errno, ``args`` are (code, message)."""

    def __init__(self, code: int, msg: str | None = None) -> None:
        super().__init__(code, msg or os.strerror(code))
        self.code = code
        self.extra_code = 0


def netlink_errors() -> tuple[type[Exception], ...]:
    """The exceptions of a refused netlink request: nsd's own, and pyroute2's once
    something loaded pyroute2 (tc through ``IPRoute``; ``run_in_namespace`` callers).
    Checking ``sys.modules`` keeps pyroute2 out of a start that does not need it."""
    mod = sys.modules.get("pyroute2.netlink.exceptions")
    return (NetlinkError,) if mod is None else (NetlinkError, mod.NetlinkError)


# --------------------------------------------------------------------------------------
# decoding replies


class NlMsg:
    """One decoded rtnetlink message: the fixed header's fields by name
    (``msg["index"]``) and the attributes nsd reads (``msg.get_attr("IFLA_IFNAME")``),
    with the names and value types pyroute2 uses."""

    __slots__ = ("attrs", "fields")

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self.fields = fields
        self.attrs = attrs

    def __getitem__(self, key: str) -> int:
        return self.fields[key]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def nlattrs(
    data: memoryview, offset: int, end: int, wanted: Container[int] | None = None
) -> Iterator[tuple[int, memoryview]]:
    """The (type, payload) of each attribute in ``data[offset:end]``, or of those whose
    type is in ``wanted``; for nested attributes call it again on a payload. Stops at
    the first malformed attribute. ``wanted`` matters for links: a link message has
    ~40 attributes of which nsd reads five: slicing only those makes decoding one
    30 µs instead of 45 (a restart decodes three per tenant)."""
    unpack = NLATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4 or offset + length > end:
            break
        kind &= NLA_TYPE_MASK
        if wanted is None or kind in wanted:
            yield kind, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def cstr(value: memoryview) -> str:
    """The text of a NUL-terminated string attribute."""
    return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")


#: the payload size of an address attribute, by family
IP_SIZE: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}


def ip_text(family: int, value: memoryview) -> str | None:
    """The address in text; None for a family other than IPv4 and IPv6 (an AF_UNSPEC
    dump answers for every family: MPLS routes, multicast routing entries) or a
    payload of another size."""
    if IP_SIZE.get(family) != len(value):
        return None
    return socket.inet_ntop(family, bytes(value))


def decode_link(data: memoryview, offset: int, end: int) -> NlMsg:
    family, _type, index, flags, change = IFINFOMSG.unpack_from(data, offset)
    attrs: dict[str, Any] = {}
    for kind, value in nlattrs(data, offset + IFINFOMSG.size, end, _LINK_ATTRS):
        if kind == IFLA_IFNAME:
            attrs["IFLA_IFNAME"] = cstr(value)
        elif kind == IFLA_MTU:
            attrs["IFLA_MTU"] = U32.unpack_from(value)[0]
        elif kind == IFLA_LINK:
            attrs["IFLA_LINK"] = U32.unpack_from(value)[0]
        elif kind == IFLA_LINK_NETNSID:
            attrs["IFLA_LINK_NETNSID"] = S32.unpack_from(value)[0]
        elif kind == IFLA_LINKINFO:
            for _sub, subvalue in nlattrs(value, 0, len(value), (IFLA_INFO_KIND,)):
                attrs["IFLA_INFO_KIND"] = cstr(subvalue)
    return NlMsg({"family": family, "index": index, "flags": flags, "change": change}, attrs)


_LINK_ATTRS = frozenset({IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINK_NETNSID, IFLA_LINKINFO})


def decode_link_name(data: memoryview, offset: int, end: int) -> NlMsg:
    """A link's index and name only: the kernel puts IFLA_IFNAME first, so listing a
    host's thousands of links stops there instead of walking each link's ~40
    attributes."""
    family, _type, index, flags, change = IFINFOMSG.unpack_from(data, offset)
    attrs: dict[str, Any] = {}
    for _kind, value in nlattrs(data, offset + IFINFOMSG.size, end, (IFLA_IFNAME,)):
        attrs["IFLA_IFNAME"] = cstr(value)
        break
    return NlMsg({"family": family, "index": index, "flags": flags, "change": change}, attrs)


ADDR_IP = {IFA_ADDRESS: "IFA_ADDRESS", IFA_LOCAL: "IFA_LOCAL"}


def decode_addr(data: memoryview, offset: int, end: int) -> NlMsg:
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(data, offset)
    attrs: dict[str, Any] = {}
    for kind, value in nlattrs(data, offset + IFADDRMSG.size, end):
        if kind in ADDR_IP:
            text = ip_text(family, value)
            if text is not None:
                attrs[ADDR_IP[kind]] = text
        elif kind == IFA_FLAGS:
            attrs["IFA_FLAGS"] = U32.unpack_from(value)[0]
    fields = {
        "family": family,
        "prefixlen": prefixlen,
        "flags": flags,
        "scope": scope,
        "index": index,
    }
    return NlMsg(fields, attrs)


ROUTE_U32 = {RTA_OIF: "RTA_OIF", RTA_PRIORITY: "RTA_PRIORITY", RTA_TABLE: "RTA_TABLE"}
ROUTE_IP = {RTA_DST: "RTA_DST", RTA_GATEWAY: "RTA_GATEWAY", RTA_PREFSRC: "RTA_PREFSRC"}


def decode_route(data: memoryview, offset: int, end: int) -> NlMsg:
    values = RTMSG.unpack_from(data, offset)
    fields = dict(zip(ROUTE_FIELDS, values, strict=True))
    family = values[0]
    attrs: dict[str, Any] = {}
    for kind, value in nlattrs(data, offset + RTMSG.size, end):
        if kind in ROUTE_U32:
            attrs[ROUTE_U32[kind]] = U32.unpack_from(value)[0]
        elif kind in ROUTE_IP:
            text = ip_text(family, value)
            if text is not None:
                attrs[ROUTE_IP[kind]] = text
    return NlMsg(fields, attrs)


ROUTE_FIELDS = ("family", "dst_len", "src_len", "tos", "table", "proto", "scope", "type", "flags")


def decode_nsid(data: memoryview, offset: int, end: int) -> NlMsg:
    attrs: dict[str, Any] = {}
    for kind, value in nlattrs(data, offset + RTGENMSG.size, end):
        if kind == NETNSA_NSID:
            attrs["NETNSA_NSID"] = S32.unpack_from(value)[0]
    return NlMsg({}, attrs)


# --------------------------------------------------------------------------------------
# encoding requests


def nlattr(kind: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_text(kind: int, value: str) -> bytes:
    return nlattr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return nlattr(kind, U32.pack(value))


def attr_ip(kind: int, family: int, value: str) -> bytes:
    return nlattr(kind, socket.inet_pton(family, value))


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def netlink_error(
    view: memoryview, start: int, end: int, *, flags: int, code: int, kind: int
) -> NetlinkError:
    """The NetlinkError for a failed request, with the kernel's extended-ACK text."""
    text: str | None = None
    if flags & NLM_F_ACK_TLVS:
        offset = start + 4
        if kind == NLMSG_ERROR:  # the request's header (and body unless capped) follows
            echoed = NLMSGHDR.unpack_from(view, offset)[0] if offset + 16 <= end else 16
            offset += NLMSGHDR.size if flags & NLM_F_CAPPED else (echoed + 3) & ~3
        for attr, value in nlattrs(view, offset, end):
            if attr == NLMSGERR_ATTR_MSG:
                text = cstr(value)
    return NetlinkError(code, text)
