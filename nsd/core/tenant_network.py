"""The core's side of the network policy: which tenants the host table lists, and each
tenant's part, from the store's records and bandwidth overrides.

nsd.net.hostnet puts the policy in place (nftables, sysctls, tc); this module decides what
it is given. Without a network policy (network.enabled = false) every method is a
no-op and GetNetwork reports the policy as disabled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from nsd.core.store import Store
from nsd.errors import NsdError
from nsd.model import (
    Check,
    NetworkStatus,
    ReconcileAction,
    ReconcileReport,
    TenantRecord,
    TenantState,
)
from nsd.net import policy as netpolicy
from nsd.net.netns import NetnsError

if TYPE_CHECKING:
    from nsd.net.hostnet import HostNetwork

log = logging.getLogger("nsd.manager")


class TenantNetworks:
    def __init__(
        self,
        hostnet: HostNetwork | None,
        cfg: netpolicy.NetworkConfig,
        store: Store,
        netns_path: Callable[[str], str],
    ) -> None:
        self._hostnet = hostnet
        self._cfg = cfg
        self._store = store
        self._netns_path = netns_path
        # Changes of the host's nft table. The whole-table load of reconcile and
        # reload computes it from the store; a tenant's removal or addition that
        # completed while that load was on its way would be undone by it.
        self._lock = asyncio.Lock()

    def reconfigure(self, cfg: netpolicy.NetworkConfig) -> None:
        """A reloaded ``[network]`` section; reconcile() applies it."""
        self._cfg = cfg
        if self._hostnet is not None:
            self._hostnet.reconfigure(cfg)

    def tenant_net(self, rec: TenantRecord) -> netpolicy.TenantNet:
        egress, ingress = self._store.bandwidth_override(rec.uid)
        bw = self._cfg.bandwidth.overlay(netpolicy.Bandwidth(egress, ingress)).effective()
        return netpolicy.TenantNet(
            rec.name, rec.uid, rec.host_ifname, rec.ipv4_address, rec.ipv6_prefix, bw
        )

    def tenants(self) -> Sequence[netpolicy.TenantNet]:
        """The tenants the host table lists: every one not being removed."""
        records = self._store.all()
        return [self.tenant_net(r) for r in records if r.state is not TenantState.REMOVING]

    @property
    def conntrack_limit(self) -> int:
        """Connections per tenant in force (0: no limit, or no network policy)."""
        return self._cfg.conntrack_limit if self._hostnet is not None and self._cfg.enabled else 0

    async def conntrack_drops(self) -> dict[str, int] | None:
        """Packets refused by the conntrack limit so far, per host veth ({} without a
        limit in force); None if they could not be read (HostNetwork.conntrack_drops)."""
        return {} if self._hostnet is None else await self._hostnet.conntrack_drops()

    async def apply_host(self) -> None:
        """Load the host table before any tenant veth is touched (fail closed)."""
        if self._hostnet is None:
            return
        async with self._lock:
            rep = await self._hostnet.apply_host(self.tenants())
        for a in rep.actions:
            log.info("network: %s", a)
        for p in rep.problems:
            log.warning("network: %s", p)

    async def apply_tenant(self, rec: TenantRecord) -> tuple[str, ...]:
        """The tenant's part: its elements in the host table, its namespace's table,
        sysctls and shaping. Returns what was changed."""
        if self._hostnet is None:
            return ()
        # The host table must name this veth before traffic through it is allowed: one
        # element transaction (the full table only when the incremental path fails).
        net = self.tenant_net(rec)
        async with self._lock:
            rep = await self._hostnet.set_tenant(net, self.tenants)
            rep.extend(await self._hostnet.apply_tenant(net, self._netns_path(rec.netns_name)))
        for p in rep.problems:
            log.warning("tenant %s: %s", rec.name, p)
        return tuple(rep.actions)

    async def remove_tenant(self, rec: TenantRecord) -> None:
        """Take the tenant's elements out of the host table (after its record is gone)."""
        if self._hostnet is None:
            return
        async with self._lock:
            rep = await self._hostnet.remove_tenant(rec.uid, self.tenants)
        for p in rep.problems:
            log.warning("tenant %s: %s", rec.name, p)

    async def status(self, rec: TenantRecord) -> NetworkStatus:
        if self._hostnet is None:
            return NetworkStatus(enabled=False)
        status = await self._hostnet.tenant_status(
            self.tenant_net(rec), self._netns_path(rec.netns_name)
        )
        egress, ingress = self._store.bandwidth_override(rec.uid)
        return replace(status, egress_override=egress, ingress_override=ingress)

    async def reconcile(self, report: ReconcileReport) -> None:
        """Re-read the host's facts and re-apply the whole policy, once for all tenants."""
        if self._hostnet is None:
            return
        try:
            await self._hostnet.refresh_site()
            async with self._lock:  # the store read and the load, as one
                rep = await self._hostnet.apply(
                    self.tenants(),
                    {r.uid: self._netns_path(r.netns_name) for r in self._store.all()},
                )
            report.actions += [ReconcileAction("network", None, a) for a in rep.actions]
            report.problems += rep.problems
            report.problems += await self._hostnet.foreign_drop_policies()
        except (NsdError, NetnsError, OSError, ValueError) as e:
            report.problems.append(f"network policy: {e}")

    async def checks(self) -> list[Check]:
        """For ``nsctl doctor``."""
        if self._hostnet is None:
            return [Check("nftables", "ok", "network policy disabled (network.enabled)")]
        return await self._hostnet.checks()
