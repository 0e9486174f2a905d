"""Prometheus metrics on a real cgroup v2 host (phase 1).

Read from nsd's endpoint (127.0.0.1:9917) the way Prometheus would: a tenant
that allocates 100 MB shows it in nsd_tenant_memory_current_bytes within one
sampling interval; the OOM kill of test_50 is counted; a PAMName= service owned
by a tenant shows up as a helper with its RSS.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    nsctl,
    show,
    slice_cgroup,
    stop_unit,
    systemd_run,
    uid_of,
    wait_for,
)

pytestmark = pytest.mark.phase1

METRICS = "http://127.0.0.1:9917/metrics"
INTERVAL = 15.0  # nsd's default metrics.interval


def sample(name: str, tenant: str, **labels: str) -> float | None:
    body = urllib.request.urlopen(METRICS, timeout=10).read().decode()
    want = {"tenant": tenant, **labels}
    for line in body.splitlines():
        m = re.fullmatch(rf"{name}\{{([^}}]*)\}} (\S+)", line)
        if m is None:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        if all(got.get(k) == v for k, v in want.items()):
            return float(m[2])
    return None


def test_allocation_shows_in_memory_current_within_one_interval(
    tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    nsctl("limits", "alice", "--memory-max", "512M")
    # Under one budget per tenant (user.slice) alice's slice also holds her user
    # manager, which logind started for the PAMName= sessions of test_60 and stops
    # once they are gone: its memory may leave the slice while we wait, and the
    # last sample may be older than its stop. The baseline leaves it out.
    now = int(Path(f"/sys/fs/cgroup{slice_cgroup('alice')}/memory.current").read_text())
    before = min(sample("nsd_tenant_memory_current_bytes", "alice") or 0.0, float(now))
    manager = show(f"user@{uid_of('alice')}.service", "MemoryCurrent")["MemoryCurrent"]
    before -= int(manager) if manager.isdigit() else 0
    hog = (
        "import time\nb = bytearray(100 << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\nopen('/run/nsd-e2e/hog','w').close()\n"
        "time.sleep(120)\n"
    )
    unit = nsctl("run", "alice", "--", "/usr/bin/python3", "-c", hog).stdout.strip()
    try:
        wait_for(lambda: os.path.exists("/run/nsd-e2e/hog"), "the allocation")
        allocated = time.monotonic()
        value = wait_for(
            lambda: (
                (v := sample("nsd_tenant_memory_current_bytes", "alice")) is not None
                and v >= before + (100 << 20)
                and v
            ),
            "nsd_tenant_memory_current_bytes to show 100 MB more",
            timeout=INTERVAL + 5,
        )
        figures["metrics_seen_after_s"] = round(time.monotonic() - allocated, 1)
        figures["alice_memory_current_bytes"] = value
    finally:
        stop_unit(unit)


def test_oom_kill_is_counted() -> None:
    # test_50 OOM-killed a process in bob's slice.
    value = sample("nsd_tenant_memory_events_total", "bob", event="oom_kill")
    assert value is not None and value >= 1


def test_pamname_service_shows_as_helper_with_rss(
    tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    unit = "metrics-pam-alice.service"
    systemd_run(unit, "/bin/sleep", "infinity", properties=("PAMName=su-l", "User=alice"))
    try:
        count = wait_for(
            lambda: (sample("nsd_tenant_helper_processes", "alice") or 0) >= 1,
            "the sd-pam helper to be counted",
            timeout=INTERVAL * 2 + 5,
        )
        assert count
        rss = sample("nsd_tenant_helper_rss_bytes", "alice")
        assert rss is not None and rss > 0
        figures["sd_pam_helper_rss_bytes"] = rss
        figures["sd_pam_helper_pss_bytes"] = sample("nsd_tenant_helper_pss_bytes", "alice")
    finally:
        stop_unit(unit)
