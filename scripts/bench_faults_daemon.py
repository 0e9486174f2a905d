"""The daemon part of scripts/bench_faults.py: idle CPU of the real daemon with N
tenants, and real ``Get`` latency during a burst of N conntrack faults (see there).

The probe and the burst run in processes of their own, so that neither this
process's threads nor each other compete for one interpreter lock with the probe:
what the probe measures is the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib.env import Cleanup, add_host_netns, add_users, log, new_prefix, run, start_daemon
from benchlib.stats import summarize

from nsd.varlink.client import VarlinkClient

T = "io.nsd.Tenant."
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
INET = "10.99.0.2"

# Calls Get over one connection every 2 ms until SIGTERM; prints [start, seconds] pairs.
PROBE = r"""
import json, signal, sys, time
sys.path.insert(0, sys.argv[3])
from nsd.varlink.client import VarlinkClient
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
names = sys.argv[2].split(",")
c = VarlinkClient(sys.argv[1])
out = []
i = 0
print("ready", flush=True)
while not stop:
    t = time.monotonic()
    c.call("io.nsd.Tenant.Get", {"name": names[i % len(names)]})
    out.append((t, time.monotonic() - t))
    i += 1
    time.sleep(0.002)
json.dump(out, sys.stdout)
"""

# Within one second, sends from each tenant's namespace (stdin: the namespace paths)
# one datagram to a port behind the uplink (a connection, counted), and then, in a
# second pass, one to another port: a connection over conntrack_limit = 1, dropped by
# the host. Two passes, not two datagrams at once: the second of a back-to-back pair
# was counted only about half the time (both still unconfirmed when counted).
BURST = r"""
import ctypes, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
paths = json.load(sys.stdin)
socks = []
gap = 0.5 / len(paths)
t0 = time.monotonic()
for k, path in enumerate(paths):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns", path)
    os.close(fd)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # in that namespace
    s.sendto(b"x", (sys.argv[1], 40001))
    socks.append(s)
    ahead = t0 + (k + 1) * gap - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
for k, s in enumerate(socks):
    s.sendto(b"x", (sys.argv[1], 40002))
    ahead = t0 + 0.5 + (k + 1) * gap - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
print(time.monotonic() - t0)
"""


# Gives each tenant namespace (stdin: [path, gateway, gateway's MAC] each) a permanent
# neighbour entry for its gateway. Without it, 1,000 tenants sending at once need
# 1,000 ARP resolutions, and the kernel's ARP table is one for all namespaces, with
# a hard limit of net.ipv4.neigh.default.gc_thresh3 = 1,024 dynamic entries (each
# tenant's entry for its gateway, and the host's entry for each tenant that asked):
# "neighbor table overflow", and about half the tenants could not send at all.
# Permanent entries are not counted against that limit.
NEIGHBOURS = r"""
import ctypes, json, os, sys
from pyroute2 import IPRoute
libc = ctypes.CDLL(None, use_errno=True)
for path, gateway, mac in json.load(sys.stdin):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns", path)
    os.close(fd)
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=sys.argv[1])
        ipr.neigh("replace", dst=gateway, lladdr=mac, ifindex=index, state=0x80)
"""


def host_macs(host: str) -> dict[str, str]:
    """Interface name -> MAC address in the namespace ``host``."""
    out = run("ip", "-n", os.path.basename(host), "-j", "link", "show").stdout
    return {link["ifname"]: link.get("address", "") for link in json.loads(out)}


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of ``pid`` (all its threads; with ``task`` that thread only)."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    with open(path, encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_uplink(cleanup: Cleanup, prefix: str, host: str) -> None:
    """An "internet" namespace behind the uplink up0 of the bench's host namespace."""
    inet = add_host_netns(cleanup, f"{prefix}-inet")
    h = ["ip", "-n", os.path.basename(host)]
    run(*h, "link", "add", "up0", "type", "veth", "peer", "name", "inet0", "netns", inet)
    run(*h, "addr", "add", "10.99.0.1/24", "dev", "up0")
    run(*h, "link", "set", "up0", "up")
    run(*h, "route", "add", "default", "via", INET)
    i = ["ip", "-n", os.path.basename(inet)]
    run(*i, "addr", "add", f"{INET}/24", "dev", "inet0")
    run(*i, "link", "set", "inet0", "up")


