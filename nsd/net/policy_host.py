"""The ``inet nsd`` table of the host namespace: egress NAT, isolation, host services,
conntrack limits and the marks for bandwidth shaping.

Tenants appear in it only as elements of named sets and maps (:data:`TENANT_SETS`,
:func:`tenant_elements`); chains and rules depend on the configuration and the site
alone. So one tenant's creation or removal is an element transaction
(:func:`element_changes`) that leaves the table equal to the derived one. The model is
explained in docs/networking.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv6Network
from typing import Any

from nsd.net.policy_plan import DSCP_UPLINK, PRIO_LIMITED
from nsd.net.policy_rules import (
    ACCEPT,
    COUNTER,
    CTDROPS_SET,
    DROP,
    FAMILY,
    PRIO_DSTNAT,
    PRIO_FILTER,
    PRIO_RAW_MANGLE,
    PRIO_SRCNAT,
    TABLE,
    Document,
    ct,
    dport,
    element_key,
    jump,
    l4proto,
    match,
    meta,
    payload,
    prefix,
    set_ref,
    wildcard,
)
from nsd.net.policy_site import ResolvedService, Site, TenantNet, resolve_services
from nsd.network_config import NetworkConfig

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
        "tenant_src6": [{"concat": [t.host_ifname, prefix(t.ipv6_prefix)]}],
    }
    if t.bandwidth.egress_bps is not None:
        out["upload_shaped"] = [t.host_ifname]
    if t.bandwidth.ingress_bps is not None:
        out["download_shaped"] = [t.host_ifname]
    v4, v6 = cfg.snat.get(t.name, (None, None))
    if v4 is not None:
        out["snat4"] = [[str(t.ipv4), str(v4)]]
    if v6 is not None:
        out["snat6"] = [[prefix(t.ipv6_prefix), str(v6)]]
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


def all_elements(cfg: NetworkConfig, tenants: Sequence[TenantNet]) -> Elements:
    """Every tenant's elements, each once (an allowed pair comes from both ends)."""
    by_name = {t.name: t for t in tenants}
    out: dict[str, dict[str, Any]] = {name: {} for name in TENANT_SETS}
    for t in sorted(tenants, key=lambda t: t.uid):
        for name, elems in tenant_elements(cfg, t, by_name).items():
            for e in elems:
                out[name].setdefault(element_key(e), e)
    return {name: list(elems.values()) for name, elems in out.items()}


def element_changes(old: Elements, new: Elements) -> dict[str, Any] | None:
    """The transaction that turns the elements ``old`` into ``new`` in the live host
    table (deletions first), or None if they are equal."""
    cmds: list[dict[str, Any]] = []
    adds: list[dict[str, Any]] = []
    for name in TENANT_SETS:
        before = {element_key(e): e for e in old.get(name, [])}
        after = {element_key(e): e for e in new.get(name, [])}
        gone = [e for k, e in before.items() if k not in after]
        added = [e for k, e in after.items() if k not in before]
        ref = {"family": FAMILY, "table": TABLE, "name": name}
        if gone:
            cmds.append({"delete": {"element": dict(ref, elem=gone)}})
        if added:
            adds.append({"add": {"element": dict(ref, elem=added)}})
    cmds += adds
    return {"nftables": cmds} if cmds else None


def _tenant_chain(doc: Document, name: str) -> None:
    """A chain for traffic from tenant veths: replies pass, invalid packets and
    interfaces nsd did not make (``nsd*`` names it does not know: fail closed) drop."""
    doc.chain(name)
    doc.rule(name, match(ct("state"), {"set": ["established", "related"]}), ACCEPT)
    doc.rule(name, match(ct("state"), "invalid"), DROP)
    doc.rule(
        name,
        match(meta("iifname"), set_ref("tenant_ifs"), "!="),
        COUNTER,
        DROP,
        comment="not a known tenant interface",
    )


def host_document(cfg: NetworkConfig, site: Site, tenants: Sequence[TenantNet]) -> dict[str, Any]:
    """The ``inet nsd`` table of the host namespace, top to bottom.

    Tenants appear only as elements of the named sets and maps of ``TENANT_SETS``
    (``tenant_elements``); chains and rules depend on the configuration and the site
    alone. That is what lets nsd add or remove one tenant with an element transaction
    (``element_changes``) that leaves the table equal to this document."""
    services = resolve_services(cfg, site)
    doc = Document("nsd: tenant egress, isolation, host services; replaced by nsd on every change")
    doc.set("uplinks", "ifname", list(site.uplinks))
    for name, elems in all_elements(cfg, tenants).items():
        type_, interval, data = TENANT_SETS[name]
        doc.set(name, type_, elems, interval=interval, map_=data)
    _guard(doc, cfg, site)
    if services:
        _host_services(doc, services, site)
    _tenant_to_host(doc, cfg, site)
    _shaping_marks(doc)
    _forward(doc, cfg, site)
    _egress_nat(doc, cfg, site)
    return doc.document()


