"""Benchmark of the metrics path: sampler and scrape cost at N tenants and P processes.

Call :func:`bench_metrics` from scripts/bench, or run ``scripts/bench-metrics``.
The cgroup side is a fixture tree of N tenant slices in the kernel's formats
(copied from tests/fixtures/cgroup); the /proc side is this host's real /proc
with P extra idle processes spread over the tenants' UIDs (10 % of them named
``(sd-pam)``), created for the measurement and gone afterwards. Creating
processes needs root (setresuid); without it the /proc figures use the host's
own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client.exposition import generate_latest  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from nsd.limits import Limits  # noqa: E402
from nsd.names import DEFAULT_HELPERS  # noqa: E402
from nsd.observe import catalogue as metrics_catalogue  # noqa: E402
from nsd.observe import collectors, exposition  # noqa: E402
from nsd.observe import http as metrics_http  # noqa: E402
from nsd.observe.procscan import ScanTenant, scan  # noqa: E402
from nsd.observe.sampler import Target, collect  # noqa: E402

TEMPLATE = ROOT / "tests" / "fixtures" / "cgroup" / "tenant.slice" / "tenant-1001.slice"
UID_BASE = 70000

_SPAWN_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/prctl.h>
/* argv: count uid_base uids helper_every. Children block on a pipe and exit when
   this process ends (it exits when its stdin closes). */
int main(int argc, char **argv) {
    int n = atoi(argv[1]), base = atoi(argv[2]), uids = atoi(argv[3]), every = atoi(argv[4]);
    int p[2]; char c, buf[64];
    if (pipe(p)) return 1;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            close(p[1]); close(0);
            if (every && i % every == 0) prctl(PR_SET_NAME, "(sd-pam)");
            uid_t u = base + i % uids;
            if (setresgid(u, u, u) || setresuid(u, u, u)) _exit(1);
            while (read(p[0], &c, 1) < 0) ;
            _exit(0);
        }
    }
    close(p[0]);
    printf("ready\n"); fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) ;
    return 0;
}
"""


