"""The systemd adapter against a real systemd (252 in the container this runs in).

Run by tests/systemd/test_systemd_container.py through nsenter; not collected elsewhere.
Each test uses its own tenant-like slice number, so tests don't see each other's units.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nsd.systemd import units as sd

CONTROL = Path("/etc/systemd/system.control")

LIMITS = sd.limit_properties(
    memory_min=16 << 20,
    memory_low=32 << 20,
    memory_high=256 << 20,
    memory_max=512 << 20,
    memory_swap_max=0,
    cpu_weight=50,
    cpu_quota_percent=150,
    tasks_max=200,
    io_weight=40,
)
EXPECTED = {
    "MemoryMin": 16 << 20,
    "MemoryLow": 32 << 20,
    "MemoryHigh": 256 << 20,
    "MemoryMax": 512 << 20,
    "MemorySwapMax": 0,
    "CPUWeight": 50,
    "CPUQuotaPerSecUSec": 1_500_000,
    "TasksMax": 200,
    "IOWeight": 40,
}


@pytest.fixture
async def systemd() -> AsyncIterator[sd.Systemd]:
    s = await sd.Systemd.connect()
    yield s
    await s.close()


@pytest.fixture
def slice_name() -> str:
    return f"tenant-{secrets.randbelow(10**6) + 10**6}.slice"


@pytest.fixture
def sleeper() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(["sleep", "300"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield proc.pid, pidfd
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)


def cgroup_of(pid: int) -> str:
    """The process's path in systemd's own hierarchy (hybrid: name=systemd; v2: 0::)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        if ":name=systemd:" in line:
            return line.split(":", 2)[2]
    return next(line for line in lines if line.startswith("0::")).split(":", 2)[2]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def dropins(unit: str, base: Path = CONTROL) -> dict[str, str]:
    d = base / f"{unit}.d"
    return {p.name: p.read_text() for p in sorted(d.glob("*.conf"))} if d.is_dir() else {}


