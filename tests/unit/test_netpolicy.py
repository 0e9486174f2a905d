"""Network policy derivation: configuration, nftables documents, sysctls, tc plans (no root)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from nsd.net import policy as npol
from nsd.net.sysctl_files import sysctl_relpath
from tests import golden

SITE = npol.Site(
    ipv4_gateway=IPv4Address("100.64.0.1"),
    ipv6_gateway=IPv6Address("fe80::1"),
    ipv4_pool=IPv4Network("100.64.0.0/16"),
    ipv6_pool=IPv6Network("fd12:3456:789a::/48"),
    uplinks=("eth0",),
    loopback_resolvers=(IPv4Address("127.0.0.53"),),
)


def tenant(n: int, **kw: Any) -> npol.TenantNet:
    return npol.TenantNet(
        name=f"u{n}",
        uid=1000 + n,
        host_ifname=f"nsd{1000 + n}",
        ipv4=IPv4Address("100.64.0.1") + n,
        ipv6_prefix=IPv6Network(f"fd12:3456:789a:{n:x}::/64"),
        **kw,
    )


def cfg(text: str = "") -> npol.NetworkConfig:
    return npol.config_from_mapping(tomllib.loads(text).get("network", {}))


def rules(doc: dict[str, Any], chain: str | None = None) -> list[dict[str, Any]]:
    return [
        c["add"]["rule"]
        for c in doc["nftables"]
        if "rule" in c.get("add", {}) and (chain is None or c["add"]["rule"]["chain"] == chain)
    ]


def sets(doc: dict[str, Any]) -> dict[str, list[Any]]:
    """Sets and maps by name, with their elements."""
    return {
        c["add"][kind]["name"]: c["add"][kind].get("elem", [])
        for c in doc["nftables"]
        for kind in ("set", "map")
        if kind in c.get("add", {})
    }


#: a [network] table with most keys set (egress and dns spelt out at their defaults)
FULL = """
[network]
uplinks = ["eth0", "eth1"]
egress = "masquerade"
snat = { u1 = "203.0.113.7", u2 = ["203.0.113.8", "2001:db8::8"] }
allow = [["u1", "u2"]]
conntrack_limit = 5000
dns = true
[[network.host_services]]
name = "mysql"
host = "127.0.0.1:3306"
tenant_address = "127.0.0.1:3306"
protocols = ["tcp"]
[[network.host_services]]
name = "syslog"
host = "127.0.0.1:514"
tenant_address = "gateway:514"
protocols = ["udp", "tcp"]
source = "tenant"
[network.bandwidth]
egress_mbit = 10
ingress_mbit = 2.5
"""


# -- configuration ---------------------------------------------------------------------


def test_defaults() -> None:
    c = cfg()
    assert c.enabled and c.isolation and c.egress == "masquerade" and c.dns == "auto"
    assert c.uplinks == () and c.conntrack_limit == 20000
    assert c.bandwidth == npol.Bandwidth(None, None)


def test_full_config() -> None:
    c = cfg(FULL)
    assert c.uplinks == ("eth0", "eth1")
    assert c.snat["u2"] == (IPv4Address("203.0.113.8"), IPv6Address("2001:db8::8"))
    assert c.allow == (("u1", "u2"),)
    assert c.dns == "auto"
    mysql, syslog = c.host_services
    assert mysql.tenant == IPv4Address("127.0.0.1") and mysql.snat_loopback
    assert syslog.tenant is None and syslog.tenant_port == 514
    assert syslog.protocols == ("tcp", "udp") and not syslog.snat_loopback
    assert c.bandwidth == npol.Bandwidth(10_000_000, 2_500_000)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"uplink": ["eth0"]}, "uplink"),
        ({"uplinks": "eth0"}, "uplinks"),
        ({"uplinks": ["a/b"]}, "uplinks"),
        ({"egress": "snat"}, "egress"),
        ({"isolation": "yes"}, "isolation"),
        ({"allow": [["a"]]}, "allow"),
        ({"snat": {"a": "nope"}}, "snat.a"),
        ({"snat": {"a": ["1.2.3.4", "1.2.3.5"]}}, "snat.a"),
        ({"conntrack_limit": -1}, "conntrack_limit"),
        ({"dns": "maybe"}, "dns"),
        ({"host_services": [{"name": "x", "host": "localhost:1"}]}, "host_services[0].host"),
        ({"host_services": [{"name": "x", "host": "127.0.0.1:0"}]}, "host_services[0].host"),
        ({"host_services": [{"name": "x y", "host": "127.0.0.1:1"}]}, "host_services[0].name"),
        (
            {"host_services": [{"name": "x", "host": "127.0.0.1:1", "protocols": ["sctp"]}]},
            "host_services[0].protocols",
        ),
        ({"host_services": [{"name": "x", "host": "127.0.0.1:1", "port": 1}]},
         "host_services[0].port"),
        ({"bandwidth": {"egress_mbit": -1}}, "bandwidth.egress_mbit"),
        ({"bandwidth": {"egress": 1}}, "bandwidth.egress"),
    ],
)  # fmt: skip
def test_bad_config_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(npol.NetworkConfigError) as e:
        npol.config_from_mapping(raw)
    assert e.value.key == key


@pytest.mark.parametrize(
    ("value", "unit", "bps"),
    [
        (10, 10**6, 10_000_000),
        (0, 10**6, None),
        ("10M", 1, 10_000_000),
        ("10mbit", 1, 10_000_000),
        ("1.5G", 1, 1_500_000_000),
        ("500k", 1, 500_000),
    ],
)
def test_parse_rate(value: Any, unit: int, bps: int | None) -> None:
    assert npol.parse_rate(value, "k", unit=unit) == bps


@pytest.mark.parametrize("value", ["ten", "-1M", True, "1bit", 10**12])
def test_parse_rate_refuses(value: Any) -> None:
    with pytest.raises(npol.NetworkConfigError):
        npol.parse_rate(value, "k")


def test_format_rate() -> None:
    assert npol.format_rate(10_000_000) == "10 Mbit/s"
    assert npol.format_rate(None) == "unlimited"


def test_bandwidth_overlay_and_zero_lifts_a_default() -> None:
    default = npol.Bandwidth(10_000_000, 20_000_000)
    assert default.overlay(npol.Bandwidth(5_000_000, None)) == npol.Bandwidth(5_000_000, 20_000_000)
    assert default.overlay(npol.Bandwidth(0, None)).effective() == npol.Bandwidth(None, 20_000_000)


def test_loopback_resolvers() -> None:
    conf = "# x\nnameserver 127.0.0.53\nnameserver 8.8.8.8\nnameserver ::1\nnameserver 127.0.0.53\n"
    assert npol.loopback_resolvers(conf) == (IPv4Address("127.0.0.53"),)
    assert npol.loopback_resolvers("search example\n") == ()


def test_services_resolution_and_conflicts() -> None:
    c = cfg('[[network.host_services]]\nname = "db"\nhost = "127.0.0.1:3306"\n')
    db, dns = npol.resolve_services(c, SITE)
    assert (db.tenant, db.gateway_port, db.tenant_side(SITE.ipv4_gateway)) == (
        SITE.ipv4_gateway, 3306, False,
    )  # fmt: skip
    assert dns.tenant == IPv4Address("127.0.0.53") and dns.tenant_side(SITE.ipv4_gateway)
    svc = '[[network.host_services]]\nname = "{}"\nhost = "127.0.0.1:{}"\ntenant_address = "{}"\n'
    clash = cfg(svc.format("a", 1, "gateway:9") + svc.format("b", 2, "10.9.9.9:9"))
    with pytest.raises(npol.NetworkConfigError, match="port 9"):
        npol.resolve_services(clash, SITE)
    with pytest.raises(npol.NetworkConfigError, match="tenant address"):
        npol.check_config(cfg('[network]\nsnat = { a = "100.64.0.9" }'), SITE)


# -- the host table ----------------------------------------------------------------------


def test_host_document_replaces_the_whole_table_first() -> None:
    doc = npol.host_document(cfg(), SITE, [tenant(1)])
    head = doc["nftables"][:3]
    assert [next(iter(c)) for c in head] == ["add", "delete", "add"]
    assert all(c[next(iter(c))]["table"]["name"] == "nsd" for c in head)
    # objects before rules: a jump or @set must exist when the rule is added
    kinds = [next(iter(c["add"])) for c in doc["nftables"][3:]]
    assert kinds.index("rule") > max(i for i, k in enumerate(kinds) if k in ("chain", "set"))
    json.dumps(doc)  # serialisable as is


#: scenario -> (the [network] table, the tenants); each has a golden file
#: tests/fixtures/golden/netpolicy/host-<scenario>.json holding the whole host table
HOST_SCENARIOS: dict[str, tuple[str, list[npol.TenantNet]]] = {
    "defaults": ("", [tenant(1)]),
    # an allow pair with a tenant that does not exist (ignored), snat for one tenant
    "allow-snat": (
        '[network]\nallow = [["u1", "u2"], ["u1", "ghost"]]\nsnat = { u2 = "203.0.113.7" }',
        [tenant(2), tenant(1)],
    ),
    "no-egress-no-dns": ('[network]\negress = "none"\ndns = false', [tenant(1)]),
    "no-isolation-no-conntrack-limit": (
        "[network]\nisolation = false\nconntrack_limit = 0",
        [tenant(1)],
    ),
    "no-ipv6-nat": ("[network]\nipv6_nat = false", [tenant(1)]),
    "one-tenant-shaped": (
        "",
        [tenant(1, bandwidth=npol.Bandwidth(10_000_000, 20_000_000)), tenant(2)],
    ),
    "full": (FULL, [tenant(1), tenant(2), tenant(3)]),
}

#: the same for one tenant's own table (None: the tenant gets no table)
TENANT_SCENARIOS: dict[str, tuple[str, npol.TenantNet]] = {
    "defaults": ("", tenant(1)),
    "no-dns": ("[network]\ndns = false", tenant(1)),
    "shaped-no-dns": (
        "[network]\ndns = false",
        tenant(1, bandwidth=npol.Bandwidth(1_000_000, None)),
    ),
    "full": (FULL, tenant(1)),
}


@pytest.mark.parametrize("scenario", sorted(HOST_SCENARIOS))
def test_host_document_golden(scenario: str) -> None:
    """The whole host table, compared with its reviewed golden file."""
    text, tenants = HOST_SCENARIOS[scenario]
    golden.check(f"netpolicy/host-{scenario}", npol.host_document(cfg(text), SITE, tenants))


@pytest.mark.parametrize("scenario", sorted(TENANT_SCENARIOS))
def test_tenant_document_golden(scenario: str) -> None:
    """The whole table inside one tenant's namespace, compared with its golden file."""
    text, t = TENANT_SCENARIOS[scenario]
    golden.check(f"netpolicy/tenant-{scenario}", npol.tenant_document(cfg(text), SITE, t))


