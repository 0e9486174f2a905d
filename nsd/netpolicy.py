"""Network policy: nsd's state and configuration -> nftables documents and tc plans.

Pure derivation, no I/O: given the ``[network]`` configuration, host facts (gateways,
pools, uplinks, the host's loopback resolvers) and the tenants, build

* the JSON document of the ``inet nsd`` table in the host namespace (egress NAT,
  isolation, host services, conntrack limits, marks for bandwidth shaping),
* the JSON document of the ``inet nsd`` table inside one tenant's namespace (in-namespace
  service addresses such as the resolver on 127.0.0.53, the upload classifier), or None
  when the tenant needs none,
* the per-interface sysctls each side needs, and the tc plan of each tenant.

Every document replaces its table in one transaction (``nsd.nft``): ``add table``,
``delete table``, ``add table`` and the content, so chains and sets that are no longer
derived disappear too, and packets see either the old or the new ruleset, never a mix.
The host table is replaced through ``replacement`` instead, which keeps the set holding
the conntrack counts; and since tenants appear in it only as set and map elements
(``tenant_elements``), one tenant's creation or removal is an element transaction
(``element_changes``) that leaves the table equal to the derived one. The model is
explained in docs/networking.md.

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

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from typing import Any

TABLE = "nsd"
FAMILY = "inet"

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

PROTOCOLS = ("tcp", "udp")
SOURCES = ("auto", "loopback", "tenant")
MAX_RATE_BPS = 32_000_000_000  # HTB's 32-bit byte rate; far above any per-tenant cap


class NetworkConfigError(ValueError):
    """A bad ``[network]`` value: ``key`` is the dotted key below ``network``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Bandwidth:
    """Rates in bits per second; None: not limited (in an override: not set here)."""

    egress_bps: int | None = None  # tenant -> uplink (upload)
    ingress_bps: int | None = None  # uplink -> tenant (download)

    def overlay(self, other: Bandwidth) -> Bandwidth:
        return Bandwidth(
            other.egress_bps if other.egress_bps is not None else self.egress_bps,
            other.ingress_bps if other.ingress_bps is not None else self.ingress_bps,
        )

    def effective(self) -> Bandwidth:
        """0 means "unlimited" (an override that lifts a default)."""
        return Bandwidth(self.egress_bps or None, self.ingress_bps or None)


@dataclass(frozen=True)
class HostService:
    """A host service reachable from every tenant at a fixed in-namespace address."""

    name: str
    #: where it listens on the host, e.g. 127.0.0.1:3306
    host: IPv4Address
    host_port: int
    #: where tenants reach it inside their namespace; None: the gateway address
    tenant: IPv4Address | None
    tenant_port: int
    protocols: tuple[str, ...] = ("tcp",)
    #: the source address the service sees: "loopback" (127.0.0.1: for services that only
    #: accept local clients, e.g. systemd-resolved), "tenant" (the tenant's address), or
    #: "auto" (loopback for loopback-bound services, else tenant)
    source: str = "auto"

    @property
    def snat_loopback(self) -> bool:
        if self.source == "auto":
            return self.host.is_loopback
        return self.source == "loopback"


@dataclass(frozen=True)
class NetworkConfig:
    """The ``[network]`` section."""

    enabled: bool = True
    #: interfaces traffic to the internet leaves through; empty: those of the default routes
    uplinks: tuple[str, ...] = ()
    #: "masquerade" (to the uplink's address, or ``snat``) or "none" (no internet access)
    egress: str = "masquerade"
    #: masquerade IPv6 too (for ULA tenant prefixes); false routes tenant prefixes as they are
    ipv6_nat: bool = True
    #: per-tenant source addresses instead of masquerading: name -> (IPv4, IPv6)
    snat: Mapping[str, tuple[IPv4Address | None, IPv6Address | None]] = field(default_factory=dict)
    isolation: bool = True
    #: tenant-to-tenant paths opened despite isolation: (from, to) user names
    allow: tuple[tuple[str, str], ...] = ()
    #: connections tracked per tenant at most (0: no limit)
    conntrack_limit: int = 20000
    host_services: tuple[HostService, ...] = ()
    #: "auto": the host's loopback resolvers of /etc/resolv.conf are reachable at the same
    #: address inside every namespace; "off"
    dns: str = "auto"
    bandwidth: Bandwidth = Bandwidth()


def parse_rate(value: Any, key: str, *, unit: int = 1) -> int | None:
    """A rate in bits per second from a number of ``unit`` (e.g. 10**6 for Mbit) or a
    string such as "10M", "10mbit", "1.5G", "500k"; 0 means unlimited (None)."""
    if isinstance(value, bool):
        raise NetworkConfigError(key, "must be a number")
    if isinstance(value, int | float):
        bps = float(value) * unit
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:bit|bps|b)?\s*", value, re.I)
        if m is None:
            raise NetworkConfigError(key, f"not a rate: {value!r} (e.g. 10M, 1.5G, 500k)")
        scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
        bps = float(m.group(1)) * scale
    else:
        raise NetworkConfigError(key, "must be a number or a string such as 10M")
    if not math.isfinite(bps) or bps < 0:
        raise NetworkConfigError(key, "must not be negative")
    if bps == 0:
        return None
    if bps < 8000:
        raise NetworkConfigError(key, "below 8 kbit/s")
    if bps > MAX_RATE_BPS:
        raise NetworkConfigError(key, f"above {MAX_RATE_BPS // 10**6} Mbit/s")
    return int(bps)


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "unlimited"
    for scale, unit in ((10**9, "Gbit/s"), (10**6, "Mbit/s"), (10**3, "kbit/s")):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps} bit/s"


