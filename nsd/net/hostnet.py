"""Applies the network policy to the host: nftables, sysctls, tc. Async facade.

``nsd.net.policy`` derives documents and plans (pure); this module puts them in place on
the netns worker thread (``NetnsAdapter.run_in_namespace``): libnftables (``nsd.net.nft``)
and sysctl writes in the right namespace (through the worker's own procfs), tc through
pyroute2 (``nsd.net.shaping``).

Order, so that nothing is ever open that should not be (fail closed):

1. the host table first, before any tenant veth exists (daemon start) -- its rules
   treat every interface with nsd's link prefix as a tenant's and drop what such an
   interface sends until the table knows it;
2. forwarding sysctls, only for the uplinks and nsd's veths;
3. per tenant: its namespace's table and sysctls, then the tc qdiscs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from nsd.model import Check, HostService, NetworkStatus
from nsd.net import nft, shaping
from nsd.net import policy as npol
from nsd.net.netns import NetnsAdapter, NetnsError
from nsd.net.sysctl_files import SysctlFiles

log = logging.getLogger("nsd.network")

T = TypeVar("T")

RT_TABLE_MAIN = 254


@dataclass
class NetworkReport:
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: NetworkReport) -> None:
        self.actions += other.actions
        self.problems += other.problems


def _write_sysctls(
    pairs: Sequence[tuple[str, str]], where: str, files: SysctlFiles
) -> tuple[list[str], list[str]]:
    """Write ``pairs`` in the calling thread's namespace through ``files``
    (HostNetwork._sysctl_files); (changes, problems)."""
    changed: list[str] = []
    problems: list[str] = []
    for key, value in pairs:
        try:
            if not files.ensure(key, value):
                continue
        except OSError as e:
            problems.append(f"cannot set {key}={value} ({where}): {e.strerror}")
            continue
        changed.append(f"set {key}={value} ({where})")
    return changed, problems


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class _LiveInside:
    """What a tenant's namespace holds right now (GetNetwork)."""

    routes: tuple[str, ...]
    shaping: shaping.ShapingState | None
    connections: int | None


def _live_inside(ipr: Any, tenant_interface: str) -> _LiveInside:
    """Read in the tenant's namespace (on the netns worker thread)."""
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            dst, gateway = r.get_attr("RTA_DST"), r.get_attr("RTA_GATEWAY")
            routes.append((f"{dst}/{r['dst_len']}" if dst else "default")
                          + (f" via {gateway}" if gateway else ""))  # fmt: skip
    count = _read("/proc/sys/net/netfilter/nf_conntrack_count")
    return _LiveInside(
        tuple(routes),
        shaping.state(ipr, tenant_interface),
        int(count) if count is not None else None,
    )


def _egress(cfg: npol.NetworkConfig, tenant: str) -> str:
    """How the tenant's internet traffic leaves: "none", "snat ADDRESS...", "masquerade"."""
    if cfg.egress == "none" or not cfg.enabled:
        return "none"
    snat4, snat6 = cfg.snat.get(tenant, (None, None))
    if snat4 is not None or snat6 is not None:
        return "snat " + " ".join(str(a) for a in (snat4, snat6) if a is not None)
    return "masquerade"


def _apply_document(document: Mapping[str, Any] | None, what: str) -> list[str]:
    """Replace nsd's table with ``document`` (delete it for None) if the live table
    differs; runs in the calling thread's namespace. For the tables inside tenant
    namespaces, which hold no state of their own."""
    live = nft.list_table()
    if document is None:
        if live is not None:
            nft.delete_table()
            return [f"deleted table inet nsd ({what})"]
        return []
    if live is not None and npol.summary(live) == npol.summary(document):
        return []
    nft.apply(document)
    return [("loaded" if live is None else "replaced") + f" table inet nsd ({what})"]


def _force_forwarding() -> bool:
    """The kernel has per-interface IPv6 forwarding (Linux 6.17+)."""
    return os.path.exists("/proc/sys/net/ipv6/conf/all/force_forwarding")


