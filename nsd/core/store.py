"""SQLite state: tenants, address leases, faults and schema version.

The store is the source of truth. Every change to the host is preceded by a
committed record of the intent (state ``creating`` or ``removing``), so a crash
at any point leaves a row that reconcile can finish. The store never guesses:
a corrupt database or one written by a newer nsd is refused, not rewritten.

All calls are synchronous and short; the daemon makes them from its event-loop
thread only, so there is exactly one writer and no locking beyond SQLite's.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Network
from pathlib import Path
from typing import Any

from nsd.errors import StateWriteFailed
from nsd.model import Fault, ProcessSample, TenantRecord, TenantState

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE tenants (
    uid         INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    state       TEXT    NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    netns_name  TEXT    NOT NULL UNIQUE,
    host_ifname TEXT    NOT NULL UNIQUE,
    adopted     INTEGER NOT NULL DEFAULT 0,
    created_us  INTEGER NOT NULL,
    updated_us  INTEGER NOT NULL
);
-- One row per address handed out and not yet free again. released_us NULL:
-- active lease of uid. Otherwise quarantined since released_us, and uid is then
-- the last holder, who may get the address back.
CREATE TABLE leases (
    family      INTEGER NOT NULL CHECK (family IN (4, 6)),
    address     TEXT    NOT NULL,
    uid         INTEGER NOT NULL,
    released_us INTEGER,
    PRIMARY KEY (family, address)
);
CREATE UNIQUE INDEX leases_one_per_tenant ON leases (family, uid) WHERE released_us IS NULL;
"""