_IFNAME = re.compile(r"[^/:%\s]{1,15}")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KNOWN = (
    "enabled",
    "uplinks",
    "egress",
    "ipv6_nat",
    "snat",
    "isolation",
    "allow",
    "conntrack_limit",
    "host_services",
    "dns",
    "bandwidth",
)


def config_from_mapping(raw: Mapping[str, Any]) -> NetworkConfig:
    """Parse and validate a TOML ``[network]`` table; NetworkConfigError names the key."""
    for key in raw:
        if key not in _KNOWN:
            raise NetworkConfigError(key, f"unknown key (known: {', '.join(sorted(_KNOWN))})")
    d = NetworkConfig()
    enabled = _bool(raw, "enabled", d.enabled)
    uplinks = raw.get("uplinks", [])
    if not isinstance(uplinks, list) or not all(isinstance(u, str) for u in uplinks):
        raise NetworkConfigError("uplinks", 'must be a list of interface names, e.g. ["eth0"]')
    for u in uplinks:
        if not _IFNAME.fullmatch(u) or u in (".", "..", "lo", "all", "default"):
            raise NetworkConfigError("uplinks", f"{u!r} is not a usable interface name")
    egress = raw.get("egress", d.egress)
    if egress not in ("masquerade", "none"):
        raise NetworkConfigError("egress", 'must be "masquerade" or "none"')
    dns = raw.get("dns", d.dns)
    if dns is True:
        dns = "auto"
    elif dns is False:
        dns = "off"
    if dns not in ("auto", "off"):
        raise NetworkConfigError("dns", 'must be "auto" (or true) or "off" (or false)')
    limit = raw.get("conntrack_limit", d.conntrack_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 2**31:
        raise NetworkConfigError("conntrack_limit", "must be a non-negative integer (0: none)")
    return NetworkConfig(
        enabled=enabled,
        uplinks=tuple(dict.fromkeys(uplinks)),
        egress=egress,
        ipv6_nat=_bool(raw, "ipv6_nat", d.ipv6_nat),
        snat=_snat(raw.get("snat", {})),
        isolation=_bool(raw, "isolation", d.isolation),
        allow=_allow(raw.get("allow", [])),
        conntrack_limit=limit,
        host_services=_services(raw.get("host_services", [])),
        dns=dns,
        bandwidth=_bandwidth(raw.get("bandwidth", {}), "bandwidth"),
    )


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise NetworkConfigError(key, "must be true or false")
    return value


def _snat(raw: Any) -> dict[str, tuple[IPv4Address | None, IPv6Address | None]]:
    if not isinstance(raw, dict):
        raise NetworkConfigError("snat", 'must be a table: user = "203.0.113.7" or [v4, v6]')
    out: dict[str, tuple[IPv4Address | None, IPv6Address | None]] = {}
    for user, value in raw.items():
        key = f"snat.{user}"
        values = value if isinstance(value, list) else [value]
        v4: IPv4Address | None = None
        v6: IPv6Address | None = None
        for v in values:
            try:
                addr = ip_address(v) if isinstance(v, str) else None
            except ValueError:
                addr = None
            if addr is None:
                raise NetworkConfigError(key, f"{v!r} is not an IP address")
            if isinstance(addr, IPv4Address):
                if v4 is not None:
                    raise NetworkConfigError(key, "two IPv4 addresses")
                v4 = addr
            else:
                if v6 is not None:
                    raise NetworkConfigError(key, "two IPv6 addresses")
                v6 = addr
        out[user] = (v4, v6)
    return out


def _allow(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise NetworkConfigError("allow", 'must be a list of ["from", "to"] user name pairs')
    out = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(p, str) and p for p in pair)
        ):
            raise NetworkConfigError("allow", f'{pair!r} is not a ["from", "to"] pair of users')
        out.append((pair[0], pair[1]))
    return tuple(dict.fromkeys(out))


def _endpoint(value: Any, key: str) -> tuple[IPv4Address, int]:
    if not isinstance(value, str):
        raise NetworkConfigError(key, 'must be "ADDRESS:PORT", e.g. "127.0.0.1:3306"')
    addr, sep, port = value.rpartition(":")
    try:
        ip = IPv4Address(addr)
        number = int(port)
    except ValueError:
        ip, number = None, 0
    if not sep or ip is None or not 0 < number < 65536:
        raise NetworkConfigError(key, f'{value!r} is not "IPV4ADDRESS:PORT"')
    if ip.is_unspecified or ip.is_multicast:
        raise NetworkConfigError(key, f"{ip} cannot be a service address")
    return ip, number


