"""The exporter: families from a fixture snapshot, both exposition formats,
promtool's linter, self-metrics, caching, the HTTP endpoint, the docs, the
proposed varlink replies and the nsctl tables."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import Collector, CollectorRegistry

from nsd import topview
from nsd.api.handlers import idl as installed_idl
from nsd.api.views import audit_reply, usage_reply
from nsd.core import doctor
from nsd.limits import Limits
from nsd.model import ReconcileAction
from nsd.observe import catalogue as metrics_catalogue
from nsd.observe import collectors, exposition, metrics
from nsd.observe import http as metrics_http
from nsd.observe.sampler import Snapshot, Target, collect, escaped_by_tenant
from nsd.varlink import idl
from tests.promtool import promtool

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CGROUP, PROC = str(FIXTURES / "cgroup"), str(FIXTURES / "proc")


def fixture_targets() -> list[Target]:
    limits = Limits(memory_max=str(2 << 30), memory_high="infinity", cpu_quota="150%")
    return [
        Target(1001, "alice", "/tenant.slice/tenant-1001.slice", 4026532301, "nsd1001", limits),
        Target(1002, "bob", "/tenant.slice/tenant-1002.slice", 4026532302, "nsd1002"),
        Target(1003, "carol", "/tenant.slice/tenant-1003.slice", None, "nsd1003"),
    ]


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return collect(fixture_targets(), cgroup_root=CGROUP, proc_root=PROC, generation=1)


def registry_for(
    snapshot: Snapshot | None, *, with_snapshot: bool = True
) -> tuple[CollectorRegistry, collectors.DaemonMetrics]:
    """A registry with the daemon's metrics and, unless Exposition serves the
    snapshot part itself, the snapshot collector."""
    reg = CollectorRegistry(auto_describe=False)
    if with_snapshot:
        reg.register(collectors.SnapshotCollector(lambda: snapshot))
    return reg, collectors.DaemonMetrics(reg, version="9.9.9")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in parse_text(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def tenant_series(text: str, tenant: str) -> set[str]:
    return {f"{n}{dict(lbl)}" for (n, lbl) in samples(text) if ("tenant", tenant) in lbl}


def test_tenant_values(snap: Snapshot) -> None:
    reg, _ = registry_for(snap)
    text = generate_latest(reg).decode()
    a = {"tenant": "alice", "uid": "1001"}
    assert value(text, "nsd_tenant_memory_current_bytes", **a) == 1 << 30
    assert value(text, "nsd_tenant_memory_working_set_bytes", **a) == (1 << 30) - 268435456
    assert value(text, "nsd_tenant_memory_stat_bytes", **a, kind="sock") == 8192
    assert value(text, "nsd_tenant_memory_events_total", **a, event="oom_kill") == 1
    assert value(text, "nsd_tenant_memory_page_faults_total", **a) == 9876543
    assert value(text, "nsd_tenant_pressure_memory_waiting_seconds_total", **a) == 1.234567
    assert value(text, "nsd_tenant_pressure_cpu_stalled_seconds_total", **a) == 12.345678
    assert value(text, "nsd_tenant_cpu_usage_seconds_total", **a) == 123.456789
    assert value(text, "nsd_tenant_cpu_throttled_periods_total", **a) == 42
    assert value(text, "nsd_tenant_tasks", **a) == 57
    assert value(text, "nsd_tenant_io_bytes_total", **a, operation="discard") == 8192
    assert value(text, "nsd_tenant_io_operations_total", **a, operation="write") == 354
    assert value(text, "nsd_tenant_limit_memory_max_bytes", **a) == 2 << 30
    assert value(text, "nsd_tenant_limit_memory_high_bytes", **a) == float("inf")
    assert value(text, "nsd_tenant_limit_cpu_quota_cpus", **a) == 1.5
    # Directions from the tenant's side: what the host end sent, the tenant received.
    assert value(text, "nsd_tenant_network_receive_bytes_total", **a) == float(2**64 - 1)
    assert value(text, "nsd_tenant_network_transmit_bytes_total", **a) == 1048576
    assert value(text, "nsd_tenant_network_transmit_drops_total", **a) == 2
    assert value(text, "nsd_tenant_network_receive_errors_total", **a) == 3
    assert value(text, "nsd_tenant_helper_processes", **a) == 2
    assert value(text, "nsd_tenant_processes", **a, **{"class": "session"}) == 1
    assert value(text, "nsd_tenant_escaped_processes", **a, reason="session_outside_namespace") == 1
    assert value(text, "nsd_tenant_escaped_processes", **a, reason="outside_slice") == 2
    assert value(text, "nsd_helper_processes", helper="sudo") == 3
    assert value(text, "nsd_tenants") == 3
    assert value(text, "nsd_metrics_source_available", source="smaps_rollup") == 0
    assert value(text, "nsd_metrics_source_available", source="memory.peak") == 1
    assert value(text, "nsd_build_info", version="9.9.9") == 1


def test_absent_never_zero(snap: Snapshot) -> None:
    reg, _ = registry_for(snap)
    text = generate_latest(reg).decode()
    b = {"tenant": "bob", "uid": "1002"}
    # bob's slice has no memory.peak, memory.swap.current or memory.events: absent.
    assert value(text, "nsd_tenant_memory_peak_bytes", **b) is None
    assert value(text, "nsd_tenant_memory_swap_current_bytes", **b) is None
    assert value(text, "nsd_tenant_memory_events_total", **b, event="oom_kill") is None
    assert value(text, "nsd_tenant_cpu_throttled_periods_total", **b) is None  # no cpu controller
    assert value(text, "nsd_tenant_memory_stat_bytes", **b, kind="kernel") is None
    assert value(text, "nsd_tenant_pressure_io_waiting_seconds_total", **b) is None
    assert value(text, "nsd_tenant_memory_current_bytes", **b) == 4096
    # A zero that was read is a zero.
    assert value(text, "nsd_tenant_io_bytes_total", **b, operation="read") == 0
    # carol has neither a slice nor a veth: only /proc-based and none of the cgroup series.
    carol = tenant_series(text, "carol")
    assert carol and all("helper" in s or "processes" in s for s in carol)
    assert value(text, "nsd_tenant_helper_pss_bytes", tenant="alice", uid="1001") is None
    assert value(text, "nsd_tenant_helper_pss_bytes", tenant="bob", uid="1002") == 2800 * 1024


def test_series_per_tenant_are_bounded(snap: Snapshot) -> None:
    reg, _ = registry_for(snap)
    text = generate_latest(reg).decode()
    limit = metrics_catalogue.per_tenant_series()
    assert limit == 72
    alice = tenant_series(text, "alice")
    # Every source but PSS (one of her helpers has no smaps_rollup), and 3 of the 9 limits.
    assert len(alice) == limit - 1 - 6
    for t in ("bob", "carol"):
        assert len(tenant_series(text, t)) < limit
    labels = {k for (_n, lbl) in samples(text) for k, _v in lbl}
    allowed = {"tenant", "uid", "kind", "event", "operation", "class", "reason", "helper",
               "source", "version", "le", "interface", "method", "error"}  # fmt: skip
    assert labels <= allowed


def test_openmetrics_parses_and_ends_once(snap: Snapshot) -> None:
    reg, daemon = registry_for(snap, with_snapshot=False)
    daemon.on_call_done("io.nsd.Tenant", "Get", None, 0.002)
    exp = exposition.Exposition(lambda: snap, reg)
    body = exp.render(openmetrics=True, use_gzip=False).decode()
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    families = {f.name: f for f in parse_openmetrics(body)}  # type: ignore[no-untyped-call]
    assert families["nsd_tenant_memory_events"].type == "counter"
    assert families["nsd_build"].type == "info"
    assert families["nsd_api_call_duration_seconds"].type == "histogram"
    text = exp.render(openmetrics=False, use_gzip=False).decode()
    assert {f.name for f in parse_text(text)} >= {"nsd_tenant_memory_current_bytes"}


def test_promtool_check_metrics(snap: Snapshot) -> None:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool unavailable: scripts/promtool could not fetch Debian's prometheus")
    reg, daemon = registry_for(snap, with_snapshot=False)
    daemon.on_call_done("io.nsd.Tenant", "Get", "io.nsd.Tenant.NoSuchTenant", 0.002)
    daemon.on_reconcile(0.5, [ReconcileAction("recreate-namespace", "alice", "x")], 0)
    daemon.on_sample(snap)
    body = exposition.Exposition(lambda: snap, reg).render(openmetrics=False, use_gzip=False)
    done = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_daemon_metrics() -> None:
    reg = CollectorRegistry(auto_describe=False)
    d = collectors.DaemonMetrics(reg)
    d.on_call_done("io.nsd.Tenant", "Get", None, 0.003)
    d.on_call_done("io.nsd.Tenant", "Get", "io.nsd.Tenant.NoSuchTenant", 0.001)
    d.on_call_done("io.nsd.Tenant", "Watch", None, 3600.0)
    d.on_reconcile(1.2, [ReconcileAction("repair-address", "a", "x")] * 2, problems=1)
    d.on_sample_error(RuntimeError("x"))
    for _ in range(3):
        d.on_audit_suppressed()
    text = generate_latest(reg).decode()
    get = {"interface": "io.nsd.Tenant", "method": "Get"}
    assert value(text, "nsd_api_calls_total", **get, error="") == 1
    assert value(text, "nsd_api_calls_total", **get, error="io.nsd.Tenant.NoSuchTenant") == 1
    assert value(text, "nsd_api_call_duration_seconds_count", **get) == 2
    assert value(text, "nsd_api_call_duration_seconds_bucket", **get, le="0.001") == 1
    assert value(text, "nsd_api_call_duration_seconds_bucket", **get, le="+Inf") == 2
    # A stream's lifetime is not a latency: counted, not timed.
    assert value(text, "nsd_api_calls_total", interface="io.nsd.Tenant", method="Watch",
                 error="") == 1  # fmt: skip
    assert value(text, "nsd_api_call_duration_seconds_count", interface="io.nsd.Tenant",
                 method="Watch") is None  # fmt: skip
    assert value(text, "nsd_reconcile_actions_total", kind="repair-address") == 2
    assert value(text, "nsd_reconcile_duration_seconds_sum") == 1.2
    assert value(text, "nsd_reconcile_problems") == 1
    assert value(text, "nsd_sampler_errors_total") == 1
    assert value(text, "nsd_audit_lines_suppressed_total") == 3
    assert "_created" not in text


def test_exposition_renders_a_snapshot_once(
    snap: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[bool] = []
    real_text = generate_latest

    def count_text(c: Collector) -> bytes:
        rendered.append(isinstance(c, collectors.TenantCollector))
        return real_text(c)

    monkeypatch.setattr(exposition, "generate_text", count_text)
    reg, _ = registry_for(None, with_snapshot=False)
    current: list[Snapshot | None] = [None]
    exp = exposition.Exposition(lambda: current[0], reg)
    assert b"nsd_tenant" not in exp.render(openmetrics=False, use_gzip=False)
    current[0] = snap
    exp.prerender(snap)  # the sampler's thread does this after each sample
    for _ in range(5):
        body = exp.render(openmetrics=False, use_gzip=False)
    # each tenant once (incremental rendering), then never again for this snapshot
    assert rendered.count(True) == len(snap.tenants) and b"nsd_tenant_memory_current_bytes" in body
    plain = exp.render(openmetrics=False, use_gzip=False)
    packed = exp.render(openmetrics=False, use_gzip=True)
    assert rendered.count(True) == len(snap.tenants)
    # Two gzip members (cached snapshot part + live part) decode to the plain body.
    assert gzip.decompress(packed) == plain


@pytest.mark.parametrize("om", [False, True])
def test_incremental_rendering_is_the_full_rendering(snap: Snapshot, om: bool) -> None:
    """Per-tenant rendering with reuse gives the bytes one pass over the snapshot
    gives, as tenants change, come and go; an unchanged tenant is not rendered again."""
    full = generate_openmetrics if om else generate_latest

    def whole(s: Snapshot) -> bytes:
        return full(collectors.SnapshotCollector(lambda: s)).removesuffix(b"# EOF\n")

    lines = exposition._TenantLines(om)
    assert lines.body(snap) == whole(snap) and lines.rendered == len(snap.tenants)
    again = dataclasses.replace(snap, generation=2, taken_at=snap.taken_at + 15)
    assert lines.body(again) == whole(again) and lines.rendered == 0
    first, *rest = snap.tenants
    busier = dataclasses.replace(
        first, cgroup=dataclasses.replace(first.cgroup, memory_current=123456789)
    )
    changed = dataclasses.replace(snap, generation=3, tenants=(*rest, busier)[::-1])
    changed = dataclasses.replace(changed, tenants=tuple(sorted(changed.tenants,
                                                                key=lambda t: t.uid)))  # fmt: skip
    assert lines.body(changed) == whole(changed) and lines.rendered == 1
    fewer = dataclasses.replace(snap, generation=4, tenants=tuple(rest))
    assert lines.body(fewer) == whole(fewer) and lines.rendered == 0
    assert set(lines.tenants) == {t.uid for t in rest}


@pytest.mark.parametrize(
    ("accept", "om"),
    [
        (None, False),
        ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", False),
        ("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4", True),
        ("application/openmetrics-text; version=0.0.1,text/plain", True),
        ("application/openmetrics-text;q=0,text/plain", False),
        ("APPLICATION/OPENMETRICS-TEXT", True),
    ],
)
def test_wants_openmetrics(accept: str | None, om: bool) -> None:
    assert exposition.wants_openmetrics(accept) is om


@pytest.mark.parametrize(
    ("header", "want"),
    [(None, False), ("gzip", True), ("deflate, gzip;q=1.0", True), ("gzip;q=0", False),
     ("identity", False), ("x-gzip", False)],
)  # fmt: skip
def test_wants_gzip(header: str | None, want: bool) -> None:
    assert exposition.wants_gzip(header) is want


# -- HTTP ----------------------------------------------------------------------------


@pytest.fixture
async def server(snap: Snapshot) -> AsyncIterator[metrics_http.MetricsServer]:
    reg, _ = registry_for(snap, with_snapshot=False)
    exp = exposition.Exposition(lambda: snap, reg)
    srv = metrics_http.MetricsServer(exp, "127.0.0.1", 0, timeout=0.5,
                                     max_connections=4, max_request_bytes=1024)  # fmt: skip
    await srv.start()
    yield srv
    await srv.close()


async def fetch(srv: metrics_http.MetricsServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        data = b""
    writer.close()
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *headers, "", ""]).encode()


async def test_http_metrics(server: metrics_http.MetricsServer) -> None:
    status, headers, body = await fetch(server, get("/metrics"))
    assert status == 200 and headers["content-type"] == exposition.TEXT_CONTENT_TYPE
    assert int(headers["content-length"]) == len(body) and headers["connection"] == "close"
    assert b"nsd_tenant_memory_current_bytes{" in body
    status, headers, body = await fetch(server, get(
        "/metrics?x=1", "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        "Accept-Encoding: gzip"))  # fmt: skip
    assert headers["content-type"] == exposition.OPENMETRICS_CONTENT_TYPE
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")
    status, headers, body = await fetch(server, get("/metrics", method="HEAD"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/"), 200),
        (get("/nope"), 404),
        (get("/metrics", method="POST"), 405),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 2000 + b"\r\n\r\n", 0),  # too long
        (b"GET /metrics HTTP/1.1\r\n", 0),  # never finished: timed out
    ],
)
async def test_http_refusals(server: metrics_http.MetricsServer, raw: bytes, status: int) -> None:
    got, _headers, _body = await fetch(server, raw)
    assert got == status


async def test_http_connection_limit(server: metrics_http.MetricsServer) -> None:
    idle = [await asyncio.open_connection(*server.address) for _ in range(4)]
    await asyncio.sleep(0.05)
    status, _, _ = await fetch(server, get("/metrics"))
    assert status == 0  # refused while four half-open requests are pending
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.6)
    status, _, _ = await fetch(server, get("/metrics"))
    assert status == 200


async def test_metrics_service_end_to_end() -> None:
    service = metrics.MetricsService(fixture_targets, interval=60, listen="127.0.0.1:0",
                               cgroup_root=CGROUP, proc_root=PROC)  # fmt: skip
    await service.start()
    try:
        snap = await asyncio.wait_for(service.sampler.next_snapshot(0), 10)
        assert snap.generation == 1
        service.daemon.on_call_done("io.nsd.Tenant", "List", None, 0.01)
        assert service.server is not None
        _, _, body = await fetch(service.server, get("/metrics"))
        assert b'nsd_tenant_memory_current_bytes{tenant="alice",uid="1001"}' in body
        assert b'nsd_api_calls_total{error="",interface="io.nsd.Tenant",method="List"}' in body
        assert b"nsd_sampler_duration_seconds_count 1.0" in body
    finally:
        await service.close()
    assert metrics.MetricsService(fixture_targets, interval=1, listen="").server is None


# -- docs, IDL, nsctl -----------------------------------------------------------------


def test_docs_cover_every_metric() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(nsd_[a-z_]+)`", doc))
    missing = {d.name for d in metrics_catalogue.CATALOGUE} - documented
    assert not missing, f"docs/metrics.md lacks {sorted(missing)}"
    unknown = (
        documented
        - {d.name for d in metrics_catalogue.CATALOGUE}
        - {
            f"{d.name}_{suffix}"
            for d in metrics_catalogue.CATALOGUE
            for suffix in ("bucket", "count", "sum")
        }
    )
    assert not unknown, f"docs/metrics.md names metrics that do not exist: {sorted(unknown)}"
    assert f"at most **{metrics_catalogue.per_tenant_series()}**" in doc


def tenant_interface() -> idl.InterfaceValidator:
    text = installed_idl("io.nsd.Tenant")
    if "method GetUsage" not in text:  # not integrated yet: the proposal in the fixtures
        text += "\n" + (FIXTURES / "idl" / "io.nsd.Tenant.usage.varlink").read_text()
    return idl.InterfaceValidator(idl.parse(text))


def test_replies_match_the_idl(snap: Snapshot) -> None:
    v = tenant_interface()
    assert v.reply("GetUsage", usage_reply(snap)) is None
    assert v.reply("Audit", audit_reply(snap, helpers=True)) is None
    assert v.call("GetUsage", {}) is None and v.call("Audit", {"helpers": True}) is None


def test_top_and_audit_tables(snap: Snapshot) -> None:
    reply = usage_reply(snap)
    out = topview.format_top(reply)
    lines = out.splitlines()
    assert lines[0].startswith("sampled ") and "3 tenant(s)" in lines[0]
    assert lines[2].split()[:3] == ["USER", "UID", "MEMORY"]
    assert [line.split()[0] for line in lines[3:]] == ["alice", "bob", "carol"]
    alice = lines[3].split()
    assert alice[2:6] == ["1.0G", "768M", "2.0G", "50%"]
    assert [r[0] for r in topview.top_rows(reply["tenants"], "name")] == ["alice", "bob", "carol"]
    assert topview.top_rows(reply["tenants"], "helpers")[0][0] == "alice"
    audit = topview.format_audit(audit_reply(snap, helpers=True))
    assert "outside slice+namespace" in audit and "sudo -iu bob true" in audit
    assert "/root/bin/backup.sh" in audit  # root's crontab, left in cron.service
    assert "give the unit Slice= (a template with X-NSD-Tenant=yes" in audit  # the fix
    assert topview.format_audit({"processes": [], "omitted": 3}).startswith("no flagged")
    assert topview.human_bytes(None) == "-" and topview.human_bytes(1536) == "1.5K"
    assert topview.human_bytes(5 << 40) == "5.0T" and topview.human_bytes(12) == "12B"


def test_doctor_summarises_the_audit(snap: Snapshot) -> None:
    check = doctor.escape_check(escaped_by_tenant(snap))
    assert check.severity == "warning"
    assert check.message.startswith("7 process(es) outside their tenant's slice or namespace")
    assert "alice (5), bob (2);" in check.message and "`nsctl audit`" in check.message
    assert doctor.escape_check({"carol": 0}).severity == "ok"
    assert doctor.escape_check(None).severity == "ok"


def test_nsctl_does_not_import_the_exporter() -> None:
    # nsctl imports nsd.topview; that must stay free of prometheus_client.
    code = "import sys, nsd.topview; sys.exit('prometheus_client' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == 0


async def test_metrics_service_survives_a_taken_port() -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    service = metrics.MetricsService(fixture_targets, interval=60, listen=f"127.0.0.1:{port}",
                               cgroup_root=CGROUP, proc_root=PROC)  # fmt: skip
    try:
        await service.start()
        assert service.server is None and "in use" in service.listen_error.lower()
        assert (await asyncio.wait_for(service.sampler.next_snapshot(0), 10)).generation == 1
    finally:
        await service.close()
        blocker.close()
