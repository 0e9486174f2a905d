"""Sysctl and tc plans: what nsd writes besides the nft tables, and the marks and class
handles that tie the nft rules (nsd/policy_host.py, nsd/policy_tenant.py) to the HTB
qdiscs (nsd/shaping.py).

Bandwidth classification (verified on Linux 6.18, see docs/networking.md):

* download (uplink -> tenant) is shaped by an HTB qdisc on the host veth; the host's
  forward hook sets ``meta priority`` to the limited class for packets that came in
  through an uplink, everything else takes HTB's direct (unshaped) path.
* upload (tenant -> uplink) is shaped by an HTB qdisc on the tenant's ``eth0`` inside its
  namespace. There the route a packet takes beyond the host is unknown, and skb marks and
  priorities are cleared when a packet crosses namespaces, so the host tells the tenant
  side in the packet: packets it forwards from an uplink to a shaped tenant get DSCP 1
  (LE, "lower effort", RFC 8622); the tenant namespace remembers that in the connection's
  mark, and only connections that saw no such packet (host and tenant-to-tenant
  traffic) or go to nsd's own address ranges leave through the unshaped path. Anything
  unknown (a first packet, UDP nobody answers) is shaped: fail closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nsd.net.policy_site import Site, TenantNet, resolve_services
from nsd.network_config import NetworkConfig


def conf_key(family: str, ifname: str, knob: str) -> str:
    """``net.<family>.conf.<ifname>.<knob>``, spelled as sysctl(8) spells it: with '/'
    between the parts when the interface name has a dot of its own (a VLAN such as
    ``eth0.100``), which would otherwise read as a separator (nsd/net/sysctl_files.py
    opens either spelling). A kernel interface name never holds a '/'."""
    if "." in ifname:
        return f"net/{family}/conf/{ifname}/{knob}"
    return f"net.{family}.conf.{ifname}.{knob}"


#: HTB handle major of nsd's qdiscs ("NS"); a root qdisc with another handle is not nsd's
HTB_MAJOR = 0x4E53
HTB_HANDLE = HTB_MAJOR << 16
#: the shaped class; everything classified to the qdisc's own handle goes unshaped
HTB_LIMITED = HTB_HANDLE | 0x10
PRIO_LIMITED = "4e53:10"
PRIO_DIRECT = "4e53:0"
#: DSCP the host writes on packets it forwards from an uplink into an upload-shaped tenant
DSCP_UPLINK = 1
#: conntrack marks inside a tenant namespace
CTMARK_UPLINK = 1
CTMARK_INTERNAL = 2


def host_interface_sysctls(
    cfg: NetworkConfig, site: Site, tenant: TenantNet, *, force_forwarding: bool = False
) -> tuple[tuple[str, str], ...]:
    """Per-interface sysctls of a tenant's host veth (host namespace).

    IPv4 forwarding is a property of the *input* interface (net.ipv4.conf.X.forwarding),
    so it is switched on for nsd's veths and the uplinks only, never globally. IPv6 uses
    ``force_forwarding`` (Linux 6.17+, ``force_forwarding``), which forwards without
    turning the interface into a router (accept_ra stays as it is); see
    ``forwarding_plan`` for older kernels. Written when the tenant's veth comes up, so
    that its creation needs no pass over every tenant.
    """
    name = tenant.host_ifname
    services = resolve_services(cfg, site)
    out = [
        (conf_key("ipv4", name, "forwarding"), "1"),
        (
            conf_key("ipv4", name, "route_localnet"),
            "1" if any(s.host.is_loopback for s in services) else "0",
        ),
    ]
    if force_forwarding:
        out.append((conf_key("ipv6", name, "force_forwarding"), "1"))
    return tuple(out)


def tenant_sysctls(cfg: NetworkConfig, site: Site) -> tuple[tuple[str, str], ...]:
    """Sysctls inside every tenant namespace."""
    local = [s for s in resolve_services(cfg, site) if s.tenant_side(site.ipv4_gateway)]
    loop = any(s.tenant.is_loopback for s in local)
    return ((conf_key("ipv4", site.tenant_interface, "route_localnet"), "1" if loop else "0"),)


@dataclass(frozen=True)
class ForwardingPlan:
    """What nsd writes so that tenant traffic is forwarded, and nothing more."""

    #: (key, value) written in the host namespace
    sysctls: tuple[tuple[str, str], ...]
    #: human-readable notes on what changes globally (for the log and doctor)
    notes: tuple[str, ...] = ()


def forwarding_plan(
    site: Site,
    tenant_ifnames: Iterable[str],
    *,
    force_forwarding: bool,
    accept_ra: Mapping[str, int],
) -> ForwardingPlan:
    """Forwarding sysctls for the uplinks and the tenant veths.

    ``force_forwarding``: the kernel has net.ipv6.conf.*.force_forwarding. Without it,
    IPv6 forwarding can only be switched on for the whole namespace
    (net.ipv6.conf.all.forwarding=1), which makes every interface a router: an uplink
    configured by router advertisements (accept_ra=1) would drop them and lose its
    default route. nsd then sets accept_ra=2 ("accept even when forwarding") on such
    uplinks first. ``accept_ra``: the current accept_ra of each uplink.
    """
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    ifnames = list(tenant_ifnames)
    for name in (*site.uplinks, *ifnames):
        out.append((conf_key("ipv4", name, "forwarding"), "1"))
    if force_forwarding:
        for name in (*site.uplinks, *ifnames):
            out.append((conf_key("ipv6", name, "force_forwarding"), "1"))
    else:
        for up in site.uplinks:
            if accept_ra.get(up) == 1:
                out.append((conf_key("ipv6", up, "accept_ra"), "2"))
                notes.append(
                    f"{up}: accept_ra 1 -> 2, so that router advertisements are "
                    "still accepted with IPv6 forwarding on"
                )
        out.append(("net.ipv6.conf.all.forwarding", "1"))
        notes.append(
            "this kernel has no per-interface IPv6 force_forwarding (Linux < 6.17): "
            "IPv6 forwarding is on for every interface"
        )
    return ForwardingPlan(tuple(out), tuple(notes))


@dataclass(frozen=True)
class ShapingPlan:
    """The tc set-up of one tenant: HTB on the host veth (download) and on the tenant's
    interface inside its namespace (upload); None: no qdisc of nsd's there."""

    host_ifname: str
    tenant_ifname: str
    ingress_bps: int | None
    egress_bps: int | None


def shaping_plan(site: Site, tenant: TenantNet) -> ShapingPlan:
    return ShapingPlan(
        host_ifname=tenant.host_ifname,
        tenant_ifname=site.tenant_interface,
        ingress_bps=tenant.bandwidth.ingress_bps,
        egress_bps=tenant.bandwidth.egress_bps,
    )
