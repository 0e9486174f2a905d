"""A real Prometheus (Debian's package) scraping nsd with contrib/prometheus's rules
(phase 2): after an OOM kill in alice's slice, /api/v1/alerts shows
TenantOOMKilled firing for alice, and TenantMemoryNearLimit firing for bob, held
at 95 % of his MemoryMax.

Time is compressed: nsd's package ships the rules
(/usr/share/nsd/prometheus/nsd-rules.yml); this test loads a copy whose `for: 5m`
are `for: 30s` (and scrapes and evaluates every 5 s), or it would wait 5 minutes
under TCG. The expressions are the shipped ones; promtool's unit tests
(tests/unit/test_prometheus_rules.py) cover the real durations.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.budget import memory_max, oom_in_oneshot, reporting, working_set
from tests.e2e.guest import SCRATCH, run, stop_unit, wait_for

pytestmark = pytest.mark.phase2

RULES = Path("/usr/share/nsd/prometheus/nsd-rules.yml")
PORT = 19090
API = f"http://127.0.0.1:{PORT}/api/v1"
UNIT = "nsd-e2e-prometheus.service"
CONFIG = """\
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: [{rules}]
scrape_configs:
  - job_name: nsd
    static_configs: [{{targets: ["127.0.0.1:9917"]}}]
"""


def api(path: str) -> Any:
    with urllib.request.urlopen(f"{API}/{path}", timeout=10) as r:  # noqa: S310 - http://127.0.0.1
        return json.loads(r.read())["data"]


@pytest.fixture(scope="module")
def prometheus(scratch: Path) -> Iterator[Path]:
    home = SCRATCH / "prometheus"
    shutil.rmtree(home, ignore_errors=True)
    (home / "data").mkdir(parents=True)
    rules = home / "nsd-rules.yml"
    rules.write_text(RULES.read_text().replace("for: 5m", "for: 30s"))
    (home / "prometheus.yml").write_text(CONFIG.format(rules=rules))
    run("systemd-run", "--quiet", f"--unit={UNIT}", "-p", "Type=exec", "/usr/bin/prometheus",
        f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{PORT}")  # fmt: skip
    try:

        def nsd_up() -> bool:
            try:
                targets = api("targets")["activeTargets"]
            except OSError:
                return False
            return any(t["labels"]["job"] == "nsd" and t["health"] == "up" for t in targets)

        wait_for(nsd_up, "Prometheus to scrape nsd", timeout=180)
        yield home
    finally:
        stop_unit(UNIT)


def firing(name: str, tenant: str) -> dict[str, Any] | None:
    for a in api("alerts")["alerts"]:
        labels = a["labels"]
        if (labels["alertname"], labels.get("tenant"), a["state"]) == (name, tenant, "firing"):
            return dict(a)
    return None


def test_alerts_fire_in_a_real_prometheus(
    tenants_ready: dict[str, Any], prometheus: Path, figures: dict[str, Any]
) -> None:
    # bob holds ~40 MiB (written, so resident; below the 64 MiB MemoryMax earlier
    # tests left on bob's slice); started from this test's service, so nsd's
    # placement puts it into a scope in bob's slice.
    holder = subprocess.Popen(
        reporting("bob", "budget-holder", "/usr/bin/python3", "-c",
                  "import time; x = b'x' * (40 << 20); time.sleep(900)"),
    )  # fmt: skip
    try:
        wait_for(lambda: working_set("bob") > 40 << 20, "bob to hold 40 MiB", timeout=60)
        time.sleep(2)
        limit = int(working_set("bob") / 0.95)  # 95 % of the limit, in working-set terms
        with memory_max("bob", str(limit)):
            # alice's OOM kill, after Prometheus has seen her counters at least once.
            time.sleep(10)
            with memory_max("alice", "64M"):
                try:
                    oom_in_oneshot("alice", "budget-prom-oom")
                finally:
                    stop_unit("budget-prom-oom.service")
            oom = wait_for(lambda: firing("TenantOOMKilled", "alice"),
                           "TenantOOMKilled for alice", timeout=120)  # fmt: skip
            near = wait_for(lambda: firing("TenantMemoryNearLimit", "bob"),
                            "TenantMemoryNearLimit for bob", timeout=180)  # fmt: skip
            assert oom is not None and near is not None
            figures["prometheus_alerts"] = {
                "TenantOOMKilled": {"labels": oom["labels"], "annotations": oom["annotations"]},
                "TenantMemoryNearLimit": {"labels": near["labels"], "value": near["value"]},
                "bob_memory_max": limit,
            }
            # Healthy tenants stay silent.
            assert firing("TenantOOMKilled", "web-shop") is None
            assert firing("TenantMemoryNearLimit", "alice") is None
            assert "nsctl faults alice" in oom["annotations"]["description"]
    finally:
        holder.kill()
        holder.wait()
