"""Comparison 3: Get and Enter against the running daemon at 1, 16 and 64 clients.

Closed loop (each client calls again as soon as it has its reply) gives the most
calls/s; its latency is C / throughput by Little's law. The latency target is then
checked in open loop: 64 clients together offering the target rate (5,000 calls/s)
on Poisson schedules, latency counted from when each call was due.

There is no anchor to interleave with (the wrapper script has no API), so the two
methods are interleaved with each other instead: every repetition runs each cell
once, in alternating method order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CONCURRENCY = (1, 16, 64)
METHODS = ("io.nsd.Tenant.Get", "io.nsd.Tenant.Enter")
#: the open-loop cell: (clients, offered calls/s), the target's figures
OPEN_LOOP = (64, 5000.0)


def run_api(
    socket_path: str,
    names: list[str],
    workdir: Path,
    *,
    reps: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    names_file = workdir / "tenant-names.txt"
    names_file.write_text("\n".join(names) + "\n")
    cells: dict[str, list[dict[str, Any]]] = {}
    oc, orate = OPEN_LOOP
    plan = [(c, 0.0) for c in CONCURRENCY] + [(oc, orate)]
    for rep in range(reps):
        for c, rate in plan:
            order = METHODS if rep % 2 == 0 else METHODS[::-1]
            for m in order:
                key = f"{m.rsplit('.', 1)[1]}@{c}" + (f",{rate:.0f}/s" if rate else "")
                cells.setdefault(key, []).append(
                    _one(socket_path, m, names_file, c, duration=duration, warmup=warmup, rate=rate)
                )
    out: dict[str, Any] = {
        "reps": reps,
        "duration_s": duration,
        "tenants": len(names),
        "open_loop": {"clients": oc, "offered_per_s": orate},
    }
    for key, runs in cells.items():
        calls = sum(r["calls"] for r in runs)
        secs = sum(r["duration_s"] for r in runs)
        out[key] = {
            "calls_per_s": calls / secs,
            "calls_per_s_runs": [r["calls_per_s"] for r in runs],
            # per-run percentiles; the reported figure is the median over runs
            "p50_ms": _median([r["p50_ms"] for r in runs]),
            "p90_ms": _median([r["p90_ms"] for r in runs]),
            "p99_ms": _median([r["p99_ms"] for r in runs]),
            "p99_ms_worst_run": max(r["p99_ms"] for r in runs),
            "p99_ms_runs": [r["p99_ms"] for r in runs],
            "max_ms": max(r["max_ms"] for r in runs),
            "calls": calls,
            "errors": sum(r["errors"] for r in runs),
            "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""),
        }
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _one(
    socket_path: str,
    method: str,
    names_file: Path,
    c: int,
    *,
    duration: float,
    warmup: float,
    rate: float = 0.0,
) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchlib.loadclient",
            socket_path,
            method,
            str(names_file),
            str(c),
            str(duration),
            str(warmup),
            str(rate),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=duration + warmup + 120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"load client {method}@{c} failed: {res.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(res.stdout)
    return result
