"""scripts/bench --quick end to end: every comparison is in the results with numbers,
the docs render, and nothing the bench made is left behind.

No timing assertions: figures on a shared test machine say nothing about a build.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, assert_bench_left_nothing, run_bench

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ip", "useradd", "userdel", "nsenter")),
        reason="needs iproute2, shadow utils and util-linux",
    ),
]


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: Any) -> bool:
    return number(value) and value > 0


def test_bench_quick_has_every_comparison_and_cleans_up(tmp_path: Path) -> None:
    out, docs = tmp_path / "out", tmp_path / "docs"
    res = run_bench(
        [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out), "--docs-dir", str(docs)],
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    r = json.loads((out / "latest.json").read_text())
    n = r["meta"]["tenants"]

    # 1. launcher: nsd-exec (native/), the seed's wrapper, bare nsenter
    la = r["launcher"]
    for key in ("nsd-exec", "wrapper", "nsenter"):
        assert positive(la["variants_ms"][key]["median"]), key
        assert la["variants_ms"][key]["n"] == la["rounds"]
    assert all(positive(s["median"]) for s in la["anatomy_ms"].values())
    assert la["systemd_native_template"]["status"] == "not measured"

    # 2. tenant creation, nsd against the ip script, per tenant and end to end
    c = r["create"]
    assert c["tenants"] == n
    for side in ("nsd_ms", "shell_ms"):
        assert positive(c[side]["median"]) and positive(c[side]["p90"])
    assert positive(c["nsd_total_s"]) and positive(c["shell_total_s"])
    assert positive(c["speedup_median"])

    # 3. API: Get and Enter at 1, 16, 64 clients (closed loop) and the open-loop cell
    api = r["api"]
    oc, orate = api["open_loop"]["clients"], api["open_loop"]["offered_per_s"]
    for method in ("Get", "Enter"):
        for cell in (f"{method}@1", f"{method}@16", f"{method}@64", f"{method}@{oc},{orate:.0f}/s"):
            assert positive(api[cell]["calls_per_s"]), cell
            assert positive(api[cell]["p50_ms"]) and positive(api[cell]["p99_ms"]), cell
            assert api[cell]["errors"] == 0, api[cell]["first_error"]

    # 4. memory at 0 and N tenants and after the restart; 5. restart to READY=1
    for key in ("0", str(n), "after_api", "after_restart"):
        assert positive(r["memory"][key]["rss_kib"]) and positive(r["memory"][key]["pss_kib"])
    assert number(r["memory_growth_kib_per_tenant"])
    assert r["restart"]["ready_s"] and all(positive(x) for x in r["restart"]["ready_s"])
    assert all(x is not None and x["tenants"] == n for x in r["restart"]["reconcile"])

    # 5b. the network policy on
    p = r["policy"]
    assert positive(p["create_ms"]["median"]) and positive(p["restart_ready_s"])

    # 6. metrics: a sample and scrapes at n tenants, with the extra processes
    m = r["metrics"]
    assert m["tenants"] == n and m["processes_spawned"] > 0
    assert positive(m["sampler_total"]["median_ms"]) and positive(m["scrape_text"]["median_ms"])

    # 8. boot: cold and warm starts, serial and concurrent Create, beside both floors
    b = r["boot"]
    assert b["tenants"] == n
    for key in ("cold_ready_s", "warm_ready_s", "ip_batch_s", "floor_create_s", "floor_check_s"):
        assert b[key] and all(positive(x) for x in b[key]), key
    assert positive(b["serial_create_s"]) and positive(b["concurrent_create_s"])
    starts = b["cold_reconcile"] + b["warm_reconcile"]
    assert all(x is not None and x["tenants"] == n for x in starts), starts
    assert all(x["actions"] == 0 for x in b["warm_reconcile"])  # everything was there
    assert all(x["actions"] > 0 for x in b["cold_reconcile"])  # everything was rebuilt

    # the table has a row for every comparison, placeholders included
    sections = {row["comparison"] for row in r["summary"]}
    for s in (
        "1 launcher",
        "2 create",
        "3 API",
        "4 memory",
        "5 restart",
        "6 metrics",
        "7 resident helpers",
        "8 boot",
    ):
        assert s in sections, s

    # the docs: Markdown with the table, and well-formed SVG charts
    md = (docs / "benchmarks.md").read_text()
    assert "| 2 create |" in md and "benchmarks/launcher.svg" in md
    assert "| 8 boot |" in md and "## 8. Boot and bulk creation" in md
    charts = sorted(p.name for p in (docs / "benchmarks").glob("*.svg"))
    assert charts == ["api.svg", "launcher.svg", "memory.svg", "tenant-create.svg"]
    for chart in charts:
        root = ET.parse(docs / "benchmarks" / chart).getroot()  # noqa: S314 -- our own output
        assert root.tag.endswith("svg")

    assert_bench_left_nothing(res.stderr)
