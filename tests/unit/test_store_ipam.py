from __future__ import annotations

import random
import sqlite3
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Network
from pathlib import Path

import pytest

from nsd import config
from nsd.core import store
from nsd.core.ipam import Ipam
from nsd.errors import AddressConflict, AddressPoolExhausted
from nsd.model import TenantRecord, TenantState


def rec(
    uid: int, v4: IPv4Address, v6: IPv6Network, state: TenantState = TenantState.CREATING
) -> TenantRecord:
    return TenantRecord(
        uid, f"u{uid}", state, f"u{uid}", f"nsd{uid}", v4, v6, False, store.now_us()
    )


def make(tmp_path: Path, **ipam: object) -> tuple[store.Store, Ipam]:
    cfg = config.from_mapping({"ipam": dict(ipam)} if ipam else {})
    s = store.Store(tmp_path / "nsd.db")
    return s, Ipam(cfg.ipam, cfg.tenants, s)


def add(s: store.Store, ipam: Ipam, uid: int) -> TenantRecord:
    v4, v6 = ipam.allocate(uid)
    r = rec(uid, v4, v6)
    s.insert(r)
    return r


def test_roundtrip_and_state(tmp_path: Path) -> None:
    s, ipam = make(tmp_path)
    r = add(s, ipam, 1001)
    assert s.get(1001) == r and s.get_by_name("u1001") == r
    s.set_state(1001, TenantState.READY)
    assert s.get(1001).state is TenantState.READY  # type: ignore[union-attr]
    assert s.all() == [s.get(1001)]
    assert r.ipv4_address == IPv4Address("100.64.0.2")  # .1 is the shared gateway
    assert r.ipv6_prefix.prefixlen == 64 and r.ipv6_prefix.subnet_of(ipam.ipv6_base)
    assert str(r.ipv6_address).endswith("::1")


def test_ula_is_random_rfc4193_and_persisted(tmp_path: Path) -> None:
    s, ipam = make(tmp_path)
    assert ipam.ipv6_base.prefixlen == 48
    assert str(ipam.ipv6_base).startswith("fd")
    s.close()
    _, ipam2 = make(tmp_path)
    assert ipam2.ipv6_base == ipam.ipv6_base
    assert make(tmp_path / "other")[1].ipv6_base != ipam.ipv6_base


def test_leases_never_duplicated_and_quarantined(tmp_path: Path) -> None:
    s, ipam = make(tmp_path)
    a, b = add(s, ipam, 1001), add(s, ipam, 1002)
    assert a.ipv4_address != b.ipv4_address and a.ipv6_prefix != b.ipv6_prefix
    s.delete(1001, quarantine=True)
    c = add(s, ipam, 1003)  # must not get a's quarantined addresses
    assert c.ipv4_address not in (a.ipv4_address, b.ipv4_address)
    assert c.ipv6_prefix not in (a.ipv6_prefix, b.ipv6_prefix)
    again = add(s, ipam, 1001)  # the previous holder gets its address back
    assert (again.ipv4_address, again.ipv6_prefix) == (a.ipv4_address, a.ipv6_prefix)
    with pytest.raises(store.StoreError):
        s.insert(rec(1004, a.ipv4_address, IPv6Network("fd00:9::/64")))
    assert s.get(1004) is None  # the failed insert left nothing behind


def test_quarantine_expires(tmp_path: Path) -> None:
    s, ipam = make(tmp_path, quarantine_seconds=0)
    a = add(s, ipam, 1001)
    s.delete(1001, quarantine=True)
    assert add(s, ipam, 1002).ipv4_address == a.ipv4_address


def test_lowest_free_address_below_the_search_floor(tmp_path: Path) -> None:
    """Allocation searches from above the addresses active since the last release
    (ipam._Candidates): a release below that floor, and a quarantine that ends
    below it, still give the lowest free address."""
    s, ipam = make(tmp_path, quarantine_seconds=3600)
    recs = [add(s, ipam, uid) for uid in range(1001, 1011)]
    s.delete(1003, quarantine=False)  # a rolled-back create: free at once
    assert add(s, ipam, 1020).ipv4_address == recs[2].ipv4_address
    s.delete(1002, quarantine=True)
    fresh = add(s, ipam, 1021)  # above the last one given, past the quarantined one
    assert int(fresh.ipv4_address) == int(recs[-1].ipv4_address) + 1
    ipam.cfg = replace(ipam.cfg, quarantine_seconds=0)  # its quarantine ends
    late = add(s, ipam, 1022)
    assert (late.ipv4_address, late.ipv6_prefix) == (recs[1].ipv4_address, recs[1].ipv6_prefix)
    assert add(s, ipam, 1023).ipv4_address == fresh.ipv4_address + 1


