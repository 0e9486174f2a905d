"""Benchmark of the fault path, in two parts (``scripts/bench-faults``; prints JSON).

**daemon** (default; root): the real daemon, as an operator runs it - network policy
on (the default), a conntrack limit, ``log_level = "info"``, the default metrics
interval - in a host namespace of the bench's own with an uplink, and N tenants
created through the API (N test users, made and deleted by the bench).

* idle: the daemon's CPU time (``/proc/PID/stat`` utime + stime) over ``--idle``
  seconds with the N tenants and nothing happening, as a percentage of one core;
* burst: every tenant opens one connection more than its limit within one second
  (two UDP datagrams to two ports behind the uplink; ``conntrack_limit = 1``), so
  the kernel drops one packet per tenant: N ``conntrack`` faults, read at the next
  sample and recorded by the daemon. Meanwhile a probe process calls the real
  ``io.nsd.Tenant.Get`` over the varlink socket every 2 ms and records each call's
  round-trip; a ``Watch`` client counts the fault events (one per stored record).
  Reported: p50/p99/max of ``Get`` in the same run without the burst (``--quiet``
  seconds before it) and during it (from its first packet to 1 s after the last
  record), and the time until every fault was stored.

This host has no systemd as PID 1 and no memory controller, so cgroup faults cannot
be made for the real daemon here; conntrack faults take the same recording path
(counter, journal, Watch event, store), without the process snapshot (no slices).

**inprocess** (``--mode inprocess``): nsd's FaultService in this process on tmpfs
files in the cgroup v2 formats (tmpfs signals IN_MODIFY like cgroupfs does) with a
real SQLite store: the inotify watcher and the snapshots, which the daemon part cannot
reach here. Idle CPU of the process; a burst bumps ``oom_kill`` in every tenant's
``memory.events`` within one second while a probe on the event loop does what
``Get`` does there (a store lookup and a reply) every 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_faults_daemon import bench_daemon  # noqa: E402

from nsd.config import FaultsConfig  # noqa: E402
from nsd.core.faultrecord import FaultRecorder, FaultService  # noqa: E402
from nsd.core.store import Store  # noqa: E402
from nsd.model import Fault  # noqa: E402
from nsd.systemd.journal import Journal  # noqa: E402

EVENTS = "low 0\nhigh 0\nmax {n}\noom 0\noom_kill {n}\noom_group_kill 0\n"


def slice_path(uid: int) -> str:
    return f"/tenant.slice/tenant-{uid}.slice"


def make_tree(root: Path, uids: list[int]) -> None:
    for uid in uids:
        d = root / slice_path(uid).lstrip("/")
        (d / "app.service").mkdir(parents=True)
        (d / "memory.events").write_text(EVENTS.format(n=0))
        (d / "pids.events").write_text("max 0\n")
        for name, value in (("memory.max", 67108864), ("memory.current", 67100000),
                            ("pids.max", 100), ("pids.current", 12)):  # fmt: skip
            (d / name).write_text(f"{value}\n")
        (d / "cgroup.procs").write_text("")
        (d / "app.service" / "cgroup.procs").write_text(f"{os.getpid()}\n")


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": xs[-1] * 1e3,
            "samples": len(xs)}  # fmt: skip


async def probe(store: Store, names: list[str], stop: asyncio.Event, out: list[float]) -> None:
    """Every 2 ms, what Get does on the loop: a store lookup and a reply dict."""
    loop = asyncio.get_running_loop()
    i = 0
    while not stop.is_set():
        due = loop.time() + 0.002
        await asyncio.sleep(0.002)
        rec = store.get_by_name(names[i % len(names)])
        json.dumps({"tenant": None if rec is None else {"name": rec.name, "uid": rec.uid}})
        out.append(loop.time() - due)
        i += 1


async def measure_burst(
    tmp: Path, uids: list[int], names: list[str], store: Store, stored: list[Fault]
) -> tuple[float, list[float]]:
    """Write one oom_kill into every tenant's memory.events within a second; return
    the time until every fault was stored and the probe's latencies meanwhile."""

    # In a process of its own, as the kernel's writes are: a writer thread here would
    # take the interpreter lock from the loop that is measured.
    paths = [str(tmp / slice_path(u).lstrip("/") / "memory.events") for u in uids]
    burst = (
        "import sys, time\n"
        "paths = sys.argv[2:]\n"
        "gap = 1.0 / len(paths)\n"
        "start = time.monotonic()\n"
        "for k, p in enumerate(paths):\n"
        "    with open(p, 'w') as f:\n"
        "        f.write(sys.argv[1])\n"
        "    ahead = start + (k + 1) * gap - time.monotonic()\n"
        "    if ahead > 0:\n"
        "        time.sleep(ahead)\n"
    )

    stop = asyncio.Event()
    busy: list[float] = []
    task = asyncio.create_task(probe(store, names, stop, busy))
    started = time.monotonic()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", burst, EVENTS.format(n=1), *paths
    )
    while len(stored) < 2 * len(uids):  # oom_kill and memory_max per tenant
        await asyncio.sleep(0.01)
        if time.monotonic() - started > 120:
            break
    seconds = time.monotonic() - started
    await writer.wait()
    await asyncio.sleep(0.2)
    stop.set()
    await task
    return seconds, busy


