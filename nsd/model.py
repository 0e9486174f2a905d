"""Plain data the layers pass around; no behaviour that touches the host."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, IPv6Network


class TenantState(enum.StrEnum):
    CREATING = "creating"  # intent recorded; host set-up not (yet) complete
    READY = "ready"
    REMOVING = "removing"  # removal recorded; host tear-down not (yet) complete


@dataclass(frozen=True)
class TenantRecord:
    """A tenant as the store holds it: identity, intent and its address leases."""

    uid: int
    name: str
    state: TenantState
    netns_name: str
    host_ifname: str
    ipv4_address: IPv4Address
    ipv6_prefix: IPv6Network
    adopted: bool
    created_us: int

    @property
    def ipv6_address(self) -> IPv6Address:
        # The tenant takes ::1 of its /64; the host side uses a link-local gateway.
        return self.ipv6_prefix.network_address + 1

    @functools.cached_property
    def address_texts(self) -> tuple[str, str, str]:
        """(IPv4 address, IPv6 address, IPv6 prefix) as text, as replies carry them; formatting
        IPv6 addresses is ~10% of a Get, and records are reused (Store caches them)."""
        return str(self.ipv4_address), str(self.ipv6_address), str(self.ipv6_prefix)


@dataclass(frozen=True)
class TenantView:
    """What the API reports about a tenant: the record plus live host facts."""

    record: TenantRecord
    namespace_path: str
    namespace_inode: int | None
    tenant_interface: str
    ipv4_gateway: IPv4Address
    ipv6_gateway: IPv6Address
    slice: str | None = None  # None when the host has no systemd slices
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReconcileAction:
    kind: str
    tenant: str | None
    detail: str


@dataclass
class ReconcileReport:
    actions: list[ReconcileAction] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, tenant: str | None, detail: str) -> None:
        self.actions.append(ReconcileAction(kind, tenant, detail))


@dataclass(frozen=True)
class TenantEvent:
    kind: str  # created, changed, removed, fault
    view: TenantView
    fault: Fault | None = None  # for "fault"


@dataclass(frozen=True)
class HostService:
    """A host service the tenant reaches at an address of its own namespace."""

    name: str
    address: str  # "ADDRESS:PORT" inside the tenant's namespace
    host: str  # "ADDRESS:PORT" on the host
    protocols: tuple[str, ...]


@dataclass(frozen=True)
class NetworkStatus:
    """A tenant's network policy and its state on the host; the defaults are what a
    daemon without network policy (network.enabled = false) reports."""

    enabled: bool = False
    uplinks: tuple[str, ...] = ()
    egress: str = "none"  # "masquerade", "snat ADDRESS...", or "none"
    isolation: bool = False
    allowed_to: tuple[str, ...] = ()
    allowed_from: tuple[str, ...] = ()
    conntrack_limit: int | None = None  # None: no limit
    connections: int | None = None  # tracked in the namespace now; None: unknown
    routes: tuple[str, ...] = ()
    services: tuple[HostService, ...] = ()
    egress_rate: int | None = None  # effective, bits per second; None: unlimited
    ingress_rate: int | None = None
    egress_override: int | None = None  # the tenant's own; 0 lifts a default
    ingress_override: int | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Check:
    """One finding of ``nsctl doctor``."""

    name: str
    severity: str  # ok, warning, error
    message: str


# -- faults: a tenant hit a limit (nsd.observe.faults notices them) -----------------


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process of the tenant's slice when the fault was recorded."""

    pid: int
    comm: str
    rss_bytes: int
    #: the process's cgroup below the tenant's slice, e.g. "/php-fpm@alice.service"
    cgroup: str


@dataclass(frozen=True, slots=True)
class Fault:
    uid: int
    tenant: str
    kind: str
    at_us: int  # Unix time, microseconds
    #: kernel events since the previous record of this tenant and kind (records are
    #: coalesced: a tenant at its limit can cause a hundred events a second)
    count: int
    #: the limit in force (bytes or tasks); None when unlimited ("max") or unreadable
    limit: int | None
    #: the usage at that moment (memory.current or pids.current); None if unreadable
    value: int | None
    processes: tuple[ProcessSample, ...]  # largest RSS first, at most faults.processes
    id: int | None = None  # the store's row id once stored