def test_purge_deletes_only_leases_whose_quarantine_ended(tmp_path: Path) -> None:
    s, ipam = make(tmp_path, quarantine_seconds=3600)
    add(s, ipam, 1001)
    add(s, ipam, 1002)
    s.delete(1001, quarantine=True)
    assert ipam.purge_expired() == 0  # still quarantined: kept
    assert sorted({r[2] for r in s.lease_rows()}) == [1001, 1002]
    ipam.cfg = replace(ipam.cfg, quarantine_seconds=0)
    assert ipam.purge_expired() == 2  # its IPv4 and IPv6 leases; 1002's active ones stay
    assert [r[2] for r in s.lease_rows()] == [1002, 1002]
    assert ipam.purge_expired() == 0


def test_rollback_delete_frees_at_once(tmp_path: Path) -> None:
    s, ipam = make(tmp_path)
    a = add(s, ipam, 1001)
    s.delete(1001, quarantine=False)
    assert add(s, ipam, 1002).ipv4_address == a.ipv4_address
    assert [r[2] for r in s.lease_rows()] == [1002, 1002]


def test_pool_exhaustion(tmp_path: Path) -> None:
    s, ipam = make(tmp_path, ipv4_pool="100.64.0.0/30")  # hosts .1 (gateway) and .2
    add(s, ipam, 1001)
    with pytest.raises(AddressPoolExhausted) as info:
        ipam.allocate(1002)
    assert info.value.parameters == {"family": "ipv4", "pool": "100.64.0.0/30"}


def test_uid_strategy_is_deterministic(tmp_path: Path) -> None:
    s, ipam = make(tmp_path, strategy="uid", ipv4_pool="10.100.0.0/16", ipv6_prefix="fd00:aa::/48")
    r = add(s, ipam, 1001)
    assert r.ipv4_address == IPv4Address("10.100.3.233")  # 10.100.0.0 + 1001
    assert r.ipv6_prefix == IPv6Network("fd00:aa:0:3e9::/64")  # subnet id 1001 = 0x3e9


def test_uid_strategy_conflict_names_the_address(tmp_path: Path) -> None:
    # A lease from an earlier "sequential" allocation holds the address uid 1001 derives.
    s, ipam = make(tmp_path, strategy="uid", ipv4_pool="10.100.0.0/16", ipv6_prefix="fd00:aa::/48")
    s.insert(rec(2000, IPv4Address("10.100.3.233"), IPv6Network("fd00:aa:0:7::/64")))
    with pytest.raises(AddressConflict) as info:
        ipam.allocate(1001)
    assert info.value.name == "AddressConflict"
    assert info.value.parameters == {
        "family": "ipv4", "pool": "10.100.0.0/16", "address": "10.100.3.233"}  # fmt: skip
    assert s.get(1001) is None  # nothing recorded


def test_overlap_with_host_routes(tmp_path: Path) -> None:
    _, ipam = make(tmp_path)
    from ipaddress import ip_network

    assert ipam.overlaps([ip_network("10.0.0.0/8"), ip_network("fd00:1::/64")]) == []
    problems = ipam.overlaps([ip_network("100.64.0.0/10")])
    assert problems == ["host route 100.64.0.0/10 overlaps nsd pool 100.64.0.0/16"]


def test_corrupt_database_refused_not_rewritten(tmp_path: Path) -> None:
    db = tmp_path / "nsd.db"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    with pytest.raises(store.StoreError, match="not a usable SQLite database"):
        store.Store(db)
    assert db.read_bytes() == before


