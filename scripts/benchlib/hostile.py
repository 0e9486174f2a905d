"""``scripts/bench --hostile``: hostile local users against a daemon on default limits.

Three measurements, each on a fresh daemon in a bench-made host namespace (issue 17,
points 1, 3 and 9):

* **siege**: 16 hostile UIDs (8 tenants, 8 other accounts) each hold every
  connection the daemon admits plus 4 slowloris connections (one byte a second),
  reopening whatever is closed, while a tenant, an admin and root call ``Get`` in a
  loop (a new connection per call, as nsctl does): calls that succeeded, p50/p99,
  connections held, closed (and after how long), refused (and why).
* **memory**: the same 16 UIDs open every connection they may and send requests
  without ever reading a reply; the daemon's RSS before, at its peak, and after.
* **log flood**: one tenant pipelines a refused call (``Remove`` of another tenant
  with a 60,000-character name) on one connection; bytes of log per second.

``--daemon-pythonpath /path/to/old/tree`` measures another version the same way
(the "before" figures); the bench writes no keys an older daemon would refuse.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tests.hostile import result_of, siege, spawn

from .env import (
    BenchDaemon,
    Cleanup,
    add_host_netns,
    loadavg,
    log,
    new_prefix,
    run,
    start_daemon,
)


def _admin_group(cleanup: Cleanup, prefix: str) -> str:
    group = f"{prefix}adm"
    run("groupadd", group)

    def delete() -> None:
        run("groupdel", group, check=False)

    cleanup.push(f"delete group {group}", delete)
    return group


def _users(cleanup: Cleanup, prefix: str, group: str) -> dict[str, Any]:
    names: list[str] = []

    def undo() -> None:
        for name in names:
            run("pkill", "-KILL", "-u", name, check=False)
            run("userdel", "--force", name, check=False)

    cleanup.push(f"delete {prefix}h* users", undo)

    def add(suffix: str, *extra: str) -> str:
        name = f"{prefix}h{suffix}"
        run("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
            *extra, name)  # fmt: skip
        names.append(name)
        return name

    return {
        "tenant": add("t"),
        "admin": add("a", "--groups", group),
        "hostile_tenants": [add(f"x{i}") for i in range(8)],
        "hostile_others": [add(f"o{i}") for i in range(8)],
    }


def _daemon(
    cleanup: Cleanup, prefix: str, tag: str, *, group: str, pythonpath: str | None,
    who: dict[str, Any],
) -> BenchDaemon:  # fmt: skip
    host = add_host_netns(cleanup, f"{prefix}-{tag}")
    d = start_daemon(cleanup, f"{prefix}{tag}", host, private_run_dir=True, pythonpath=pythonpath)
    d.stop()
    text = d.config.read_text()
    d.config.write_text(text.replace("[daemon]\n", f'[daemon]\nadmin_group = "{group}"\n', 1))
    d.start_timed()
    for name in [who["tenant"], *who["hostile_tenants"]]:
        d.call("io.nsd.Tenant.Create", name=name)
    return d


def _remove_tenants(d: BenchDaemon, who: dict[str, Any]) -> None:
    for name in [who["tenant"], *who["hostile_tenants"]]:
        d.call("io.nsd.Tenant.Remove", name=name, force=True)


def _measure_siege(d: BenchDaemon, who: dict[str, Any], seconds: float) -> dict[str, Any]:
    callers = {
        "tenant": (who["tenant"], who["tenant"]),
        "admin": (who["admin"], who["tenant"]),
        "root": (None, who["tenant"]),
    }
    hostile = who["hostile_tenants"] + who["hostile_others"]
    result = siege(d.socket, hostile, callers, seconds)
    result.pop("per_uid")
    return result


def _measure_memory(d: BenchDaemon, who: dict[str, Any], seconds: float) -> dict[str, Any]:
    before = d.memory()
    # 64 attempts per UID: whatever each version admits is "at its cap".
    floods = [spawn("flood", u, d.socket, seconds, "--connections", "64", "--name", u)
              for u in who["hostile_tenants"] + who["hostile_others"]]  # fmt: skip
    peak = before["rss_kib"]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, d.memory()["rss_kib"])
        time.sleep(0.5)
    results = [result_of(p) for p in floods]
    time.sleep(2.0)  # let the daemon notice the closes
    return {
        "uids": len(results),
        "connections_admitted": sum(r["admitted"] for r in results),
        "requests_sent": sum(r["requests_sent"] for r in results),
        "alive_at_end": sum(r["alive_at_end"] for r in results),
        "rss_kib_before": before["rss_kib"],
        "rss_kib_peak": peak,
        "rss_kib_after": d.memory()["rss_kib"],
    }


def _measure_log_flood(d: BenchDaemon, who: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One tenant pipelines a refused Remove with a 60,000-character name."""
    size0 = d.log.stat().st_size
    name = who["hostile_tenants"][0] + "x" * 60_000
    t0 = time.monotonic()
    r = result_of(spawn("refused", who["tenant"], d.socket, seconds, "--name", name))
    elapsed = time.monotonic() - t0
    logged = d.log.stat().st_size - size0
    text = d.log.read_bytes()[size0:].decode(errors="replace")
    lines = [x for x in text.splitlines() if "method=io.nsd.Tenant.Remove" in x]
    suppressed = sum(int(m) for m in re.findall(r"suppressed=(\d+)", text))
    return {
        "seconds": round(elapsed, 2),
        "calls_refused": r["answered"],
        "bytes_logged": logged,
        "bytes_logged_per_s": round(logged / elapsed),
        "audit_lines": len(lines),
        "suppressed_reported": suppressed,
        "longest_line": max((len(x) for x in lines), default=0),
    }


SECTIONS = ("siege", "memory", "log_flood")


def run_hostile(
    cleanup: Cleanup, seconds: float, pythonpath: str | None, sections: tuple[str, ...] = SECTIONS
) -> dict[str, Any]:
    prefix = new_prefix()
    group = _admin_group(cleanup, prefix)
    who = _users(cleanup, prefix, group)
    results: dict[str, Any] = {}
    for section, tag, fn, secs in (
        ("siege", "sg", _measure_siege, seconds),
        ("memory", "mm", _measure_memory, min(seconds, 20.0)),
        ("log_flood", "lf", _measure_log_flood, 5.0),
    ):
        if section not in sections:
            continue
        log(f"hostile: {section} ({secs:g} s, load average {loadavg()[0]:.1f})")
        d = _daemon(cleanup, prefix, tag, group=group, pythonpath=pythonpath, who=who)
        try:
            results[section] = fn(d, who, secs)
            results[section]["loadavg_after"] = loadavg()
        finally:
            _remove_tenants(d, who)
            d.kill()
        log(f"  {json.dumps(results[section])}")
    return results


def write(out: Path, results: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out / f"hostile-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
