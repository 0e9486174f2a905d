"""The systemd adapter: units, properties and jobs over org.freedesktop.systemd1 (D-Bus).

A thin, typed layer over systemd's Manager API with dbus-fast. It knows units, properties
and jobs; it knows nothing about tenants. Everything nsd asks systemd goes through here,
so the core never imports a D-Bus library.

Connection
----------
One connection to the system bus (or to ``address``, for tests), made lazily by the first
call and again after it is lost: a bus restart, systemd leaving the bus or a broken socket
fails the calls and job waits in flight with :class:`SystemdUnavailable`, and the *next*
call reconnects. A failed connection attempt starts a backoff (0.1 s doubling to 5 s);
calls during the backoff fail at once instead of hammering a dead bus, so nothing ever
hangs and nothing crashes. Every call has a timeout (:class:`SystemdTimeout`).

Jobs
----
``StartUnit``, ``StopUnit``, ``StartTransientUnit`` only *queue* a job; the unit is there
when systemd's ``JobRemoved`` signal names the job. The match rule for it is added when
the connection is made, and ``Subscribe`` is (re)sent before each job is queued, so the
signal is routed to us before the job exists. A fast job's ``JobRemoved`` can arrive in
the same read as the method reply, before the awaiting coroutine runs: while any job
call is in flight, every ``JobRemoved`` is kept, and looked up by job path as soon as
the reply names the job. A job whose result is not ``done`` raises :class:`JobFailed`.
A job that does not end within its timeout is cancelled (best effort) and raises
:class:`SystemdTimeout`.

Persistence
-----------
``SetUnitProperties(runtime=False)`` writes ``/etc/systemd/system.control/<unit>.d/50-*.conf``
drop-ins, which systemd reads whenever it loads the unit, also at boot, without a
``daemon-reload``. A slice needs no unit file (fragment), so a slice that only has such
drop-ins is a complete, persistent unit: :meth:`Systemd.ensure_slice` creates or adopts
one that way. A slice made with ``StartTransientUnit`` is different: its drop-ins go to
``/run/systemd/transient`` and vanish at reboot, and a second ``StartTransientUnit``
fails with ``UnitExists`` - which is why slices are never created transiently here.

PID-reuse-safe placement
------------------------
:meth:`Systemd.start_scope_for_process` puts a process, pinned by a pidfd, into a new
scope: with the ``PIDFDs`` property where systemd has it (detected, see
:meth:`Systemd._detect_pidfds`), otherwise with ``PIDs``, checking before and after that
the pidfd's process is alive, still has that PID, and ended up in the scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import select
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

log = logging.getLogger("nsd.systemd")

SYSTEMD: Final = "org.freedesktop.systemd1"
MANAGER_PATH: Final = "/org/freedesktop/systemd1"
MANAGER: Final = "org.freedesktop.systemd1.Manager"
UNIT: Final = "org.freedesktop.systemd1.Unit"
SLICE: Final = "org.freedesktop.systemd1.Slice"
SCOPE: Final = "org.freedesktop.systemd1.Scope"
SERVICE: Final = "org.freedesktop.systemd1.Service"
JOB: Final = "org.freedesktop.systemd1.Job"
PROPERTIES: Final = "org.freedesktop.DBus.Properties"
DBUS: Final = "org.freedesktop.DBus"
DBUS_PATH: Final = "/org/freedesktop/DBus"

#: systemd's "infinity" / "unset" for 64-bit properties (MemoryMax, TasksMax, CPUWeight...).
UINT64_MAX: Final = 2**64 - 1
INFINITY: Final = UINT64_MAX

DEFAULT_SYSTEM_BUS: Final = "unix:path=/run/dbus/system_bus_socket"

# D-Bus errors that mean "systemd is not there (any more)", not "systemd said no".
_UNAVAILABLE_ERRORS: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.NoServer",
    }
)
# What systemd answers for a transient property it does not know (it says both).
_UNKNOWN_PROPERTY_ERRORS: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.PropertyReadOnly",
        "org.freedesktop.DBus.Error.UnknownProperty",
    }
)
_NO_UNIT_FOR_PID: Final = "org.freedesktop.systemd1.NoUnitForPID"
_ALREADY_SUBSCRIBED: Final = "org.freedesktop.systemd1.AlreadySubscribed"
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 5.0

Property = tuple[str, str, Any]
"""One unit property as systemd's D-Bus API takes it: (name, D-Bus signature, value)."""


