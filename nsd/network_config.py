"""The ``[network]`` section of nsd.toml: its dataclasses, parsed and validated.

Only the checks that need no host facts live here; those that do (a snat address inside
the tenant pool, clashing host-service addresses) are in nsd/policy_site.py
(``check_config``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from nsd.names import valid_ifname

PROTOCOLS = ("tcp", "udp")
SOURCES = ("auto", "loopback", "tenant")
MAX_RATE_BPS = 32_000_000_000  # HTB's 32-bit byte rate; far above any per-tenant cap


class NetworkConfigError(ValueError):
    """A bad ``[network]`` value: ``key`` is the dotted key below ``network``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


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
        # A huge TOML integer cannot become a float: any such number is above the cap.
        if isinstance(value, int) and abs(value) > MAX_RATE_BPS:
            bps = math.copysign(math.inf, value > 0 or -1)
        else:
            bps = float(value) * unit
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:bit|bps|b)?\s*", value, re.I)
        if m is None:
            raise NetworkConfigError(key, f"not a rate: {value!r} (e.g. 10M, 1.5G, 500k)")
        scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
        bps = float(m.group(1)) * scale
    else:
        raise NetworkConfigError(key, "must be a number or a string such as 10M")
    if math.isnan(bps):
        raise NetworkConfigError(key, "must be a number, not nan")
    if bps < 0:
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
        # valid_ifname counts bytes (IFNAMSIZ) and refuses NUL; the old pattern did neither.
        if not valid_ifname(u) or u in ("lo", "all", "default"):
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
            # ipaddress accepts an IPv6 zone ("fe80::1%eth0"); an nft rule takes none.
            if addr is None or getattr(addr, "scope_id", None) is not None:
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