def test_host_document_sets() -> None:
    c = cfg('[network]\nallow = [["u1", "u2"], ["u1", "ghost"]]\nsnat = { u2 = "203.0.113.7" }')
    s = sets(npol.host_document(c, SITE, [tenant(2), tenant(1)]))
    assert s["tenant_ifs"] == ["nsd1001", "nsd1002"]  # sorted by uid
    assert s["uplinks"] == ["eth0"]
    assert s["tenant_src4"][0] == {"concat": ["nsd1001", "100.64.0.2"]}
    assert s["allowed"] == [{"concat": ["nsd1001", "nsd1002"]}]  # unknown tenants ignored
    assert s["upload_shaped"] == []
    assert s["snat4"] == [["100.64.0.3", "203.0.113.7"]] and s["snat6"] == []
    # one dynamic set counts every tenant's connections (elements are added by the kernel)
    assert s["ctcount_20000"] == []
    assert "ctcount_20000" not in sets(
        npol.host_document(cfg("[network]\nconntrack_limit = 0"), SITE, [tenant(1)])
    )


def test_shaping_changes_only_set_elements() -> None:
    # the rules are always there (they depend on no tenant); the sets say who is shaped
    plain = npol.host_document(cfg(), SITE, [tenant(1)])
    assert sets(plain)["upload_shaped"] == [] and sets(plain)["download_shaped"] == []
    limited = tenant(1, bandwidth=npol.Bandwidth(10_000_000, 20_000_000))
    doc = npol.host_document(cfg(), SITE, [limited, tenant(2)])
    assert sets(doc)["upload_shaped"] == ["nsd1001"]
    assert sets(doc)["download_shaped"] == ["nsd1001"]
    assert rules(doc) == rules(plain)  # only elements differ