def _services(raw: Any) -> tuple[HostService, ...]:
    if not isinstance(raw, list):
        raise NetworkConfigError("host_services", "must be an array of tables")
    out: list[HostService] = []
    for i, entry in enumerate(raw):
        key = f"host_services[{i}]"
        if not isinstance(entry, dict):
            raise NetworkConfigError(key, "must be a table")
        unknown = set(entry) - {"name", "host", "tenant_address", "protocols", "source"}
        if unknown:
            raise NetworkConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        name = entry.get("name")
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            raise NetworkConfigError(f"{key}.name", "must be 1-64 letters, digits, _ . -")
        host, host_port = _endpoint(entry.get("host"), f"{key}.host")
        tenant_raw = entry.get("tenant_address")
        if tenant_raw is None:
            tenant, tenant_port = None, host_port
        elif isinstance(tenant_raw, str) and tenant_raw.startswith("gateway:"):
            tenant, tenant_port = None, _endpoint("0.0.0.1:" + tenant_raw[8:], key)[1]
        else:
            tenant, tenant_port = _endpoint(tenant_raw, f"{key}.tenant_address")
        protocols = entry.get("protocols", ["tcp"])
        if (
            not isinstance(protocols, list)
            or not protocols
            or any(p not in PROTOCOLS for p in protocols)
        ):
            raise NetworkConfigError(f"{key}.protocols", 'must be a list of "tcp" and/or "udp"')
        source = entry.get("source", "auto")
        if source not in SOURCES:
            raise NetworkConfigError(f"{key}.source", 'must be "auto", "loopback" or "tenant"')
        out.append(
            HostService(
                name=name,
                host=host,
                host_port=host_port,
                tenant=tenant,
                tenant_port=tenant_port,
                protocols=tuple(sorted(set(protocols))),
                source=source,
            )
        )
    names = [s.name for s in out]
    for n in names:
        if names.count(n) > 1:
            raise NetworkConfigError("host_services", f"two services named {n!r}")
    return tuple(out)


def _bandwidth(raw: Any, key: str) -> Bandwidth:
    if not isinstance(raw, dict):
        raise NetworkConfigError(key, "must be a table with egress_mbit and/or ingress_mbit")
    unknown = set(raw) - {"egress_mbit", "ingress_mbit"}
    if unknown:
        raise NetworkConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
    return Bandwidth(
        egress_bps=parse_rate(raw.get("egress_mbit", 0), f"{key}.egress_mbit", unit=10**6),
        ingress_bps=parse_rate(raw.get("ingress_mbit", 0), f"{key}.ingress_mbit", unit=10**6),
    )


# --------------------------------------------------------------------------------------
# host facts and tenants


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
    bandwidth: Bandwidth = Bandwidth()

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


# --------------------------------------------------------------------------------------
# JSON building blocks (libnftables' JSON schema, nft 1.0.x)


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field_: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field_}}


def _ct(key: str) -> dict[str, Any]:
    return {"ct": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(net: IPv4Network | IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _ref(name: str) -> str:
    return "@" + name


def _wild(prefix: str) -> str:
    # nft's interface-name wildcard: a trailing '*' matches any suffix
    return prefix + "*"


_ACCEPT: dict[str, Any] = {"accept": None}
_DROP: dict[str, Any] = {"drop": None}
_COUNTER: dict[str, Any] = {"counter": None}


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def _proto(proto: str) -> dict[str, Any]:
    return _match(_meta("l4proto"), proto)


def _dport(port: int) -> dict[str, Any]:
    return _match(_payload("th", "dport"), port)


class _Doc:
    """Accumulates one table's commands."""

    def __init__(self, comment: str) -> None:
        self.cmds: list[dict[str, Any]] = []
        # Chains and sets come before every rule: a jump or a set reference must name
        # something that exists at that point of the transaction.
        self.objects: list[dict[str, Any]] = []
        self.rules: list[dict[str, Any]] = []
        table = {"family": FAMILY, "name": TABLE}
        # add + delete + add: replaces the whole table, chains and sets included, in one
        # transaction whether or not it existed before (nft 1.0.6 has no "destroy").
        self.cmds += [
            {"add": {"table": dict(table)}},
            {"delete": {"table": dict(table)}},
            {"add": {"table": dict(table, comment=comment)}},
        ]

    def chain(
        self,
        name: str,
        *,
        type_: str | None = None,
        hook: str | None = None,
        prio: int = 0,
        policy: str = "accept",
    ) -> None:
        chain: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name}
        if hook is not None:
            chain.update(type=type_ or "filter", hook=hook, prio=prio, policy=policy)
        self.objects.append({"add": {"chain": chain}})

    def set(
        self,
        name: str,
        type_: str | list[str],
        elements: Iterable[Any],
        *,
        interval: bool = False,
        map_: str | None = None,
        dynamic_size: int | None = None,
    ) -> None:
        """A named set (a map with ``map_``, the data type). ``dynamic_size``: a set the
        kernel fills from the packet path (``add @set``), holding state of its own."""
        body: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name, "type": type_}
        flags = ["interval"] if interval else []
        if dynamic_size is not None:
            # nft 1.0.6's JSON parser knows no "dynamic" flag; the kernel gets it
            # (NFT_SET_EVAL) from nft's evaluation of the ``add @set`` rule.
            body["size"] = dynamic_size
        if flags:
            body["flags"] = flags
        if map_ is not None:
            body["map"] = map_
        elems = list(elements)
        if elems:
            body["elem"] = elems
        self.objects.append({"add": {"map" if map_ is not None else "set": body}})

    def rule(self, chain: str, *expr: dict[str, Any], comment: str | None = None) -> None:
        body: dict[str, Any] = {
            "family": FAMILY,
            "table": TABLE,
            "chain": chain,
            "expr": list(expr),
        }
        if comment:
            body["comment"] = comment
        self.rules.append({"add": {"rule": body}})

    def document(self) -> dict[str, Any]:
        """The commands; the first rule's comment carries a hash of every rule (see
        ``_stamp``)."""
        rules = [json.loads(json.dumps(r)) for r in self.rules]
        if rules:
            digest = hashlib.sha256(
                json.dumps([r["add"]["rule"] for r in rules], sort_keys=True).encode()
            ).hexdigest()[:RULES_HASH_LEN]
            first = rules[0]["add"]["rule"]
            first["comment"] = _stamp(first.get("comment"), digest)
        return {"nftables": [*self.cmds, *self.objects, *rules]}