async def eventually(check, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


# -- connection and features ------------------------------------------------------


async def test_connect_detects_features(systemd: sd.Systemd) -> None:
    f = systemd.features
    assert f.version >= 252
    if f.version == 252:
        assert not f.pidfds  # detected: 252 answers "Cannot set property PIDFDs..."
    # The probe created nothing.
    assert await systemd.list_units_by_patterns([], ["nsd-pidfd-probe-*"]) == []


# -- slices: create or adopt, persist, change, revert -------------------------------------


async def test_slice_created_with_properties(systemd: sd.Systemd, slice_name: str) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    props = await systemd.get_unit_properties(slice_name, sd.SLICE)
    assert {k: props[k] for k in EXPECTED} == EXPECTED
    assert props["ControlGroup"] == f"/tenant.slice/{slice_name}"
    unit = await systemd.get_unit_properties(slice_name)
    assert (unit["ActiveState"], unit["LoadState"]) == ("active", "loaded")
    # Not transient, no unit file: only drop-ins, which systemd reads at every load.
    assert unit["Transient"] is False
    assert unit["FragmentPath"] == ""
    files = dropins(slice_name)
    # One file per setting, named for the unit-file setting (CPUQuota=, not the D-Bus name).
    assert set(files) == {
        f"50-{k}.conf" for k in (*EXPECTED.keys() - {"CPUQuotaPerSecUSec"}, "CPUQuota")
    }
    assert "CPUQuota=150%" in files["50-CPUQuota.conf"]
    assert "MemoryMax=536870912" in files["50-MemoryMax.conf"]
    assert all(p.startswith(str(CONTROL)) for p in unit["DropInPaths"])


async def test_slice_adopted_when_it_exists(systemd: sd.Systemd, slice_name: str) -> None:
    # Exists already: implicitly, because a unit was started in it (as after a reboot
    # a tenant's own service would), and then through an earlier nsd run.
    sh(
        "systemd-run",
        "--quiet",
        f"--slice={slice_name}",
        "--unit=adopt-" + slice_name[:-6],
        "-p",
        "CollectMode=inactive-or-failed",
        "sleep",
        "60",
    )
    assert (await systemd.get_unit_properties(slice_name))["ActiveState"] == "active"
    await systemd.ensure_slice(slice_name, LIMITS)
    await systemd.ensure_slice(slice_name, sd.limit_properties(memory_max=1 << 30))
    props = await systemd.get_unit_properties(slice_name, sd.SLICE)
    assert props["MemoryMax"] == 1 << 30
    assert props["CPUWeight"] == 50  # earlier settings stay
    await systemd.stop_unit("adopt-" + slice_name[:-6] + ".service")


async def test_runtime_change_persists_without_reload(systemd: sd.Systemd, slice_name: str) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    await systemd.set_unit_properties(
        slice_name, sd.limit_properties(memory_max=300 << 20, cpu_weight=7), runtime=False
    )
    props = await systemd.get_unit_properties(slice_name, sd.SLICE)
    assert (props["MemoryMax"], props["CPUWeight"]) == (300 << 20, 7)  # live, no reload
    assert "MemoryMax=314572800" in dropins(slice_name)["50-MemoryMax.conf"]
    # A daemon-reload (anyone's) re-reads the drop-ins: the values stay.
    sh("systemctl", "daemon-reload")
    props = await systemd.get_unit_properties(slice_name, sd.SLICE)
    assert (props["MemoryMax"], props["CPUWeight"]) == (300 << 20, 7)
    assert {k: props[k] for k in ("TasksMax", "IOWeight")} == {"TasksMax": 200, "IOWeight": 40}


async def test_runtime_only_change_goes_to_run(systemd: sd.Systemd, slice_name: str) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    await systemd.set_unit_properties(slice_name, [("TasksMax", "t", 99)], runtime=True)
    assert (
        "TasksMax=99"
        in dropins(slice_name, Path("/run/systemd/system.control"))["50-TasksMax.conf"]
    )
    assert (await systemd.get_unit_properties(slice_name, sd.SLICE))["TasksMax"] == 99


async def test_transient_slices_do_not_persist(systemd: sd.Systemd, slice_name: str) -> None:
    """Why ensure_slice never uses StartTransientUnit for slices."""
    await systemd.start_transient_unit(slice_name, LIMITS)
    await systemd.set_unit_properties(slice_name, [("CPUWeight", "t", 9)], runtime=False)
    assert dropins(slice_name) == {}  # not in /etc ...
    assert (
        "CPUWeight=9" in dropins(slice_name, Path("/run/systemd/transient"))["50-CPUWeight.conf"]
    )  # ... but in /run: gone at reboot
    with pytest.raises(sd.SystemdError) as err:
        await systemd.start_transient_unit(slice_name, LIMITS)
    assert err.value.dbus_name == "org.freedesktop.systemd1.UnitExists"
    await systemd.stop_unit(slice_name)


async def test_revert_removes_dropins(systemd: sd.Systemd, slice_name: str) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    await systemd.set_unit_properties(slice_name, [("TasksMax", "t", 99)], runtime=True)
    changes = await systemd.revert_unit_files([slice_name])
    assert {path for _, path, _ in changes} >= {
        str(CONTROL / f"{slice_name}.d"),
        f"/run/systemd/system.control/{slice_name}.d",
    }
    assert dropins(slice_name) == {}
    await systemd.stop_unit(slice_name)

    async def defaults() -> bool:
        props = await systemd.get_unit_properties(slice_name, sd.SLICE)
        return bool(props["MemoryMax"] == sd.INFINITY and props["TasksMax"] != 200)

    # Once stopped, the unit is unloaded; loading it again finds no drop-ins.
    assert await eventually(defaults)


# -- placement ------------------------------------------------------------------------


async def place(s: sd.Systemd, slice_name: str, pid: int, pidfd: int) -> tuple[str, bool]:
    scope = f"nsdt-{secrets.token_hex(4)}.scope"
    await s.ensure_slice(slice_name, LIMITS)
    used = await s.start_scope_for_process(
        scope,
        pid,
        pidfd,
        [("Slice", "s", slice_name), ("CollectMode", "s", "inactive-or-failed")],
    )
    assert cgroup_of(pid) == f"/tenant.slice/{slice_name}/{scope}"
    assert await s.unit_for_pid(pid) == scope
    props = await s.get_unit_properties(scope)
    assert props["ActiveState"] == "active"
    return scope, used


async def test_scope_placement_by_pid_forced(slice_name: str, sleeper: tuple[int, int]) -> None:
    s = await sd.Systemd.connect(use_pidfds=False)  # the fallback path, forced
    try:
        _scope, used = await place(s, slice_name, *sleeper)
        assert not used
    finally:
        await s.close()


async def test_scope_placement_detected(
    systemd: sd.Systemd, slice_name: str, sleeper: tuple[int, int]
) -> None:
    _scope, used = await place(systemd, slice_name, *sleeper)
    assert used == systemd.features.pidfds


async def test_scope_placement_by_pidfds(
    systemd: sd.Systemd, slice_name: str, sleeper: tuple[int, int]
) -> None:
    if not systemd.features.pidfds:
        pytest.skip(
            f"systemd {systemd.features.version} has no PIDFDs for scopes "
            "(covered by the fake-bus tests and the VM tier)"
        )
    _scope, used = await place(systemd, slice_name, *sleeper)
    assert used


async def test_placement_of_a_dead_process(systemd: sd.Systemd, slice_name: str) -> None:
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    proc.wait()
    try:
        with pytest.raises(sd.ProcessGone):
            await systemd.start_scope_for_process("dead.scope", proc.pid, pidfd)
    finally:
        os.close(pidfd)
    assert await systemd.list_units_by_patterns([], ["dead.scope"]) == []


async def test_scope_for_a_missing_pid_is_refused(systemd: sd.Systemd) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(sd.SystemdError, match="does not exist"):
        await systemd.start_transient_unit("nopid.scope", [("PIDs", "au", [proc.pid])])


async def test_killed_scopes_do_not_pile_up(
    systemd: sd.Systemd, slice_name: str, sleeper: tuple[int, int]
) -> None:
    scope, _ = await place(systemd, slice_name, *sleeper)
    # Like an OOM kill: the scope's processes die by SIGKILL.
    await systemd.kill_unit(scope, "all", signal.SIGKILL)

    async def gone() -> bool:
        return await systemd.list_units_by_patterns([], [scope]) == []

    assert await eventually(gone)  # collected (CollectMode=inactive-or-failed)


async def test_without_collect_mode_failed_units_stay(systemd: sd.Systemd) -> None:
    """The contrast: a failed unit stays listed until reset-failed."""
    name = f"nsdt-{secrets.token_hex(4)}.service"
    with pytest.raises(sd.JobFailed) as err:
        await systemd.start_transient_unit(
            name, [sd.exec_start(["/bin/false"]), ("Type", "s", "oneshot")]
        )
    assert (err.value.unit, err.value.result) == (name, "failed")
    assert await systemd.list_units_by_patterns(["failed"], [name]) == [
        sd.UnitState(name, "failed", "failed")
    ]
    await systemd.reset_failed_unit(name)
    assert await systemd.list_units_by_patterns([], [name]) == []


async def test_failing_job_raises_and_is_collected(systemd: sd.Systemd) -> None:
    name = f"nsdt-{secrets.token_hex(4)}.service"
    with pytest.raises(sd.JobFailed):
        await systemd.start_transient_unit(
            name,
            [
                sd.exec_start(["/bin/false"]),
                ("Type", "s", "oneshot"),
                ("CollectMode", "s", "inactive-or-failed"),
            ],
        )
    assert await systemd.list_units_by_patterns([], [name]) == []


# -- self-service run -------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = "nsdt-" + secrets.token_hex(4)
    sh("ip", "netns", "add", name)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_transient_service_in_namespace_and_slice(
    systemd: sd.Systemd, slice_name: str, netns: str
) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    name = f"nsdt-{secrets.token_hex(4)}.service"
    await systemd.start_transient_unit(
        name,
        [
            sd.exec_start(["/bin/sleep", "300"]),
            ("Type", "s", "exec"),
            ("NetworkNamespacePath", "s", netns),
            ("User", "s", "nobody"),
            ("Slice", "s", slice_name),
            ("CollectMode", "s", "inactive-or-failed"),
        ],
    )
    pid = (await systemd.get_unit_properties(name, sd.SERVICE))["MainPID"]
    assert pid > 0
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
    assert cgroup_of(pid) == f"/tenant.slice/{slice_name}/{name}"
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nUid:\t65534\t65534\t65534\t65534\n" in status
    await systemd.stop_unit(name)
    assert await systemd.list_units_by_patterns([], [name]) == []


@pytest.mark.parametrize(
    ("script", "status", "result"),
    [("exit 0", 0, "success"), ("exit 3", 3, "exit-code"), ("kill -9 $$", 128 + 9, "signal")],
    ids=["zero", "three", "killed"],
)
async def test_run_and_wait_returns_the_exit_status(
    systemd: sd.Systemd, slice_name: str, script: str, status: int, result: str
) -> None:
    await systemd.ensure_slice(slice_name, LIMITS)
    name = f"nsdt-{secrets.token_hex(4)}.service"
    await systemd.start_transient_unit(
        name,
        [
            sd.exec_start(["/bin/sh", "-c", f"sleep 0.2; {script}"]),
            ("Type", "s", "exec"),
            ("Slice", "s", slice_name),
            ("AddRef", "b", True),  # stays loaded until unref, so the status can be read
            ("CollectMode", "s", "inactive-or-failed"),
        ],
    )
    end = await systemd.wait_unit_exit(name, timeout=10)
    # "$$" reached the shell as it is: exec_start turns off systemd's $-expansion.
    assert (end.exit_status, end.result) == (status, result)
    await systemd.unref_unit(name)

    async def gone() -> bool:
        return await systemd.list_units_by_patterns([], [name]) == []

    assert await eventually(gone)


# -- user-<uid>.slice as a tenant slice? (findings for the docs) ------------------------


@pytest.fixture
def login_user() -> Iterator[tuple[str, int]]:
    uid = 40000 + secrets.randbelow(10000)
    name = f"nsdt{uid}"
    sh("useradd", "-u", str(uid), "-m", name)
    try:
        yield name, uid
    finally:
        subprocess.run(["loginctl", "terminate-user", name], check=False, capture_output=True)
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


async def test_user_slice_outlives_logout_but_not_kill_user(
    systemd: sd.Systemd, login_user: tuple[str, int]
) -> None:
    """logind (252) on the last logout without linger stops user@UID.service, not the
    user-UID.slice: a tenant service placed there keeps running, and the slice stays
    while it does (StopWhenUnneeded=yes). ``loginctl kill-user`` however signals the
    whole slice, tenant services included."""
    user, uid = login_user
    user_slice = f"user-{uid}.slice"
    name = f"nsdt-{secrets.token_hex(4)}.service"
    await systemd.start_transient_unit(
        name,
        [
            sd.exec_start(["/bin/sleep", "300"]),
            ("User", "s", user),
            ("Slice", "s", user_slice),
            ("CollectMode", "s", "inactive-or-failed"),
        ],
    )
    sh("su", "-", user, "-c", "true")  # a login session: pam_systemd, logind, user@UID

    async def user_manager_stopped() -> bool:
        states = await systemd.list_units_by_patterns(["active"], [f"user@{uid}.service"])
        return states == []

    assert await eventually(user_manager_stopped, timeout=20)  # UserStopDelaySec=10s
    assert (await systemd.get_unit_properties(name))["ActiveState"] == "active"
    slice_unit = await systemd.get_unit_properties(user_slice)
    assert (slice_unit["ActiveState"], slice_unit["StopWhenUnneeded"]) == ("active", True)

    # kill-user needs the user logged in again: a session that lasts a while.
    session = subprocess.Popen(["su", "-", user, "-c", "sleep 60"])
    try:

        async def logged_in() -> bool:
            out = subprocess.run(["loginctl", "show-user", user], capture_output=True, check=False)
            return out.returncode == 0 and b"State=active" in out.stdout

        assert await eventually(logged_in, timeout=10)
        sh("loginctl", "kill-user", user)
    finally:
        session.kill()
        session.wait()

    async def service_gone() -> bool:
        return await systemd.list_units_by_patterns(["active"], [name]) == []

    assert await eventually(service_gone)


async def test_systemd_reexec_is_survived(systemd: sd.Systemd, slice_name: str) -> None:
    """systemd re-executes itself on upgrades: it leaves the bus and comes back."""
    await systemd.ensure_slice(slice_name, LIMITS)
    sh("systemctl", "daemon-reexec")

    async def works_again() -> bool:
        try:
            await systemd.stop_unit(slice_name)
            await systemd.ensure_slice(slice_name, LIMITS)
        except sd.SystemdUnavailable:
            return False
        return True

    assert await eventually(works_again, timeout=10)
    assert (await systemd.get_unit_properties(slice_name))["ActiveState"] == "active"
    assert (await systemd.features_now()).version >= 252