def test_newer_schema_refused(tmp_path: Path) -> None:
    s = store.Store(tmp_path / "nsd.db")
    s.set_meta("schema_version", str(store.SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(store.StoreError, match="newer nsd"):
        store.Store(tmp_path / "nsd.db")


def test_foreign_sqlite_refused(tmp_path: Path) -> None:
    db = tmp_path / "nsd.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE x (a)")
    con.commit()
    con.close()
    with pytest.raises(store.StoreError, match="not an nsd database"):
        store.Store(db)


def test_v1_database_is_migrated(tmp_path: Path) -> None:
    s, ipam = make(tmp_path)
    add(s, ipam, 1001)
    s.close()
    con = sqlite3.connect(tmp_path / "nsd.db")
    con.execute("DROP TABLE tenant_limits")  # what version 1 did not have
    con.execute("DROP TABLE tenant_bandwidth")
    con.execute("DROP TABLE faults")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    s = store.Store(tmp_path / "nsd.db")
    assert s.get_meta("schema_version") == str(store.SCHEMA_VERSION)
    assert s.get(1001) is not None  # data kept
    s.set_limit_overrides(1001, {"memory_max": "536870912"})
    assert s.limit_overrides(1001) == {"memory_max": "536870912"}
    s.delete(1001, quarantine=True)
    assert s.limit_overrides(1001) == {}  # removed with the tenant


def test_lease_cache_matches_the_database(tmp_path: Path) -> None:
    """The leases the store keeps in memory (for allocation) say what SQL says, through
    inserts, removals with and without quarantine, take-overs and purges."""
    s, ipam = make(tmp_path, quarantine_seconds=3600)
    recs = {uid: add(s, ipam, uid) for uid in range(1001, 1011)}
    s.delete(1002, quarantine=True)
    s.delete(1003, quarantine=False)
    s.delete(1004, quarantine=True)
    add(s, ipam, 1002)  # gets its quarantined addresses back
    add(s, ipam, 1020)  # the lowest free: 1003's, never quarantined
    assert s.get(1020).ipv4_address == recs[1003].ipv4_address  # type: ignore[union-attr]
    purge_cut = store.now_us()
    s.delete(1005, quarantine=True)
    # every address any tenant got here, and one nobody did
    every = {
        4: {str(r.ipv4_address) for r in recs.values()} | {"100.64.255.254"},
        6: {str(r.ipv6_prefix) for r in recs.values()} | {"fd00:ffff::/64"},
    }

    def from_sql(family: int, since: int) -> tuple[set[str], dict[int, str | None]]:
        db = sqlite3.connect(tmp_path / "nsd.db")
        taken = {
            str(a)
            for (a,) in db.execute(
                "SELECT address FROM leases WHERE family = ? AND "
                "(released_us IS NULL OR released_us > ?)",
                (family, since),
            )
        }
        prev: dict[int, str | None] = {}
        for uid in (1002, 1004, 1005, 1099):
            row = db.execute(
                "SELECT address FROM leases WHERE family = ? AND uid = ? AND released_us > ? "
                "ORDER BY released_us DESC LIMIT 1",
                (family, uid, since),
            ).fetchone()
            prev[uid] = None if row is None else str(row[0])
        db.close()
        return taken, prev

    for since in (0, purge_cut):
        for family in (4, 6):
            taken, prev = from_sql(family, since)
            assert {a for a in every[family] if s.address_taken(family, a, since)} == taken
            assert {u: s.previous_address(family, u, since) for u in prev} == prev
    assert s.purge_quarantine(purge_cut) == 2  # 1004's two; 1005's are newer
    for family in (4, 6):
        taken, prev = from_sql(family, 0)
        assert {a for a in every[family] if s.address_taken(family, a, 0)} == taken
        assert {u: s.previous_address(family, u, 0) for u in prev} == prev


def test_allocation_matches_a_reference_over_random_histories(tmp_path: Path) -> None:
    """Random creates, removals (quarantined or rolled back), purges and quarantines
    that end, on pools small enough to run out: every allocation is what the rule says,
    computed from the leases table itself (the previous holder's quarantined address,
    else the lowest address that is neither active nor quarantined)."""
    s, ipam = make(
        tmp_path, ipv4_pool="100.64.0.0/27", ipv6_prefix="fd00:1::/56", quarantine_seconds=3600
    )
    pool4 = [a for a in ipam.ipv4_pool.hosts() if a != ipam.ipv4_gateway]
    pool6 = [
        IPv6Network((int(ipam.ipv6_base.network_address) + (i << 64), 64)) for i in range(1, 256)
    ]
    rng = random.Random(1414)
    live: set[int] = set()

    def expected(uid: int) -> tuple[object, object]:
        since = store.now_us() - ipam.cfg.quarantine_seconds * 1_000_000
        rows = s.lease_rows()
        out: list[object] = []
        for family, pool in ((4, pool4), (6, pool6)):
            mine = [(r, a) for f, a, u, r in rows if f == family and u == uid and r and r > since]
            if mine:
                out.append(max(mine)[1])
                continue
            taken = {a for f, a, _, r in rows if f == family and (r is None or r > since)}
            out.append(next((str(x) for x in pool if str(x) not in taken), None))
        return out[0], out[1]

    for _ in range(600):
        op = rng.random()
        if op < 0.5 or not live:
            uid = rng.randrange(1000, 1060)
            if uid in live:
                continue
            want = expected(uid)
            if None in want:
                with pytest.raises(AddressPoolExhausted):
                    ipam.allocate(uid)
                continue
            v4, v6 = ipam.allocate(uid)
            assert (str(v4), str(v6)) == want
            s.insert(rec(uid, v4, v6))
            live.add(uid)
        elif op < 0.8:
            uid = rng.choice(sorted(live))
            s.delete(uid, quarantine=rng.random() < 0.7)
            live.discard(uid)
        elif op < 0.9:
            # quarantines end (time passes) or hold again
            ipam.cfg = replace(ipam.cfg, quarantine_seconds=rng.choice((0, 3600)))
        else:
            ipam.purge_expired()