#: hex digits of the rules' hash in the first rule's comment
RULES_HASH_LEN = 12


def _stamp(comment: str | None, digest: str) -> str:
    """A rule comment that also names the hash of every rule of the derived table.

    libnftables lists rules in a normalised form that differs from what nsd loads, so
    rules cannot be compared with the derived ones directly; comments come back as they
    were. With the hash in a comment, ``summary`` sees any change of the derived rules
    (a host service's port, a new limit) even in a new process, where nsd has not yet
    seen the live rules it loaded."""
    tag = f"rules {digest}"
    return f"{comment} [{tag}]" if comment else f"nsd {tag}"


# Chain priorities (nft's named priorities as numbers: valid for every hook in nft 1.0.6)
PRIO_RAW_MANGLE = -150
PRIO_DSTNAT = -100
PRIO_FILTER = 0
PRIO_SRCNAT = 100


# --------------------------------------------------------------------------------------
# the host table


#: per-tenant elements of the host table: set or map name -> its elements
Elements = dict[str, list[Any]]

#: the named sets and maps whose elements come from tenants (and the allow-list), with
#: their types; everything else in the host table depends on the configuration and the
#: site alone, so a tenant's creation or removal changes elements of these, nothing else
TENANT_SETS: dict[str, tuple[str | list[str], bool, str | None]] = {
    # name: (type, interval, map data type)
    "tenant_ifs": ("ifname", False, None),
    "tenant_src4": (["ifname", "ipv4_addr"], False, None),
    "tenant_src6": (["ifname", "ipv6_addr"], True, None),
    "allowed": (["ifname", "ifname"], False, None),
    "upload_shaped": ("ifname", False, None),
    "download_shaped": ("ifname", False, None),
    "snat4": ("ipv4_addr", False, "ipv4_addr"),
    "snat6": ("ipv6_addr", True, "ipv6_addr"),
}
#: elements of the conntrack-limit set at most (one per tenant interface that opened a
#: connection); beyond it a new interface's connections are not counted
CTCOUNT_SIZE = 65535


def ctcount_set(limit: int) -> str:
    """The dynamic set that counts each tenant interface's connections.

    Its elements (one per host veth, each with its own ``ct count``) are the counting
    state: a table replacement keeps this set (see ``replacement``). The limit is part
    of the name because an element keeps the limit it was created with: a new limit is a
    new set, and the old one (and its counts) goes."""
    return f"ctcount_{limit}"


def tenant_elements(
    cfg: NetworkConfig, tenant: TenantNet, present: Mapping[str, TenantNet]
) -> Elements:
    """The host table's elements that exist because of ``tenant``; ``present``: the
    tenants the table knows, by name (for the allow-list pairs, whose other end must
    exist). O(1) in the number of tenants (O(len(network.allow)))."""
    t = tenant
    out: Elements = {
        "tenant_ifs": [t.host_ifname],
        "tenant_src4": [{"concat": [t.host_ifname, str(t.ipv4)]}],
        "tenant_src6": [{"concat": [t.host_ifname, _prefix(t.ipv6_prefix)]}],
    }
    if t.bandwidth.egress_bps is not None:
        out["upload_shaped"] = [t.host_ifname]
    if t.bandwidth.ingress_bps is not None:
        out["download_shaped"] = [t.host_ifname]
    v4, v6 = cfg.snat.get(t.name, (None, None))
    if v4 is not None:
        out["snat4"] = [[str(t.ipv4), str(v4)]]
    if v6 is not None:
        out["snat6"] = [[_prefix(t.ipv6_prefix), str(v6)]]
    pairs = []
    for src, dst in cfg.allow:
        if src == dst:
            continue
        if src == t.name and dst in present:
            pairs.append({"concat": [t.host_ifname, present[dst].host_ifname]})
        elif dst == t.name and src in present:
            pairs.append({"concat": [present[src].host_ifname, t.host_ifname]})
    if pairs:
        out["allowed"] = pairs
    return out


def _key(element: Any) -> str:
    return json.dumps(element, sort_keys=True)


def all_elements(cfg: NetworkConfig, tenants: Sequence[TenantNet]) -> Elements:
    """Every tenant's elements, each once (an allowed pair comes from both ends)."""
    by_name = {t.name: t for t in tenants}
    out: dict[str, dict[str, Any]] = {name: {} for name in TENANT_SETS}
    for t in sorted(tenants, key=lambda t: t.uid):
        for name, elems in tenant_elements(cfg, t, by_name).items():
            for e in elems:
                out[name].setdefault(_key(e), e)
    return {name: list(elems.values()) for name, elems in out.items()}


