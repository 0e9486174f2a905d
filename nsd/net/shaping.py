"""Per-tenant bandwidth limits with HTB, through pyroute2, on the netns worker thread.

One HTB qdisc (handle ``4e53:``) per shaped interface, with one class ``4e53:10`` whose
rate and ceiling are the limit. The kernel classifies by ``skb->priority`` alone (HTB
looks at it before any filter): nftables rules set it, so no tc filter is needed, and
packets whose priority is the qdisc's own handle (``4e53:0``) take HTB's direct path,
unshaped.

* host veth ``nsd<uid>`` (download): ``default 0``: unclassified packets go direct; the
  host's forward hook puts packets from an uplink into ``4e53:10``.
* tenant ``eth0`` inside its namespace (upload): ``default 0x10``: everything is shaped
  unless the tenant table classified it as host or tenant-to-tenant traffic.

Both interfaces belong to nsd, so a root qdisc there that is not nsd's HTB is replaced;
with no limit, nsd's qdisc is deleted and the veth is back to ``noqueue``.

Functions take a pyroute2 ``IPRoute`` bound to the interface's namespace and must run on
the netns worker (``NetnsAdapter.run_in_namespace``).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Any

from nsd.net.policy_plan import HTB_HANDLE, HTB_LIMITED
from nsd.net.rtnl import Rtnl, get_link
from nsd.net.rtnl_wire import (
    NLM_F_ACK,
    NLM_F_ECHO,
    NLM_F_REQUEST,
    RTM_GETQDISC,
    NetlinkError,
    NlMsg,
    cstr,
    netlink_errors,
    nlattrs,
)

TC_H_ROOT = 0xFFFFFFFF
DEFAULT_LIMITED = HTB_LIMITED & 0xFFFF


class ShapingError(Exception):
    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno_


@dataclass(frozen=True)
class ShapingState:
    """What an interface's root qdisc says about nsd's limit."""

    ifname: str
    #: the rate of nsd's class in bits per second; None: no limit of nsd's
    rate_bps: int | None
    #: the root qdisc's kind if it is not nsd's HTB (e.g. "noqueue" is reported as None)
    foreign: str | None = None


_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_HTB_GLOB = struct.Struct("=IIII")  # version, rate2quantum, defcls, debug
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_HTB_INIT = 2


def _index(nl: Rtnl, ifname: str) -> int:
    # One RTM_GETLINK by name: the kernel looks the link up, whatever the number of
    # links on the host (a dump would make every tenant's call O(links)).
    link = get_link(nl, ifname=ifname)
    if link is None:
        raise ShapingError(f"no interface {ifname}", errno.ENODEV)
    return int(link["index"])


def _decode_qdisc(data: memoryview, offset: int, end: int) -> NlMsg:
    _family, index, handle, parent, _info = _TCMSG.unpack_from(data, offset)
    attrs: dict[str, Any] = {}
    for kind, value in nlattrs(data, offset + _TCMSG.size, end):
        if kind == TCA_KIND:
            attrs["TCA_KIND"] = cstr(value)
        elif kind == TCA_OPTIONS:
            for sub, subvalue in nlattrs(value, 0, len(value)):
                if sub == TCA_HTB_INIT and len(subvalue) >= _HTB_GLOB.size:
                    attrs["defcls"] = _HTB_GLOB.unpack_from(subvalue)[2]
    return NlMsg({"index": index, "handle": handle, "parent": parent}, attrs)


def _root(nl: Rtnl, index: int) -> NlMsg | None:
    """The root qdisc of one interface (None: none, or the built-in noqueue).

    An RTM_GETQDISC for (ifindex, root), which the kernel answers from the device itself.
    pyroute2's ``get_qdiscs(index=)`` dumps every qdisc of the namespace and filters in
    Python: O(tenants) per call on the host. Linux 6.18 sends the answer to a get only
    with NLM_F_ECHO (else just the ACK); built-in qdiscs (noqueue) get no answer, as
    they are left out of dumps too."""
    body = _TCMSG.pack(0, index, 0, TC_H_ROOT, 0)
    flags = NLM_F_REQUEST | NLM_F_ECHO | NLM_F_ACK
    try:
        msgs = nl.request(RTM_GETQDISC, flags, body, _decode_qdisc)
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.EINVAL):
            return None
        raise
    for q in msgs:
        if q["index"] == index and q["parent"] == TC_H_ROOT:
            return q
    return None


def _ours(root: NlMsg | None) -> bool:
    return root is not None and root.get_attr("TCA_KIND") == "htb" and root["handle"] == HTB_HANDLE


def _our_class(ipr: Any, index: int) -> Any | None:
    for c in ipr.get_classes(index=index):
        if int(c["index"]) == index and int(c["handle"]) == HTB_LIMITED:
            return c
    return None


def _class_rate(cls: Any) -> int | None:
    parms = cls.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
    if not parms:
        return None
    rate64 = cls.get_nested("TCA_OPTIONS", "TCA_HTB_RATE64")
    return int(rate64 or parms["rate"]) * 8


def state(ipr: Any, ifname: str) -> ShapingState:
    nl = Rtnl()
    try:
        index = _index(nl, ifname)
        root = _root(nl, index)
    finally:
        nl.close()
    if root is None:
        return ShapingState(ifname, None)
    if not _ours(root):
        kind = root.get_attr("TCA_KIND")
        return ShapingState(ifname, None, foreign=None if kind == "noqueue" else kind)
    cls = _our_class(ipr, index)
    return ShapingState(ifname, _class_rate(cls) if cls is not None else None)


def _quantum(rate_bps: int) -> int:
    # HTB's quantum (bytes a class may send per round) defaults to rate/r2q and warns
    # outside 1000..200000; keep it above one full-size frame and below the cap.
    return max(1600, min(200_000, rate_bps // 8 // 10))


def ensure(ipr: Any, ifname: str, rate_bps: int | None, *, default_limited: bool) -> list[str]:
    """Make ``ifname``'s root qdisc nsd's HTB at ``rate_bps``, or remove nsd's qdisc when
    ``rate_bps`` is None. Returns what changed."""
    actions: list[str] = []
    default = DEFAULT_LIMITED if default_limited else 0
    # Reads through a raw socket of the calling thread's namespace (one request each,
    # see _index and _root); changes through pyroute2, which builds the tc options.
    nl = Rtnl()
    try:
        index = _index(nl, ifname)
        root = _root(nl, index)
        ours = _ours(root)
        if rate_bps is None:
            if ours:
                ipr.tc("del", index=index, handle=HTB_HANDLE, parent=TC_H_ROOT)
                actions.append(f"removed the bandwidth limit of {ifname}")
            return actions
        if ours and root is not None and root.get_attr("defcls") != default:
            ours = False
        if not ours:
            kind = root.get_attr("TCA_KIND") if root is not None else None
            if root is not None and kind != "noqueue":
                ipr.tc("del", index=index, handle=int(root["handle"]), parent=TC_H_ROOT)
                actions.append(f"removed root qdisc {kind} of {ifname}")
            ipr.tc("add", "htb", index=index, handle=HTB_HANDLE, parent=TC_H_ROOT,
                   default=default)  # fmt: skip
        cls = _our_class(ipr, index) if ours else None
        if cls is not None and _class_rate(cls) == rate_bps // 8 * 8:
            return actions
        rate = rate_bps // 8  # bytes per second
        ipr.tc(
            "replace-class" if cls is not None else "add-class",
            "htb",
            index=index,
            handle=HTB_LIMITED,
            parent=HTB_HANDLE,
            rate=rate,
            ceil=rate,
            quantum=_quantum(rate_bps),
        )
        actions.append(f"limited {ifname} to {rate_bps / 1e6:g} Mbit/s")
    except netlink_errors() as e:  # Rtnl's reads or pyroute2's tc changes
        raise ShapingError(f"tc on {ifname}: {e}", getattr(e, "code", None)) from e
    finally:
        nl.close()
    return actions
