"""Soak: many mixed API calls and create/remove cycles against one daemon; its
descriptors, threads, RSS and database must come back to where they were.

Used by ``scripts/bench --soak`` (100,000 calls, 1,000 cycles) and, scaled down, by
tests/integration/test_soak.py. The daemon runs with a short address quarantine and
purge interval (``SOAK_CONFIG``), so the released leases of the cycles must also
leave the database within the run.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nsd.varlink.client import VarlinkClient, VarlinkError

from .env import Cleanup, add_host_netns, add_users, log, new_prefix, start_daemon

if TYPE_CHECKING:
    import argparse

T = "io.nsd.Tenant."
D = "io.nsd.Daemon."

# Leases released by a cycle end their quarantine after 2 s and are purged each second.
SOAK_CONFIG = "[ipam]\nquarantine_seconds = 2\npurge_interval = 1\n"

# (weight, method, parameters; "{t}" is a resident tenant, "{x}" a name that is none)
MIX: list[tuple[int, str, dict[str, Any]]] = [
    (30, T + "Get", {"name": "{t}"}),
    (15, T + "Enter", {"name": "{t}", "create": False}),
    (10, T + "GetLimits", {"name": "{t}"}),
    (10, T + "GetNetwork", {"name": "{t}"}),
    (10, T + "GetUsage", {"name": "{t}"}),
    (5, T + "List", {}),
    (2, T + "Ensure", {"name": "{t}"}),  # checks the whole host side: the costly one
    (5, D + "Status", {}),
    (5, T + "Get", {"name": "{x}"}),  # NoSuchTenant
    (3, T + "Get", {"name": "Not A Name"}),  # InvalidTenantName
    (2, T + "Watch", {"name": "{t}"}),  # a stream, abandoned after its first reply
]
NEW_CONNECTION_EVERY = 50  # calls per connection: connections churn too


def checkpoint(db: str) -> None:
    """Fold the WAL into the database file (as SQLite's auto-checkpoint does every
    1,000 pages), so that the file's size says how much the database holds."""
    con = sqlite3.connect(db, timeout=10)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def footprint(pid: int, db: str) -> dict[str, int]:
    """The daemon's open descriptors, threads, RSS (KiB) and database files (bytes),
    once its descriptor count is steady (a connection just closed by a client is
    closed by the daemon a moment later)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(50):
        time.sleep(0.1)
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now == fds:
            break
        fds = now
    checkpoint(db)
    out = {"fds": fds}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Threads":
                out["threads"] = int(value)
            elif key == "VmRSS":
                out["rss_kib"] = int(value.split()[0])
    out["db_bytes"] = os.path.getsize(db)
    wal = db + "-wal"
    out["wal_bytes"] = os.path.getsize(wal) if os.path.exists(wal) else 0
    return out


def _call(c: VarlinkClient, method: str, params: dict[str, Any]) -> str:
    """One call; its outcome: "ok" or the error's name."""
    try:
        if method.endswith(".Enter"):
            _, fds = c.call_with_fds(method, params)
            for fd in fds:
                os.close(fd)
        elif method.endswith(".Watch"):
            next(iter(c.call_more(method, params)))
            return "stream"  # the connection is abandoned mid-stream: the caller drops it
        else:
            c.call(method, params)
    except VarlinkError as e:
        return e.name
    return "ok"