# Schema changes, one transaction each: version N -> N + 1.
_MIGRATIONS: dict[int, str] = {
    1: """
-- Per-tenant limit overrides (field as in nsd.limits, canonical value).
CREATE TABLE tenant_limits (
    uid   INTEGER NOT NULL REFERENCES tenants(uid) ON DELETE CASCADE,
    field TEXT    NOT NULL,
    value TEXT    NOT NULL,
    PRIMARY KEY (uid, field)
);
""",
    2: """
-- Per-tenant bandwidth overrides in bit/s: NULL the default, 0 explicitly unlimited.
CREATE TABLE tenant_bandwidth (
    uid         INTEGER PRIMARY KEY REFERENCES tenants(uid) ON DELETE CASCADE,
    egress_bps  INTEGER,
    ingress_bps INTEGER
);
""",
    3: """
-- Faults: a tenant hitting a limit (nsd.observe.faults). No foreign key: a fault outlives
-- its tenant until retention (faults.keep, faults.keep_days) drops it.
CREATE TABLE faults (
    id         INTEGER PRIMARY KEY,
    uid        INTEGER NOT NULL,
    tenant     TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    at_us      INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    limit_value INTEGER,
    value      INTEGER,
    -- JSON array of [pid, comm, rss_bytes, cgroup], largest RSS first
    processes  TEXT    NOT NULL
);
CREATE INDEX faults_by_time ON faults (at_us);
CREATE INDEX faults_by_tenant ON faults (tenant, at_us);
""",
}


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do."""


def now_us() -> int:
    return time.time_ns() // 1000


class LeaseIndex:
    """One family's leases as the leases table holds them, indexed for allocation: is
    an address taken, and what did a tenant hold last. Both are asked on every Create,
    so neither may walk all leases: at 1,000 tenants that was ~0.4 ms per Create."""

    def __init__(self) -> None:
        #: active address -> uid
        self.active: dict[str, int] = {}
        #: quarantined address -> (released_us, the uid that held it)
        self.quarantined: dict[str, tuple[int, int]] = {}
        #: how many active leases ended so far (allocation's search floor, nsd/ipam.py)
        self.releases = 0
        #: uid -> its active addresses, and its quarantined ones with released_us
        self._active_of: dict[int, set[str]] = {}
        self._released_by: dict[int, dict[str, int]] = {}

    def load(self, address: str, uid: int, released_us: int | None) -> None:
        if released_us is None:
            self.take(address, uid)
        else:
            self._quarantine(address, uid, int(released_us))

    def take(self, address: str, uid: int) -> None:
        """``address`` is now ``uid``'s (a quarantined one is taken over)."""
        old = self.quarantined.pop(address, None)
        if old is not None:
            self._unquarantine(address, old[1])
        self.active[address] = uid
        self._active_of.setdefault(uid, set()).add(address)

    def release(self, uid: int, released_us: int | None) -> None:
        """``uid``'s active addresses go into quarantine, or are freed (None)."""
        for address in self._active_of.pop(uid, ()):
            del self.active[address]
            self.releases += 1
            if released_us is not None:
                self._quarantine(address, uid, released_us)

    def purge(self, released_before_us: int) -> None:
        for address in [a for a, (r, _) in self.quarantined.items() if r <= released_before_us]:
            self._unquarantine(address, self.quarantined.pop(address)[1])

    def taken(self, address: str, since_us: int) -> bool:
        if address in self.active:
            return True
        held = self.quarantined.get(address)
        return held is not None and held[0] > since_us

    def previous(self, uid: int, since_us: int) -> str | None:
        mine = [(r, a) for a, r in self._released_by.get(uid, {}).items() if r > since_us]
        return max(mine)[1] if mine else None

    def _quarantine(self, address: str, uid: int, released_us: int) -> None:
        self.quarantined[address] = (released_us, uid)
        self._released_by.setdefault(uid, {})[address] = released_us

    def _unquarantine(self, address: str, uid: int) -> None:
        released = self._released_by.get(uid)
        if released is not None:
            released.pop(address, None)
            if not released:
                del self._released_by[uid]


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = self._open(path)
        # The daemon is the only writer and every write goes through _write(), which
        # empties these: reads of an unchanged store never reach SQLite.
        self._by_uid: dict[int, TenantRecord | None] = {}
        self._uid_of: dict[str, int] = {}
        self._all: tuple[TenantRecord, ...] | None = None
        # The leases by family, read once and then kept in step by the writes below
        # (insert, delete, purge_quarantine: the only ones that touch leases): every
        # Create looks for the lowest free address, and reading all leases anew for it
        # (~2,000 rows at 1,000 tenants, twice) was a third of Create's time on the
        # event loop.
        self._leases: dict[int, LeaseIndex] | None = None

    # -- opening ---------------------------------------------------------------

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        version = SCHEMA_VERSION
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a
            # transaction's boundaries are exactly where the code says.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
            if not fresh:
                # Check before anything writes: even switching the journal mode
                # would modify a database that is not ours to change.
                row = db.execute("PRAGMA quick_check").fetchone()
                if row is None or row[0] != "ok":
                    raise StoreError(
                        f"{path}: database is corrupt ({row[0] if row else 'no answer'}); "
                        "nsd will not rewrite it. Restore a backup or move it away."
                    )
                version = _check_version(db, path)
            db.execute("PRAGMA foreign_keys = ON")
            # WAL + synchronous=NORMAL survives a crash of the process (the case
            # reconcile handles); FULL would only add safety against power loss.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"{path}: not a usable SQLite database ({e}); nsd will not rewrite it. "
                "Restore a backup or move it away."
            ) from e
        os.chmod(path, 0o600)
        if fresh:
            with _transaction(db):
                _create(db)
        else:
            _migrate(db, path, version)
        return db

    def close(self) -> None:
        self._db.close()

    # -- meta ------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write():
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- tenants ---------------------------------------------------------------

    _SELECT = """
        SELECT t.uid, t.name, t.state, t.netns_name, t.host_ifname, t.adopted, t.created_us,
               l4.address, l6.address
        FROM tenants t
        JOIN leases l4 ON l4.uid = t.uid AND l4.family = 4 AND l4.released_us IS NULL
        JOIN leases l6 ON l6.uid = t.uid AND l6.family = 6 AND l6.released_us IS NULL
    """

    def get(self, uid: int) -> TenantRecord | None:
        if uid in self._by_uid:
            return self._by_uid[uid]
        row = self._db.execute(self._SELECT + " WHERE t.uid = ?", (uid,)).fetchone()
        rec = None if row is None else _record(row)
        self._by_uid[uid] = rec
        return rec

    def get_by_name(self, name: str) -> TenantRecord | None:
        uid = self._uid_of.get(name)
        if uid is not None:
            return self.get(uid)
        row = self._db.execute(self._SELECT + " WHERE t.name = ?", (name,)).fetchone()
        if row is None:
            return None
        rec = _record(row)
        self._by_uid[rec.uid] = rec
        self._uid_of[name] = rec.uid
        return rec

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Every write's transaction. The record caches are emptied before it (nothing
        read during it comes from them) and after it, committed or not."""
        self._drop_cache()
        try:
            with _transaction(self._db):
                yield
        except sqlite3.OperationalError as e:
            # SQLITE_FULL, SQLITE_READONLY, SQLITE_IOERR: the transaction was rolled
            # back and nothing is recorded; the callers record intent before acting.
            raise StateWriteFailed(str(self.path), str(e)) from e
        finally:
            self._drop_cache()

    def _drop_cache(self) -> None:
        self._by_uid.clear()
        self._uid_of.clear()
        self._all = None

    def all(self) -> list[TenantRecord]:
        """Every tenant by UID. Cached like get(): the metrics sampler asks for all of
        them on the event loop every interval, and parsing 1,000 rows took ~20 ms."""
        if self._all is None:
            rows = self._db.execute(self._SELECT + " ORDER BY t.uid")
            self._all = tuple(_record(r) for r in rows)
        return list(self._all)

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM tenants").fetchone()[0])

    def insert(self, rec: TenantRecord) -> None:
        """Record a new tenant and its two leases in one transaction."""
        ts = now_us()
        leases = self._lease_table()
        with self._write():
            self._db.execute(
                "INSERT INTO tenants (uid, name, state, netns_name, host_ifname, adopted, "
                "created_us, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.uid, rec.name, rec.state.value, rec.netns_name, rec.host_ifname,
                 int(rec.adopted), rec.created_us, ts),
            )  # fmt: skip
            for family, address in ((4, str(rec.ipv4_address)), (6, str(rec.ipv6_prefix))):
                # A quarantined row for the same address is taken over: the caller
                # (IPAM) only offers addresses whose quarantine has ended, or the
                # tenant's own previous address.
                self._db.execute(
                    "INSERT INTO leases (family, address, uid, released_us) VALUES (?, ?, ?, NULL) "
                    "ON CONFLICT (family, address) DO UPDATE SET uid = excluded.uid, "
                    "released_us = NULL WHERE leases.released_us IS NOT NULL",
                    (family, address, rec.uid),
                )
                if self._db.execute("SELECT changes()").fetchone()[0] != 1:
                    raise StoreError(f"address {address} is leased to another tenant")
        for family, address in ((4, str(rec.ipv4_address)), (6, str(rec.ipv6_prefix))):
            leases[family].take(address, rec.uid)

    def set_state(self, uid: int, state: TenantState) -> None:
        with self._write():
            self._db.execute(
                "UPDATE tenants SET state = ?, updated_us = ? WHERE uid = ?",
                (state.value, now_us(), uid),
            )

    def delete(self, uid: int, *, quarantine: bool) -> None:
        """Forget a tenant in one transaction.

        Its leases go into quarantine (a proxy may still point at them), or are
        dropped outright when the addresses were never in use (a rolled-back create).
        """
        ts = now_us()
        leases = self._lease_table()
        with self._write():
            if quarantine:
                self._db.execute(
                    "UPDATE leases SET released_us = ? WHERE uid = ? AND released_us IS NULL",
                    (ts, uid),
                )
            else:
                self._db.execute("DELETE FROM leases WHERE uid = ? AND released_us IS NULL", (uid,))
            self._db.execute("DELETE FROM tenants WHERE uid = ?", (uid,))
        for index in leases.values():
            index.release(uid, ts if quarantine else None)

    # -- limit overrides -------------------------------------------------------

    def limit_overrides(self, uid: int) -> dict[str, str]:
        rows = self._db.execute("SELECT field, value FROM tenant_limits WHERE uid = ?", (uid,))
        return {str(f): str(v) for f, v in rows}

    def all_limit_overrides(self) -> dict[int, dict[str, str]]:
        """Every tenant's overrides (tenants without any are absent), in one query."""
        out: dict[int, dict[str, str]] = {}
        for uid, f, v in self._db.execute("SELECT uid, field, value FROM tenant_limits"):
            out.setdefault(int(uid), {})[str(f)] = str(v)
        return out

    def set_limit_overrides(self, uid: int, overrides: dict[str, str]) -> None:
        """Replace the tenant's overrides with ``overrides`` in one transaction."""
        with self._write():
            self._db.execute("DELETE FROM tenant_limits WHERE uid = ?", (uid,))
            self._db.executemany(
                "INSERT INTO tenant_limits (uid, field, value) VALUES (?, ?, ?)",
                [(uid, f, v) for f, v in sorted(overrides.items())],
            )

    # -- bandwidth overrides ---------------------------------------------------

    def bandwidth_override(self, uid: int) -> tuple[int | None, int | None]:
        """(egress, ingress) in bit/s: None the default, 0 explicitly unlimited."""
        row = self._db.execute(
            "SELECT egress_bps, ingress_bps FROM tenant_bandwidth WHERE uid = ?", (uid,)
        ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def set_bandwidth_override(self, uid: int, egress: int | None, ingress: int | None) -> None:
        with self._write():
            self._db.execute(
                "INSERT OR REPLACE INTO tenant_bandwidth (uid, egress_bps, ingress_bps) "
                "VALUES (?, ?, ?)",
                (uid, egress, ingress),
            )

    # -- leases ----------------------------------------------------------------

    def _lease_table(self) -> dict[int, LeaseIndex]:
        if self._leases is None:
            leases = {4: LeaseIndex(), 6: LeaseIndex()}
            for family, address, uid, released in self._db.execute(
                "SELECT family, address, uid, released_us FROM leases"
            ):
                leases[int(family)].load(str(address), int(uid), released)
            self._leases = leases
        return self._leases

    def leases(self, family: int) -> LeaseIndex:
        """The family's leases, for reading; only the store changes them."""
        return self._lease_table()[family]

    def address_taken(self, family: int, address: str, quarantine_since_us: int) -> bool:
        """Whether ``address`` is not free for a new tenant: active, or quarantined
        after the cut-off."""
        return self._lease_table()[family].taken(address, quarantine_since_us)

    def previous_address(self, family: int, uid: int, quarantine_since_us: int) -> str | None:
        """The address ``uid`` held most recently, if still in quarantine (not reused)."""
        return self._lease_table()[family].previous(uid, quarantine_since_us)

    def purge_quarantine(self, released_before_us: int) -> int:
        leases = self._lease_table()
        with self._write():
            cur = self._db.execute(
                "DELETE FROM leases WHERE released_us IS NOT NULL AND released_us <= ?",
                (released_before_us,),
            )
            purged = cur.rowcount
        for index in leases.values():
            index.purge(released_before_us)
        return purged

    # -- faults ----------------------------------------------------------------

    def add_faults(self, faults: Sequence[Fault], keep: int, keep_after_us: int) -> list[int]:
        """Store ``faults`` in one transaction, then apply the retention: at most
        ``keep`` faults, none older than ``keep_after_us``. Returns the new ids."""
        ids = []
        with _transaction(self._db):
            for f in faults:
                procs = json.dumps([[p.pid, p.comm, p.rss_bytes, p.cgroup] for p in f.processes])
                cur = self._db.execute(
                    "INSERT INTO faults (uid, tenant, kind, at_us, count, limit_value, value, "
                    "processes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.uid, f.tenant, f.kind, f.at_us, f.count, f.limit, f.value, procs),
                )
                ids.append(int(cur.lastrowid or 0))
            self._db.execute("DELETE FROM faults WHERE at_us < ?", (keep_after_us,))
            # Ids only grow and only the oldest rows are deleted, so the newest
            # ``keep`` are those above max(id) - keep: two index look-ups, where
            # "ORDER BY id DESC OFFSET keep" would walk ``keep`` rows on every write.
            self._db.execute(
                "DELETE FROM faults WHERE id <= (SELECT max(id) FROM faults) - ?", (keep,)
            )
        return ids

    def faults(
        self, tenant: str | None = None, since_us: int = 0, limit: int = 1000
    ) -> list[Fault]:
        """Stored faults, oldest first: the newest ``limit`` of those at or after
        ``since_us`` (of ``tenant`` only, if given)."""
        rows = self._db.execute(
            "SELECT id, uid, tenant, kind, at_us, count, limit_value, value, processes "
            "FROM faults WHERE at_us >= ? AND (? IS NULL OR tenant = ?) "
            "ORDER BY id DESC LIMIT ?",
            (since_us, tenant, tenant, limit),
        ).fetchall()
        return [_fault(r) for r in reversed(rows)]

    def lease_rows(self) -> list[tuple[int, str, int, int | None]]:
        """Every lease row (family, address, uid, released_us): for tests and audits."""
        return [
            (int(f), str(a), int(u), r)
            for f, a, u, r in self._db.execute(
                "SELECT family, address, uid, released_us FROM leases ORDER BY family, address"
            )
        ]


def _create(db: sqlite3.Connection) -> None:
    _execute_script(db, _SCHEMA)
    for version in sorted(_MIGRATIONS):
        _execute_script(db, _MIGRATIONS[version])
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    # Statement by statement: executescript() would COMMIT our open transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migrate(db: sqlite3.Connection, path: Path, version: int) -> None:
    while version < SCHEMA_VERSION:
        with _transaction(db):
            _execute_script(db, _MIGRATIONS[version])
            version += 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))