def element_changes(old: Elements, new: Elements) -> dict[str, Any] | None:
    """The transaction that turns the elements ``old`` into ``new`` in the live host
    table (deletions first), or None if they are equal."""
    cmds: list[dict[str, Any]] = []
    adds: list[dict[str, Any]] = []
    for name in TENANT_SETS:
        before = {_key(e): e for e in old.get(name, [])}
        after = {_key(e): e for e in new.get(name, [])}
        gone = [e for k, e in before.items() if k not in after]
        added = [e for k, e in after.items() if k not in before]
        ref = {"family": FAMILY, "table": TABLE, "name": name}
        if gone:
            cmds.append({"delete": {"element": dict(ref, elem=gone)}})
        if added:
            adds.append({"add": {"element": dict(ref, elem=added)}})
    cmds += adds
    return {"nftables": cmds} if cmds else None


def _tenant_chain(doc: _Doc, name: str) -> None:
    """A chain for traffic from tenant veths: replies pass, invalid packets and
    interfaces nsd did not make (``nsd*`` names it does not know: fail closed) drop."""
    doc.chain(name)
    doc.rule(name, _match(_ct("state"), {"set": ["established", "related"]}), _ACCEPT)
    doc.rule(name, _match(_ct("state"), "invalid"), _DROP)
    doc.rule(
        name,
        _match(_meta("iifname"), _ref("tenant_ifs"), "!="),
        _COUNTER,
        _DROP,
        comment="not a known tenant interface",
    )


