"""A short soak (the long one is ``scripts/bench --soak``): mixed API calls and
create/remove cycles against a real daemon; its descriptors, threads, RSS and
database come back to the baseline, and released leases are purged after their
quarantine by the daemon's own timer."""

from __future__ import annotations

import os
import sys

import pytest

from tests.harness import ROOT, daemon_env

sys.path.insert(0, str(ROOT / "scripts"))
from benchlib.soak import SOAK_CONFIG, Soak

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, users"),
]

CALLS, CYCLES = 5_000, 50


def test_short_soak_returns_to_baseline() -> None:
    with daemon_env(extra=SOAK_CONFIG) as (d, users):
        d.start()
        residents = [users.add() for _ in range(3)]
        for name in residents:
            d.call("io.nsd.Tenant.Create", name=name)
        cyclers = [users.add() for _ in range(3)]
        assert d.proc is not None
        soak = Soak(
            d.socket,
            d.proc.pid,  # nsenter --net execs nsd in its own process
            str(d.state_dir / "nsd.db"),
            residents,
            cyclers,
            lease_rows=lambda: int(d.db_rows("SELECT count(*) FROM leases")[0][0]),
            say=print,
        )
        r = soak.run(CALLS, CYCLES, warmup_calls=2_000, warmup_cycles=6)
        print(r)
        before, after = r["before"], r["after"]
        assert after["fds"] <= before["fds"]
        assert after["threads"] == before["threads"]
        assert abs(r["rss_change"]) <= 0.05, r
        assert after["db_bytes"] == before["db_bytes"]
        # Every cycle's leases were released, quarantined and then purged.
        assert r["lease_rows_after"] == r["lease_rows_before"] == 2 * len(residents)
        assert "io.nsd.Daemon.InternalError" not in r["outcomes"]
        assert d.stop() == 0, d.log_text()