def _guard(doc: Document, cfg: NetworkConfig, site: Site) -> None:
    """prerouting: anti-spoofing and per-tenant conntrack limits."""
    wild = wildcard(site.link_prefix)
    doc.chain("guard", hook="prerouting", prio=PRIO_RAW_MANGLE)
    # A tenant sends from its own addresses only (link-local and :: for neighbour discovery
    # and DAD). Interfaces with nsd's prefix that the table does not know yet match no
    # element, so everything they send is dropped until nsd knows them: fail closed.
    doc.rule(
        "guard",
        match(meta("iifname"), wild),
        match(meta("nfproto"), "ipv4"),
        match({"concat": [meta("iifname"), payload("ip", "saddr")]}, set_ref("tenant_src4"), "!="),
        COUNTER,
        DROP,
        comment="spoofed IPv4 source",
    )
    doc.rule(
        "guard",
        match(meta("iifname"), wild),
        match(payload("ip6", "saddr"), {"set": [prefix(IPv6Network("fe80::/10")), "::"]}, "!="),
        match({"concat": [meta("iifname"), payload("ip6", "saddr")]}, set_ref("tenant_src6"), "!="),
        COUNTER,
        DROP,
        comment="spoofed IPv6 source",
    )
    if cfg.conntrack_limit > 0:
        # One element per tenant interface, created by the first new connection, each
        # counting that interface's connections: no per-tenant rule or chain.
        # The packets over the limit also land in CTDROPS_SET, whose element per
        # interface counts them: the drops of each tenant (the rule's own counter is
        # every tenant's together).
        counts = ctcount_set(cfg.conntrack_limit)
        doc.set(counts, "ifname", [], dynamic_size=CTCOUNT_SIZE)
        doc.set(CTDROPS_SET, "ifname", [], dynamic_size=CTCOUNT_SIZE, counter=True)
        doc.rule(
            "guard",
            match(meta("iifname"), wild),
            match(ct("state"), "new"),
            {
                "set": {
                    "op": "add",
                    "elem": meta("iifname"),
                    "set": set_ref(counts),
                    "stmt": [{"ct count": {"val": cfg.conntrack_limit, "inv": True}}],
                }
            },
            {"set": {"op": "add", "elem": meta("iifname"), "set": set_ref(CTDROPS_SET)}},
            COUNTER,
            DROP,
            comment=f"more than {cfg.conntrack_limit} connections of one tenant",
        )


def _host_services(doc: Document, services: Sequence[ResolvedService], site: Site) -> None:
    """DNAT from the gateway to each host service; SNAT to loopback where it needs it."""
    gw4 = site.ipv4_gateway
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
                match(meta("iifname"), set_ref("tenant_ifs")),
                match(payload("ip", "daddr"), str(gw4)),
                l4proto(proto),
                dport(svc.gateway_port),
                {"dnat": {"family": "ip", "addr": str(svc.host), "port": svc.host_port}},
                comment=svc.name,
            )
            if svc.snat_loopback:
                # systemd-resolved and many loopback-bound services answer local
                # clients only; the tenant's address is then hidden from them.
                doc.rule(
                    "services_source",
                    match(meta("iifname"), set_ref("tenant_ifs")),
                    match(ct("status"), "dnat", "in"),
                    match(payload("ip", "daddr"), str(svc.host)),
                    l4proto(proto),
                    dport(svc.host_port),
                    {"snat": {"family": "ip", "addr": "127.0.0.1"}},
                    comment=svc.name,
                )


