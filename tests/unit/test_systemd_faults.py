"""Fault injection for the systemd adapter, against a fake systemd on a private bus.

python-dbusmock needs dbus-python (libdbus headers to build), so this file brings its
own equivalent: a private ``dbus-daemon`` per test and a fake ``org.freedesktop.systemd1``
exported with dbus-fast's ``ServiceInterface``. The fake can be told to answer
StartTransientUnit with an error, end jobs with a failed result, send JobRemoved before
its reply (the fast-job race), never end a job, hang for 30 s, drop off the bus in the
middle of a call, and to take (or not) the ``PIDFDs`` property. The bus daemon itself
can be killed and restarted at the same address.

Each fault must end in the right adapter exception, quickly, and leave the adapter
usable: the next call works once the fake (or the bus) is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import (
    ServiceInterface,
    dbus_method,
    dbus_property,
    dbus_signal,
)

from nsd.systemd import properties as systemd_props
from nsd.systemd import units as sd

pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None, reason="needs dbus-daemon (Debian package dbus-daemon)"
)

FAST = 0.5  # the adapter's call timeout in these tests: a fault must end within ~this


# -- a private bus --------------------------------------------------------------


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """``dbus-daemon --session`` listening on a fixed socket path, restartable."""

    def __init__(self, directory: str) -> None:
        self.socket = os.path.join(directory, "bus")
        self.address = f"unix:path={self.socket}"
        self.proc: subprocess.Popen[str] | None = None
        # Hermetic: no service directories, so nothing is ever bus-activated.
        self.config = os.path.join(directory, "bus.conf")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(BUS_CONFIG.format(address=self.address))

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # "Failed to set fd limit" as non-init root
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once it listens
        assert line.startswith("unix:"), line

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    directory = tempfile.mkdtemp(prefix="nsd-bus-")
    bus = PrivateBus(directory)
    bus.start()
    try:
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- the fake systemd -----------------------------------------------------------


@dataclass
class Behaviour:
    start_error: tuple[str, str] | None = None  # (D-Bus error name, text) from StartTransientUnit
    job_result: str = "done"
    job_signal: str = "after"  # "after" the reply, "before" it (fast-job race), "never"
    delay: float = 0.0  # seconds StartTransientUnit/StartUnit sleep before answering
    # "call": drop off the bus instead of answering StartTransientUnit/StartUnit; "job":
    # after answering; "properties": instead of applying SetUnitProperties
    vanish: str = ""
    pidfds: bool = False  # accept the PIDFDs property
    version: str = "252.39-1~fake"


@dataclass
class Record:
    transient: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    pidfd_pids: list[int] = field(default_factory=list)  # PIDs read from received pidfds
    subscribes: int = 0
    cancels: list[str] = field(default_factory=list)


class FakeManager(ServiceInterface):
    def __init__(self, fake: FakeSystemd) -> None:
        super().__init__(sd.MANAGER)
        self.fake = fake
        self.jobs = 0

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return self.fake.behaviour.version

    @dbus_method()
    def Subscribe(self):  # type: ignore[no-untyped-def]
        self.fake.record.subscribes += 1

    @dbus_signal()
    def JobRemoved(
        self, job_id: int, job: str, unit: str, result: str
    ) -> Annotated[tuple[int, str, str, str], DBusSignature("uoss")]:
        return job_id, job, unit, result

    async def _job(self, unit: str) -> str:
        b = self.fake.behaviour
        self.jobs += 1
        job_id = self.jobs
        path = f"/org/freedesktop/systemd1/job/{job_id}"
        if b.job_signal == "before":
            self.JobRemoved(job_id, path, unit, b.job_result)
        elif b.job_signal == "after":
            asyncio.get_running_loop().call_later(
                0.01, self.JobRemoved, job_id, path, unit, b.job_result
            )
        if b.vanish == "job":
            asyncio.get_running_loop().call_later(0.05, self.fake.vanish)
        return path

    async def _maybe_fault(self) -> None:
        b = self.fake.behaviour
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.vanish == "call":
            self.fake.vanish()
            await asyncio.sleep(10)  # never answers: the bus answers NoReply for us

    @dbus_method()
    async def StartTransientUnit(
        self,
        name: DBusStr,
        mode: DBusStr,
        properties: Annotated[list[Any], DBusSignature("a(sv)")],
        aux: Annotated[list[Any], DBusSignature("a(sa(sv))")],
    ) -> Annotated[str, DBusSignature("o")]:
        props = {key: value.value for key, value in properties}
        if "PIDFDs" in props:
            if not self.fake.behaviour.pidfds:
                raise DBusError(
                    "org.freedesktop.DBus.Error.PropertyReadOnly",
                    "Cannot set property PIDFDs, or unknown property.",
                )
            if not props["PIDFDs"]:
                raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", "Invalid argument")
            for index in props["PIDFDs"]:
                # dbus-fast leaves fd indices inside variants as they are: map them.
                fd = self.fake.received_fds[index]
                with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                    pid = next(int(x.split()[1]) for x in f if x.startswith("Pid:"))
                self.fake.record.pidfd_pids.append(pid)
                self.fake.units_by_pid[pid] = name
                os.close(fd)
        for pid in props.get("PIDs", []):
            self.fake.units_by_pid[pid] = name
        await self._maybe_fault()
        if self.fake.behaviour.start_error is not None:
            raise DBusError(*self.fake.behaviour.start_error)
        self.fake.record.transient.append((name, props))
        return await self._job(name)

    @dbus_method()
    async def StartUnit(self, name: DBusStr, mode: DBusStr) -> Annotated[str, DBusSignature("o")]:
        await self._maybe_fault()
        return await self._job(name)

    @dbus_method()
    async def StopUnit(self, name: DBusStr, mode: DBusStr) -> Annotated[str, DBusSignature("o")]:
        return await self._job(name)

    # No return annotation: dbus-fast reads "-> None" as a return signature of None
    @dbus_method()
    async def SetUnitProperties(  # type: ignore[no-untyped-def]
        self,
        name: DBusStr,
        runtime: Annotated[bool, DBusSignature("b")],
        properties: Annotated[list[Any], DBusSignature("a(sv)")],
    ):
        if self.fake.behaviour.vanish == "properties":
            self.fake.vanish()
            await asyncio.sleep(10)  # never answers: the bus answers NoReply for us
        self.fake.unit_props.setdefault(name, {}).update(
            {key: value.value for key, value in properties}
        )

    @dbus_method()
    def GetUnitByPID(self, pid: DBusUInt32) -> Annotated[str, DBusSignature("o")]:
        unit = self.fake.units_by_pid.get(pid)
        if unit is None:
            raise DBusError(
                "org.freedesktop.systemd1.NoUnitForPID",
                f"PID {pid} does not belong to any loaded unit.",
            )
        return sd.unit_object_path(unit)


class FakeSystemd:
    def __init__(self, address: str, behaviour: Behaviour | None = None) -> None:
        self.address = address
        self.behaviour = behaviour or Behaviour()
        self.record = Record()
        self.units_by_pid: dict[int, str] = {}
        self.unit_props: dict[str, dict[str, Any]] = {}
        self.received_fds: list[int] = []
        self.bus: FakeBus | None = None

    async def start(self) -> FakeSystemd:
        self.bus = FakeBus(bus_address=self.address, negotiate_unix_fd=True)
        await self.bus.connect()
        self.bus.add_message_handler(self._remember_fds)
        self.bus.export(sd.MANAGER_PATH, FakeManager(self))
        await self.bus.request_name(sd.SYSTEMD)
        return self

    def _remember_fds(self, msg: Message) -> None:
        if msg.member == "StartTransientUnit":
            self.received_fds = list(msg.unix_fds)

    def vanish(self) -> None:
        """Drop off the bus like a crashed systemd: calls in progress are never answered."""
        if self.bus is not None:
            self.bus.gone = True
            self.bus.disconnect()
            self.bus = None


class FakeBus(MessageBus):
    """A bus connection that, once gone, sends nothing: the fake's unfinished handlers
    would otherwise try to reply on the closed socket when they end."""

    gone = False

    # dbus-fast's aio bus returns a future from send(); its base class is typed None
    def send(self, msg: Message) -> asyncio.Future[None]:  # type: ignore[override]
        if self.gone:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return super().send(msg)


@pytest.fixture
async def fake(private_bus: PrivateBus) -> AsyncIterator[FakeSystemd]:
    f = await FakeSystemd(private_bus.address).start()
    yield f
    f.vanish()


@pytest.fixture
async def adapter(private_bus: PrivateBus, fake: FakeSystemd) -> AsyncIterator[sd.Systemd]:
    s = await sd.Systemd.connect(private_bus.address, timeout=FAST)
    yield s
    await s.close()


SCOPE_PROPS: list[sd.Property] = [("Slice", "s", "tenant-1001.slice")]


async def start_ok(s: sd.Systemd, name: str = "ok.scope") -> None:
    assert await s.start_transient_unit(name, SCOPE_PROPS, timeout=FAST * 4) == "done"


@contextlib.contextmanager
def quick(limit: float = FAST * 4) -> Iterator[None]:
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.2f} s"


async def eventually_ok(s: sd.Systemd, within: float = 10.0) -> None:
    """Retry a call until it works (reconnects wait out the adapter's backoff)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await start_ok(s)
            return
        except sd.SystemdUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- the tests ------------------------------------------------------------------


async def test_connect_detects_features(adapter: sd.Systemd, fake: FakeSystemd) -> None:
    assert adapter.features == sd.Features(version=252, pidfds=False)
    await start_ok(adapter)
    assert fake.record.subscribes >= 1
    assert fake.record.transient == [("ok.scope", {"Slice": "tenant-1001.slice"})]


async def test_start_transient_unit_error_is_kept_verbatim(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    fake.behaviour.start_error = ("org.freedesktop.systemd1.UnitExists", "Unit x.scope exists.")
    with quick(), pytest.raises(sd.SystemdError) as err:
        await adapter.start_transient_unit("x.scope", SCOPE_PROPS)
    assert type(err.value) is sd.SystemdError
    assert err.value.dbus_name == "org.freedesktop.systemd1.UnitExists"
    assert err.value.message == "Unit x.scope exists."
    fake.behaviour.start_error = None
    await start_ok(adapter)


@pytest.mark.parametrize("when", ["after", "before"])
async def test_failed_job_raises_job_failed(
    adapter: sd.Systemd, fake: FakeSystemd, when: str
) -> None:
    fake.behaviour.job_result = "failed"
    fake.behaviour.job_signal = when
    with quick(), pytest.raises(sd.JobFailed) as err:
        await adapter.start_transient_unit("bad.scope", SCOPE_PROPS)
    assert (err.value.unit, err.value.result) == ("bad.scope", "failed")
    fake.behaviour.job_result = "done"
    await start_ok(adapter)


async def test_job_removed_before_the_reply_is_not_missed(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    fake.behaviour.job_signal = "before"
    for i in range(20):
        with quick():
            await start_ok(adapter, f"fast-{i}.scope")
    assert not adapter.jobs.early  # nothing kept once no job call is in flight
    assert not adapter.jobs.waiters


async def test_a_30s_delay_times_out_and_the_adapter_keeps_serving(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    fake.behaviour.delay = 30.0
    with quick(), pytest.raises(sd.SystemdTimeout):
        await adapter.start_transient_unit("slow.scope", SCOPE_PROPS)
    # Other calls are answered meanwhile (the fake is still "busy" with the slow one).
    assert await adapter.unit_for_pid(4242) is None
    fake.behaviour.delay = 0.0
    await start_ok(adapter)


async def test_a_job_that_never_ends_times_out(adapter: sd.Systemd, fake: FakeSystemd) -> None:
    fake.behaviour.job_signal = "never"
    with quick(), pytest.raises(sd.SystemdTimeout) as err:
        await adapter.start_transient_unit("stuck.scope", SCOPE_PROPS, timeout=FAST)
    assert "did not finish" in err.value.message
    assert not adapter.jobs.waiters
    fake.behaviour.job_signal = "after"
    await start_ok(adapter)


async def test_systemd_dropping_off_the_bus_mid_call(
    adapter: sd.Systemd, fake: FakeSystemd, private_bus: PrivateBus
) -> None:
    fake.behaviour.vanish = "call"
    with quick(), pytest.raises(sd.SystemdUnavailable) as err:
        await adapter.start_transient_unit("gone.scope", SCOPE_PROPS)
    assert err.value.dbus_name == "org.freedesktop.DBus.Error.NoReply"
    # While it is away, calls fail at once with a named error.
    with quick(), pytest.raises(sd.SystemdUnavailable) as err:
        await adapter.start_transient_unit("gone.scope", SCOPE_PROPS)
    assert err.value.dbus_name == "org.freedesktop.DBus.Error.NameHasNoOwner"
    # systemd comes back (a new connection, a new unique name): the adapter just works.
    back = await FakeSystemd(private_bus.address).start()
    try:
        await eventually_ok(adapter)
        assert back.record.subscribes == 1  # subscribed again to the new systemd
    finally:
        back.vanish()


async def test_systemd_dropping_off_while_a_job_is_pending(
    adapter: sd.Systemd, fake: FakeSystemd, private_bus: PrivateBus
) -> None:
    fake.behaviour.vanish = "job"
    fake.behaviour.job_signal = "never"
    with quick(), pytest.raises(sd.SystemdUnavailable, match="left the bus"):
        await adapter.start_transient_unit("orphan.scope", SCOPE_PROPS, timeout=30)
    back = await FakeSystemd(private_bus.address).start()
    try:
        await eventually_ok(adapter)
    finally:
        back.vanish()


async def test_bus_restart_fails_pending_calls_and_reconnects(
    adapter: sd.Systemd, fake: FakeSystemd, private_bus: PrivateBus
) -> None:
    fake.behaviour.job_signal = "never"
    pending = asyncio.create_task(adapter.start_transient_unit("x.scope", SCOPE_PROPS, timeout=30))
    await asyncio.sleep(0.2)
    with quick():
        private_bus.stop()
        with pytest.raises(sd.SystemdUnavailable):
            await pending
    # No bus: named error, fast, repeatedly (backoff: no hammering, no hang).
    for _ in range(3):
        with quick(), pytest.raises(sd.SystemdUnavailable, match="no D-Bus system bus"):
            await start_ok(adapter)
    private_bus.start()
    back = await FakeSystemd(private_bus.address).start()
    try:
        await eventually_ok(adapter)
        assert adapter.connected
    finally:
        back.vanish()


async def test_no_bus_at_all_is_a_named_error(tmp_path: Any) -> None:
    s = sd.Systemd(f"unix:path={tmp_path}/nothing", call_timeout=FAST)
    with quick(), pytest.raises(sd.SystemdUnavailable, match="no D-Bus system bus"):
        await s.ensure_connected()
    with quick(), pytest.raises(sd.SystemdUnavailable, match="next reconnect attempt"):
        await s.unit_for_pid(1)
    await s.close()


async def test_bus_without_systemd_is_a_named_error(private_bus: PrivateBus) -> None:
    with quick(), pytest.raises(sd.SystemdUnavailable, match="not on the bus"):
        await sd.Systemd.connect(private_bus.address, timeout=FAST)


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd runs here")
async def test_this_machine_without_systemd_is_a_named_error() -> None:
    with quick(), pytest.raises(sd.SystemdUnavailable) as err:
        await sd.Systemd.connect(timeout=FAST)
    assert "systemd" in err.value.message


# -- placement ------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield proc.pid, pidfd
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)


async def test_placement_with_pidfds_passes_the_fd(
    private_bus: PrivateBus, sleeper: tuple[int, int]
) -> None:
    fake = await FakeSystemd(private_bus.address, Behaviour(pidfds=True)).start()
    s = await sd.Systemd.connect(private_bus.address, timeout=FAST)
    try:
        assert s.features.pidfds
        pid, pidfd = sleeper
        assert await s.start_scope_for_process("p.scope", pid, pidfd, SCOPE_PROPS)
        assert fake.record.pidfd_pids == [pid]  # the fd arrived and names the process
        assert "PIDs" not in fake.record.transient[-1][1]
    finally:
        await s.close()
        fake.vanish()


async def test_placement_falls_back_to_pids(
    adapter: sd.Systemd, fake: FakeSystemd, sleeper: tuple[int, int]
) -> None:
    pid, pidfd = sleeper
    assert not await adapter.start_scope_for_process("p.scope", pid, pidfd, SCOPE_PROPS)
    assert fake.record.transient[-1][1]["PIDs"] == [pid]


async def test_forced_pidfds_fall_back_when_systemd_refuses(
    private_bus: PrivateBus, fake: FakeSystemd, sleeper: tuple[int, int]
) -> None:
    s = await sd.Systemd.connect(private_bus.address, timeout=FAST, use_pidfds=True)
    try:
        pid, pidfd = sleeper
        assert not await s.start_scope_for_process("p.scope", pid, pidfd, SCOPE_PROPS)
        assert fake.record.transient[-1][1]["PIDs"] == [pid]
        assert not s.features.pidfds  # remembered
    finally:
        await s.close()


async def test_placement_of_a_dead_process_is_refused(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    proc.wait()
    try:
        with pytest.raises(sd.ProcessGone):
            await adapter.start_scope_for_process("p.scope", proc.pid, pidfd, SCOPE_PROPS)
    finally:
        os.close(pidfd)
    assert fake.record.transient == []  # systemd was never asked


async def test_placement_not_verified_is_an_error(
    adapter: sd.Systemd, fake: FakeSystemd, sleeper: tuple[int, int]
) -> None:
    pid, pidfd = sleeper
    fake.units_by_pid[pid] = "elsewhere.scope"
    real_start = adapter.start_transient_unit

    async def start_without_moving(name: str, *args: Any, **kwargs: Any) -> str:
        result = await real_start(name, *args, **kwargs)
        fake.units_by_pid[pid] = "elsewhere.scope"  # systemd "moved" someone else
        return result

    adapter.start_transient_unit = start_without_moving  # type: ignore[method-assign]
    with pytest.raises(sd.SystemdError, match=r"not in p\.scope"):
        await adapter.start_scope_for_process("p.scope", pid, pidfd, SCOPE_PROPS)


# -- pure helpers -----------------------------------------------------------------


def test_limit_properties() -> None:
    props = sd.limit_properties(
        memory_min=1,
        memory_low=2,
        memory_high=3,
        memory_max=sd.INFINITY,
        memory_swap_max=0,
        cpu_weight=100,
        cpu_quota_percent=150,
        tasks_max=512,
        io_weight=50,
    )
    assert dict((n, (s, v)) for n, s, v in props) == {
        "MemoryMin": ("t", 1),
        "MemoryLow": ("t", 2),
        "MemoryHigh": ("t", 3),
        "MemoryMax": ("t", 2**64 - 1),
        "MemorySwapMax": ("t", 0),
        "CPUWeight": ("t", 100),
        "CPUQuotaPerSecUSec": ("t", 1_500_000),
        "TasksMax": ("t", 512),
        "IOWeight": ("t", 50),
    }
    assert sd.limit_properties() == []
    assert sd.limit_properties(cpu_quota_percent=float("inf")) == [
        ("CPUQuotaPerSecUSec", "t", 2**64 - 1)
    ]
    for bad in (
        {"cpu_weight": 0},
        {"io_weight": 10001},
        {"cpu_quota_percent": 0},
        {"memory_max": -1},
    ):
        with pytest.raises(ValueError):
            sd.limit_properties(**bad)


@pytest.mark.parametrize(
    "name", ["tenant-1001.slice", "a_b.scope", "-.slice", "x@y\\z.service", "ü.slice", ""]
)
def test_unit_object_path_round_trip(name: str) -> None:
    path = sd.unit_object_path(name)
    assert path.startswith("/org/freedesktop/systemd1/unit/")
    assert all(c.isalnum() or c in "/_" for c in path)
    assert sd.unit_name_from_path(path) == name


def test_unit_object_path_matches_systemd() -> None:
    assert sd.unit_object_path("tenant-1001.slice") == (
        "/org/freedesktop/systemd1/unit/tenant_2d1001_2eslice"
    )


def test_exec_start_passes_argv_verbatim() -> None:
    assert sd.exec_start(["/bin/sh", "-c", "echo $$"]) == (
        "ExecStartEx",
        "a(sasas)",
        [["/bin/sh", ["/bin/sh", "-c", "echo $$"], ["no-env-expand"]]],
    )
    assert sd.exec_start(["/bin/true"], expand_environment=True, ignore_failure=True)[2] == [
        ["/bin/true", ["/bin/true"], ["ignore-failure"]]
    ]
    with pytest.raises(ValueError):
        sd.exec_start(["true"])


def test_marshal_fds() -> None:
    fds: list[int] = []
    out = systemd_props.marshal_properties(
        [
            ("PIDFDs", "ah", [sd.Fd(7), sd.Fd(9)]),
            ("StandardInputFileDescriptor", "h", sd.Fd(3)),
            ("PIDs", "au", [1]),
        ],
        fds,
    )
    assert fds == [7, 9, 3]
    assert out[0][1] == Variant("ah", [0, 1])
    assert out[1][1] == Variant("h", 2)
    with pytest.raises(ValueError, match="PIDFDs"):
        systemd_props.marshal_properties([("PIDFDs", "ah", [7])], [])


async def test_a_malformed_call_is_an_error_not_a_lost_bus(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    with pytest.raises(ValueError, match="MemoryMax"):
        await adapter.set_unit_properties("x.slice", [("MemoryMax", "t", "not a number")], False)
    assert adapter.connected
    await start_ok(adapter)


async def test_job_removed_from_anyone_but_systemd_is_ignored(
    adapter: sd.Systemd, fake: FakeSystemd, private_bus: PrivateBus
) -> None:
    """Any client may send a unicast signal; a forged JobRemoved must not end a job."""
    fake.behaviour.job_signal = "never"
    assert adapter._bus is not None
    target = adapter._bus.unique_name
    rogue = await MessageBus(bus_address=private_bus.address).connect()
    try:
        pending = asyncio.create_task(
            adapter.start_transient_unit("x.scope", SCOPE_PROPS, timeout=FAST)
        )
        await asyncio.sleep(FAST / 4)  # the job is queued and waited for
        assert list(adapter.jobs.waiters) == ["/org/freedesktop/systemd1/job/1"]
        for i in range(1, 4):
            await rogue.send(
                Message(
                    message_type=MessageType.SIGNAL,
                    destination=target,
                    path=sd.MANAGER_PATH,
                    interface=sd.MANAGER,
                    member="JobRemoved",
                    signature="uoss",
                    body=[i, f"/org/freedesktop/systemd1/job/{i}", "x.scope", "done"],
                )
            )
        with pytest.raises(sd.SystemdTimeout):
            await pending
    finally:
        rogue.disconnect()


# -- the same faults, as nsd's API reports them -------------------------------------


def _slices(adapter: sd.Systemd) -> Any:
    from nsd import config
    from nsd.systemd.slices import TenantSlices

    cfg = config.from_mapping({"systemd": {"call_timeout": FAST}})
    return TenantSlices(cfg, adapter, "")


def _record() -> Any:
    from ipaddress import IPv4Address, IPv6Network

    from nsd.model import TenantRecord, TenantState

    v4, v6 = IPv4Address("100.64.0.2"), IPv6Network("fd00:1:2:1::/64")
    return TenantRecord(1001, "alice", TenantState.READY, "alice", "nsd1001", v4, v6, False, 0)


def _as_varlink(e: Exception) -> tuple[str, dict[str, Any]]:
    from nsd.api.handlers import varlink_error
    from nsd.errors import NsdError

    assert isinstance(e, NsdError)
    err = varlink_error("io.nsd.Tenant", e)
    return err.name, err.parameters


# "reexec-job": systemd re-executes after accepting the scope, before its job ends.
@pytest.mark.parametrize("fault", ["error", "job-failed", "delay", "vanish", "reexec-job"])
async def test_faults_become_named_api_errors_and_nothing_is_left(
    adapter: sd.Systemd, fake: FakeSystemd, sleeper: tuple[int, int], fault: str
) -> None:
    from nsd.errors import NsdError

    if fault == "error":
        fake.behaviour.start_error = ("org.freedesktop.systemd1.UnitExists", "Unit exists.")
    elif fault == "job-failed":
        fake.behaviour.job_result = "failed"
    elif fault == "delay":
        fake.behaviour.delay = 30.0
    elif fault == "vanish":
        fake.behaviour.vanish = "call"
    else:
        fake.behaviour.vanish, fake.behaviour.job_signal = "job", "never"
    pid, _ = sleeper
    slices = _slices(adapter)
    with quick(), pytest.raises(NsdError) as info:
        await slices.place(_record(), pid, lambda: os.pidfd_open(pid))
    name, params = _as_varlink(info.value)
    if fault in ("vanish", "reexec-job"):
        assert name == "io.nsd.Tenant.SystemdUnavailable" and params["reason"]
    else:
        assert name == "io.nsd.Tenant.SystemdRequestFailed"
        assert params["unit"].startswith("nsd-enter-1001-") and params["message"]
    if fault == "error":
        assert params["dbusError"] == "org.freedesktop.systemd1.UnitExists"
    if fault == "job-failed":
        assert "result 'failed'" in params["message"]
    # The daemon keeps serving: once systemd behaves again, placement works.
    fake.behaviour = Behaviour()
    gone = fault in ("vanish", "reexec-job")
    back = await FakeSystemd(fake.address).start() if gone else None
    try:
        await eventually_ok(adapter)
    finally:
        if back is not None:
            back.vanish()


async def test_run_names_the_user_by_uid_never_by_name(
    adapter: sd.Systemd, fake: FakeSystemd
) -> None:
    """A name could resolve to another account by the time systemd looks it up (a
    rename, a reused name): nsd hands systemd the UID whose identity it checked."""
    unit = await _slices(adapter).start_run(
        _record(), "/run/netns/alice", "/", ["/bin/true"], False
    )
    assert unit.startswith("nsd-run-1001-")
    ((_, props),) = fake.record.transient
    assert props["User"] == "1001"


@pytest.mark.parametrize("during", ["properties", "call"], ids=["set-properties", "start"])
async def test_reexec_during_a_slice_change_then_converges(
    adapter: sd.Systemd, fake: FakeSystemd, private_bus: PrivateBus, during: str
) -> None:
    """systemd re-executes (drops off the bus, comes back with a new connection)
    while nsd sets a slice's limits (SetUnitProperties, then StartUnit): a named
    error, fast; the next ensure (reconcile's) converges and a second changes nothing."""
    from nsd import limits as limits_mod
    from nsd.errors import NsdError

    slices = _slices(adapter)
    limits = limits_mod.Limits(memory_max="1073741824", tasks_max="500")
    unit = slices.slice_of(1001)
    fake.behaviour.vanish = during
    with quick(), pytest.raises(NsdError) as info:
        await slices.ensure(1001, limits)
    assert _as_varlink(info.value)[0] == "io.nsd.Tenant.SystemdUnavailable"
    # Whatever it had applied lives on in the re-executed systemd (persistent drop-ins):
    # nothing, or the new limits on a slice whose start was cut off.
    if during == "properties":
        assert unit not in fake.unit_props
    else:
        assert fake.unit_props[unit]["MemoryMax"] == 1073741824
    back = await FakeSystemd(fake.address).start()
    back.unit_props = fake.unit_props
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await slices.ensure(1001, limits)
                break
            except NsdError:  # the adapter waits out its reconnect backoff
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        applied = dict(back.unit_props[unit])
        assert applied["MemoryMax"] == 1073741824 and applied["TasksMax"] == 500
        await slices.ensure(1001, limits)
        assert back.unit_props[unit] == applied  # the second one is a no-op
    finally:
        back.vanish()