def _check_version(db: sqlite3.Connection, path: Path) -> int:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not an nsd database ({e})") from e
    if row is None or not str(row[0]).isdigit():
        raise StoreError(f"{path}: not an nsd database (no schema version)")
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} was written by a newer nsd "
            f"(this one knows up to {SCHEMA_VERSION}); refusing to touch it"
        )
    return version


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk during COMMIT does), and a
        # COMMIT that failed otherwise leaves the transaction open: end it either way.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _fault(row: tuple[Any, ...]) -> Fault:
    fid, uid, tenant, kind, at_us, count, limit, value, procs = row
    return Fault(
        uid=int(uid), tenant=str(tenant), kind=str(kind), at_us=int(at_us), count=int(count),
        limit=None if limit is None else int(limit), value=None if value is None else int(value),
        processes=tuple(ProcessSample(int(p), str(c), int(r), str(g))
                        for p, c, r, g in json.loads(procs)),
        id=int(fid),
    )  # fmt: skip


def _record(row: tuple[object, ...]) -> TenantRecord:
    uid, name, state, netns, ifname, adopted, created, v4, v6 = row
    return TenantRecord(
        uid=int(str(uid)),
        name=str(name),
        state=TenantState(str(state)),
        netns_name=str(netns),
        host_ifname=str(ifname),
        ipv4_address=IPv4Address(str(v4)),
        ipv6_prefix=IPv6Network(str(v6)),
        adopted=bool(adopted),
        created_us=int(str(created)),
    )
