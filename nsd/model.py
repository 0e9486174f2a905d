"""Plain data the layers pass around; no behaviour that touches the host."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .faults import Fault


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
        """(ipv4Address, ipv6Address, ipv6Prefix) as the API writes them; formatting
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
