"""Metrics end to end: a real daemon in a test host namespace serves /metrics,
GetUsage (plain and streaming) and Audit; nsctl top and audit print them.

This host has no cgroup v2 memory controller, so the cgroup series are absent
and the source gauges say so; the /proc-based series (helpers, processes) and
the veth counters are real. The VM tier covers cgroup v2 itself.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from nsd import config
from tests.harness import PY, Daemon, TestUsers, daemon_env, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
    pytest.mark.skipif(
        not hasattr(config, "MetricsConfig"), reason="metrics not wired into the daemon yet"
    ),
]

T = "io.nsd.Tenant."
PORT = 9917


@pytest.fixture
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    extra = f'[metrics]\nlisten = "127.0.0.1:{PORT}"\ninterval = 1.0\n'
    with daemon_env(extra=extra) as (d, users):
        d.start()
        yield d, users
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()


def scrape(d: Daemon, *headers: str) -> tuple[str, bytes]:
    """GET /metrics from inside the daemon's (test) host namespace."""
    code = (
        "import sys, urllib.request\n"
        f"req = urllib.request.Request('http://127.0.0.1:{PORT}/metrics')\n"
        "for h in sys.argv[1:]:\n"
        "    k, v = h.split(': ', 1); req.add_header(k, v)\n"
        "r = urllib.request.urlopen(req, timeout=10)\n"
        "sys.stdout.buffer.write(r.headers['Content-Type'].encode() + b'\\n' + r.read())\n"
    )
    out = subprocess.run(["nsenter", f"--net={d.host}", PY, "-c", code, *headers],
                         capture_output=True, check=True, timeout=30).stdout  # fmt: skip
    ctype, _, body = out.partition(b"\n")
    return ctype.decode(), body


def test_metrics_usage_and_audit(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    uid = uid_of(name)
    d.call(T + "Create", name=name)
    # A process of the tenant outside its namespace: an escape (no session, no slice).
    sleeper = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                "sleep", "60"])  # fmt: skip
    try:
        # Streaming GetUsage: one reply per sample; the second comes from a newer sample.
        with d.client() as c:
            replies = []
            for reply in c.call_more(T + "GetUsage", {"name": name}):
                replies.append(reply)
                if len(replies) == 2:
                    break
        assert replies[1]["sampledUSec"] > replies[0]["sampledUSec"]
        usage = replies[1]["tenants"]
        assert [u["name"] for u in usage] == [name]
        assert usage[0]["escapedProcesses"] >= 1

        ctype, body = scrape(d)
        text = body.decode()
        assert ctype.startswith("text/plain; version=0.0.4")
        labels = f'tenant="{name}",uid="{uid}"'
        assert f"nsd_tenant_network_receive_packets_total{{{labels}}}" in text
        assert f'nsd_tenant_processes{{class="contained",{labels}}}' in text
        assert 'nsd_metrics_source_available{source="proc"} 1.0' in text
        assert 'method="Create"' in text and "nsd_reconcile_duration_seconds_count" in text
        ctype, body = scrape(d, "Accept: application/openmetrics-text", "Accept-Encoding: gzip")
        assert ctype.startswith("application/openmetrics-text")
        assert gzip.decompress(body).endswith(b"# EOF\n")

        audit = d.call(T + "Audit", name=name)["processes"]
        flagged = {p["pid"]: p["reason"] for p in audit}
        # Without slices (no systemd here) only the namespace is judged.
        assert flagged.get(sleeper.pid) in ("outsideNamespace", "outsideSliceAndNamespace")
        top = d.nsctl("top")
        assert top.returncode == 0 and name in top.stdout and "MEMORY" in top.stdout
        out = d.nsctl("audit", name, check=False)
        assert out.returncode == 1 and str(sleeper.pid) in out.stdout  # 1: something is flagged
        doctor = d.nsctl("doctor", check=False).stdout  # the audit summarised
        assert "tenant-processes" in doctor and f"{name} (1)" in doctor, doctor
    finally:
        sleeper.kill()
        sleeper.wait()


def test_metrics_endpoint_is_loopback_only_by_default() -> None:
    cfg: Any = config.load(None)  # Config gains .metrics with the integration
    assert cfg.metrics.listen == "127.0.0.1:9917"
    with pytest.raises(urllib.error.URLError):
        # Nothing listens on the real host's loopback: the test daemons run elsewhere.
        urllib.request.urlopen("http://127.0.0.1:1/metrics", timeout=2)
