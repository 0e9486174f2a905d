"""Placement that keeps the budget, with a real systemd (252, in the container).

Run by tests/systemd/test_systemd_container.py; not collected elsewhere. Every
process that enters a tenant through nsd-exec ends in the tenant's slice - a
oneshot script's child, the programs a process manager starts for two tenants -
except a unit's own main process, which stays in its unit and which the audit
then reports (as it reports anything nsd-exec was told to leave with --no-scope).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from tests.harness import PY, Daemon, TestUsers, daemon_env, run, uid_of  # noqa: E402
from tests.harness import systemctl_show as show  # noqa: E402

T = "io.nsd.Tenant."
NSD_EXEC = str(Path(PY).with_name("nsd-exec"))
EXTRA = """
[systemd]
use_pidfds = "never"
[metrics]
listen = "127.0.0.1:9917"
interval = 1.0
"""


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env(extra=EXTRA) as (d, users):
        d.start()
        yield d, users
        assert d.stop() == 0, d.log_text()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the tenants' workloads can write their reports to."""
    path = Path(tempfile.mkdtemp(prefix="nsdt-place-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tenant(d: Daemon, users: TestUsers) -> tuple[str, str]:
    name = users.add()
    return name, str(d.call(T + "Create", name=name)["tenant"]["slice"])


def wait_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


WORKLOAD = """\
#!/bin/sh
# Report where this process runs (PID and cgroup), then stay alive to be audited.
echo $$ $(grep -E '^0::|name=systemd' /proc/self/cgroup | head -1) > "$1.t"
mv "$1.t" "$1"
exec sleep 300
"""


def report(d: Daemon, name: str, out: Path, *flags: str) -> str:
    """A shell line: nsd-exec as ``name``, whose workload writes its PID and cgroup
    to ``out`` and then sleeps."""
    script = out.parent / "workload.sh"
    script.write_text(WORKLOAD)
    opts = " ".join(flags)
    return f"{NSD_EXEC} --socket {d.socket} {opts} {name} -- /bin/sh {script} {out}"


def where(text: str) -> tuple[int, str]:
    pid, cgroup = text.split()
    return int(pid), cgroup.split(":", 2)[2]


def kill(pid: int) -> None:
    subprocess.run(["kill", "-KILL", str(pid)], check=False)


def audited(d: Daemon, name: str, pid: int, timeout: float = 20) -> str:
    """The audit's reason for ``pid``, once a sample after its start lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in d.call(T + "Audit", name=name)["processes"]:
            if p["pid"] == pid:
                return str(p["reason"])
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} not in the audit of {name}")


def test_oneshot_child_ends_in_the_tenant_slice(
    env: tuple[Daemon, TestUsers], shared: Path
) -> None:
    d, users = env
    name, slice_ = tenant(d, users)
    out = shared / "where"
    unit = f"oneshot-{secrets.token_hex(3)}.service"
    # The script (the unit's main process) forks nsd-exec: before, `auto` left it in
    # the oneshot service; now it goes into a scope in the tenant's slice.
    run("systemd-run", "--quiet", f"--unit={unit}", "--property=Type=oneshot", "--no-block",
        "/bin/sh", "-c", f"{report(d, name, out)}; true")  # fmt: skip
    pid, cgroup = where(wait_file(out))
    try:
        assert f"/{slice_}/nsd-enter-{uid_of(name)}-{pid}-" in cgroup, cgroup
        assert show(unit, "ActiveState")["ActiveState"] == "activating"  # the script waits
    finally:
        kill(pid)
        run("systemctl", "stop", unit, check=False)


def test_a_managers_programs_of_two_tenants_end_in_their_slices(
    env: tuple[Daemon, TestUsers], shared: Path
) -> None:
    d, users = env
    (a, slice_a), (b, slice_b) = tenant(d, users), tenant(d, users)
    out_a, out_b = shared / "a", shared / "b"
    unit = f"manager-{secrets.token_hex(3)}.service"
    # Stands for a root supervisord: a service whose main process starts programs
    # of several tenants through nsd-exec.
    script = f"{report(d, a, out_a)} & {report(d, b, out_b)} & wait"
    run("systemd-run", "--quiet", f"--unit={unit}", "/bin/sh", "-c", script)
    pid_a, cg_a = where(wait_file(out_a))
    pid_b, cg_b = where(wait_file(out_b))
    try:
        assert f"/{slice_a}/nsd-enter-{uid_of(a)}-{pid_a}-" in cg_a, cg_a
        assert f"/{slice_b}/nsd-enter-{uid_of(b)}-{pid_b}-" in cg_b, cg_b
        assert show(unit, "ActiveState")["ActiveState"] == "active"  # the manager stays
    finally:
        kill(pid_a)
        kill(pid_b)
        run("systemctl", "stop", unit, check=False)


def test_main_process_stays_and_the_audit_reports_it(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, slice_ = tenant(d, users)
    unit = f"main-{secrets.token_hex(3)}.service"
    run("systemd-run", "--quiet", f"--unit={unit}", "--property=Type=exec",
        NSD_EXEC, "--socket", d.socket, name, "--", "/bin/sleep", "300")  # fmt: skip
    try:
        pid = int(show(unit, "MainPID")["MainPID"])
        assert "stays in its unit (its main process)" in wait_log(d, f"pid {pid} stays")
        # Its unit has no Slice=: the tenant's work runs outside the tenant's budget,
        # and the audit says so (with the fix).
        assert audited(d, name, pid) == "outsideSlice"
        out = d.nsctl("audit", name, check=False)
        assert out.returncode == 1 and str(pid) in out.stdout
        assert "give the unit Slice=" in out.stdout
        doctor = d.nsctl("doctor", check=False).stdout
        assert f"{name} (1)" in doctor and "tenant-processes" in doctor
        assert slice_ not in show(unit, "ControlGroup")["ControlGroup"]
    finally:
        run("systemctl", "stop", unit, check=False)


def test_no_scope_still_opts_out_and_is_audited(
    env: tuple[Daemon, TestUsers], shared: Path
) -> None:
    d, users = env
    name, _ = tenant(d, users)
    out = shared / "where"
    unit = f"optout-{secrets.token_hex(3)}.service"
    line = report(d, name, out, "--no-scope")
    run("systemd-run", "--quiet", f"--unit={unit}", "/bin/sh", "-c", f"{line}; true")
    pid, cgroup = where(wait_file(out))
    try:
        assert cgroup.endswith(f"/{unit}"), cgroup
        assert audited(d, name, pid) == "outsideSlice"
    finally:
        kill(pid)
        run("systemctl", "stop", unit, check=False)


def wait_log(d: Daemon, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log_text()
        if text in log:
            return next(line for line in log.splitlines() if text in line)
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged")


def test_a_oneshot_whose_main_process_is_nsd_exec_stays_in_its_unit(
    env: tuple[Daemon, TestUsers], shared: Path
) -> None:
    """systemd counts a oneshot's ExecStart process as its main process too."""
    d, users = env
    name, _ = tenant(d, users)
    out = shared / "where"
    unit = f"oneshot-main-{secrets.token_hex(3)}.service"
    run("systemd-run", "--quiet", f"--unit={unit}", "--property=Type=oneshot", "--no-block",
        *report(d, name, out).split())  # fmt: skip
    pid, cgroup = where(wait_file(out))
    try:
        assert cgroup.endswith(f"/{unit}"), cgroup
        assert int(show(unit, "MainPID")["MainPID"]) == pid
    finally:
        kill(pid)
        run("systemctl", "stop", unit, check=False)
