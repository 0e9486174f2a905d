"""Comparison 2: creating tenants, nsd's API against a shell script of ``ip`` commands.

Both sides build the same thing per tenant (see docs/operator-guide.md): a namespace
file in /run/netns, a veth pair with one end in the namespace, a /32 IPv4 and a /64
IPv6 address on the tenant end, the gateways on the host end, the host routes, lo up,
default routes inside, and ``net.ipv4.ip_unprivileged_port_start=0`` written inside
the namespace. Each side has its own bench-made host namespace, so both grow to N
tenants under the same conditions, and the two are interleaved in chunks (ABBA order)
so that neither always runs on a warmer or fuller host.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsd.varlink.client import VarlinkClient

from .env import RUN_NETNS, BenchDaemon, log
from .stats import ratio, summarize

#: What a provider would write without nsd: the tenant's network with one ``ip``
#: command per object, as iproute2 documents it. Kept deliberately plain.
SHELL_SCRIPT = """\
#!/bin/sh
# tenant-add.sh HOSTNS NETNS HOSTIF V4 GW4 V6NET V6ADDR
# One tenant's namespace and network with iproute2, as a provider would script it.
set -e
host=$1 ns=$2 hif=$3 v4=$4 gw4=$5 v6net=$6 v6=$7
ip netns add "$ns"
ip -n "$host" link add "$hif" type veth peer name eth0 netns "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link set eth0 up
ip -n "$ns" addr add "$v4/32" dev eth0
ip -n "$ns" addr add "$v6/64" dev eth0 nodad
ip -n "$ns" route add "$gw4/32" dev eth0 scope link
ip -n "$ns" route add default via "$gw4" dev eth0 onlink
ip -n "$ns" -6 route add default via fe80::1 dev eth0
ip -n "$host" link set "$hif" up
ip -n "$host" addr add "$gw4/32" dev "$hif"
ip -n "$host" addr add fe80::1/64 dev "$hif" nodad
ip -n "$host" route add "$v4/32" dev "$hif" src "$gw4" scope link
ip -n "$host" -6 route add "$v6net" dev "$hif"
ip netns exec "$ns" sysctl -qw net.ipv4.ip_unprivileged_port_start=0
"""

SHELL_V4 = ipaddress.IPv4Network("100.64.0.0/16")
SHELL_V6 = ipaddress.IPv6Network("fd42:4e53:4442::/48")


class ShellAnchor:
    def __init__(self, prefix: str, host_name: str, workdir: Path) -> None:
        self.prefix = prefix
        self.host_name = host_name
        self.script = workdir / "tenant-add.sh"
        self.script.write_text(SHELL_SCRIPT)
        self.script.chmod(0o755)
        self.count = 0

    def netns_name(self, i: int) -> str:
        return f"{self.prefix}s{i}"

    def create_next(self) -> float:
        i = self.count
        self.count += 1
        gw4 = SHELL_V4.network_address + 1
        v4 = SHELL_V4.network_address + 2 + i
        v6net = ipaddress.IPv6Network((int(SHELL_V6.network_address) + ((i + 1) << 64), 64))
        argv = [
            str(self.script),
            self.host_name,
            self.netns_name(i),
            f"bsh{i}",
            str(v4),
            str(gw4),
            str(v6net),
            str(v6net.network_address + 1),
        ]
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"tenant-add.sh failed for tenant {i}: {res.stderr.strip()}")
        return dt


def run_create(
    d: BenchDaemon,
    users: list[str],
    shell: ShellAnchor,
    memory_at: Callable[[int], None],
    warmup: int,
) -> dict[str, Any]:
    """Create ``len(users)`` tenants on each side, interleaved; ``memory_at(count)`` is
    called at 0, 100 and N nsd tenants (where they fall on a chunk boundary)."""
    n = len(users)
    step = max(1, min(100, n // 10))
    bounds = sorted({*range(step, n + 1, step), n, *([100] if n > 100 else [])})
    nsd_times: list[float] = []
    sh_times: list[float] = []
    nsd_wall = sh_wall = 0.0
    memory_at(0)
    done = 0
    client = VarlinkClient(d.socket)
    try:

        def nsd_chunk(end: int) -> float:
            t_chunk = time.perf_counter()
            for name in users[done:end]:
                t0 = time.perf_counter()
                client.call("io.nsd.Tenant.Create", {"name": name})
                nsd_times.append(time.perf_counter() - t0)
            return time.perf_counter() - t_chunk

        def sh_chunk(end: int) -> float:
            t_chunk = time.perf_counter()
            for _ in range(done, end):
                sh_times.append(shell.create_next())
            return time.perf_counter() - t_chunk

        t_start = time.monotonic()
        for k, end in enumerate(bounds):
            # ABBA: alternate which side goes first in each chunk
            if k % 2 == 0:
                nsd_wall += nsd_chunk(end)
                sh_wall += sh_chunk(end)
            else:
                sh_wall += sh_chunk(end)
                nsd_wall += nsd_chunk(end)
            done = end
            if end in (100, n):
                memory_at(end)
            if n >= 200 and (k + 1) % 2 == 0:
                log(f"  {end}/{n} tenants each ({time.monotonic() - t_start:.0f} s)")
    finally:
        client.close()
    # The first `warmup` tenants of each side only warm caches (interpreter, page
    # cache, kernel slabs); their times stay in the end-to-end totals only.
    a = summarize(nsd_times[warmup:] or nsd_times)
    b = summarize(sh_times[warmup:] or sh_times)
    return {
        "tenants": n,
        "chunks": len(bounds),
        "warmup_tenants": warmup,
        "nsd_ms": _ms(a),
        "shell_ms": _ms(b),
        "nsd_total_s": nsd_wall,
        "shell_total_s": sh_wall,
        "speedup_median": ratio(b["median"], a["median"]),
        "speedup_total": ratio(sh_wall, nsd_wall),
        "nsd_first_last_decile_ms": _deciles(nsd_times),
        "shell_first_last_decile_ms": _deciles(sh_times),
        "shell_script": SHELL_SCRIPT,
        "netns_dir": RUN_NETNS,
    }


def _ms(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (v * 1000 if k != "n" else v) for k, v in s.items()}


def _deciles(xs: list[float]) -> list[float]:
    """Median of the first and of the last tenth: does the cost grow with N?"""
    if len(xs) < 10:
        return [summarize(xs)["median"] * 1000] * 2
    k = len(xs) // 10
    return [summarize(xs[:k])["median"] * 1000, summarize(xs[-k:])["median"] * 1000]
