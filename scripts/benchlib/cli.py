"""The bench's command line and the order of the run.

Order: users (untimed) -> daemon -> tenant creation, nsd and shell interleaved, with
memory at 0/100/N -> launcher comparison at N tenants -> API load -> restarts with N
tenants (exec to READY=1, memory after) -> cleanup. Results go to
``OUT/bench-<time>.json`` and ``OUT/latest.json``; the table is printed; a full run
also renders docs/benchmarks.md and docs/benchmarks/*.svg.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_metrics import bench_metrics

from . import report
from .api import run_api
from .boot import run_boot
from .env import (
    BenchDaemon,
    Cleanup,
    add_host_netns,
    add_users,
    loadavg,
    log,
    new_prefix,
    remove_namespace_files,
    start_daemon,
)
from .hostile import run_hostile
from .hostile import write as write_hostile
from .launcher import ROOT, run_launcher
from .policy import run_policy
from .report import VM_RESULTS
from .soak import run_soak
from .tenants import ShellAnchor, run_create


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description="nsd against the tools it replaces, side by side"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny N and few repetitions (the smoke test); no docs unless --docs-dir",
    )
    p.add_argument("--tenants", type=int, help="N tenants per side (default 1000, --quick 5)")
    p.add_argument(
        "--races",
        type=int,
        metavar="ROUNDS",
        help="instead: the race tests of tests/integration/test_races.py with ROUNDS rounds "
        "each (the test suite runs 200 and 40), with their figures",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench-results",
        help="directory for the results JSON (default bench-results/)",
    )
    p.add_argument(
        "--docs-dir",
        type=Path,
        help="render benchmarks.md and benchmarks/*.svg here "
        "(default: docs/ for a full run, nowhere for --quick)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not render docs")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the table of an earlier run's results and render the "
        "docs from them (to --docs-dir, default docs/); with --vm-figures, those replace "
        "the VM figures stored in the results",
    )
    p.add_argument(
        "--vm-figures",
        type=Path,
        help="the VM e2e tier's figures for the systemd sections: a figures.json, or a "
        "results directory of scripts/vm-test with phase*/figures.json (default: "
        f"bench-results/vm-figures.json, else {VM_RESULTS}, if it exists)",
    )
    p.add_argument(
        "--metrics-processes",
        type=int,
        help="extra idle processes for the metrics section (default 20000, --quick 50; "
        "0 skips the section)",
    )
    p.add_argument("--launcher-rounds", type=int, help="starts of each launcher variant")
    p.add_argument("--api-seconds", type=float, help="measured seconds per API cell and rep")
    p.add_argument("--restarts", type=int, help="timed restarts with N tenants")
    p.add_argument(
        "--boot-rounds",
        type=int,
        help="warm restarts, cold starts and floor runs of the boot section (default 3, "
        "--quick 1; 0 skips it)",
    )
    p.add_argument(
        "--boot-before",
        type=Path,
        metavar="JSON",
        help="results of an earlier run (e.g. --boot-only with --daemon-pythonpath of the "
        "code before a change) whose boot section the docs show as 'before'",
    )
    p.add_argument(
        "--boot-only",
        action="store_true",
        help="only the users and the boot section (development: profiles, quick figures); "
        "results JSON, no docs",
    )
    p.add_argument(
        "--policy-tenants",
        type=int,
        help="tenants for the network-policy-on section (default 100, --quick 3; 0 skips it)",
    )
    p.add_argument(
        "--hostile",
        action="store_true",
        help="measure only hostile local users (connection policy, memory, log flood; "
        "see scripts/benchlib/hostile.py) and write bench-results/hostile-*.json",
    )
    p.add_argument(
        "--hostile-seconds",
        type=float,
        default=40.0,
        help="seconds of the hostile siege (default 40: past the 15 s idle bound twice)",
    )
    p.add_argument(
        "--hostile-sections",
        default="siege,memory,log_flood",
        help="comma-separated subset of siege, memory, log_flood",
    )
    p.add_argument(
        "--daemon-pythonpath",
        help="run the daemons with this PYTHONPATH, e.g. a copy of the tree with a "
        "proposed patch applied (the bench itself stays on this checkout)",
    )
    p.add_argument(
        "--daemon-commit",
        help="with --daemon-pythonpath: the commit that tree is a copy of (for the docs)",
    )
    p.add_argument(
        "--soak",
        action="store_true",
        help="only the soak: --soak-calls mixed API calls and --soak-cycles create/remove "
        "cycles; descriptors, threads, RSS and database size before and after",
    )
    p.add_argument("--soak-calls", type=int, default=100_000, help="default 100,000")
    p.add_argument("--soak-cycles", type=int, default=1_000, help="default 1,000")
    args = p.parse_args(argv)
    _defaults(p, args)
    return args


def _defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the options not given default to (some depend on --quick)."""
    q = args.quick
    args.tenants = args.tenants or (5 if q else 1000)
    args.launcher_rounds = args.launcher_rounds or (5 if q else 200)
    args.launcher_warmup = 1 if q else 10
    args.create_warmup = 1 if q else 5
    args.api_seconds = args.api_seconds or (0.3 if q else 2.0)
    args.api_warmup = 0.1 if q else 0.5
    args.api_reps = 1 if q else 3
    args.restarts = args.restarts or (1 if q else 3)
    if args.boot_rounds is None:
        args.boot_rounds = 1 if q else 3
    if args.boot_only:
        args.no_docs = True
    if args.policy_tenants is None:
        args.policy_tenants = 3 if q else 100
    if args.metrics_processes is None:
        args.metrics_processes = 50 if q else 20000
    if args.tenants < 2:
        p.error("--tenants must be at least 2")
    if args.docs_dir is None and (not q or args.render) and not args.no_docs:
        args.docs_dir = ROOT / "docs"
    if args.no_docs:
        args.docs_dir = None
    args.vm_figures_given = args.vm_figures is not None
    if args.vm_figures is None:
        for candidate in (ROOT / "bench-results/vm-figures.json", VM_RESULTS):
            if candidate.exists():
                args.vm_figures = candidate
                break