def test_sysctls() -> None:
    assert npol.tenant_sysctls(cfg(), SITE) == (("net.ipv4.conf.eth0.route_localnet", "1"),)
    assert npol.tenant_sysctls(cfg("[network]\ndns = false"), SITE)[0][1] == "0"
    host = dict(npol.host_interface_sysctls(cfg(), SITE, tenant(1)))
    assert host == {
        "net.ipv4.conf.nsd1001.forwarding": "1",
        "net.ipv4.conf.nsd1001.route_localnet": "1",
    }
    forced = dict(npol.host_interface_sysctls(cfg(), SITE, tenant(1), force_forwarding=True))
    assert forced["net.ipv6.conf.nsd1001.force_forwarding"] == "1"


def test_forwarding_plan_per_interface() -> None:
    plan = npol.forwarding_plan(SITE, ["nsd1001"], force_forwarding=True, accept_ra={"eth0": 1})
    assert set(plan.sysctls) == {
        ("net.ipv4.conf.eth0.forwarding", "1"),
        ("net.ipv4.conf.nsd1001.forwarding", "1"),
        ("net.ipv6.conf.eth0.force_forwarding", "1"),
        ("net.ipv6.conf.nsd1001.force_forwarding", "1"),
    }
    assert not plan.notes


def test_forwarding_plan_spells_dotted_interface_names_with_slashes() -> None:
    """A VLAN uplink (eth0.100): in a dotted key its dot would read as a separator
    (net.ipv4.conf.eth0.100.forwarding is net/ipv4/conf/eth0/100/forwarding, which
    does not exist); sysctl(8)'s '/' spelling keeps the name whole."""
    site = replace(SITE, uplinks=("eth0.100",))
    ra = {"eth0.100": 1}
    plan = npol.forwarding_plan(site, ["nsd1001"], force_forwarding=False, accept_ra=ra)
    assert plan.sysctls == (
        ("net/ipv4/conf/eth0.100/forwarding", "1"),
        ("net.ipv4.conf.nsd1001.forwarding", "1"),
        ("net/ipv6/conf/eth0.100/accept_ra", "2"),
        ("net.ipv6.conf.all.forwarding", "1"),
    )
    paths = [sysctl_relpath(k) for k, _ in plan.sysctls]
    assert paths == [
        "sys/net/ipv4/conf/eth0.100/forwarding",
        "sys/net/ipv4/conf/nsd1001/forwarding",
        "sys/net/ipv6/conf/eth0.100/accept_ra",
        "sys/net/ipv6/conf/all/forwarding",
    ]
    inside = replace(SITE, tenant_interface="veth.1")
    assert npol.tenant_sysctls(cfg(), inside) == (("net/ipv4/conf/veth.1/route_localnet", "1"),)