def _tenant_to_host(doc: Document, cfg: NetworkConfig, site: Site) -> None:
    """input: what tenants may reach on the host."""
    wild = wildcard(site.link_prefix)
    gw4, gw6 = site.ipv4_gateway, site.ipv6_gateway
    doc.chain("input", hook="input", prio=PRIO_FILTER)
    doc.rule("input", match(meta("iifname"), wild), jump("tenant_to_host"))
    _tenant_chain(doc, "tenant_to_host")
    doc.rule("tenant_to_host", match(ct("status"), "dnat", "in"), ACCEPT, comment="host services")
    doc.rule(
        "tenant_to_host",
        match(
            payload("icmpv6", "type"),
            {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        ),
        ACCEPT,
    )
    doc.rule(
        "tenant_to_host",
        match(payload("ip", "daddr"), str(gw4)),
        match(payload("icmp", "type"), "echo-request"),
        ACCEPT,
    )
    doc.rule(
        "tenant_to_host",
        match(payload("ip6", "daddr"), str(gw6)),
        match(payload("icmpv6", "type"), "echo-request"),
        ACCEPT,
    )
    if cfg.isolation:
        doc.rule("tenant_to_host", COUNTER, DROP, comment="isolation: host addresses")


def _shaping_marks(doc: Document) -> None:
    """forward and output: the marks for bandwidth shaping (before any verdict); the
    ``*_shaped`` sets say which tenants they apply to."""
    doc.chain("forward_marks", hook="forward", prio=PRIO_RAW_MANGLE)
    doc.rule(
        "forward_marks",
        match(meta("iifname"), set_ref("uplinks")),
        match(meta("oifname"), set_ref("download_shaped")),
        {"mangle": {"key": meta("priority"), "value": PRIO_LIMITED}},
        comment="download shaping class",
    )
    for proto in ("ip", "ip6"):
        doc.rule(
            "forward_marks",
            match(meta("iifname"), set_ref("uplinks")),
            match(meta("oifname"), set_ref("upload_shaped")),
            {"mangle": {"key": payload(proto, "dscp"), "value": DSCP_UPLINK}},
            comment="tells the tenant side: from an uplink",
        )
        doc.rule(
            "forward_marks",
            match(meta("iifname"), set_ref("uplinks"), "!="),
            match(meta("oifname"), set_ref("upload_shaped")),
            match(payload(proto, "dscp"), DSCP_UPLINK),
            {"mangle": {"key": payload(proto, "dscp"), "value": 0}},
        )
    doc.chain("output_marks", hook="output", prio=PRIO_RAW_MANGLE)
    for proto in ("ip", "ip6"):
        doc.rule(
            "output_marks",
            match(meta("oifname"), set_ref("upload_shaped")),
            match(payload(proto, "dscp"), DSCP_UPLINK),
            {"mangle": {"key": payload(proto, "dscp"), "value": 0}},
        )


def _forward(doc: Document, cfg: NetworkConfig, site: Site) -> None:
    """forward: isolation between tenants, egress, and no new connections from outside."""
    wild = wildcard(site.link_prefix)
    doc.chain("forward", hook="forward", prio=PRIO_FILTER)
    doc.rule("forward", match(meta("iifname"), wild), jump("from_tenant"))
    doc.rule("forward", match(meta("oifname"), wild), jump("to_tenant"))
    _tenant_chain(doc, "from_tenant")
    if cfg.egress != "none":
        doc.rule(
            "from_tenant", match(meta("oifname"), set_ref("uplinks")), ACCEPT, comment="egress"
        )
    doc.rule(
        "from_tenant",
        match({"concat": [meta("iifname"), meta("oifname")]}, set_ref("allowed")),
        ACCEPT,
        comment="network.allow",
    )
    if cfg.isolation:
        doc.rule("from_tenant", COUNTER, DROP, comment="isolation")
    else:
        doc.rule("from_tenant", match(meta("oifname"), wild), ACCEPT)
        doc.rule("from_tenant", COUNTER, DROP, comment="only uplinks and tenants")
    doc.chain("to_tenant")
    doc.rule("to_tenant", match(ct("state"), {"set": ["established", "related"]}), ACCEPT)
    doc.rule(
        "to_tenant",
        match(ct("status"), "dnat", "in"),
        ACCEPT,
        comment="the operator forwarded it",
    )
    doc.rule("to_tenant", COUNTER, DROP, comment="no new connections from outside")


def _egress_nat(doc: Document, cfg: NetworkConfig, site: Site) -> None:
    """postrouting: SNAT (``network.snat``) or masquerading of tenant traffic to uplinks."""
    if cfg.egress != "masquerade" or not site.uplinks:
        return
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
                match(meta("oifname"), set_ref("uplinks")),
                {
                    "snat": {
                        "family": proto,
                        "addr": {"map": {"key": payload(proto, "saddr"), "data": set_ref(name)}},
                    }
                },
                comment="network.snat",
            )
    doc.rule(
        "egress_nat",
        match(meta("oifname"), set_ref("uplinks")),
        match(payload("ip", "saddr"), prefix(site.ipv4_pool)),
        {"masquerade": None},
    )
    if cfg.ipv6_nat:
        doc.rule(
            "egress_nat",
            match(meta("oifname"), set_ref("uplinks")),
            match(payload("ip6", "saddr"), prefix(site.ipv6_pool)),
            {"masquerade": None},
        )