def meta(args: argparse.Namespace) -> dict[str, Any]:
    def cmd(*c: str) -> str:
        r = subprocess.run(list(c), capture_output=True, text=True, check=False, cwd=ROOT)
        return r.stdout.strip()

    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "tenants": args.tenants,
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "systemd_pid1": os.path.exists("/run/systemd/system"),
        "sudo": cmd("sudo", "-V").splitlines()[0] if os.path.exists("/usr/bin/sudo") else "",
        "iproute2": cmd("ip", "-V"),
        "daemon_pythonpath": args.daemon_pythonpath,
        # what the daemons ran, if not this checkout (--daemon-pythonpath, --daemon-commit)
        "daemon_commit": args.daemon_commit,
    }


class Run:
    """One bench run: the phases in order, their timings, the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n: int = args.tenants
        self.prefix = new_prefix()
        self.results: dict[str, Any] = {"meta": meta(args)}
        self.phases: dict[str, float] = {}
        self.loads: dict[str, list[float]] = {"start": loadavg()}
        self.memory: dict[str, Any] = {}
        self.cleanup = Cleanup()

    def phase(self, name: str, t0: float) -> None:
        self.phases[name] = round(time.monotonic() - t0, 2)
        self.loads[name] = loadavg()
        log(f"{name}: {self.phases[name]:.1f} s (load average {self.loads[name][0]:.1f})")

    def measure(self) -> None:
        args, n, prefix, cleanup = self.args, self.n, self.prefix, self.cleanup
        t = time.monotonic()
        log(f"creating {n} test users (untimed)")
        users = add_users(cleanup, prefix, n)
        cleanup.push("remove namespace files", self._remove_namespaces)
        nsd_host = add_host_netns(cleanup, f"{prefix}-nsd")
        add_host_netns(cleanup, f"{prefix}-sh")
        self.phase("setup: users and host namespaces", t)

        if args.boot_only:
            self._boot(users)
            return

        t = time.monotonic()
        d = start_daemon(cleanup, prefix, nsd_host, pythonpath=args.daemon_pythonpath)
        log(f"tenant creation: {n} via nsd's API and {n} via tenant-add.sh, interleaved")
        shell = ShellAnchor(prefix, f"{prefix}-sh", d.tmp)
        self.results["create"] = run_create(d, users, shell, self._memory_of(d), args.create_warmup)
        self.phase("tenant creation", t)

        t = time.monotonic()
        log(f"launcher: {args.launcher_rounds} rounds of every variant")
        pw = pwd.getpwnam(users[0])
        self.results["launcher"] = run_launcher(
            cleanup,
            prefix,
            d.socket,
            users[0],
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            rounds=args.launcher_rounds,
            warmup=args.launcher_warmup,
        )
        self.phase("launcher", t)

        t = time.monotonic()
        log("API: Get and Enter at 1, 16, 64 clients, and 64 clients offering 5,000/s")
        self.results["api"] = run_api(
            d.socket,
            users,
            d.tmp,
            reps=args.api_reps,
            duration=args.api_seconds,
            warmup=args.api_warmup,
        )
        self.memory["after_api"] = d.memory()
        self.phase("API load", t)

        t = time.monotonic()
        log(f"restart with {n} tenants, {args.restarts} time(s)")
        self.results["restart"] = self._restarts(d)
        self.phase("restarts", t)
        self.results["memory"] = self.memory
        self.results["daemon_log_tail"] = d.log_tail(10)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nsd-latest.log").write_text(d.log_text())
        d.kill()  # idle from here on; the policy section runs a daemon of its own

        if args.boot_rounds:
            self._boot(users)

        if args.policy_tenants:
            t = time.monotonic()
            k = min(args.policy_tenants, n)
            log(f"network policy on: {k} tenants through a second daemon")
            self.results["policy"] = run_policy(cleanup, prefix, users[:k], args.daemon_pythonpath)
            self.phase("network policy on", t)

        if args.metrics_processes:
            t = time.monotonic()
            p = args.metrics_processes
            log(f"metrics: sampler and scrapes with {n} tenants and {p} extra processes")
            self.results["metrics"] = bench_metrics(n, p, 3 if args.quick else 5)
            self.phase("metrics", t)

    def _boot(self, users: list[str]) -> None:
        t = time.monotonic()
        log(f"boot: {self.n} tenants, {self.args.boot_rounds} round(s) of warm and cold "
            "starts and of the floors, through a daemon of its own")  # fmt: skip
        self.results["boot"] = run_boot(
            self.cleanup,
            self.prefix,
            users,
            rounds=self.args.boot_rounds,
            pythonpath=self.args.daemon_pythonpath,
        )
        self.phase("boot", t)

    def _remove_namespaces(self) -> None:
        removed = remove_namespace_files(
            (f"usr_{self.prefix}", f"{self.prefix}s", f"{self.prefix}fb", f"{self.prefix}fc")
        )
        log(f"removed {removed} namespace files")

    def _memory_of(self, d: BenchDaemon) -> Callable[[int], None]:
        def at(count: int) -> None:
            self.memory[str(count)] = d.memory()

        return at

    def _restarts(self, d: BenchDaemon) -> dict[str, Any]:
        ready: list[float] = []
        after: list[dict[str, int]] = []
        reconciles: list[dict[str, int] | None] = []
        for _ in range(self.args.restarts):
            status = d.stop(timeout=900)
            if status != 0:
                raise RuntimeError(f"nsd exited with {status}:\n{d.log_tail()}")
            ready.append(d.start_timed())
            after.append(d.memory())
            reconciles.append(d.last_reconcile())
        self.memory["after_restart"] = after[-1]
        return {"tenants": self.n, "ready_s": ready, "memory_after": after, "reconcile": reconciles}

    def write(self, t_start: float) -> None:
        args, results = self.args, self.results
        results["meta"]["phases_s"] = self.phases
        results["meta"]["loadavg"] = self.loads
        results["meta"]["total_s"] = round(time.monotonic() - t_start, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = results["meta"]["date"].replace(":", "").replace("-", "")
        if args.boot_only:  # a partial run: no table, and latest.json stays a full one
            path = args.out / f"boot-{stamp}.json"
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(report.boot_text(results["boot"]))
            log(f"results: {path}")
            return
        results["vm"] = report.load_vm_figures(args.vm_figures)
        _boot_before(args, results)
        report.derive(results)
        path = args.out / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
        text = json.dumps(results, indent=2) + "\n"
        path.write_text(text)
        (args.out / "latest.json").write_text(text)
        print(report.table_text(results))
        log(f"results: {path}")
        if args.docs_dir is not None:
            written = report.render_docs(results, args.docs_dir)
            log("rendered " + ", ".join(str(p) for p in written))
        log(f"total {results['meta']['total_s']:.0f} s")


def render_only(args: argparse.Namespace) -> int:
    results: dict[str, Any] = json.loads(args.render.read_text())
    if args.vm_figures_given:  # newer VM figures for an earlier run's results
        results["vm"] = report.load_vm_figures(args.vm_figures)
    _boot_before(args, results)
    report.derive(results)
    print(report.table_text(results))
    if args.docs_dir is not None:
        written = report.render_docs(results, args.docs_dir)
        log("rendered " + ", ".join(str(p) for p in written))
    return 0


def _boot_before(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.boot_before is not None:
        before = json.loads(args.boot_before.read_text())
        results["boot_before"] = {"meta": before["meta"], "boot": before["boot"]}


def run_races(rounds: int) -> int:
    """The suite's race tests, longer: Enter(create=false) against Create/Remove/Get,
    and nsd-exec launches against Remove. Each prints what it counted."""
    env = dict(os.environ, NSD_RACE_ROUNDS=str(rounds), NSD_EXEC_RACE_ROUNDS=str(rounds))
    tests = "enter_without_create or joining_nsd_exec"
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", tests,
            "tests/integration/test_races.py"]  # fmt: skip
    return subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render_only(args)
    if os.geteuid() != 0:
        print("scripts/bench: needs root (namespaces, veth pairs, users)", file=sys.stderr)
        return 1
    if args.soak:
        return run_soak(args)
    if args.hostile:
        cleanup = Cleanup()
        with cleanup.active():
            sections = tuple(args.hostile_sections.split(","))
            results = run_hostile(cleanup, args.hostile_seconds, args.daemon_pythonpath, sections)
            log("cleaning up")
        results["meta"] = meta(args)
        print(json.dumps(results, indent=2))
        log(f"results: {write_hostile(args.out, results)}")
        return 0
    if args.races is not None:
        return run_races(args.races)
    t_start = time.monotonic()
    run = Run(args)
    log(f"run prefix {run.prefix}; {run.n} tenants per side{' (quick)' if args.quick else ''}")
    with run.cleanup.active():
        run.measure()
        t_cleanup = time.monotonic()
        log("cleaning up")
    run.phase("cleanup", t_cleanup)
    run.write(t_start)
    return 0