def test_forwarding_plan_old_kernel_keeps_router_advertisements() -> None:
    plan = npol.forwarding_plan(SITE, ["nsd1001"], force_forwarding=False, accept_ra={"eth0": 1})
    keys = [k for k, _ in plan.sysctls]
    # accept_ra=2 before the global switch, or the uplink drops RAs and its default route
    assert keys.index("net.ipv6.conf.eth0.accept_ra") < keys.index("net.ipv6.conf.all.forwarding")
    assert plan.notes
    static = npol.forwarding_plan(SITE, [], force_forwarding=False, accept_ra={"eth0": 0})
    assert ("net.ipv6.conf.eth0.accept_ra", "2") not in static.sysctls


def test_shaping_plan() -> None:
    t = tenant(1, bandwidth=npol.Bandwidth(1_000_000, 2_000_000))
    assert npol.shaping_plan(SITE, t) == npol.ShapingPlan("nsd1001", "eth0", 2_000_000, 1_000_000)


# -- reading live tables -----------------------------------------------------------------


def as_listed(doc: dict[str, Any]) -> dict[str, Any]:
    """What `nft -j list table` returns for a loaded document: bare objects."""
    return {"nftables": [next(iter(c.values())) for c in doc["nftables"][2:]]}


def test_summary_detects_drift() -> None:
    doc = npol.host_document(cfg(), SITE, [tenant(1)])
    live = as_listed(doc)
    assert npol.summary(live) == npol.summary(doc)
    flushed = {"nftables": [o for o in live["nftables"] if "rule" not in o]}
    assert npol.summary(flushed) != npol.summary(doc)
    other = npol.host_document(cfg(), SITE, [tenant(1), tenant(2)])
    assert npol.summary(other) != npol.summary(doc)
    # an element swapped for another (same count) is drift too
    swapped = npol.host_document(cfg(), SITE, [tenant(2)])
    assert npol.summary(swapped) != npol.summary(doc)
    # the kernel's elements of the conntrack counting set are state, not drift
    counted = json.loads(json.dumps(live))
    for o in counted["nftables"]:
        if o.get("set", {}).get("name") == "ctcount_20000":
            o["set"]["elem"] = [{"elem": {"val": "nsd1001"}}]
    assert npol.summary(counted) == npol.summary(doc)