def make_cgroup_tree(root: Path, tenants: int) -> None:
    """N tenant slices, each with the fixture's files and one service below it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    files = {p.name: p.read_bytes() for p in TEMPLATE.iterdir() if p.is_file()}
    for i in range(tenants):
        d = root / "tenant.slice" / f"tenant-{UID_BASE + i}.slice"
        (d / "app.service").mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)


@contextlib.contextmanager
def idle_processes(count: int, uids: int, work: Path) -> Iterator[int]:
    """``count`` idle processes with UIDs UID_BASE.. (as root); yields how many exist."""
    if count <= 0 or os.geteuid() != 0:
        yield 0
        return
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the process benchmark needs a C compiler (gcc) to fork cheaply")
    src, exe = work / "spawn.c", work / "spawn"
    src.write_text(_SPAWN_C)
    subprocess.run([gcc, "-O2", "-o", str(exe), str(src)], check=True)
    proc = subprocess.Popen([str(exe), str(count), str(UID_BASE), str(uids), "10"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("spawner failed")
        yield count
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the spawner exits; its children see EOF on the pipe and exit
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _count_uid_range(uids):
            time.sleep(0.2)


def _count_uid_range(uids: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if UID_BASE <= os.stat(f"/proc/{name}").st_uid < UID_BASE + uids:
                    n += 1
    return n


def _timed(fn: Any, rounds: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _ms(times: list[float]) -> dict[str, float]:
    def ms(x: float) -> float:
        return round(x * 1000, 1)

    return {"median_ms": ms(statistics.median(times)), "min_ms": ms(min(times)),
            "max_ms": ms(max(times))}  # fmt: skip


async def _scrape(server: metrics_http.MetricsServer, headers: str = "") -> bytes:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    data = await reader.read()
    writer.close()
    return data


async def _http(snapshot: Any, rounds: int, concurrent: int) -> dict[str, Any]:
    reg = CollectorRegistry(auto_describe=False)
    collectors.DaemonMetrics(reg)
    exp = exposition.Exposition(lambda: snapshot, reg)
    t0 = time.perf_counter()
    exp.prerender(snapshot)  # what the sampler's thread does after each sample
    prerender = time.perf_counter() - t0
    server = metrics_http.MetricsServer(exp, "127.0.0.1", 0)
    await server.start()
    try:
        out: dict[str, Any] = {"prerender_text_ms": round(prerender * 1000, 1)}
        for label, headers in (
            ("scrape_text", ""),
            ("scrape_text_gzip", "Accept-Encoding: gzip\r\n"),
            ("scrape_openmetrics", "Accept: application/openmetrics-text;version=1.0.0\r\n"),
        ):
            first = time.perf_counter()
            body = await _scrape(server, headers)
            cold = time.perf_counter() - first
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                body = await _scrape(server, headers)
                times.append(time.perf_counter() - t)
            out[label] = {**_ms(times), "first_ms": round(cold * 1000, 1), "bytes": len(body)}
        t = time.perf_counter()
        await asyncio.gather(*(_scrape(server) for _ in range(concurrent)))
        out[f"{concurrent}_concurrent_scrapes_ms"] = round((time.perf_counter() - t) * 1000, 1)
        return out
    finally:
        await server.close()


def bench_metrics(tenants: int = 1000, processes: int = 20000, rounds: int = 5) -> dict[str, Any]:
    """Figures (milliseconds) for the sampler and for scrapes; see the module docstring."""
    work = Path(tempfile.mkdtemp(prefix="nsd-bench-metrics-"))
    try:
        cgroup_root = work / "cgroup"
        make_cgroup_tree(cgroup_root, tenants)
        limits = Limits(memory_max=str(2 << 30), memory_high=str(3 << 29), tasks_max="512")
        netns = os.stat("/proc/self/ns/net").st_ino
        targets = [
            Target(UID_BASE + i, f"user{i}", f"/tenant.slice/tenant-{UID_BASE + i}.slice",
                   netns, f"nsd{UID_BASE + i}", limits)
            for i in range(tenants)
        ]  # fmt: skip
        result: dict[str, Any] = {"tenants": tenants}
        with idle_processes(processes, tenants, work) as spawned:
            result["processes_spawned"] = spawned
            # The /proc scan alone: (a) every tenant process contained (its cgroup is
            # the tenant's), (b) every one an escape (cgroup elsewhere: a loginuid read
            # each, and audit records), the worst case.
            own = "/" if not os.path.exists("/proc/self/cgroup") else _own_cgroup()
            contained = [ScanTenant(t.uid, own, netns) for t in targets]
            escaped = [ScanTenant(t.uid, t.cgroup, netns) for t in targets]
            times, s = _timed(lambda: scan(contained, DEFAULT_HELPERS), rounds)
            result["proc_scan_contained"] = {**_ms(times), "processes": s.processes if s else 0}
            times, _ = _timed(lambda: scan(escaped, DEFAULT_HELPERS), rounds)
            result["proc_scan_all_escaped"] = _ms(times)
            times, snap = _timed(
                lambda: collect(targets, cgroup_root=str(cgroup_root), generation=1), rounds
            )
            result["sampler_total"] = _ms(times)
        times, _ = _timed(
            lambda: collect(targets, cgroup_root=str(cgroup_root), proc_root="/nonexistent"),
            rounds,
        )
        result["sampler_cgroup_files_only"] = _ms(times)
        result.update(asyncio.run(_http(snap, rounds * 4, 10)))
        text = generate_latest(collectors.SnapshotCollector(lambda: snap)).decode()
        result["series_total"] = sum(
            1 for line in text.splitlines() if line and not line.startswith("#")
        )
        result["series_per_tenant_max"] = metrics_catalogue.per_tenant_series()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _own_cgroup() -> str:
    from nsd.observe.procscan import parse_cgroup  # noqa: PLC0415

    with open("/proc/self/cgroup", "rb") as f:
        return parse_cgroup(f.read()) or "/"


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(bench_metrics(args.tenants, args.processes, args.rounds), indent=2))
