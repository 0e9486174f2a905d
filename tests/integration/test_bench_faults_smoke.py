"""scripts/bench-faults end to end at a small N, both parts: every figure the docs
quote (docs/metrics.md, "Cost") is in the output with a number, every fault of the
burst was recorded, and nothing the bench made is left behind.

No timing assertions: figures on a shared test machine say nothing about a build
(the 1,000-tenant figures come from a full run, docs/metrics.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import pytest

from tests.harness import ROOT, assert_bench_left_nothing, run_bench

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ip", "useradd", "userdel", "nsenter", "nft")),
        reason="needs iproute2, shadow utils, util-linux and nftables",
    ),
]

BENCH = str(ROOT / "scripts" / "bench-faults")
TENANTS = 8


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def latencies(figures: dict[str, Any]) -> bool:
    """Percentiles of a non-empty sample (the in-process probe's lateness may be 0)."""
    return (
        bool(figures)
        and figures["samples"] > 0
        and all(number(figures[k]) and figures[k] >= 0 for k in ("p50_ms", "p99_ms", "max_ms"))
    )


def bench_faults(*args: str) -> tuple[dict[str, Any], str]:
    res = run_bench([BENCH, *args], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    try:
        result: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"not JSON on stdout: {res.stdout[-3000:]!r}\n{res.stderr[-3000:]}")
    return result, res.stderr


def test_daemon_part_records_every_fault_of_the_burst_and_cleans_up() -> None:
    # --settle 16: one metrics sample (15 s) with every tenant before the burst, so
    # the burst's drops are new at the next one.
    r, stderr = bench_faults(
        "--tenants", str(TENANTS), "--idle", "2", "--quiet", "2", "--settle", "16"
    )
    assert r["mode"] == "daemon" and r["tenants"] == TENANTS
    # One conntrack fault per tenant: stored and announced (Watch) exactly once each.
    assert r["burst_faults_recorded"] == TENANTS, r
    assert 0 < r["burst_first_record_after_seconds"] <= r["burst_all_recorded_after_seconds"]
    for key in ("idle_cpu_percent_of_one_core", "idle_cpu_percent_event_loop_thread",
                "burst_sent_seconds", "burst_daemon_cpu_seconds", "create_seconds"):  # fmt: skip
        assert number(r[key]) and r[key] >= 0, (key, r[key])
    assert latencies(r["get_quiet"]), r["get_quiet"]
    assert latencies(r["get_during_burst"]), r["get_during_burst"]
    # The daemon's own log says what it recorded: the journal line's fallback.
    assert any("conntrack x1, limit 1" in line for line in r["daemon_log_tail"]), r

    assert_bench_left_nothing(stderr)


def test_inprocess_part_stores_a_record_per_tenant() -> None:
    n = 50
    r, _ = bench_faults("--mode", "inprocess", "--tenants", str(n), "--idle", "1", "--window", "1")
    assert r["tenants"] == n and r["watches"] >= n
    assert r["burst_faults_written"] == n
    # oom_kill and max of the same moment: two records per tenant.
    assert r["burst_records_stored"] == 2 * n, r
    assert number(r["burst_all_stored_after_seconds"]) and r["burst_all_stored_after_seconds"] > 0
    assert number(r["idle_cpu_percent_of_one_core"])
    assert latencies(r["get_probe_quiet"]), r["get_probe_quiet"]
    assert latencies(r["get_probe_during_burst"]), r["get_probe_during_burst"]