# -- errors -------------------------------------------------------------------


class SystemdError(Exception):
    """Base of the adapter's errors; as such, a D-Bus error from systemd, kept verbatim.

    ``dbus_name`` is the D-Bus error name (``org.freedesktop.systemd1.NoSuchUnit``...),
    or ``""`` when the adapter itself detected the condition; ``message`` is the text.
    """

    def __init__(self, dbus_name: str, message: str) -> None:
        super().__init__(f"{message} [{dbus_name}]" if dbus_name else message)
        self.dbus_name = dbus_name
        self.message = message


class SystemdUnavailable(SystemdError):
    """No system bus, systemd not on it, or the connection was lost; the message says why."""


class SystemdTimeout(SystemdError):
    """No answer, or no end of a job, within the timeout."""


class JobFailed(SystemdError):
    """A job ended with a result other than ``done`` (failed, dependency, timeout...)."""

    def __init__(self, unit: str, result: str, job: str = "") -> None:
        super().__init__("", f"job for {unit} finished with result {result!r}")
        self.unit = unit
        self.result = result
        self.job = job


class ProcessGone(SystemdError):
    """The process to place exited (or its pidfd no longer has that PID)."""

    def __init__(self, pid: int, when: str) -> None:
        super().__init__("", f"process {pid} is gone ({when})")
        self.pid = pid