async def inprocess(args: argparse.Namespace) -> dict[str, Any]:
    uids = list(range(70000, 70000 + args.tenants))
    names = [f"bench{u}" for u in uids]
    tmp = Path(tempfile.mkdtemp(prefix="nsd-bench-faults-", dir="/dev/shm"))
    state = Path(tempfile.mkdtemp(prefix="nsd-bench-faults-state-"))
    try:
        make_tree(tmp, uids)
        store = Store(state / "nsd.db")
        stored: list[Fault] = []
        cfg = FaultsConfig()
        recorder = FaultRecorder(store, cfg, stored.append,
                                 journal=Journal(str(state / "no-journald")))  # fmt: skip
        service = FaultService(str(tmp), recorder)
        service.start()
        service.sync((u, n, slice_path(u), None) for u, n in zip(uids, names, strict=True))
        assert service.watcher is not None
        watches = service.watcher.watches

        # Idle: everything watched, nothing happens.
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(args.idle)
        idle_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0) * 100

        # Baseline probe latency, then the same during a burst.
        stop = asyncio.Event()
        quiet: list[float] = []
        task = asyncio.create_task(probe(store, names, stop, quiet))
        await asyncio.sleep(args.window)
        stop.set()
        await task

        burst_seconds, busy = await measure_burst(tmp, uids, names, store, stored)
        await service.close()
        in_store = len(store.faults(limit=10000))
        store.close()
        return {
            "tenants": args.tenants,
            "watches": watches,
            "idle_seconds": args.idle,
            "idle_cpu_percent_of_one_core": round(idle_cpu, 3),
            "burst_faults_written": len(uids),
            "burst_records_stored": in_store,
            "burst_all_stored_after_seconds": round(burst_seconds, 3),
            "get_probe_quiet": percentiles(quiet),
            "get_probe_during_burst": percentiles(busy),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("daemon", "inprocess"), default="daemon")
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--idle", type=float, default=300.0, help="seconds of idle measurement")
    p.add_argument("--window", type=float, default=2.0, help="inprocess: seconds of quiet probing")
    p.add_argument("--quiet", type=float, default=30.0,
                   help="daemon: seconds of probing before the burst")  # fmt: skip
    p.add_argument("--settle", type=float, default=35.0,
                   help="daemon: seconds after creating the tenants before measuring "
                        "(the first samples with every tenant)")  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # no journald here: fault lines would go to stderr
    if args.mode == "inprocess":
        sys.setswitchinterval(0.001)  # as the daemon does (nsd.daemon.main)
        result = asyncio.run(inprocess(args))
    else:
        result = bench_daemon(args.tenants, args.idle, args.quiet, args.settle)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