def host_document(  # noqa: PLR0912, PLR0915 -- the table top to bottom, read as one
    cfg: NetworkConfig, site: Site, tenants: Sequence[TenantNet]
) -> dict[str, Any]:
    """The ``inet nsd`` table of the host namespace.

    Tenants appear only as elements of the named sets and maps of ``TENANT_SETS``
    (``tenant_elements``); chains and rules depend on the configuration and the site
    alone. That is what lets nsd add or remove one tenant with an element transaction
    (``element_changes``) that leaves the table equal to this document."""
    services = resolve_services(cfg, site)
    doc = _Doc("nsd: tenant egress, isolation, host services; replaced by nsd on every change")
    wild = _wild(site.link_prefix)
    gw4, gw6 = site.ipv4_gateway, site.ipv6_gateway

    # -- sets --------------------------------------------------------------------------
    doc.set("uplinks", "ifname", list(site.uplinks))
    for name, elems in all_elements(cfg, tenants).items():
        type_, interval, data = TENANT_SETS[name]
        doc.set(name, type_, elems, interval=interval, map_=data)

    # -- prerouting guard: anti-spoofing and per-tenant conntrack limits ------------------
    doc.chain("guard", hook="prerouting", prio=PRIO_RAW_MANGLE)
    # A tenant sends from its own addresses only (link-local and :: for neighbour discovery
    # and DAD). Interfaces with nsd's prefix that the table does not know yet match no
    # element, so everything they send is dropped until nsd knows them: fail closed.
    doc.rule(
        "guard",
        _match(_meta("iifname"), wild),
        _match(_meta("nfproto"), "ipv4"),
        _match({"concat": [_meta("iifname"), _payload("ip", "saddr")]}, _ref("tenant_src4"), "!="),
        _COUNTER,
        _DROP,
        comment="spoofed IPv4 source",
    )
    doc.rule(
        "guard",
        _match(_meta("iifname"), wild),
        _match(_payload("ip6", "saddr"), {"set": [_prefix(IPv6Network("fe80::/10")), "::"]}, "!="),
        _match({"concat": [_meta("iifname"), _payload("ip6", "saddr")]}, _ref("tenant_src6"), "!="),
        _COUNTER,
        _DROP,
        comment="spoofed IPv6 source",
    )
    if cfg.conntrack_limit > 0:
        # One element per tenant interface, created by the first new connection, each
        # counting that interface's connections: no per-tenant rule or chain.
        counts = ctcount_set(cfg.conntrack_limit)
        doc.set(counts, "ifname", [], dynamic_size=CTCOUNT_SIZE)
        doc.rule(
            "guard",
            _match(_meta("iifname"), wild),
            _match(_ct("state"), "new"),
            {
                "set": {
                    "op": "add",
                    "elem": _meta("iifname"),
                    "set": _ref(counts),
                    "stmt": [{"ct count": {"val": cfg.conntrack_limit, "inv": True}}],
                }
            },
            _COUNTER,
            _DROP,
            comment=f"more than {cfg.conntrack_limit} connections of one tenant",
        )

    # -- host services: DNAT from the gateway, SNAT to loopback ---------------------------
    if services:
        doc.chain("services", type_="nat", hook="prerouting", prio=PRIO_DSTNAT)
        doc.chain("services_source", type_="nat", hook="input", prio=PRIO_SRCNAT)
        done: set[tuple[str, int]] = set()
        for svc in services:
            for proto in svc.protocols:
                if (proto, svc.gateway_port) in done:
                    continue
                done.add((proto, svc.gateway_port))
                doc.rule(
                    "services",
                    _match(_meta("iifname"), _ref("tenant_ifs")),
                    _match(_payload("ip", "daddr"), str(gw4)),
                    _proto(proto),
                    _dport(svc.gateway_port),
                    {"dnat": {"family": "ip", "addr": str(svc.host), "port": svc.host_port}},
                    comment=svc.name,
                )
                if svc.snat_loopback:
                    # systemd-resolved and many loopback-bound services answer local
                    # clients only; the tenant's address is then hidden from them.
                    doc.rule(
                        "services_source",
                        _match(_meta("iifname"), _ref("tenant_ifs")),
                        _match(_ct("status"), "dnat", "in"),
                        _match(_payload("ip", "daddr"), str(svc.host)),
                        _proto(proto),
                        _dport(svc.host_port),
                        {"snat": {"family": "ip", "addr": "127.0.0.1"}},
                        comment=svc.name,
                    )

    # -- input: what tenants may reach on the host -----------------------------------------
    doc.chain("input", hook="input", prio=PRIO_FILTER)
    doc.rule("input", _match(_meta("iifname"), wild), _jump("tenant_to_host"))
    _tenant_chain(doc, "tenant_to_host")
    doc.rule(
        "tenant_to_host", _match(_ct("status"), "dnat", "in"), _ACCEPT, comment="host services"
    )
    doc.rule(
        "tenant_to_host",
        _match(
            _payload("icmpv6", "type"),
            {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        ),
        _ACCEPT,
    )
    doc.rule(
        "tenant_to_host",
        _match(_payload("ip", "daddr"), str(gw4)),
        _match(_payload("icmp", "type"), "echo-request"),
        _ACCEPT,
    )
    doc.rule(
        "tenant_to_host",
        _match(_payload("ip6", "daddr"), str(gw6)),
        _match(_payload("icmpv6", "type"), "echo-request"),
        _ACCEPT,
    )
    if cfg.isolation:
        doc.rule("tenant_to_host", _COUNTER, _DROP, comment="isolation: host addresses")

    # -- forward: marks for shaping (before any verdict) ----------------------------------
    doc.chain("forward_marks", hook="forward", prio=PRIO_RAW_MANGLE)
    doc.rule(
        "forward_marks",
        _match(_meta("iifname"), _ref("uplinks")),
        _match(_meta("oifname"), _ref("download_shaped")),
        {"mangle": {"key": _meta("priority"), "value": PRIO_LIMITED}},
        comment="download shaping class",
    )
    for proto in ("ip", "ip6"):
        doc.rule(
            "forward_marks",
            _match(_meta("iifname"), _ref("uplinks")),
            _match(_meta("oifname"), _ref("upload_shaped")),
            {"mangle": {"key": _payload(proto, "dscp"), "value": DSCP_UPLINK}},
            comment="tells the tenant side: from an uplink",
        )
        doc.rule(
            "forward_marks",
            _match(_meta("iifname"), _ref("uplinks"), "!="),
            _match(_meta("oifname"), _ref("upload_shaped")),
            _match(_payload(proto, "dscp"), DSCP_UPLINK),
            {"mangle": {"key": _payload(proto, "dscp"), "value": 0}},
        )
    doc.chain("output_marks", hook="output", prio=PRIO_RAW_MANGLE)
    for proto in ("ip", "ip6"):
        doc.rule(
            "output_marks",
            _match(_meta("oifname"), _ref("upload_shaped")),
            _match(_payload(proto, "dscp"), DSCP_UPLINK),
            {"mangle": {"key": _payload(proto, "dscp"), "value": 0}},
        )

    # -- forward: isolation and egress ----------------------------------------------------
    doc.chain("forward", hook="forward", prio=PRIO_FILTER)
    doc.rule("forward", _match(_meta("iifname"), wild), _jump("from_tenant"))
    doc.rule("forward", _match(_meta("oifname"), wild), _jump("to_tenant"))
    _tenant_chain(doc, "from_tenant")
    if cfg.egress != "none":
        doc.rule(
            "from_tenant", _match(_meta("oifname"), _ref("uplinks")), _ACCEPT, comment="egress"
        )
    doc.rule(
        "from_tenant",
        _match({"concat": [_meta("iifname"), _meta("oifname")]}, _ref("allowed")),
        _ACCEPT,
        comment="network.allow",
    )
    if cfg.isolation:
        doc.rule("from_tenant", _COUNTER, _DROP, comment="isolation")
    else:
        doc.rule("from_tenant", _match(_meta("oifname"), wild), _ACCEPT)
        doc.rule("from_tenant", _COUNTER, _DROP, comment="only uplinks and tenants")
    doc.chain("to_tenant")
    doc.rule("to_tenant", _match(_ct("state"), {"set": ["established", "related"]}), _ACCEPT)
    doc.rule(
        "to_tenant",
        _match(_ct("status"), "dnat", "in"),
        _ACCEPT,
        comment="the operator forwarded it",
    )
    doc.rule("to_tenant", _COUNTER, _DROP, comment="no new connections from outside")

    # -- egress NAT ------------------------------------------------------------------------
    if cfg.egress == "masquerade" and site.uplinks:
        doc.chain("egress_nat", type_="nat", hook="postrouting", prio=PRIO_SRCNAT)
        # network.snat: the source address by the tenant's address; a packet whose source
        # is not in the map does not match (the lookup fails) and is masqueraded below.
        for proto, name, present in (
            ("ip", "snat4", any(v4 is not None for v4, _ in cfg.snat.values())),
            ("ip6", "snat6", any(v6 is not None for _, v6 in cfg.snat.values())),
        ):
            if present:
                doc.rule(
                    "egress_nat",
                    _match(_meta("oifname"), _ref("uplinks")),
                    {
                        "snat": {
                            "family": proto,
                            "addr": {"map": {"key": _payload(proto, "saddr"), "data": _ref(name)}},
                        }
                    },
                    comment="network.snat",
                )
        doc.rule(
            "egress_nat",
            _match(_meta("oifname"), _ref("uplinks")),
            _match(_payload("ip", "saddr"), _prefix(site.ipv4_pool)),
            {"masquerade": None},
        )
        if cfg.ipv6_nat:
            doc.rule(
                "egress_nat",
                _match(_meta("oifname"), _ref("uplinks")),
                _match(_payload("ip6", "saddr"), _prefix(site.ipv6_pool)),
                {"masquerade": None},
            )
    return doc.document()


# --------------------------------------------------------------------------------------
# the table inside a tenant's namespace


def tenant_document(cfg: NetworkConfig, site: Site, tenant: TenantNet) -> dict[str, Any] | None:
    """The ``inet nsd`` table inside ``tenant``'s namespace, or None if it needs none."""
    gw4 = site.ipv4_gateway
    eth = site.tenant_interface
    local = [s for s in resolve_services(cfg, site) if s.tenant_side(gw4)]
    shaped = tenant.bandwidth.egress_bps is not None
    if not local and not shaped:
        return None
    doc = _Doc("nsd: in-namespace service addresses, upload classification")
    if local:
        doc.chain("services", type_="nat", hook="output", prio=PRIO_DSTNAT)
        for svc in local:
            for proto in svc.protocols:
                doc.rule(
                    "services",
                    _match(_payload("ip", "daddr"), str(svc.tenant)),
                    _proto(proto),
                    _dport(svc.tenant_port),
                    {"dnat": {"family": "ip", "addr": str(gw4), "port": svc.gateway_port}},
                    comment=svc.name,
                )
        if any(s.tenant.is_loopback for s in local):
            # The socket was bound to 127.0.0.1; after the DNAT it leaves through eth0
            # (net.ipv4.conf.eth0.route_localnet=1 allows the 127/8 source there) and
            # gets the tenant's own address.
            doc.chain("services_source", type_="nat", hook="postrouting", prio=PRIO_SRCNAT)
            doc.rule(
                "services_source",
                _match(_meta("oifname"), eth),
                _match(_payload("ip", "saddr"), _prefix(IPv4Network("127.0.0.0/8"))),
                {"snat": {"family": "ip", "addr": str(tenant.ipv4)}},
            )
    doc.chain("inbound", hook="prerouting", prio=PRIO_FILTER)
    if local and any(s.tenant.is_loopback for s in local):
        # route_localnet also lets packets *to* 127/8 in through eth0: only the answers
        # to the connections above may.
        lo = _prefix(IPv4Network("127.0.0.0/8"))
        doc.rule(
            "inbound",
            _match(_meta("iifname"), eth),
            _match(_payload("ip", "daddr"), lo),
            _match(_ct("status"), "snat", "in"),
            _ACCEPT,
        )
        doc.rule(
            "inbound",
            _match(_meta("iifname"), eth),
            _match(_payload("ip", "daddr"), lo),
            _COUNTER,
            _DROP,
        )
    if shaped:
        for proto in ("ip", "ip6"):
            doc.rule(
                "inbound",
                _match(_meta("iifname"), eth),
                _match(_payload(proto, "dscp"), DSCP_UPLINK),
                {"mangle": {"key": _ct("mark"), "value": CTMARK_UPLINK}},
            )
        doc.rule(
            "inbound",
            _match(_meta("iifname"), eth),
            _match(_ct("mark"), CTMARK_UPLINK, "!="),
            {"mangle": {"key": _ct("mark"), "value": CTMARK_INTERNAL}},
        )
        doc.chain("classify", hook="postrouting", prio=PRIO_FILTER)
        direct = {"mangle": {"key": _meta("priority"), "value": PRIO_DIRECT}}
        doc.rule(
            "classify",
            _match(_meta("oifname"), eth),
            _match(_ct("mark"), CTMARK_INTERNAL),
            direct,
            comment="host and tenant-to-tenant connections",
        )
        doc.rule(
            "classify",
            _match(_meta("oifname"), eth),
            _match(_payload("ip", "daddr"), _prefix(site.ipv4_pool)),
            direct,
        )
        doc.rule(
            "classify",
            _match(_meta("oifname"), eth),
            _match(
                _payload("ip6", "daddr"),
                {"set": [_prefix(site.ipv6_pool), _prefix(IPv6Network("fe80::/10"))]},
            ),
            direct,
        )
    return doc.document()


# --------------------------------------------------------------------------------------
# sysctls and tc


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
        (f"net.ipv4.conf.{name}.forwarding", "1"),
        (
            f"net.ipv4.conf.{name}.route_localnet",
            "1" if any(s.host.is_loopback for s in services) else "0",
        ),
    ]
    if force_forwarding:
        out.append((f"net.ipv6.conf.{name}.force_forwarding", "1"))
    return tuple(out)


