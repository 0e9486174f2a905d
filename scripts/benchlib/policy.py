"""Network policy on: what nsd's default ``[network]`` policy adds per tenant.

The comparisons above run nsd with ``[network] enabled = false``, because the shell
anchor builds no firewall: that is the same work on both sides. nsd's default is
policy on (an nftables table per host and per tenant, NAT, isolation, shaping), so
this section measures it too, with a second daemon in a host namespace of its own,
its own run dir, and the first K bench users as tenants: per-tenant creation time
(and how it grows from the first to the last tenth), restart to READY=1, memory.
"""

from __future__ import annotations

import time
from typing import Any

from nsd.varlink.client import VarlinkClient

from .env import Cleanup, add_host_netns, log, start_daemon
from .stats import summarize


def run_policy(
    cleanup: Cleanup, prefix: str, users: list[str], pythonpath: str | None
) -> dict[str, Any]:
    host = add_host_netns(cleanup, f"{prefix}-pol")
    d = start_daemon(
        cleanup, f"{prefix}p", host, policy=True, private_run_dir=True, pythonpath=pythonpath
    )
    mem0 = d.memory()
    times: list[float] = []
    client = VarlinkClient(d.socket)
    t0 = time.perf_counter()
    try:
        for name in users:
            t = time.perf_counter()
            client.call("io.nsd.Tenant.Create", {"name": name})
            times.append(time.perf_counter() - t)
    finally:
        client.close()
    total = time.perf_counter() - t0
    mem_k = d.memory()
    log(f"  policy on: {len(users)} tenants in {total:.1f} s; restarting")
    status = d.stop(timeout=900)
    if status != 0:
        raise RuntimeError(f"nsd (policy on) exited with {status}:\n{d.log_tail()}")
    ready = d.start_timed()
    k = max(1, len(users) // 10)
    s = summarize(times)
    result = {
        "tenants": len(users),
        "create_ms": {key: (v * 1000 if key != "n" else v) for key, v in s.items()},
        "create_first_last_tenth_ms": [
            summarize(times[:k])["median"] * 1000,
            summarize(times[-k:])["median"] * 1000,
        ],
        "create_total_s": total,
        "restart_ready_s": ready,
        "restart_reconcile": d.last_reconcile(),
        "memory": {"0": mem0, str(len(users)): mem_k, "after_restart": d.memory()},
    }
    d.kill()
    return result
