"""What the network policy is derived from besides the configuration: the host's facts
(:class:`Site`), the tenants (:class:`TenantNet`), and the host services resolved against
them (:func:`resolve_services`), with the configuration checks that need those facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from nsd.network_config import Bandwidth, NetworkConfig, NetworkConfigError


@dataclass(frozen=True)
class Site:
    """Host-wide facts the documents depend on."""

    ipv4_gateway: IPv4Address
    ipv6_gateway: IPv6Address
    ipv4_pool: IPv4Network
    ipv6_pool: IPv6Network
    #: the veth end inside every tenant namespace
    tenant_interface: str = "eth0"
    #: host veths are ``<link_prefix><uid>``; any interface with this prefix is treated as a
    #: tenant's (fail closed for a veth that appears before the table knows it)
    link_prefix: str = "nsd"
    #: resolved uplinks (the configured ones, or the interfaces of the default routes)
    uplinks: tuple[str, ...] = ()
    #: loopback IPv4 resolvers of the host's /etc/resolv.conf, in order
    loopback_resolvers: tuple[IPv4Address, ...] = ()


@dataclass(frozen=True)
class TenantNet:
    """What the policy needs to know about one tenant."""

    name: str
    uid: int
    host_ifname: str
    ipv4: IPv4Address
    ipv6_prefix: IPv6Network
    #: effective limits (defaults overlaid with the tenant's overrides)
    bandwidth: Bandwidth = field(default_factory=Bandwidth)

    @property
    def ipv6(self) -> IPv6Address:
        return self.ipv6_prefix.network_address + 1


@dataclass(frozen=True)
class ResolvedService:
    """A host service with the gateway port tenants' traffic is funnelled through."""

    name: str
    protocols: tuple[str, ...]
    host: IPv4Address
    host_port: int
    #: the in-namespace address; equal to the gateway when no tenant-side rule is needed
    tenant: IPv4Address
    tenant_port: int
    #: the gateway port the host's DNAT rule listens on
    gateway_port: int
    snat_loopback: bool

    def tenant_side(self, gateway: IPv4Address) -> bool:
        return self.tenant != gateway or self.tenant_port != self.gateway_port


def loopback_resolvers(resolv_conf: str) -> tuple[IPv4Address, ...]:
    """IPv4 loopback ``nameserver`` lines of a resolv.conf, in order, without duplicates.

    Only these need help inside a namespace (there, 127.0.0.53 is the namespace's own
    loopback); other resolvers are reached like any other address.
    """
    out: list[IPv4Address] = []
    for line in resolv_conf.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = IPv4Address(fields[1])
            except ValueError:
                continue
            if addr.is_loopback and addr not in out:
                out.append(addr)
    return tuple(out)


def resolve_services(cfg: NetworkConfig, site: Site) -> tuple[ResolvedService, ...]:
    """Configured services plus DNS; raises NetworkConfigError on clashing addresses."""
    out: list[ResolvedService] = []
    gw = site.ipv4_gateway
    for s in cfg.host_services:
        tenant = s.tenant if s.tenant is not None else gw
        out.append(
            ResolvedService(
                name=s.name,
                protocols=s.protocols,
                host=s.host,
                host_port=s.host_port,
                tenant=tenant,
                tenant_port=s.tenant_port,
                gateway_port=s.tenant_port,
                snat_loopback=s.snat_loopback,
            )
        )
    if cfg.dns == "auto" and site.loopback_resolvers:
        # Every loopback resolver address answers inside the namespace; all of them go to
        # the first one on the host (a second local resolver is rare, and they would need
        # distinct gateway ports).
        first = site.loopback_resolvers[0]
        taken = {(p, s.gateway_port) for s in out for p in s.protocols}
        if ("udp", 53) not in taken and ("tcp", 53) not in taken:
            for addr in site.loopback_resolvers:
                out.append(
                    ResolvedService(
                        name="dns",
                        protocols=("tcp", "udp"),
                        host=first,
                        host_port=53,
                        tenant=addr,
                        tenant_port=53,
                        gateway_port=53,
                        snat_loopback=True,
                    )
                )
    seen_tenant: dict[tuple[str, IPv4Address, int], str] = {}
    seen_gateway: dict[tuple[str, int], ResolvedService] = {}
    for svc in out:
        for proto in svc.protocols:
            k = (proto, svc.tenant, svc.tenant_port)
            if k in seen_tenant and seen_tenant[k] != svc.name:
                raise NetworkConfigError(
                    "host_services",
                    f"{seen_tenant[k]} and {svc.name} both use {proto} {svc.tenant}:"
                    f"{svc.tenant_port}",
                )
            seen_tenant[k] = svc.name
            other = seen_gateway.get((proto, svc.gateway_port))
            if other is not None and (other.host, other.host_port) != (svc.host, svc.host_port):
                raise NetworkConfigError(
                    "host_services",
                    f"{other.name} and {svc.name} both need {proto} port {svc.gateway_port} "
                    "of the gateway for different host services",
                )
            seen_gateway[(proto, svc.gateway_port)] = svc
    return tuple(out)


def check_config(cfg: NetworkConfig, site: Site) -> None:
    """Checks that need host facts (pool, gateway); NetworkConfigError on failure."""
    for user, (v4, v6) in cfg.snat.items():
        for addr in (v4, v6):
            if addr is not None and (addr in site.ipv4_pool or addr in site.ipv6_pool):
                raise NetworkConfigError(f"snat.{user}", f"{addr} is a tenant address")
    for s in cfg.host_services:
        if s.tenant is not None and s.tenant in site.ipv4_pool and s.tenant != site.ipv4_gateway:
            raise NetworkConfigError(
                "host_services", f"{s.name}: {s.tenant} is in the tenant pool {site.ipv4_pool}"
            )
    resolve_services(cfg, site)