def test_rules_of_ignores_counters_and_handles() -> None:
    doc = npol.host_document(cfg(), SITE, [tenant(1)])
    live = as_listed(doc)
    for i, o in enumerate(live["nftables"]):
        if "rule" in o:
            o["rule"] = dict(o["rule"], handle=i, expr=[
                {"counter": {"packets": 3, "bytes": 9}} if "counter" in e else e
                for e in o["rule"]["expr"]
            ])  # fmt: skip
    assert npol.rules_of(live) == npol.rules_of(doc)
    other = npol.host_document(cfg("[network]\nisolation = false"), SITE, [])
    assert npol.rules_of(other) != npol.rules_of(doc)


C_ALLOW = """
[network]
allow = [["u1", "u2"], ["u3", "u1"]]
snat = { u2 = ["203.0.113.7", "2001:db8::7"] }
"""


def test_incremental_changes_equal_a_rebuild() -> None:
    """Tenants created and removed one by one, each as an element transaction applied to
    a model of the live table: always what host_document derives for the same tenants."""
    c = cfg(C_ALLOW)
    live = {k: {json.dumps(e, sort_keys=True) for e in v} for k, v in sets(
        npol.host_document(c, SITE, [])).items()}  # fmt: skip
    present: dict[str, npol.TenantNet] = {}

    def run(change: dict[str, Any] | None) -> None:
        assert change is not None
        for cmd in change["nftables"]:
            ((op, body),) = cmd.items()
            elems = {json.dumps(e, sort_keys=True) for e in body["element"]["elem"]}
            target = live[body["element"]["name"]]
            if op == "delete":
                assert elems <= target  # nft refuses to delete a missing element
                target -= elems
            else:
                target |= elems

    order = [tenant(n, bandwidth=npol.Bandwidth(10**6 if n % 2 else None, None)) for n in
             (1, 2, 3, 4, 5)]  # fmt: skip
    steps = [("add", t) for t in order] + [("del", order[1]), ("del", order[0]),
             ("add", order[1]), ("del", order[4]), ("add", order[0])]  # fmt: skip
    for op, t in steps:
        if op == "add":
            present[t.name] = t
            run(npol.element_changes({}, npol.tenant_elements(c, t, present)))
        else:
            run(npol.element_changes(npol.tenant_elements(c, t, present), {}))
            del present[t.name]
        want = sets(npol.host_document(c, SITE, list(present.values())))
        assert {k: v for k, v in live.items() if v or want.get(k)} == {
            k: {json.dumps(e, sort_keys=True) for e in v} for k, v in want.items() if v
        }, (op, t.name)
    # a changed tenant (a new limit): deletions, then additions, of its elements only
    t = present["u1"]
    changed = replace(t, bandwidth=npol.Bandwidth(None, 10**6))
    change = npol.element_changes(
        npol.tenant_elements(c, t, present), npol.tenant_elements(c, changed, present)
    )
    assert change is not None
    assert [next(iter(cmd)) for cmd in change["nftables"]] == ["delete", "add"]
    assert npol.element_changes(npol.tenant_elements(c, t, present),
                                npol.tenant_elements(c, t, present)) is None  # fmt: skip