# -- values -------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What the connected systemd can do, detected once per connection.

    ``pidfds``: StartTransientUnit accepts a ``PIDFDs`` ("ah") property for scopes.
    """

    version: int
    pidfds: bool


@dataclass(frozen=True)
class Fd:
    """A file descriptor in a property value: ``("PIDFDs", "ah", [Fd(pidfd)])``.

    It is sent with the message (SCM_RIGHTS); the caller keeps its own descriptor open
    until the call returns and closes it afterwards.
    """

    fd: int


class UnitState(NamedTuple):
    name: str
    active_state: str
    sub_state: str


@dataclass(frozen=True)
class UnitExit:
    """How a (service) unit ended: see :meth:`Systemd.wait_unit_exit`."""

    active_state: str  #: "inactive" or "failed"
    result: str  #: "success", "exit-code", "signal", "timeout", "oom-kill"...
    exec_main_code: int  #: CLD_EXITED (1), CLD_KILLED (2), CLD_DUMPED (3); 0 if it never ran
    exec_main_status: int  #: exit status, or the signal number when killed

    @property
    def exit_status(self) -> int:
        """A shell-style status: the exit code, or 128 + signal when it was killed."""
        if self.exec_main_code in (2, 3):
            return 128 + self.exec_main_status
        return self.exec_main_status


# -- property helpers -----------------------------------------------------------


def _weight(name: str, value: int) -> Property:
    if value != UINT64_MAX and not 1 <= value <= 10000:
        raise ValueError(f"{name} must be 1..10000 (or UINT64_MAX for the default), not {value}")
    return (name, "t", value)


def _bytes(name: str, value: int) -> Property:
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{name} must be 0..2^64-1 bytes (UINT64_MAX = infinity), not {value}")
    return (name, "t", value)


def limit_properties(
    *,
    memory_min: int | None = None,
    memory_low: int | None = None,
    memory_high: int | None = None,
    memory_max: int | None = None,
    memory_swap_max: int | None = None,
    cpu_weight: int | None = None,
    cpu_quota_percent: float | None = None,
    tasks_max: int | None = None,
    io_weight: int | None = None,
) -> list[Property]:
    """Resource-control properties in systemd's D-Bus names and signatures.

    ``None`` leaves a setting out (unchanged). Memory values and ``tasks_max`` are
    absolute numbers; :data:`INFINITY` (UINT64_MAX) means no limit. Weights are
    1..10000, or UINT64_MAX to return to systemd's default. ``cpu_quota_percent`` is the
    share of one CPU (200 = two CPUs), sent as ``CPUQuotaPerSecUSec``;
    ``float('inf')`` removes the quota.
    """
    props: list[Property] = []
    for name, value in (
        ("MemoryMin", memory_min),
        ("MemoryLow", memory_low),
        ("MemoryHigh", memory_high),
        ("MemoryMax", memory_max),
        ("MemorySwapMax", memory_swap_max),
        ("TasksMax", tasks_max),
    ):
        if value is not None:
            props.append(_bytes(name, value))
    if cpu_weight is not None:
        props.append(_weight("CPUWeight", cpu_weight))
    if io_weight is not None:
        props.append(_weight("IOWeight", io_weight))
    if cpu_quota_percent is not None:
        if cpu_quota_percent == float("inf"):
            props.append(("CPUQuotaPerSecUSec", "t", UINT64_MAX))
        elif cpu_quota_percent > 0:
            # 1 % of a CPU is 10 ms of CPU time per second; systemd rounds to 1 ms itself.
            props.append(("CPUQuotaPerSecUSec", "t", round(cpu_quota_percent * 10_000)))
        else:
            raise ValueError(f"CPU quota must be > 0 percent, not {cpu_quota_percent}")
    return props


def exec_start(
    argv: Sequence[str], *, expand_environment: bool = False, ignore_failure: bool = False
) -> Property:
    """The command of a transient service, run with exactly this ``argv``.

    systemd expands ``$VAR``/``${VAR}`` in a unit's command line and turns ``$$`` into
    ``$`` - also for ``ExecStart`` set over D-Bus - so a tenant's ``sh -c 'echo $$'``
    would arrive mangled. ``ExecStartEx`` with the ``no-env-expand`` flag (systemd 247+,
    the ``:`` prefix of unit files) passes argv through untouched. argv[0] must be an
    absolute path.
    """
    if not argv or not argv[0].startswith("/"):
        raise ValueError("the command needs an absolute path as argv[0]")
    flags = [] if expand_environment else ["no-env-expand"]
    if ignore_failure:
        flags.append("ignore-failure")
    return ("ExecStartEx", "a(sasas)", [[argv[0], list(argv), flags]])


def unit_object_path(name: str) -> str:
    """The D-Bus object path systemd gives a unit (sd-bus label escaping)."""
    if not name:
        return MANAGER_PATH + "/unit/_"
    escaped = "".join(
        ch if (ch.isascii() and ch.isalnum()) else "".join(f"_{b:02x}" for b in ch.encode())
        for ch in name
    )
    return f"{MANAGER_PATH}/unit/{escaped}"


def unit_name_from_path(path: str) -> str:
    """Inverse of :func:`unit_object_path`."""
    label = path.rsplit("/", 1)[-1]
    if label == "_":
        return ""
    return re.sub(rb"_([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), label.encode()).decode()


def _marshal_value(signature: str, value: Any, fds: list[int]) -> Any:
    if signature == "h":
        if not isinstance(value, Fd):
            raise TypeError("a 'h' property value must be an Fd")
        fds.append(value.fd)
        return len(fds) - 1
    if signature == "ah":
        out = []
        for item in value:
            if not isinstance(item, Fd):
                raise TypeError("an 'ah' property value must be a list of Fd")
            fds.append(item.fd)
            out.append(len(fds) - 1)
        return out
    return value


def _marshal_properties(properties: Iterable[Property], fds: list[int]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, sig, value in properties:
        try:
            out.append([name, Variant(sig, _marshal_value(sig, value, fds))])
        except Exception as e:  # dbus-fast checks the value against the signature
            raise ValueError(f"property {name} ({sig!r}): {e}") from e
    return out


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # readable once the process has exited
    return bool(poller.poll(0))


def _pidfd_pid(pidfd: int) -> int | None:
    """The PID a pidfd refers to now (``Pid:`` in fdinfo; -1 once the process was reaped)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def check_pidfd(pid: int, pidfd: int, when: str) -> None:
    """Raise :class:`ProcessGone` unless ``pidfd`` is a live process whose PID is ``pid``."""
    if _pidfd_pid(pidfd) != pid or _pidfd_exited(pidfd):
        raise ProcessGone(pid, when)
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        raise ProcessGone(pid, when) from None


# -- the adapter --------------------------------------------------------------