def _default_route_links(ipr: Any) -> list[str]:
    """Interfaces of the default routes of the main table (IPv4 and IPv6)."""
    names: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if int(r["dst_len"]) != 0 or r.get_attr("RTA_TABLE") not in (None, RT_TABLE_MAIN):
                continue
            oifs = [r.get_attr("RTA_OIF")]
            multipath = r.get_attr("RTA_MULTIPATH") or []
            oifs += [hop["oif"] for hop in multipath]
            for oif in oifs:
                if not oif:
                    continue
                for link in ipr.get_links(oif):
                    name = link.get_attr("IFLA_IFNAME")
                    if name and name not in names:
                        names.append(name)
    return names


class HostNetwork:
    """The network policy of one host: derive, apply, repair, report."""

    def __init__(
        self,
        cfg: npol.NetworkConfig,
        net: NetnsAdapter,
        *,
        ipv4_gateway: IPv4Address,
        ipv6_gateway: IPv6Address,
        ipv4_pool: IPv4Network,
        ipv6_pool: IPv6Network,
        tenant_interface: str = "eth0",
        link_prefix: str = "nsd",
        resolv_conf: str = "/etc/resolv.conf",
    ) -> None:
        self.cfg = cfg
        self.net = net
        self.resolv_conf = resolv_conf
        self.site = npol.Site(
            ipv4_gateway=ipv4_gateway,
            ipv6_gateway=ipv6_gateway,
            ipv4_pool=ipv4_pool,
            ipv6_pool=ipv6_pool,
            tenant_interface=tenant_interface,
            link_prefix=link_prefix,
            uplinks=cfg.uplinks,
        )
        self.forwarding_notes: tuple[str, ...] = ()
        # The tenants whose elements nsd put into the live host table (by uid and by
        # name), since the last full load; None: no full load yet in this process. The
        # incremental path (set_tenant, remove_tenant) derives element changes from it.
        self._loaded: dict[int, npol.TenantNet] | None = None
        self._names: dict[str, npol.TenantNet] = {}
        # (rules of the document, rules of the live table right after loading it):
        # lets a later comparison check every rule exactly (npol.rules_of)
        self._rules: tuple[str, str] | None = None

    def reconfigure(self, cfg: npol.NetworkConfig) -> None:
        """Take a reloaded ``[network]`` section; the next apply (reconcile) enacts it."""
        self.cfg = cfg

    # -- host facts ----------------------------------------------------------------------

    async def refresh_site(self) -> npol.Site:
        """Re-read what the policy depends on: uplinks (configured, or the interfaces of
        the default routes) and the host's loopback resolvers."""
        uplinks = self.cfg.uplinks
        if not uplinks:
            found = await self.net.run_in_namespace(None, _default_route_links)
            uplinks = tuple(n for n in found if not n.startswith(self.site.link_prefix))
        resolvers: tuple[IPv4Address, ...] = ()
        if self.cfg.dns == "auto":
            try:
                with open(self.resolv_conf, encoding="utf-8", errors="replace") as f:
                    resolvers = npol.loopback_resolvers(f.read())
            except OSError as e:
                log.warning("cannot read %s: %s", self.resolv_conf, e.strerror)
        self.site = replace(self.site, uplinks=uplinks, loopback_resolvers=resolvers)
        npol.check_config(self.cfg, self.site)
        return self.site

    def _in(self, path: str | None, fn: Callable[[Any], T]) -> Awaitable[T]:
        return self.net.run_in_namespace(path, fn)

    # -- applying ------------------------------------------------------------------------

    async def apply_host(self, tenants: Sequence[npol.TenantNet]) -> NetworkReport:
        """The host table and the forwarding sysctls, in full (daemon start, reconcile,
        and the fallback of the incremental path): O(tenants). Raises nft.NftError if
        the table cannot be loaded (the caller fails closed: no tenant veth comes up)."""
        report = NetworkReport()
        # Recorded before the first await: an incremental change queued after this one
        # on the worker thread builds on these tenants.
        self._remember(tenants)
        if not self.cfg.enabled:
            report.actions += await self._in(None, lambda _i: _apply_document(None, "host"))
            return report
        document = npol.host_document(self.cfg, self.site, tenants)
        report.actions += await self._in(None, lambda _i: self._load_host(document))
        # One dump of the host's links (the adapter's raw socket), not one lookup per
        # tenant.
        links = set(await self.net.list_prefixed_links())
        report.extend(await self._in(None, lambda _ipr: self._forwarding(tenants, links)))
        return report

    def _sysctl_files(self) -> SysctlFiles:
        """On the worker, once per namespace visited: where ``_write_sysctls`` opens
        (the worker's own procfs: nsd/net/sysctl_files.py says why)."""
        files = self.net.worker_sysctl_files
        files.next_namespace()
        return files

    def _remember(self, tenants: Sequence[npol.TenantNet]) -> None:
        self._loaded = {t.uid: t for t in tenants}
        self._names = {t.name: t for t in tenants}

    def _load_host(self, document: Mapping[str, Any]) -> list[str]:
        """On the worker, in the host namespace: replace the host table by ``document``
        unless the live table already equals it; keep the conntrack counts."""
        live = nft.list_table()
        if live is not None and self._matches(live, document):
            return []
        action = ("loaded" if live is None else "replaced") + " table inet nsd (host)"
        try:
            nft.run(npol.replacement(document, live))
        except nft.NftError as e:
            # The live table changed between the read and the load, or a stateful set
            # there is not what nsd declares: replace it outright (counts restart).
            log.warning("keeping the conntrack counts failed (%s); replacing the table", e)
            nft.apply(document)
            action += ", conntrack counts restarted"
        loaded = nft.list_table()
        self._rules = (npol.rules_of(document), npol.rules_of(loaded or {}))
        return [action]

    def _matches(self, live: Mapping[str, Any], document: Mapping[str, Any]) -> bool:
        if npol.summary(live) != npol.summary(document):
            return False
        # Rules exactly, when nsd has seen this document's rules loaded (in this
        # process); else by chain, count and comment only (npol.summary).
        if self._rules is not None and self._rules[0] == npol.rules_of(document):
            return self._rules[1] == npol.rules_of(live)
        return True

    async def set_tenant(
        self, tenant: npol.TenantNet, everyone: Callable[[], Sequence[npol.TenantNet]]
    ) -> NetworkReport:
        """Add ``tenant`` to the host table, or bring its elements up to date (a new
        bandwidth limit): one element transaction, O(1) in the number of tenants.
        ``everyone``: all tenants, called only when the incremental path cannot be
        taken (no full load yet, or the live table is not what nsd left)."""
        if self._loaded is None or not self.cfg.enabled:
            return await self.apply_host(everyone())
        old = self._loaded.get(tenant.uid)
        present = dict(self._names)
        if old is not None:
            present.pop(old.name, None)
        before = npol.tenant_elements(self.cfg, old, self._names) if old is not None else {}
        present[tenant.name] = tenant
        after = npol.tenant_elements(self.cfg, tenant, present)
        # Recorded before the await: a change of another tenant computed meanwhile (an
        # allowed pair between the two) sees this one; the worker runs them in order.
        self._loaded[tenant.uid] = tenant
        self._names = present
        return await self._change_elements(before, after, tenant.name, everyone)

    async def remove_tenant(
        self, uid: int, everyone: Callable[[], Sequence[npol.TenantNet]]
    ) -> NetworkReport:
        """Take tenant ``uid`` out of the host table: one element transaction. Call
        after its veth is gone; a failure is a problem in the report, not an error."""
        if self._loaded is None or not self.cfg.enabled:
            return await self.apply_host(everyone())
        old = self._loaded.get(uid)
        if old is None:
            return NetworkReport()
        before = npol.tenant_elements(self.cfg, old, self._names)
        del self._loaded[uid]
        self._names.pop(old.name, None)
        try:
            return await self._change_elements(before, {}, old.name, everyone)
        except nft.NftError as e:
            # The tenant's veth is gone already: nothing is open that should not be,
            # and reconcile loads the table again.
            return NetworkReport(problems=[f"cannot reload table inet nsd: {e}"])

    async def _change_elements(
        self,
        before: npol.Elements,
        after: npol.Elements,
        name: str,
        everyone: Callable[[], Sequence[npol.TenantNet]],
    ) -> NetworkReport:
        report = NetworkReport()
        change = npol.element_changes(before, after)
        if change is None:
            return report
        try:
            await self._in(None, lambda _i: nft.run(change))
        except nft.NftError as e:
            # Elements nsd did not expect (someone edited or deleted the table):
            # derive the whole table from state and replace it.
            log.warning("network: tenant %s: element update failed (%s); reloading", name, e)
            return await self.apply_host(everyone())
        report.actions.append(f"updated the elements of tenant {name} in table inet nsd (host)")
        return report

    def _forwarding(self, tenants: Sequence[npol.TenantNet], links: set[str]) -> NetworkReport:
        report = NetworkReport()
        force = _force_forwarding()
        accept_ra = {}
        for up in self.site.uplinks:
            value = _read(f"/proc/sys/net/ipv6/conf/{up}/accept_ra")
            if value is None:
                report.problems.append(f"uplink {up} does not exist")
            else:
                accept_ra[up] = int(value)
        plan = npol.forwarding_plan(
            replace(self.site, uplinks=tuple(accept_ra)),
            [t.host_ifname for t in tenants if t.host_ifname in links],
            force_forwarding=force,
            accept_ra=accept_ra,
        )
        self.forwarding_notes = plan.notes
        changed, problems = _write_sysctls(plan.sysctls, "host", self._sysctl_files())
        report.actions += changed
        report.problems += problems
        return report

    async def apply_tenant(self, tenant: npol.TenantNet, netns_path: str) -> NetworkReport:
        """One tenant's namespace table, sysctls and qdiscs, and its host-side sysctls
        and qdisc. Call after its veth exists and after ``apply_host`` knows it."""
        report = NetworkReport()
        cfg, site = self.cfg, self.site
        enabled = cfg.enabled
        document = npol.tenant_document(cfg, site, tenant) if enabled else None
        plan = npol.shaping_plan(site, tenant)
        tenant_sysctls = npol.tenant_sysctls(cfg, site) if enabled else ()
        host_sysctls = (
            npol.host_interface_sysctls(cfg, site, tenant, force_forwarding=_force_forwarding())
            if enabled
            else ()
        )

        def inside(ipr: Any) -> NetworkReport:
            r = NetworkReport()
            changed, problems = _write_sysctls(tenant_sysctls, tenant.name, self._sysctl_files())
            r.actions += changed
            r.problems += problems
            r.actions += _apply_document(document, tenant.name)
            r.actions += shaping.ensure(
                ipr, plan.tenant_ifname, plan.egress_bps if enabled else None, default_limited=True
            )
            return r

        def host_side(ipr: Any) -> NetworkReport:
            r = NetworkReport()
            changed, problems = _write_sysctls(host_sysctls, "host", self._sysctl_files())
            r.actions += changed
            r.problems += problems
            r.actions += shaping.ensure(
                ipr, plan.host_ifname, plan.ingress_bps if enabled else None, default_limited=False
            )
            return r

        for path, fn in ((netns_path, inside), (None, host_side)):
            try:
                report.extend(await self._in(path, fn))
            except (nft.NftError, shaping.ShapingError, NetnsError) as e:
                report.problems.append(f"tenant {tenant.name}: {e}")
        return report

    async def apply(
        self, tenants: Sequence[npol.TenantNet], netns_paths: Mapping[int, str]
    ) -> NetworkReport:
        """Everything: host table, forwarding, every tenant (reconcile)."""
        report = await self.apply_host(tenants)
        for t in tenants:
            path = netns_paths.get(t.uid)
            if path is not None and self.net.namespace_inode(path) is not None:
                report.extend(await self.apply_tenant(t, path))
        return report

    # -- reading ---------------------------------------------------------------------------

    async def tenant_status(self, tenant: npol.TenantNet, netns_path: str) -> NetworkStatus:
        """What ``nsctl net USER`` shows (without the tenant's overrides: the store's)."""
        cfg, site = self.cfg, self.site
        problems: list[str] = []
        try:
            inner = await self._in(netns_path, lambda ipr: _live_inside(ipr, site.tenant_interface))
            host_shaping = await self._in(None, lambda ipr: shaping.state(ipr, tenant.host_ifname))
        except (NetnsError, nft.NftError, shaping.ShapingError) as e:
            problems.append(str(e))
            inner, host_shaping = _LiveInside((), None, None), None
        live_up = inner.shaping.rate_bps if inner.shaping else None
        live_down = host_shaping.rate_bps if host_shaping else None
        if tenant.bandwidth.egress_bps != live_up:
            problems.append("upload limit not in effect (reconcile repairs it)")
        if tenant.bandwidth.ingress_bps != live_down:
            problems.append("download limit not in effect (reconcile repairs it)")
        return NetworkStatus(
            enabled=cfg.enabled,
            uplinks=tuple(site.uplinks),
            egress=_egress(cfg, tenant.name),
            isolation=cfg.isolation,
            allowed_to=tuple(sorted(dst for src, dst in cfg.allow if src == tenant.name)),
            allowed_from=tuple(sorted(src for src, dst in cfg.allow if dst == tenant.name)),
            conntrack_limit=cfg.conntrack_limit or None,
            connections=inner.connections,
            routes=inner.routes,
            services=tuple(
                HostService(
                    s.name,
                    f"{s.tenant}:{s.tenant_port}",
                    f"{s.host}:{s.host_port}",
                    tuple(s.protocols),
                )
                for s in npol.resolve_services(cfg, site)
            ),
            egress_rate=tenant.bandwidth.egress_bps,
            ingress_rate=tenant.bandwidth.ingress_bps,
            problems=tuple(problems),
        )

    async def checks(self) -> list[Check]:
        """For ``nsctl doctor``: libnftables, nsd's table, forwarding, drop policies of
        other tables in the forward and input hooks."""
        out: list[Check] = []
        reason = nft.available()
        if reason is not None:
            return [Check("nftables", "error", reason)]
        if not self.cfg.enabled:
            return [Check("nftables", "ok", "network policy disabled (network.enabled)")]

        def probe(_ipr: Any) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
            return nft.list_table(), nft.list_ruleset(), _read("/proc/net/ip_tables_names")

        table, ruleset, legacy = await self._in(None, probe)
        if table is None:
            out.append(Check("nftables", "error", "table inet nsd is missing (reconcile loads it)"))
        else:
            out.append(Check("nftables", "ok", "table inet nsd is loaded"))
        drops = npol.forward_drop_policies(ruleset)
        for line in drops:
            out.append(Check("foreign-drop-policy", "warning", line))
        if legacy:
            out.append(
                Check(
                    "iptables-legacy",
                    "warning",
                    f"legacy iptables tables are in use ({legacy.replace(chr(10), ' ')}):"
                    " nsd cannot see whether they drop tenant traffic",
                )
            )
        if not self.site.uplinks:
            out.append(
                Check(
                    "uplinks",
                    "warning",
                    "no uplink (network.uplinks empty and no default route): "
                    "tenants have no internet access",
                )
            )
        else:
            out.append(Check("uplinks", "ok", "egress through " + ", ".join(self.site.uplinks)))
        force = _force_forwarding()
        out.append(
            Check(
                "forwarding",
                "ok" if force else "warning",
                "IPv4 forwarding per interface, IPv6 by force_forwarding per interface"
                if force
                else "; ".join(self.forwarding_notes)
                or "IPv6 forwarding needs net.ipv6.conf.all.forwarding (kernel < 6.17)",
            )
        )
        return out

    async def foreign_drop_policies(self) -> list[str]:
        ruleset = await self._in(None, lambda _i: nft.list_ruleset())
        return npol.forward_drop_policies(ruleset)

    async def conntrack_drops(self) -> dict[str, int] | None:
        """Packets refused by the conntrack limit so far, per host veth (the counters of
        ``npol.CTDROPS_SET``); {} when no limit is in force; None if the set cannot be
        read.

        nftables has no change notification for counters, so the fault service calls
        this once per metrics sample: one netlink dump of one set on the netns worker
        (its elements are the veths that ever had a connection refused, not every
        tenant)."""
        if not self.cfg.enabled or self.cfg.conntrack_limit <= 0:
            return {}
        try:
            listing = await self._in(None, lambda _i: nft.list_set(npol.CTDROPS_SET))
        except (nft.NftError, NetnsError) as e:
            log.warning("cannot read the conntrack drops: %s", e)
            return None
        return {} if listing is None else npol.element_counters(listing)
