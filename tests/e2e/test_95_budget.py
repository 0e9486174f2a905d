"""Every tenant workload in the tenant's budget (phase 2, after the reboot checks).

The cases docs/nsd-exec.md presents as normal use, each with the real program:
a oneshot service's script calling nsd-exec (the issue's reproduction: 300 MiB
under MemoryMax=64M, which must be OOM-killed and counted for the tenant), a job
of root's crontab through the real cron (no logind session: it runs in
cron.service), and a root supervisord (Debian's supervisor) running programs of
two tenants, which `systemctl stop supervisor` must still stop. Each must end in
its tenant's slice, in an nsd-enter scope.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.budget import (
    fault_count,
    in_tenant_scope,
    memory_events,
    memory_max,
    oom_in_oneshot,
    reported,
    reporting,
)
from tests.e2e.guest import SCRATCH, nsctl, run, stop_unit, uid_of, wait_for

pytestmark = pytest.mark.phase2

SUPERVISOR_CONF = Path("/etc/supervisor/conf.d/nsd-e2e-budget.conf")


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def test_oneshot_child_is_oom_killed_in_the_tenant_slice(
    tenants_ready: dict[str, Any], scratch: Path, figures: dict[str, Any]
) -> None:
    before = memory_events("alice")["oom_kill"]
    counted_before = fault_count("alice", "oom_kill")
    with memory_max("alice", "64M"):
        try:
            oom_in_oneshot("alice", "budget-oneshot")
        finally:
            stop_unit("budget-oneshot.service")
    cgroup, _pid = reported("budget-oneshot")
    rc = (SCRATCH / "budget-oneshot.rc").read_text().strip()
    after = memory_events("alice")["oom_kill"]
    figures["budget_oneshot"] = {"cgroup": cgroup, "exit_status": rc,
                                 "oom_kill_before": before, "oom_kill_after": after}  # fmt: skip
    assert in_tenant_scope("alice", cgroup), cgroup
    assert rc == "137", f"the 300 MiB workload was not SIGKILLed (exit {rc})"
    assert after > before, (before, after)

    # Counted for alice: the fault counter (event-driven), the record with its
    # journal entry.
    def grown() -> float:
        n = fault_count("alice", "oom_kill")
        return n if n > counted_before else 0.0

    counted = wait_for(grown, "nsd_tenant_faults_total{kind=oom_kill} of alice to grow", 30)
    faults = json.loads(nsctl("--json", "faults", "alice", "--since", "10min").stdout)["faults"]
    kills = [f for f in faults if f["kind"] == "oom_kill"]
    assert kills and kills[-1]["limit"] == 64 << 20, faults
    journal = run("journalctl", "-o", "json", "NSD_TENANT=alice", "NSD_FAULT=oom_kill").stdout
    entries = [json.loads(line) for line in journal.splitlines()]
    assert entries and entries[-1]["NSD_UID"] == str(uid_of("alice")), journal[-2000:]
    assert entries[-1]["NSD_LIMIT"] == str(64 << 20)
    figures["budget_oneshot"].update(
        faults_total=counted, fault_record=kills[-1], journal_message=entries[-1]["MESSAGE"]
    )


def test_root_crontab_job_runs_in_the_tenant_slice(
    tenants_ready: dict[str, Any], scratch: Path, figures: dict[str, Any]
) -> None:
    saved = run("crontab", "-l", check=False)
    line = " ".join(reporting("bob", "budget-cron", "/bin/true"))
    run("crontab", "-", input=f"* * * * * {line}\n")
    try:
        # cron starts jobs at the minute: up to 60 s, more on a slow VM.
        cgroup, _ = reported("budget-cron", timeout=150)
    finally:
        if saved.returncode == 0:
            run("crontab", "-", input=saved.stdout)
        else:
            run("crontab", "-r", check=False)
    figures["budget_root_crontab"] = cgroup
    # Not cron.service: bob's slice.
    assert in_tenant_scope("bob", cgroup), cgroup


def test_root_supervisord_programs_of_two_tenants(
    tenants_ready: dict[str, Any], scratch: Path, figures: dict[str, Any]
) -> None:
    programs = {"alice": "budget-sup-alice", "bob": "budget-sup-bob"}
    conf = "".join(
        f"[program:{name}]\ncommand={' '.join(reporting(user, name, '/bin/sleep', '900'))}\n"
        "stopsignal=TERM\nstopwaitsecs=10\nautorestart=false\n\n"
        for user, name in programs.items()
    )
    SUPERVISOR_CONF.write_text(conf)
    try:
        run("systemctl", "start", "supervisor.service")
        wait_for(lambda: run("supervisorctl", "update", check=False).returncode == 0,
                 "supervisorctl to reach supervisord", timeout=60)  # fmt: skip
        where = {user: reported(name) for user, name in programs.items()}
        figures["budget_supervisord"] = {u: c for u, (c, _) in where.items()}
        for user, (cgroup, pid) in where.items():
            assert in_tenant_scope(user, cgroup), (user, cgroup)
            assert alive(pid)
        # supervisord still stops its programs, wherever they run.
        run("systemctl", "stop", "supervisor.service", timeout=90)
        pids = [pid for _, pid in where.values()]
        wait_for(lambda: not any(alive(p) for p in pids), "the programs to stop", timeout=30)
    finally:
        SUPERVISOR_CONF.unlink(missing_ok=True)
        run("systemctl", "start", "supervisor.service", check=False)


def test_audit_reports_a_units_main_process_outside_the_slice(
    tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    """A unit's main process stays in its unit; without Slice= that is outside the
    tenant's budget, and the audit says so, with the fix."""
    unit = "budget-main.service"
    run("systemd-run", "--quiet", f"--unit={unit}", "-p", "Type=exec",
        *reporting("alice", "budget-main", "/bin/sleep", "300"))  # fmt: skip
    try:
        cgroup, pid = reported("budget-main")
        assert cgroup == f"/system.slice/{unit}", cgroup

        def listed() -> dict[str, Any] | None:
            res = nsctl("--json", "audit", "alice", check=False)
            procs = {p["pid"]: p for p in json.loads(res.stdout)["processes"]}
            return procs.get(pid)

        found = wait_for(listed, "the audit to list the unit's main process", timeout=45)
        assert found is not None
        assert found["reason"] == "outsideSlice", found
        human = nsctl("audit", "alice", check=False)
        assert human.returncode == 1 and "give the unit Slice=" in human.stdout
        figures["budget_audit_main_process"] = found
    finally:
        stop_unit(unit)


def test_no_scope_still_opts_out(tenants_ready: dict[str, Any], scratch: Path) -> None:
    unit = "budget-noscope.service"
    line = " ".join(reporting("alice", "budget-noscope", "/bin/true", flags=("--no-scope",)))
    run("systemd-run", "--quiet", "--wait", f"--unit={unit}", "-p", "Type=oneshot",
        "/bin/sh", "-c", f"{line}; true", timeout=60)  # fmt: skip
    cgroup, _ = reported("budget-noscope")
    assert cgroup == f"/system.slice/{unit}", cgroup  # left where it was, as asked
