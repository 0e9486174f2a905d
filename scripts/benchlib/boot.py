"""Section 8: boot and bulk creation against the kernel's floor.

A daemon of its own (network policy off, namespaces in a private run dir) in a host
namespace of its own: N tenants created one after the other over one connection, then
warm restarts (every namespace present) and cold starts (every namespace and veth gone,
as after a reboot), each to READY=1; then all N removed, and created again by 64
concurrent clients. Interleaved with the cold starts, in rotating order, two
floors measured in the same run, each in a fresh bench-made host namespace:

* ``ip -batch``: N x (``netns add`` + a veth pair into it), the issue's kernel floor;
* ``nsd-floor`` (native/bench/nsd-floor.c, C): nsd's per-tenant work (namespace,
  veth, addresses, routes, sysctl; then the reads of a restart's check) through one
  netlink socket per namespace, one request per change, nothing else.

A cold start is staged by stopping nsd, unmounting and unlinking every namespace file
of its run dir, and waiting until the kernel has destroyed those namespaces (their
veths are gone from the host namespace), so that the start is not charged with the
previous round's teardown. The floors are torn down the same way.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsd.varlink.client import VarlinkClient

from .env import RUN_NETNS, Cleanup, add_host_netns, log, remove_namespace_files, run, start_daemon
from .launcher import ROOT
from .stats import summarize

FLOOR = ROOT / "native/build/nsd-floor"


def host_links(host: str) -> int:
    """How many links the namespace ``host`` (a name in /run/netns) has."""
    out = run("ip", "-n", host, "-o", "link", "show").stdout
    return len(out.splitlines())


def wait_torn_down(host: str, timeout: float = 300.0) -> float:
    """Wait until only lo is left in ``host`` (the kernel destroyed the tenants'
    namespaces, and with them the veths); seconds waited."""
    t0 = time.monotonic()
    while host_links(host) > 1:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"namespaces behind {host} still not destroyed after {timeout} s")
        time.sleep(0.1)
    time.sleep(0.5)  # what the kernel's cleanup does after unlinking the devices
    return time.monotonic() - t0


def call_serially(socket_path: str, method: str, users: list[str]) -> float:
    """``method`` for every user, one call after the other on one connection; seconds."""
    c = VarlinkClient(socket_path)
    try:
        t0 = time.perf_counter()
        for name in users:
            c.call(method, {"name": name})
        return time.perf_counter() - t0
    finally:
        c.close()


def create_concurrently(socket_path: str, users: list[str], clients: int) -> float:
    """Create a tenant for every user from ``clients`` connections at once; seconds."""
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in users:
        work.put(name)
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        c = VarlinkClient(socket_path)
        try:
            start.wait()
            while True:
                try:
                    name = work.get_nowait()
                except queue.Empty:
                    return
                c.call("io.nsd.Tenant.Create", {"name": name})
        except BaseException as e:  # reported after the join
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"concurrent Create failed: {errors[0]!r}")
    return dt


class EarlyEnter:
    """During a start: ``Enter`` of one tenant from a client that connects as soon as
    nsd listens (nsd serves while its start-up reconcile runs, building a tenant asked
    for ahead of the others). ``answered``: when the reply came (perf_counter)."""

    def __init__(self, socket_path: str, name: str, timeout: float = 900.0) -> None:
        self.socket_path, self.name, self.timeout = socket_path, name, timeout
        self.answered: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._enter, daemon=True)
        self.thread.start()

    def _enter(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    c = VarlinkClient(self.socket_path)
                    break
                except OSError:  # not listening yet (or the last run's socket file)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.002)
            try:
                _, fds = c.call_with_fds("io.nsd.Tenant.Enter", {"name": self.name})
                self.answered = time.perf_counter()
                for fd in fds:
                    os.close(fd)
            finally:
                c.close()
        except BaseException as e:  # reported by seconds_after()
            self.error = e

    def seconds_after(self, t0: float) -> float:
        """Seconds from ``t0`` (nsd's exec) to the answer."""
        self.thread.join(self.timeout)
        if self.answered is None:
            raise RuntimeError(f"Enter of {self.name} during the start failed: {self.error!r}")
        return self.answered - t0


class Floors:
    """The two floors, each in a fresh host namespace per round."""

    def __init__(self, cleanup: Cleanup, prefix: str, n: int, workdir: Path) -> None:
        self.cleanup, self.prefix, self.n = cleanup, prefix, n
        self.batch = workdir / "floor.batch"
        with self.batch.open("w") as f:
            for i in range(n):
                f.write(f"netns add {prefix}fb{i}\n")
                f.write(f"link add {prefix}g{i} type veth peer name eth0 netns {prefix}fb{i}\n")
        self.rounds = 0

    def _host(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}{self.rounds}"
        add_host_netns(self.cleanup, name)
        return name

    def _teardown(self, host: str, ns_prefix: str) -> None:
        remove_namespace_files((ns_prefix,))
        wait_torn_down(host)
        run("ip", "netns", "del", host, check=False)

    def ip_batch(self) -> float:
        self.rounds += 1
        host = self._host("fb")
        try:
            t0 = time.perf_counter()
            run("nsenter", f"--net={RUN_NETNS}/{host}", "ip", "-batch", str(self.batch))
            return time.perf_counter() - t0
        finally:
            self._teardown(host, f"{self.prefix}fb")

    def minimal(self) -> dict[str, Any]:
        """nsd-floor create, then check, in one fresh host namespace."""
        self.rounds += 1
        host = self._host("fc")
        out: dict[str, Any] = {}
        try:
            for mode in ("create", "check"):
                argv = ["nsenter", f"--net={RUN_NETNS}/{host}", str(FLOOR), mode, RUN_NETNS,
                        f"{self.prefix}fc", str(self.n)]  # fmt: skip
                res = subprocess.run(argv, capture_output=True, text=True, check=True)
                out[mode] = _json(res.stdout)
            return out
        finally:
            self._teardown(host, f"{self.prefix}fc")


def _json(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def run_boot(
    cleanup: Cleanup,
    prefix: str,
    users: list[str],
    *,
    rounds: int,
    clients: int = 64,
    pythonpath: str | None = None,
) -> dict[str, Any]:
    n = len(users)
    host_name = f"{prefix}-boot"
    host = add_host_netns(cleanup, host_name)
    d = start_daemon(cleanup, prefix, host, private_run_dir=True, pythonpath=pythonpath)
    run_dir = str(d.tmp / "netns")
    serial_s = call_serially(d.socket, "io.nsd.Tenant.Create", users)
    log(f"  {n} tenants created one after the other: {serial_s:.1f} s")
    floors = Floors(cleanup, prefix, n, d.tmp)

    warm: list[float] = []
    warm_reconcile: list[dict[str, int] | None] = []
    for _ in range(rounds):
        if d.stop(timeout=900) != 0:
            raise RuntimeError(f"nsd exited badly:\n{d.log_tail()}")
        warm.append(d.start_timed())
        warm_reconcile.append(d.last_reconcile())
    log(f"  warm restarts: {', '.join(f'{x:.2f} s' for x in warm)}")

    cold: list[float] = []
    cold_enter: list[float] = []
    cold_reconcile: list[dict[str, int] | None] = []
    batch: list[float] = []
    minimal: list[dict[str, Any]] = []

    def cold_start() -> None:
        if d.stop(timeout=900) != 0:
            raise RuntimeError(f"nsd exited badly:\n{d.log_tail()}")
        remove_namespace_files(("",), run_dir)
        wait_torn_down(host_name)
        # the tenant the reconcile reaches last (it goes by UID, users[] too)
        early = EarlyEnter(d.socket, users[-1])
        cold.append(d.start_timed())
        cold_enter.append(early.seconds_after(d.exec_at))
        cold_reconcile.append(d.last_reconcile())

    def ip_batch() -> None:
        batch.append(floors.ip_batch())

    def nsd_floor() -> None:
        minimal.append(floors.minimal())

    steps: list[Callable[[], None]] = [cold_start, ip_batch, nsd_floor]
    for k in range(rounds):
        for j in range(len(steps)):  # rotating order: each goes first once in 3 rounds
            steps[(j + k) % len(steps)]()
        log(f"  round {k + 1}: cold start {cold[-1]:.2f} s (Enter of the last tenant "
            f"answered after {cold_enter[-1]:.2f} s), ip -batch {batch[-1]:.2f} s, "
            f"nsd-floor {minimal[-1]['create']['total_s']:.2f} s")  # fmt: skip
    remove_s = call_serially(d.socket, "io.nsd.Tenant.Remove", users)
    concurrent_s = create_concurrently(d.socket, users, clients)
    log(f"  removed one after the other: {remove_s:.1f} s; created again by {clients} "
        f"concurrent clients: {concurrent_s:.1f} s")  # fmt: skip
    d.kill()
    return {
        "tenants": n,
        "rounds": rounds,
        "serial_create_s": serial_s,
        "serial_remove_s": remove_s,
        "concurrent_clients": clients,
        "concurrent_create_s": concurrent_s,
        "warm_ready_s": warm,
        "warm_reconcile": warm_reconcile,
        "cold_ready_s": cold,
        "cold_enter_s": cold_enter,
        "cold_reconcile": cold_reconcile,
        "ip_batch_s": batch,
        "floor_create_s": [m["create"]["total_s"] for m in minimal],
        "floor_check_s": [m["check"]["total_s"] for m in minimal],
        "floor_create_ms": summarize([m["create"]["median_ms"] for m in minimal]),
        "floor": minimal,
    }