class Systemd:
    """A connection to systemd's Manager. Construct it, then call methods; it connects
    (and reconnects) by itself. :meth:`connect` constructs and connects at once.

    ``address``: a D-Bus address (tests); default: the system bus.
    ``call_timeout``: seconds for one method call (and for connecting).
    ``use_pidfds``: None detects ``PIDFDs`` support; False never uses it (forces the
    ``PIDs`` fallback); True uses it without probing.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        call_timeout: float = 5.0,
        use_pidfds: bool | None = None,
    ) -> None:
        self._address = address
        self._call_timeout = call_timeout
        self._use_pidfds = use_pidfds
        self._bus: MessageBus | None = None
        self._features: Features | None = None
        self._connect_lock = asyncio.Lock()
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_error = ""
        self._watch: asyncio.Task[None] | None = None
        self._need_subscribe = True
        self._features_stale = False
        self._closed = False
        # systemd's unique bus name: signals from anyone else are ignored (any client may
        # send us a unicast "JobRemoved"; the bus daemon fills in the true sender).
        self._owner = ""
        # job path -> future of (unit, result)
        self._job_waiters: dict[str, asyncio.Future[tuple[str, str]]] = {}
        # JobRemoved seen while a job call was in flight: job path -> (unit, result)
        self._early_jobs: dict[str, tuple[str, str]] = {}
        self._job_calls = 0
        # unit object path -> events set on PropertiesChanged
        self._unit_events: dict[str, set[asyncio.Event]] = {}

    @classmethod
    async def connect(
        cls, address: str | None = None, timeout: float = 5.0, *, use_pidfds: bool | None = None
    ) -> Systemd:
        """Connect now; raises :class:`SystemdUnavailable` when systemd can't be reached."""
        self = cls(address, call_timeout=timeout, use_pidfds=use_pidfds)
        await self.ensure_connected()
        return self

    @property
    def features(self) -> Features:
        """Features of the systemd last connected to (raises if never connected)."""
        if self._features is None:
            raise SystemdUnavailable("", "not connected to systemd yet")
        return self._features

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def ensure_connected(self) -> Features:
        await self._get_bus()
        return self.features

    async def close(self) -> None:
        self._closed = True
        bus, self._bus = self._bus, None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if bus is not None:
            bus.disconnect()
        self._fail_waiters(SystemdUnavailable("", "the systemd adapter was closed"))

    # -- connection -----------------------------------------------------------

    async def _get_bus(self) -> MessageBus:
        bus = self._bus
        if bus is not None and bus.connected:
            return bus
        if self._closed:
            raise SystemdUnavailable("", "the systemd adapter was closed")
        async with self._connect_lock:
            bus = self._bus
            if bus is not None and bus.connected:
                return bus
            loop = asyncio.get_running_loop()
            wait = self._next_attempt - loop.time()
            if wait > 0:
                raise SystemdUnavailable(
                    "", f"{self._last_error} (next reconnect attempt in {wait:.1f} s)"
                )
            try:
                bus = await self._open()
            except SystemdError as e:
                self._backoff = min(max(self._backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
                self._next_attempt = loop.time() + self._backoff
                self._last_error = e.message
                raise
            self._backoff = 0.0
            self._next_attempt = 0.0
            self._bus = bus
            self._watch = asyncio.create_task(self._watch_disconnect(bus))
            return bus

    def _where(self) -> str:
        address = self._address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
        return address

    async def _open(self) -> MessageBus:
        where = self._where()
        bus = MessageBus(bus_address=self._address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        try:
            async with asyncio.timeout(self._call_timeout):
                await bus.connect()
        except TimeoutError:
            raise SystemdUnavailable("", f"connecting to the bus at {where} timed out") from None
        except Exception as e:  # OSError, AuthError, InvalidAddressError...
            hint = ""
            if self._address is None and not os.path.isdir("/run/systemd/system"):
                hint = " (systemd is not running as PID 1 on this machine)"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or repr(e)
            raise SystemdUnavailable("", f"no D-Bus system bus at {where}: {reason}{hint}") from e
        try:
            bus.add_message_handler(self._on_message)
            for rule in (
                f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',"
                f"interface='{MANAGER}',member='JobRemoved'",
                f"type='signal',sender='{DBUS}',interface='{DBUS}',"
                f"member='NameOwnerChanged',arg0='{SYSTEMD}'",
            ):
                await self._bus_call(bus, "AddMatch", [rule])
            try:
                (self._owner,) = await self._bus_call(bus, "GetNameOwner", [SYSTEMD])
            except SystemdError as e:
                raise SystemdUnavailable(
                    e.dbus_name, f"{SYSTEMD} is not on the bus at {where} (is systemd PID 1?)"
                ) from e
            self._need_subscribe = True
            self._features = await self._detect(bus)
            self._features_stale = False
        except BaseException:
            bus.disconnect()
            raise
        log.info(
            "connected to systemd %d at %s (PIDFDs: %s)",
            self._features.version,
            where,
            "yes" if self._features.pidfds else "no",
        )
        return bus

    async def _watch_disconnect(self, bus: MessageBus) -> None:
        reason = "the bus connection was closed"
        try:
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = f"lost the bus connection: {e or type(e).__name__}"
        if self._bus is bus:
            self._bus = None
        log.warning("systemd adapter: %s", reason)
        self._fail_waiters(SystemdUnavailable("", reason))

    def _fail_waiters(self, exc: SystemdError) -> None:
        waiters, self._job_waiters = self._job_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        for events in self._unit_events.values():
            for event in events:
                event.set()

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.sender == DBUS and msg.member == "NameOwnerChanged" and msg.interface == DBUS:
            self._owner_changed(*msg.body)
            return
        if not self._owner or msg.sender != self._owner:
            return
        if msg.member == "JobRemoved" and msg.interface == MANAGER and msg.signature == "uoss":
            _id, job, unit, result = msg.body
            fut = self._job_waiters.pop(job, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result((unit, result))
            elif self._job_calls > 0:
                self._early_jobs[job] = (unit, result)
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            for event in self._unit_events.get(msg.path or "", ()):
                event.set()

    def _owner_changed(self, name: str, _old: str, new: str) -> None:
        if name != SYSTEMD:
            return
        # A new systemd (restarted, re-executed, a fake in tests): subscribe again and
        # detect its features again before the next placement.
        self._owner = new
        self._need_subscribe = True
        self._features_stale = True
        self._early_jobs.clear()
        if not new:
            self._fail_waiters(
                SystemdUnavailable("", f"{SYSTEMD} left the bus while jobs were pending")
            )

    # -- calls ----------------------------------------------------------------

    async def _bus_call(self, bus: MessageBus, member: str, body: list[str]) -> list[Any]:
        """A call to the bus daemon itself (AddMatch, GetNameOwner...): one string argument."""
        return await self._call_on(
            bus, member, "s", body, destination=DBUS, path=DBUS_PATH, interface=DBUS
        )

    async def _call_on(
        self,
        bus: MessageBus,
        member: str,
        signature: str,
        body: list[Any],
        *,
        destination: str = SYSTEMD,
        path: str = MANAGER_PATH,
        interface: str = MANAGER,
        unix_fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> list[Any]:
        msg = Message(
            # systemd is never bus-activated: if it is not there, say so at once.
            flags=MessageFlag.NO_AUTOSTART,
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
            unix_fds=list(unix_fds),
        )
        limit = self._call_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                reply = await bus.call(msg)
        except TimeoutError:
            raise SystemdTimeout("", f"no answer to {member} within {limit:g} s") from None
        except Exception as e:
            if bus.connected:  # e.g. a body that does not match the signature: our bug
                raise SystemdError("", f"{member}: {type(e).__name__}: {e}") from e
            if self._bus is bus:  # the connection broke under the call
                self._bus = None
            raise SystemdUnavailable(
                "", f"lost the bus connection during {member}: {e or type(e).__name__}"
            ) from e
        if reply is None:  # dbus-fast answers pending calls with None on a clean EOF
            if self._bus is bus:
                self._bus = None
            raise SystemdUnavailable("", f"the bus connection closed during {member}")
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = str(reply.body[0]) if reply.body else name
            if name in _UNAVAILABLE_ERRORS or name.startswith("org.freedesktop.DBus.Error.Spawn."):
                raise SystemdUnavailable(name, f"{member}: {text}")
            raise SystemdError(name, text)
        return list(reply.body)

    async def _call(
        self,
        member: str,
        signature: str,
        body: list[Any],
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER,
        unix_fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> list[Any]:
        bus = await self._get_bus()
        return await self._call_on(
            bus,
            member,
            signature,
            body,
            path=path,
            interface=interface,
            unix_fds=unix_fds,
            timeout=timeout,
        )

    async def _subscribe(self) -> None:
        if not self._need_subscribe:
            return
        try:
            await self._call("Subscribe", "", [])
        except SystemdError as e:
            if e.dbus_name != _ALREADY_SUBSCRIBED:
                raise
        self._need_subscribe = False

    async def _run_job(
        self,
        unit: str,
        member: str,
        signature: str,
        body: list[Any],
        *,
        unix_fds: Sequence[int] = (),
        timeout: float,
    ) -> str:
        """Queue a job with ``member`` and wait for its JobRemoved; return its result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._subscribe()
        self._job_calls += 1
        try:
            (job,) = await self._call(
                member,
                signature,
                body,
                unix_fds=unix_fds,
                timeout=max(0.0, min(self._call_timeout, deadline - loop.time())),
            )
            early = self._early_jobs.pop(job, None)
            if early is not None:
                result = early[1]
            else:
                fut: asyncio.Future[tuple[str, str]] = loop.create_future()
                self._job_waiters[job] = fut
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        _unit, result = await fut
                except TimeoutError:
                    self._job_waiters.pop(job, None)
                    with contextlib.suppress(SystemdError):
                        await self._call("Cancel", "", [], path=job, interface=JOB, timeout=1.0)
                    raise SystemdTimeout(
                        "", f"job {job} for {unit} did not finish within {timeout:g} s"
                    ) from None
                finally:
                    self._job_waiters.pop(job, None)
        finally:
            self._job_calls -= 1
            if self._job_calls == 0:
                self._early_jobs.clear()
        if result != "done":
            raise JobFailed(unit, result, job)
        return str(result)

    # -- features -------------------------------------------------------------

    async def _detect(self, bus: MessageBus) -> Features:
        (version,) = await self._call_on(
            bus, "Get", "ss", [MANAGER, "Version"], interface=PROPERTIES
        )
        text = str(_unwrap(version))
        match = re.match(r"\D*(\d+)", text)
        number = int(match[1]) if match else 0
        if self._use_pidfds is None:
            pidfds = await self._detect_pidfds(bus)
        else:
            pidfds = self._use_pidfds
        return Features(version=number, pidfds=pidfds)

    async def _detect_pidfds(self, bus: MessageBus) -> bool:
        """Ask systemd whether scopes take ``PIDFDs``, without creating anything.

        The probe is ``StartTransientUnit`` of a throwaway scope whose only property is
        an *empty* ``PIDFDs`` array. A systemd without the property rejects it as
        unknown ("Cannot set property PIDFDs, or unknown property.", PropertyReadOnly);
        one with it parses the array and rejects the empty list (EINVAL: a scope needs a
        process). Either way no unit is created; should one ever be, it is stopped.
        """
        probe = f"nsd-pidfd-probe-{secrets.token_hex(6)}.scope"
        try:
            await self._call_on(
                bus,
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
                [probe, "fail", [["PIDFDs", Variant("ah", [])]], []],
            )
        except SystemdTimeout:
            raise
        except SystemdUnavailable:
            raise
        except SystemdError as e:
            return not (e.dbus_name in _UNKNOWN_PROPERTY_ERRORS and "PIDFDs" in e.message)
        with contextlib.suppress(SystemdError):
            await self._call_on(bus, "StopUnit", "ss", [probe, "replace"])
        return True

    async def features_now(self) -> Features:
        """Features, re-detected if systemd changed since (e.g. re-executed after an update)."""
        bus = await self._get_bus()
        if self._features_stale:  # systemd's owner changed since the detection
            self._features = await self._detect(bus)
            self._features_stale = False
        return self.features

    # -- units ----------------------------------------------------------------

    async def start_transient_unit(
        self,
        name: str,
        properties: Iterable[Property],
        mode: str = "fail",
        aux: Iterable[tuple[str, Iterable[Property]]] = (),
        timeout: float = 30.0,
    ) -> str:
        """Create and start a transient unit; wait for its job. Returns the job result
        (``done``); raises :class:`JobFailed` if the job fails."""
        fds: list[int] = []
        props = _marshal_properties(properties, fds)
        aux_units = [[aux_name, _marshal_properties(aux_props, fds)] for aux_name, aux_props in aux]
        return await self._run_job(
            name,
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            [name, mode, props, aux_units],
            unix_fds=fds,
            timeout=timeout,
        )

    async def start_unit(self, name: str, mode: str = "replace", timeout: float = 30.0) -> str:
        return await self._run_job(name, "StartUnit", "ss", [name, mode], timeout=timeout)

    async def stop_unit(self, name: str, mode: str = "replace", timeout: float = 30.0) -> str:
        return await self._run_job(name, "StopUnit", "ss", [name, mode], timeout=timeout)

    async def set_unit_properties(
        self, name: str, properties: Iterable[Property], runtime: bool
    ) -> None:
        """Change properties of a unit (loading it if needed), live.

        ``runtime=False`` also persists them as drop-ins in /etc/systemd/system.control,
        read again at every load of the unit - across reboots, no daemon-reload needed
        (for a *transient* unit systemd puts them in /run/systemd/transient instead).
        """
        fds: list[int] = []
        props = _marshal_properties(properties, fds)
        await self._call("SetUnitProperties", "sba(sv)", [name, runtime, props], unix_fds=fds)

    async def ensure_slice(
        self,
        name: str,
        properties: Iterable[Property],
        *,
        persistent: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Create or adopt a slice with ``properties`` and start it. Idempotent.

        The slice is never transient: its properties are drop-ins (see the module doc),
        so it holds from boot on, before anything of nsd runs, and an existing slice is
        simply adopted.
        """
        await self.set_unit_properties(name, properties, runtime=not persistent)
        await self.start_unit(name, "replace", timeout=timeout)

    async def load_unit(self, name: str) -> str:
        """Load a unit (no-op if loaded) and return its object path."""
        (path,) = await self._call("LoadUnit", "s", [name])
        return str(path)

    async def get_unit_properties(self, name: str, interface: str = UNIT) -> dict[str, Any]:
        """All properties of ``interface`` (UNIT, SLICE, SCOPE, SERVICE) of a unit.

        Uses LoadUnit, so it works for units that are not active (or not loaded) yet.
        """
        path = await self.load_unit(name)
        (props,) = await self._call("GetAll", "s", [interface], path=path, interface=PROPERTIES)
        return {key: _unwrap(value) for key, value in props.items()}

    async def revert_unit_files(self, names: Iterable[str]) -> list[tuple[str, str, str]]:
        """Remove the units' drop-ins and overrides in /etc and /run (``systemctl revert``).

        Returns systemd's list of changes (type, path, destination). The loaded units keep
        their current properties until they are unloaded (stopped and collected).
        """
        (changes,) = await self._call("RevertUnitFiles", "as", [list(names)])
        return [(str(a), str(b), str(c)) for a, b, c in changes]

    async def reload(self, timeout: float = 120.0) -> None:
        """daemon-reload: systemd re-reads unit files and drop-ins (answers when done).

        Not needed for properties set with :meth:`set_unit_properties`; only for
        unit-file drop-ins written to disk (nsd's template drop-ins).
        """
        await self._call("Reload", "", [], timeout=timeout)

    async def reset_failed_unit(self, name: str) -> None:
        await self._call("ResetFailedUnit", "s", [name])

    async def kill_unit(self, name: str, whom: str = "all", signal: int = 15) -> None:
        await self._call("KillUnit", "ssi", [name, whom, signal])

    async def unref_unit(self, name: str) -> None:
        """Drop the reference taken with the ``AddRef`` property."""
        await self._call("Unref", "", [], path=unit_object_path(name), interface=UNIT)

    async def list_units_by_patterns(
        self, states: Iterable[str], patterns: Iterable[str]
    ) -> list[UnitState]:
        """Loaded units matching glob ``patterns`` whose state is in ``states`` (any if empty)."""
        (units,) = await self._call("ListUnitsByPatterns", "asas", [list(states), list(patterns)])
        return [UnitState(str(u[0]), str(u[3]), str(u[4])) for u in units]

    async def is_loaded(self, name: str) -> bool:
        """Whether systemd has the unit loaded now (GetUnit, which never loads it)."""
        try:
            await self._call("GetUnit", "s", [name])
        except SystemdError as e:
            if e.dbus_name == "org.freedesktop.systemd1.NoSuchUnit":
                return False
            raise
        return True

    async def unit_for_pid(self, pid: int) -> str | None:
        """The unit a process belongs to (GetUnitByPID), or None if none."""
        try:
            (path,) = await self._call("GetUnitByPID", "u", [pid])
        except SystemdError as e:
            if e.dbus_name == _NO_UNIT_FOR_PID:
                return None
            raise
        return unit_name_from_path(str(path))

    async def wait_unit_exit(
        self, name: str, timeout: float | None = None, poll: float = 1.0
    ) -> UnitExit:
        """Wait until a unit is inactive or failed; report how its main process ended.

        For a transient service started with ``("AddRef", "b", True)`` so that the unit
        stays loaded until :meth:`unref_unit` (this does not unref). Woken by the unit's
        PropertiesChanged signals, with a ``poll`` interval as a safety net.
        """
        bus = await self._get_bus()
        path = unit_object_path(name)
        rule = (
            f"type='signal',sender='{SYSTEMD}',path='{path}',"
            f"interface='{PROPERTIES}',member='PropertiesChanged'"
        )
        event = asyncio.Event()
        self._unit_events.setdefault(path, set()).add(event)
        try:
            await self._bus_call(bus, "AddMatch", [rule])
            await self._subscribe()
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    unit = await self.get_unit_properties(name, UNIT)
                    job_id = unit.get("Job", [0, "/"])[0]
                    if unit["ActiveState"] in ("inactive", "failed") and not job_id:
                        service: dict[str, Any] = {}
                        if name.endswith(".service"):
                            service = await self.get_unit_properties(name, SERVICE)
                        return UnitExit(
                            active_state=str(unit["ActiveState"]),
                            result=str(service.get("Result", "")),
                            exec_main_code=int(service.get("ExecMainCode", 0)),
                            exec_main_status=int(service.get("ExecMainStatus", 0)),
                        )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(poll):
                            await event.wait()
                    if not self.connected:
                        raise SystemdUnavailable("", f"lost the bus while waiting for {name}")
        except TimeoutError:
            raise SystemdTimeout("", f"{name} did not finish within {timeout:g} s") from None
        finally:
            events = self._unit_events.get(path)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._unit_events[path]
            if bus.connected:
                with contextlib.suppress(SystemdError):
                    await self._bus_call(bus, "RemoveMatch", [rule])

    # -- placement ------------------------------------------------------------

    async def start_scope_for_process(
        self,
        name: str,
        pid: int,
        pidfd: int,
        properties: Iterable[Property] = (),
        *,
        timeout: float = 30.0,
    ) -> bool:
        """Start transient scope ``name`` holding the process pinned by ``pidfd``.

        PID-reuse safe: ``pidfd`` (from ``os.pidfd_open(pid)``, opened while ``pid`` was
        known to be the right process, e.g. from SO_PEERCRED or SO_PEERPIDFD) must still
        name a live process with PID ``pid`` before the call; systemd gets the pidfd
        itself (``PIDFDs``) where it supports that, else the PID; afterwards the process
        must still be alive and ``GetUnitByPID`` must name the new scope. Raises
        :class:`ProcessGone` if the process went away, :class:`JobFailed` etc. otherwise.
        Returns True if ``PIDFDs`` was used.

        Nothing is rolled back here: when the placement is not verified, the caller
        decides (a scope whose process died stops by itself; add
        ``("CollectMode", "s", "inactive-or-failed")`` so failed scopes are collected).
        """
        props = list(properties)
        check_pidfd(pid, pidfd, "before placement")
        features = await self.features_now()
        used_pidfds = features.pidfds
        try:
            await self.start_transient_unit(
                name, [*props, self._process_property(pid, pidfd, used_pidfds)], timeout=timeout
            )
        except SystemdError as e:
            if not (
                used_pidfds and e.dbus_name in _UNKNOWN_PROPERTY_ERRORS and "PIDFDs" in e.message
            ):
                if _pidfd_exited(pidfd):
                    raise ProcessGone(pid, f"during placement: {e.message}") from e
                raise
            # Detected support was wrong (systemd replaced under us): fall back, remember.
            log.warning("systemd rejected PIDFDs; falling back to PIDs: %s", e.message)
            self._features = Features(version=features.version, pidfds=False)
            used_pidfds = False
            check_pidfd(pid, pidfd, "before placement")
            await self.start_transient_unit(
                name, [*props, self._process_property(pid, pidfd, False)], timeout=timeout
            )
        check_pidfd(pid, pidfd, "after placement")
        unit = await self.unit_for_pid(pid)
        # The pidfd's process is alive, so ``pid`` is still its PID: the answer is about it.
        if unit != name:
            raise SystemdError(
                "", f"process {pid} is in {unit or 'no unit'}, not in {name}, after placement"
            )
        return used_pidfds

    @staticmethod
    def _process_property(pid: int, pidfd: int, use_pidfds: bool) -> Property:
        if use_pidfds:
            return ("PIDFDs", "ah", [Fd(pidfd)])
        return ("PIDs", "au", [pid])