def percentiles_ms(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = summarize(xs)
    return {"p50_ms": round(s["median"] * 1e3, 3), "p99_ms": round(s["p99"] * 1e3, 3),
            "max_ms": round(s["max"] * 1e3, 3), "samples": len(xs)}  # fmt: skip


class FaultCounter:
    """A Watch client in a thread: when each fault event arrived."""

    def __init__(self, socket_path: str) -> None:
        self.times: list[float] = []
        self.ready = threading.Event()
        self._client = VarlinkClient(socket_path)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for reply in self._client.call_more(T + "Watch", {}):
                if reply.get("event") == "synced":
                    self.ready.set()
                if reply.get("fault") is not None:
                    self.times.append(time.monotonic())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._client.close()


def create_tenants(socket_path: str, users: list[str], host: str) -> list[str]:
    """Each user a tenant, with a permanent neighbour entry for its gateway (see
    NEIGHBOURS); returns their namespace paths."""
    made: list[dict[str, Any]] = []
    with VarlinkClient(socket_path) as client:
        for name in users:
            made.append(client.call(T + "Create", {"name": name})["tenant"])
    macs = host_macs(host)
    neighbours = [[t["namespacePath"], t["ipv4Gateway"], macs[t["hostInterface"]]]
                  for t in made]  # fmt: skip
    subprocess.run([PY, "-c", NEIGHBOURS, made[0]["tenantInterface"]],
                   input=json.dumps(neighbours), text=True, check=True)  # fmt: skip
    return [t["namespacePath"] for t in made]


def bench_daemon(tenants: int, idle: float, quiet: float, settle: float = 35.0) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("bench-faults: the daemon part needs root (namespaces, users)")
    cleanup = Cleanup()
    with cleanup.active():
        prefix = new_prefix()
        log(f"run prefix {prefix}; {tenants} users")
        users = add_users(cleanup, prefix, tenants)
        host = add_host_netns(cleanup, f"{prefix}-nsd")
        add_uplink(cleanup, prefix, host)
        d = start_daemon(cleanup, prefix, host, policy=True, private_run_dir=True,
                         extra='uplinks = ["up0"]\nconntrack_limit = 1\n')  # fmt: skip
        log(f"creating {tenants} tenants")
        t0 = time.monotonic()
        paths = create_tenants(d.socket, users, host)
        created_s = time.monotonic() - t0
        # Let the first samples with every tenant pass (the sampler and the fault
        # service's first reading of the counters).
        time.sleep(settle)
        log(f"idle for {idle:.0f} s")
        # The whole process, and its main thread (the event loop) apart from the
        # worker threads (the sampler's, the netns worker).
        cpu0, loop0, wall0 = cpu_seconds(d.pid), cpu_seconds(d.pid, d.pid), time.monotonic()
        time.sleep(idle)
        wall = time.monotonic() - wall0
        idle_cpu = (cpu_seconds(d.pid) - cpu0) / wall * 100
        idle_loop = (cpu_seconds(d.pid, d.pid) - loop0) / wall * 100

        log(f"probing Get for {quiet:.0f} s, then the burst")
        counter = FaultCounter(d.socket)
        counter.ready.wait(10)
        probe = subprocess.Popen(
            [PY, "-c", PROBE, d.socket, ",".join(users[:50]), str(ROOT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        cleanup.push("stop the probe", probe.kill)
        assert probe.stdout is not None
        assert probe.stdout.readline().strip() == "ready"
        time.sleep(quiet)
        cpu_b = cpu_seconds(d.pid)
        burst_start = time.monotonic()
        sent = subprocess.run(
            ["nsenter", f"--net={host}", PY, "-c", BURST, INET],
            input=json.dumps(paths), capture_output=True, text=True, check=True,
        )  # fmt: skip
        deadline = burst_start + 120
        while len(counter.times) < tenants and time.monotonic() < deadline:
            time.sleep(0.05)
        last = counter.times[-1] if counter.times else time.monotonic()
        burst_cpu = cpu_seconds(d.pid) - cpu_b
        time.sleep(max(0.0, last + 1.0 - time.monotonic()))
        probe.send_signal(signal.SIGTERM)
        out, _ = probe.communicate(timeout=60)
        counter.close()
        calls: list[tuple[float, float]] = [(a, b) for a, b in json.loads(out)]
        first = counter.times[0] if counter.times else last
        result = {
            "mode": "daemon",
            "tenants": tenants,
            "create_seconds": round(created_s, 1),
            "idle_seconds": idle,
            "idle_cpu_percent_of_one_core": round(idle_cpu, 3),
            "idle_cpu_percent_event_loop_thread": round(idle_loop, 3),
            "burst_sent_seconds": float(sent.stdout.strip()),
            "burst_faults_recorded": len(counter.times),
            "burst_first_record_after_seconds": round(first - burst_start, 3),
            "burst_all_recorded_after_seconds": round(last - burst_start, 3),
            "burst_recording_seconds": round(last - first, 3),
            "burst_daemon_cpu_seconds": round(burst_cpu, 3),
            "get_quiet": percentiles_ms([dt for t, dt in calls if t < burst_start]),
            "get_during_burst": percentiles_ms(
                [dt for t, dt in calls if burst_start <= t <= last + 1.0]
            ),
            "get_while_recording": percentiles_ms(
                [dt for t, dt in calls if first - 0.5 <= t <= last + 0.5]
            ),
            "daemon_log_tail": d.log_tail(5).splitlines(),
        }
    return result