def tenant_sysctls(cfg: NetworkConfig, site: Site) -> tuple[tuple[str, str], ...]:
    """Sysctls inside every tenant namespace."""
    local = [s for s in resolve_services(cfg, site) if s.tenant_side(site.ipv4_gateway)]
    loop = any(s.tenant.is_loopback for s in local)
    return ((f"net.ipv4.conf.{site.tenant_interface}.route_localnet", "1" if loop else "0"),)


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
        out.append((f"net.ipv4.conf.{name}.forwarding", "1"))
    if force_forwarding:
        for name in (*site.uplinks, *ifnames):
            out.append((f"net.ipv6.conf.{name}.force_forwarding", "1"))
    else:
        for up in site.uplinks:
            if accept_ra.get(up) == 1:
                out.append((f"net.ipv6.conf.{up}.accept_ra", "2"))
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


# --------------------------------------------------------------------------------------
# reading live rulesets


def is_stateful(set_name: str) -> bool:
    """A set the kernel fills (conntrack counts): its elements are state, not policy."""
    return set_name.startswith("ctcount_")


def _objects(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, body) of each table object of a document nsd builds (``add`` commands) or
    of what ``nft -j list table`` returns (bare objects)."""
    for cmd in document.get("nftables", []):
        item = cmd.get("add", cmd) if isinstance(cmd, dict) else None
        if not isinstance(item, dict):
            continue
        for kind in ("chain", "rule", "set", "map"):
            if kind in item:
                yield kind, item[kind]


def summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """A comparable digest of a table: chains with their type, hook, priority and policy;
    each chain's rules (their comments, in order); every set and map with its elements
    (sorted; a stateful set's elements are left out). Works on what nsd loads and on what
    ``nft -j list table`` returns, so drift (a flushed table, a deleted chain, set or
    element, an element added by hand, rules added or removed) shows as a difference.
    Rule expressions are not compared here: libnftables lists them in a normalised form
    that differs from what nsd loads (see ``rules_of`` for how nsd still checks them)."""
    chains: dict[str, list[Any]] = {}
    rules: dict[str, list[str]] = {}
    sets: dict[str, list[str] | None] = {}
    for kind, body in _objects(document):
        if kind == "chain":
            chains[body["name"]] = [
                body.get("type"),
                body.get("hook"),
                body.get("prio"),
                body.get("policy"),
            ]
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body.get("comment", ""))
        else:
            name = body["name"]
            elems = body.get("elem", [])
            sets[name] = None if is_stateful(name) else sorted(_key(e) for e in elems)
    return {"chains": chains, "rules": rules, "sets": sets}


def rules_of(document: Mapping[str, Any]) -> str:
    """Every rule of a table, exactly, as one comparable string (handles left out,
    counters zeroed). nsd keeps this of the live table after each full load: later, the
    live rules must still read the same (a rule changed in place is drift too)."""
    out = []
    for kind, body in _objects(document):
        if kind != "rule":
            continue
        rule = {k: v for k, v in body.items() if k != "handle"}
        rule["expr"] = [
            {"counter": None} if isinstance(e, dict) and "counter" in e else e
            for e in body.get("expr", [])
        ]
        out.append(rule)
    return json.dumps(out, sort_keys=True)


def replacement(document: Mapping[str, Any], live: Mapping[str, Any] | None) -> dict[str, Any]:
    """The transaction that replaces the ``live`` table by ``document`` atomically while
    keeping its stateful sets (the conntrack counts of ``ctcount_set``).

    ``document`` (``host_document``) starts with add + delete + add of the table: right
    when there is no live table. Otherwise the table is emptied instead of deleted: flush
    (every rule), delete every set and map but the stateful ones the document declares
    too, delete every chain, then the document's content without those sets. It is one
    transaction: packets see the old or the new ruleset. It fails (NftError) if the live
    table changed since ``live`` was read; the caller then loads ``document`` as is."""
    cmds = list(document["nftables"])
    if live is None:
        return {"nftables": cmds}
    table = {"family": FAMILY, "name": TABLE}
    declared = {body["name"] for kind, body in _objects(document) if kind in ("set", "map")}
    kept: set[str] = set()
    out: list[dict[str, Any]] = [{"add": {"table": dict(table)}}, {"flush": {"table": table}}]
    chains = []
    for kind, body in _objects(live):
        ref = {"family": FAMILY, "table": TABLE, "name": str(body.get("name"))}
        if kind in ("set", "map"):
            if is_stateful(ref["name"]) and ref["name"] in declared:
                kept.add(ref["name"])
            else:
                out.append({"delete": {kind: ref}})
        elif kind == "chain":
            chains.append({"delete": {"chain": ref}})
    out += chains  # after the sets: a map element can name a chain (a verdict)
    for cmd in cmds[3:]:
        add = cmd.get("add", {})
        if any(k in add and add[k]["name"] in kept for k in ("set", "map")):
            continue
        out.append(cmd)
    return {"nftables": out}


def forward_drop_policies(ruleset: Mapping[str, Any], *, own: str = TABLE) -> list[str]:
    """Base chains of *other* tables in the forward and input hooks whose policy is drop
    (ufw, Docker, firewalld): they drop tenant traffic that nsd's table accepts, because
    an accept ends only its own chain. One readable line each."""
    out = []
    for item in ruleset.get("nftables", []):
        c = item.get("chain") if isinstance(item, dict) else None
        if not c or c.get("hook") not in ("forward", "input"):
            continue
        if c.get("family") == FAMILY and c.get("table") == own:
            continue
        if c.get("policy") == "drop":
            what = (
                "forwarded tenant traffic"
                if c["hook"] == "forward"
                else ("tenant connections to host services and DNS")
            )
            out.append(
                f"table {c.get('family')} {c.get('table')} chain {c.get('name')} "
                f"(hook {c['hook']}) has policy drop: {what} is dropped there unless that "
                "table accepts it"
            )
    return out
