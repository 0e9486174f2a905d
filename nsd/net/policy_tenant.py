"""The ``inet nsd`` table inside one tenant's namespace: in-namespace service addresses
(such as the resolver on 127.0.0.53) and the upload classifier; None when the tenant
needs neither."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from nsd.net.policy_plan import CTMARK_INTERNAL, CTMARK_UPLINK, DSCP_UPLINK, PRIO_DIRECT
from nsd.net.policy_rules import (
    ACCEPT,
    COUNTER,
    DROP,
    PRIO_DSTNAT,
    PRIO_FILTER,
    PRIO_SRCNAT,
    Document,
    ct,
    dport,
    l4proto,
    match,
    meta,
    payload,
    prefix,
)
from nsd.net.policy_site import ResolvedService, Site, TenantNet, resolve_services
from nsd.network_config import NetworkConfig


def tenant_document(cfg: NetworkConfig, site: Site, tenant: TenantNet) -> dict[str, Any] | None:
    """The ``inet nsd`` table inside ``tenant``'s namespace, or None if it needs none."""
    local = [s for s in resolve_services(cfg, site) if s.tenant_side(site.ipv4_gateway)]
    shaped = tenant.bandwidth.egress_bps is not None
    if not local and not shaped:
        return None
    doc = Document("nsd: in-namespace service addresses, upload classification")
    loopback = any(s.tenant.is_loopback for s in local)
    if local:
        _local_services(doc, local, site, tenant, loopback=loopback)
    doc.chain("inbound", hook="prerouting", prio=PRIO_FILTER)
    if loopback:
        _loopback_answers_only(doc, site)
    if shaped:
        _upload_classifier(doc, site)
    return doc.document()


def _local_services(
    doc: Document,
    local: Sequence[ResolvedService],
    site: Site,
    tenant: TenantNet,
    *,
    loopback: bool,
) -> None:
    """DNAT from each service's in-namespace address to the gateway (where the host's
    table takes over)."""
    gw4 = site.ipv4_gateway
    doc.chain("services", type_="nat", hook="output", prio=PRIO_DSTNAT)
    for svc in local:
        for proto in svc.protocols:
            doc.rule(
                "services",
                match(payload("ip", "daddr"), str(svc.tenant)),
                l4proto(proto),
                dport(svc.tenant_port),
                {"dnat": {"family": "ip", "addr": str(gw4), "port": svc.gateway_port}},
                comment=svc.name,
            )
    if loopback:
        # The socket was bound to 127.0.0.1; after the DNAT it leaves through eth0
        # (net.ipv4.conf.eth0.route_localnet=1 allows the 127/8 source there) and
        # gets the tenant's own address.
        doc.chain("services_source", type_="nat", hook="postrouting", prio=PRIO_SRCNAT)
        doc.rule(
            "services_source",
            match(meta("oifname"), site.tenant_interface),
            match(payload("ip", "saddr"), prefix(IPv4Network("127.0.0.0/8"))),
            {"snat": {"family": "ip", "addr": str(tenant.ipv4)}},
        )


def _loopback_answers_only(doc: Document, site: Site) -> None:
    """route_localnet also lets packets *to* 127/8 in through eth0: only the answers to
    the connections of ``_local_services`` may."""
    eth = site.tenant_interface
    lo = prefix(IPv4Network("127.0.0.0/8"))
    doc.rule(
        "inbound",
        match(meta("iifname"), eth),
        match(payload("ip", "daddr"), lo),
        match(ct("status"), "snat", "in"),
        ACCEPT,
    )
    doc.rule(
        "inbound",
        match(meta("iifname"), eth),
        match(payload("ip", "daddr"), lo),
        COUNTER,
        DROP,
    )


def _upload_classifier(doc: Document, site: Site) -> None:
    """Connections that saw a packet from an uplink (DSCP_UPLINK, set by the host) are
    shaped; host, tenant-to-tenant and nsd-range traffic take HTB's direct path."""
    eth = site.tenant_interface
    for proto in ("ip", "ip6"):
        doc.rule(
            "inbound",
            match(meta("iifname"), eth),
            match(payload(proto, "dscp"), DSCP_UPLINK),
            {"mangle": {"key": ct("mark"), "value": CTMARK_UPLINK}},
        )
    doc.rule(
        "inbound",
        match(meta("iifname"), eth),
        match(ct("mark"), CTMARK_UPLINK, "!="),
        {"mangle": {"key": ct("mark"), "value": CTMARK_INTERNAL}},
    )
    doc.chain("classify", hook="postrouting", prio=PRIO_FILTER)
    direct = {"mangle": {"key": meta("priority"), "value": PRIO_DIRECT}}
    doc.rule(
        "classify",
        match(meta("oifname"), eth),
        match(ct("mark"), CTMARK_INTERNAL),
        direct,
        comment="host and tenant-to-tenant connections",
    )
    doc.rule(
        "classify",
        match(meta("oifname"), eth),
        match(payload("ip", "daddr"), prefix(site.ipv4_pool)),
        direct,
    )
    doc.rule(
        "classify",
        match(meta("oifname"), eth),
        match(
            payload("ip6", "daddr"),
            {"set": [prefix(site.ipv6_pool), prefix(IPv6Network("fe80::/10"))]},
        ),
        direct,
    )
