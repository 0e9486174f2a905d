"""Address allocation: stable IPv4 and IPv6 per tenant, never duplicated.

Two strategies:

* ``pool``: the lowest free address of ``ipv4_pool`` and the lowest free /64 of
  the IPv6 prefix. Every host-side veth shares one gateway address, so a tenant
  costs exactly one IPv4 address.
* ``uid``: address = pool start + (uid - uid_offset), /64 number = uid -
  uid_offset. Deterministic, for hosts migrating from a per-user layout whose
  proxy configuration already encodes UID-derived addresses.

Released addresses stay quarantined for ``quarantine_seconds`` (a proxy may
still point at them) before another tenant can get them; the tenant that held
one gets its old address back if it returns within that time.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Generic, TypeVar

from nsd.config import IpamConfig, TenantsConfig
from nsd.core.store import LeaseIndex, Store, now_us
from nsd.errors import AddressConflict, AddressPoolExhausted

ULA_META_KEY = "ipv6_ula_prefix"

T = TypeVar("T")


class _Candidates(Generic[T]):
    """A pool's candidates in allocation order, each with its text as the store keeps
    it, formatted once: formatting each anew with ``ipaddress`` (~20 µs for an IPv6
    network) made the search 20-40 ms per Create at 1,000 tenants, on the event loop,
    where it also held the GIL that the netns worker needs after each system call.

    The search starts at ``_floor``: every candidate below it was active when last
    looked at. An active lease stops being one only by a release (LeaseIndex.releases
    counts them), so until the next release the floor holds, and a Create on a pool
    filled from the start looks at one candidate instead of all (~0.2 ms per Create
    at 1,000 tenants). Quarantined candidates never raise the floor: their quarantine
    ends with time, not with an event."""

    def __init__(self, source: Iterator[T]) -> None:
        self._source: Iterator[T] = source
        self._known: list[tuple[str, T]] = []
        self._floor = 0
        self._floor_of: tuple[LeaseIndex, int] | None = None

    def _from(self, start: int) -> Iterator[tuple[str, T]]:
        for i in range(start, len(self._known)):
            yield self._known[i]
        for item in self._source:
            entry = (str(item), item)
            self._known.append(entry)
            yield entry

    def first_free(self, leases: LeaseIndex, quarantine_since_us: int) -> T | None:
        if self._floor_of != (leases, leases.releases):
            self._floor = 0
        position, contiguous = self._floor, True
        # LeaseIndex.taken(), inlined: this loop passes every taken address
        active, quarantined = leases.active, leases.quarantined
        found: T | None = None
        for text, item in self._from(position):
            if text in active:
                position += 1
                if contiguous:
                    self._floor = position
                continue
            contiguous = False
            held = quarantined.get(text)
            if held is None or held[0] <= quarantine_since_us:
                found = item
                break
        self._floor_of = (leases, leases.releases)
        return found


def ula_prefix(cfg: IpamConfig, store: Store) -> IPv6Network:
    """The IPv6 prefix tenants' /64s come from.

    Configured, or a ULA /48 generated once (RFC 4193: fd00::/8 plus a random
    40-bit global ID) and persisted, so addresses are stable across restarts.
    """
    if cfg.ipv6_prefix:
        return IPv6Network(cfg.ipv6_prefix)
    stored = store.get_meta(ULA_META_KEY)
    if stored is not None:
        return IPv6Network(stored)
    global_id = int.from_bytes(secrets.token_bytes(5), "big")
    prefix = IPv6Network(((0xFD << 120) | (global_id << 80), 48))
    store.set_meta(ULA_META_KEY, str(prefix))
    return prefix


class Ipam:
    def __init__(self, cfg: IpamConfig, tenants: TenantsConfig, store: Store) -> None:
        self.cfg = cfg
        self.tenants = tenants
        self.store = store
        self.ipv4_pool: IPv4Network = cfg.ipv4_network
        self.ipv4_gateway: IPv4Address = cfg.ipv4_gateway_address
        self.ipv6_base: IPv6Network = ula_prefix(cfg, store)
        self.ipv6_gateway = IPv6Address(cfg.ipv6_gateway)
        gateway = self.ipv4_gateway
        self._free4 = _Candidates(a for a in self.ipv4_pool.hosts() if a != gateway)
        # /64 number 0 is left out: it would be the base prefix itself, which
        # operators tend to use for the host.
        self._free6 = _Candidates(iter(_subnets64(self.ipv6_base, start=1)))

    def purge_expired(self) -> int:
        """Delete released leases whose quarantine has ended; how many went.

        Nothing reads them any more (allocation only looks at leases released within
        the quarantine), so without this every removal would leave two rows forever.
        """
        return self.store.purge_quarantine(now_us() - self.cfg.quarantine_seconds * 1_000_000)

    def allocate(self, uid: int) -> tuple[IPv4Address, IPv6Network]:
        """Choose addresses for ``uid``. The caller records them in the same loop turn."""
        since = now_us() - self.cfg.quarantine_seconds * 1_000_000
        if self.cfg.strategy == "uid":
            return self._by_uid(uid, since)
        prev4 = self.store.previous_address(4, uid, since)
        prev6 = self.store.previous_address(6, uid, since)
        v4 = IPv4Address(prev4) if prev4 else self._first_free4(since)
        v6 = IPv6Network(prev6) if prev6 else self._first_free6(since)
        if v4 not in self.ipv4_pool:  # the pool was reconfigured since
            v4 = self._first_free4(since)
        return v4, v6

    def _first_free4(self, since: int) -> IPv4Address:
        addr = self._free4.first_free(self.store.leases(4), since)
        if addr is None:
            raise AddressPoolExhausted("ipv4", str(self.ipv4_pool))
        return addr

    def _first_free6(self, since: int) -> IPv6Network:
        net = self._free6.first_free(self.store.leases(6), since)
        if net is None:
            raise AddressPoolExhausted("ipv6", str(self.ipv6_base))
        return net

    def _by_uid(self, uid: int, since: int) -> tuple[IPv4Address, IPv6Network]:
        offset = uid - self.cfg.uid_offset
        v4 = self.ipv4_pool.network_address + offset
        if (
            offset <= 0
            or v4 not in self.ipv4_pool
            or v4 in (self.ipv4_pool.broadcast_address, self.ipv4_gateway)
        ):
            raise AddressPoolExhausted("ipv4", str(self.ipv4_pool))
        count6 = 1 << (64 - self.ipv6_base.prefixlen)
        if offset >= count6:
            raise AddressPoolExhausted("ipv6", str(self.ipv6_base))
        v6 = IPv6Network((int(self.ipv6_base.network_address) + (offset << 64), 64))
        # A uid-derived address can only collide with a lease that another
        # strategy handed out earlier; quarantine does not apply to it.
        for family, pool, address in ((4, self.ipv4_pool, str(v4)), (6, self.ipv6_base, str(v6))):
            taken = self.store.address_taken(family, address, since)
            if taken and address != self.store.previous_address(family, uid, since):
                raise AddressConflict(f"ipv{family}", str(pool), address)
        return v4, v6

    def overlaps(self, routes: Iterable[IPv4Network | IPv6Network]) -> list[str]:
        """Host routes that overlap nsd's pools, as readable problems.

        100.64.0.0/10 is also used by carrier-grade NAT and VPN meshes; handing
        out an address that the host routes elsewhere breaks both silently.
        """
        problems = []
        for route in routes:
            for pool in (self.ipv4_pool, self.ipv6_base):
                if route.version == pool.version and route.overlaps(pool):
                    problems.append(f"host route {route} overlaps nsd pool {pool}")
        return problems


def _subnets64(base: IPv6Network, start: int) -> Iterable[IPv6Network]:
    count = 1 << (64 - base.prefixlen)
    first = int(base.network_address)
    for i in range(start, count):
        yield IPv6Network((first + (i << 64), 64))
