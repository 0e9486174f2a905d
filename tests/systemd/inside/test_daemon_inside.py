"""The nsd daemon with a real systemd (252, in the container this runs in).

Run by tests/systemd/test_systemd_container.py; not collected elsewhere. The
daemon runs as the harness runs it on the host (a test-made "host" network
namespace, socket and state in a temp dir), but here systemd is PID 1 and on
the bus, so tenants get slices, Enter places callers into scopes and
`nsctl run` starts transient services. PIDFDs: systemd 252 has none, so every
placement here takes the PIDs path guarded by pidfds; the Debian 13 VM tier
covers PIDFDs.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from tests.harness import Daemon, TestUsers, daemon_env, netns_inode, run, uid_of  # noqa: E402
from tests.harness import systemctl_show as show  # noqa: E402
from tests.native import native_program  # noqa: E402

T = "io.nsd.Tenant."
CONTROL = Path("/etc/systemd/system.control")
EXTRA = """
[limits]
memory_max = "512M"
tasks_max = 300
[systemd]
use_pidfds = "never"
"""
NSD_EXEC = str(native_program("nsd-exec"))


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env(extra=EXTRA) as (d, users):
        d.start()
        yield d, users
        assert d.stop() == 0, d.log_text()


def tenant(d: Daemon, users: TestUsers) -> tuple[str, dict[str, object]]:
    name = users.add()
    return name, d.call(T + "Create", name=name)["tenant"]


def wait_for_exec(pid: int, comm: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return
        except FileNotFoundError:
            break
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not become {comm}")


def cgroup_of(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(
        line.split(":", 2)[2] for line in lines if line.split(":")[1] in ("", "name=systemd")
    )


def test_daemon_found_systemd(env: tuple[Daemon, TestUsers]) -> None:
    d, _ = env
    assert "systemd 252 on the bus; PIDFDs for scopes: no" in d.log_text()
    assert not [x for x in d.call("io.nsd.Daemon.Status")["degraded"] if "systemd" in x]


def test_slice_created_with_configured_limits(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    unit = f"tenant-{uid_of(name)}.slice"
    assert t["slice"] == unit
    assert show(unit, "MemoryMax", "TasksMax", "ActiveState") == {
        "MemoryMax": str(512 << 20), "TasksMax": "300", "ActiveState": "active"
    }  # fmt: skip
    assert (CONTROL / f"{unit}.d" / "50-MemoryMax.conf").exists()  # persistent, no unit file
    assert not Path(f"/etc/systemd/system/{unit}").exists()


def test_set_limits_at_runtime_and_reset(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    unit = str(t["slice"])
    out = d.nsctl("limits", name, "--memory-max", "1G", "--cpu-weight", "50").stdout
    assert "1G" in out and "tenant" in out
    assert show(unit, "MemoryMax", "CPUWeight") == {"MemoryMax": str(1 << 30), "CPUWeight": "50"}
    assert d.call(T + "GetLimits", name=name)["overrides"] == {
        "memoryMax": str(1 << 30), "cpuWeight": "50"
    }  # fmt: skip
    d.nsctl("limits", name, "--reset", "memoryMax")
    assert show(unit, "MemoryMax") == {"MemoryMax": str(512 << 20)}  # the default again
    bad = d.nsctl("limits", name, "--memory-max", "lots", check=False)
    assert bad.returncode == 1 and "io.nsd.Tenant.InvalidLimit" in bad.stderr
    bad = d.nsctl("limits", name, "--memory-high", "2G", check=False)  # above MemoryMax 512M
    assert bad.returncode == 1 and "must not be below memory_high" in bad.stderr


def test_restart_adopts_slices(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    d.nsctl("limits", name, "--tasks-max", "123")
    d.restart()
    assert show(str(t["slice"]), "TasksMax", "ActiveState") == {
        "TasksMax": "123", "ActiveState": "active"
    }  # fmt: skip
    assert "UnitExists" not in d.log_text()


def test_nsd_exec_from_a_session_is_placed_into_a_scope(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    # systemd-run --scope execs its command in place, and nsd-exec execs its own:
    # the Popen pid ends up being the workload.
    proc = subprocess.Popen(
        ["systemd-run", "--quiet", "--scope", f"--unit=sess-{secrets.token_hex(3)}",
         NSD_EXEC, "--socket", d.socket, name, "--", "/bin/sleep", "300"],
    )  # fmt: skip
    try:
        wait_for_exec(proc.pid, "sleep")
        cg = cgroup_of(proc.pid)
        assert f"/tenant.slice/{t['slice']}/nsd-enter-{uid_of(name)}-{proc.pid}-" in cg, cg
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == t["namespaceInode"]
    finally:
        proc.kill()
        proc.wait()


def test_nsd_exec_in_a_service_stays_in_its_unit(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    for flag, expect_scope in (("", False), ("--scope", True)):
        unit = f"svc-{secrets.token_hex(3)}.service"
        argv = [
            NSD_EXEC,
            "--socket",
            d.socket,
            *([flag] if flag else []),
            name,
            "--",
            "/bin/sleep",
            "300",
        ]
        run("systemd-run", "--quiet", f"--unit={unit}", "--property=Type=exec", *argv)
        try:
            pid = int(show(unit, "MainPID")["MainPID"])
            wait_for_exec(pid, "sleep")
            cg = cgroup_of(pid)
            if expect_scope:
                assert f"/{t['slice']}/nsd-enter-" in cg, cg
            else:
                assert cg.endswith(f"/{unit}"), cg  # the policy keeps a service's process home
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == t["namespaceInode"]
        finally:
            run("systemctl", "stop", unit, check=False)


def test_nsctl_run_in_namespace_and_slice(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    out = Path(f"/tmp/nsdrun-{secrets.token_hex(4)}")
    script = f"readlink /proc/self/ns/net > {out}; cat /proc/self/cgroup >> {out}; id -u >> {out}"
    res = d.nsctl("run", name, "--wait", "--", "/bin/sh", "-c", script)
    assert "success, exit status 0" in res.stderr
    text = out.read_text()
    assert f"net:[{t['namespaceInode']}]" in text
    assert f"/tenant.slice/{t['slice']}/nsd-run-{uid_of(name)}-" in text
    assert text.splitlines()[-1] == str(uid_of(name))
    failed = d.nsctl("run", name, "--wait", "--", "/bin/sh", "-c", "exit 3", check=False)
    assert failed.returncode == 3
    out.unlink()


def test_tenant_may_run_for_itself_but_not_for_others(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    a, _ = tenant(d, users)
    b, _ = tenant(d, users)
    ok = d.nsctl("run", a, "--wait", "--", "/bin/true", user=a)
    assert ok.returncode == 0
    for args in (("run", b, "--", "/bin/true"), ("limits", b, "--memory-max", "1G"),
                 ("limits", a, "--memory-max", "1G")):  # fmt: skip
        res = d.nsctl(*args, user=a, check=False)
        assert res.returncode == 1 and "org.varlink.service.PermissionDenied" in res.stderr, args


def test_remove_drops_the_slice(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name, t = tenant(d, users)
    unit = str(t["slice"])
    d.call(T + "Remove", name=name)
    assert show(unit, "ActiveState")["ActiveState"] == "inactive"
    assert not (CONTROL / f"{unit}.d").exists()
    assert netns_inode(str(t["namespacePath"])) is None


def test_sighup_reapplies_changed_default_limits(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    _, t = tenant(d, users)
    unit = str(t["slice"])
    own, t_own = tenant(d, users)
    d.nsctl("limits", own, "--memory-max", "1G")
    original = d.config.read_text()
    d.config.write_text(original.replace('memory_max = "512M"', 'memory_max = "768M"'))
    try:
        assert d.proc is not None
        d.proc.send_signal(1)  # SIGHUP
        deadline = time.monotonic() + 10
        while show(unit, "MemoryMax")["MemoryMax"] != str(768 << 20):
            assert time.monotonic() < deadline, d.log_text()[-2000:]
            time.sleep(0.1)
        # A tenant's own override still wins over the new default.
        assert show(str(t_own["slice"]), "MemoryMax")["MemoryMax"] == str(1 << 30)
        assert "reloaded" in d.log_text()
    finally:
        d.config.write_text(original)
        assert d.proc is not None
        d.proc.send_signal(1)