def test_replacement_keeps_the_conntrack_counts() -> None:
    doc = npol.host_document(cfg(), SITE, [tenant(1)])
    assert npol.replacement(doc, None) == doc  # no table yet: add, delete, add
    live = as_listed(npol.host_document(cfg(), SITE, [tenant(1), tenant(2)]))
    tx = npol.replacement(doc, live)["nftables"]
    ops = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in tx]
    assert ops[:2] == [("add", "table"), ("flush", "table")]
    assert ("delete", "table") not in ops
    deleted = [next(iter(c["delete"].values()))["name"] for c in tx if "delete" in c]
    assert "ctcount_20000" not in deleted and "tenant_ifs" in deleted and "guard" in deleted
    added = [next(iter(c["add"].values())).get("name") for c in tx[2:] if "add" in c]
    assert "ctcount_20000" not in added and "tenant_ifs" in added
    # a new limit is a new set: the old one goes
    other = npol.replacement(npol.host_document(cfg("[network]\nconntrack_limit = 5"), SITE,
                                                [tenant(1)]), live)  # fmt: skip
    assert {"delete": {"set": {"family": "inet", "table": "nsd", "name": "ctcount_20000"}}} in (
        other["nftables"]
    )


def test_forward_drop_policies() -> None:
    ruleset = {
        "nftables": [
            {"metainfo": {}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD",
                       "hook": "forward", "policy": "drop"}},
            {"chain": {"family": "ip", "table": "filter", "name": "INPUT",
                       "hook": "input", "policy": "drop"}},
            {"chain": {"family": "inet", "table": "nsd", "name": "forward",
                       "hook": "forward", "policy": "drop"}},
            {"chain": {"family": "ip", "table": "x", "name": "fw",
                       "hook": "forward", "policy": "accept"}},
        ]
    }  # fmt: skip
    found = npol.forward_drop_policies(ruleset)
    assert len(found) == 2
    assert "table ip filter chain FORWARD (hook forward)" in found[0]
    assert "host services" in found[1]


def test_summary_sees_a_changed_rule_with_the_same_comment() -> None:
    """A host service moved to another port: same chains, rule counts and comments, but
    different rules. The hash in the first rule's comment tells them apart, also for a
    new process that never saw the live table's rules."""
    svc = '[[network.host_services]]\nname = "db"\nhost = "127.0.0.1:{0}"\n'
    svc += 'tenant_address = "127.0.0.1:{0}"\n'
    a = npol.host_document(cfg("[network]\n" + svc.format(3306)), SITE, [tenant(1)])
    b = npol.host_document(cfg("[network]\n" + svc.format(3307)), SITE, [tenant(1)])
    assert npol.summary(a) != npol.summary(b)
    assert npol.summary(as_listed(a)) == npol.summary(a)
    first = rules(a)[0]["comment"]
    assert first.startswith("spoofed IPv4 source [rules ") and len(first) < 128
    # elements do not change the hash: a tenant's creation changes no rule
    c = npol.host_document(cfg("[network]\n" + svc.format(3306)), SITE, [tenant(1), tenant(2)])
    assert rules(c) == rules(a)
    ta = npol.tenant_document(cfg("[network]\n" + svc.format(3306)), SITE, tenant(1))
    tb = npol.tenant_document(cfg("[network]\n" + svc.format(3307)), SITE, tenant(1))
    assert ta is not None and tb is not None and npol.summary(ta) != npol.summary(tb)