class Soak:
    def __init__(
        self,
        socket_path: str,
        pid: int,
        db: str,
        residents: list[str],
        cyclers: list[str],
        *,
        lease_rows: Callable[[], int],
        say: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.socket_path = socket_path
        self.pid = pid
        self.db = db
        self.residents = residents  # tenants that exist throughout
        self.cyclers = cyclers  # users created and removed in turn
        self.lease_rows = lease_rows
        self.say = say
        self.rnd = random.Random(17)  # noqa: S311 -- a load pattern, not a secret
        self.outcomes: dict[str, int] = {}
        self._weights = [w for w, _, _ in MIX]

    def _batch(self, c: VarlinkClient, n: int) -> VarlinkClient:
        for i in range(n):
            if i and i % NEW_CONNECTION_EVERY == 0:
                c.close()
                c = VarlinkClient(self.socket_path)
            _, method, params = self.rnd.choices(MIX, self._weights)[0]
            p = {
                k: (
                    self.rnd.choice(self.residents)
                    if v == "{t}"
                    else "nosuchtenant" + str(i % 7)
                    if v == "{x}"
                    else v
                )
                for k, v in params.items()
            }
            outcome = _call(c, method, p)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome == "stream":
                c.close()
                c = VarlinkClient(self.socket_path)
        return c

    def _cycle(self, c: VarlinkClient, k: int) -> None:
        name = self.cyclers[k % len(self.cyclers)]
        c.call(T + "Create", {"name": name})
        c.call(T + "Remove", {"name": name})

    def run(self, calls: int, cycles: int, warmup_calls: int, warmup_cycles: int) -> dict[str, Any]:
        c = VarlinkClient(self.socket_path)
        try:
            for k in range(warmup_cycles):
                self._cycle(c, k)
            c = self._batch(c, warmup_calls)
            self.outcomes.clear()
            before = footprint(self.pid, self.db)
            leases_before = self._leases_settled(len(self.residents) * 2)
            self.say(f"soak: baseline {before}, {leases_before} lease rows")
            t0 = time.monotonic()
            per_cycle = calls // max(cycles, 1)
            done_calls = 0
            for k in range(cycles):
                c = self._batch(c, per_cycle)
                done_calls += per_cycle
                self._cycle(c, k)
                if (k + 1) % max(cycles // 10, 1) == 0:
                    self.say(f"soak: {done_calls} calls, {k + 1} cycles, "
                             f"{footprint(self.pid, self.db)}")  # fmt: skip
            c = self._batch(c, calls - done_calls)
            elapsed = time.monotonic() - t0
        finally:
            c.close()
        t1 = time.monotonic()
        leases_after = self._leases_settled(leases_before)
        purge_wait = time.monotonic() - t1
        after = footprint(self.pid, self.db)
        self.say(f"soak: after {after}, {leases_after} lease rows ({purge_wait:.1f} s to purge)")
        return {
            "calls": calls,
            "cycles": cycles,
            "seconds": round(elapsed, 1),
            "calls_per_s": round((calls + 2 * cycles) / elapsed),
            "outcomes": dict(sorted(self.outcomes.items())),
            "before": before,
            "after": after,
            "lease_rows_before": leases_before,
            "lease_rows_after": leases_after,
            "purge_wait_s": round(purge_wait, 1),
            "rss_change": round(after["rss_kib"] / before["rss_kib"] - 1, 4),
        }

    def _leases_settled(self, want: int, timeout: float = 15.0) -> int:
        """Lease rows once the purge got to them: ``want``, or what is left at the end."""
        deadline = time.monotonic() + timeout
        rows = self.lease_rows()
        while rows != want and time.monotonic() < deadline:
            time.sleep(0.2)  # the purge runs on its own timer in the daemon: poll it
            rows = self.lease_rows()
        return rows


def run_soak(args: argparse.Namespace) -> int:
    """``scripts/bench --soak``: its own users, host namespace and daemon; prints the
    figures and writes them to OUT/soak-latest.json."""
    cleanup = Cleanup()
    prefix = new_prefix()
    with cleanup.active():
        users = add_users(cleanup, prefix, 6, progress=False)
        host = add_host_netns(cleanup, f"{prefix}-nsd")
        d = start_daemon(cleanup, prefix, host, private_run_dir=True, extra=SOAK_CONFIG)
        residents, cyclers = users[:3], users[3:]
        for name in residents:
            d.call(T + "Create", name=name)
        soak = Soak(
            d.socket, d.pid, str(d.state_dir / "nsd.db"), residents, cyclers,
            lease_rows=lambda: int(d.db_rows("SELECT count(*) FROM leases")[0][0]), say=log,
        )  # fmt: skip
        warmup_calls = min(5_000, args.soak_calls // 10)
        result = soak.run(args.soak_calls, args.soak_cycles, warmup_calls, 20)
        for name in residents:
            d.call(T + "Remove", name=name)
        status = d.stop(timeout=60)
        result["exit_status"] = status
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    b, a = result["before"], result["after"]
    print(f"soak: {result['calls']:,} calls and {result['cycles']:,} create/remove cycles "
          f"in {result['seconds']} s")  # fmt: skip
    for key in ("fds", "threads", "rss_kib", "db_bytes", "wal_bytes"):
        print(f"  {key:10} {b[key]:>10,} -> {a[key]:>10,}")
    print(f"  leases     {result['lease_rows_before']:>10,} -> {result['lease_rows_after']:>10,} "
          f"(purged {result['purge_wait_s']} s after the last cycle)")  # fmt: skip
    print(f"  outcomes   {result['outcomes']}")
    ok = (
        a["fds"] <= b["fds"]
        and a["threads"] == b["threads"]
        and abs(result["rss_change"]) <= 0.05
        and a["db_bytes"] == b["db_bytes"]
        and result["lease_rows_after"] == result["lease_rows_before"]
        and status == 0
    )
    print(f"  {'back to baseline' if ok else 'NOT back to baseline'} "
          f"(RSS {result['rss_change']:+.1%})")  # fmt: skip
    return 0 if ok else 1
