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
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from .netpolicy import HTB_HANDLE, HTB_LIMITED

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


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise ShapingError(f"no interface {ifname}", errno.ENODEV)
    return int(found[0])


def _root(ipr: Any, index: int) -> Any | None:
    for q in ipr.get_qdiscs(index=index):
        if int(q["index"]) == index and int(q["parent"]) == TC_H_ROOT:
            return q
    return None


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
    index = _index(ipr, ifname)
    root = _root(ipr, index)
    if root is None:
        return ShapingState(ifname, None)
    kind = root.get_attr("TCA_KIND")
    if kind != "htb" or int(root["handle"]) != HTB_HANDLE:
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
    index = _index(ipr, ifname)
    default = DEFAULT_LIMITED if default_limited else 0
    try:
        root = _root(ipr, index)
        ours = (
            root is not None
            and root.get_attr("TCA_KIND") == "htb"
            and int(root["handle"]) == HTB_HANDLE
        )
        if rate_bps is None:
            if ours:
                ipr.tc("del", index=index, handle=HTB_HANDLE, parent=TC_H_ROOT)
                actions.append(f"removed the bandwidth limit of {ifname}")
            return actions
        if ours and root is not None:
            init = root.get_nested("TCA_OPTIONS", "TCA_HTB_INIT") or {}
            if int(init.get("defcls", -1)) != default:
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
    except NetlinkError as e:
        raise ShapingError(f"tc on {ifname}: {e}", e.code) from e
    return actions
