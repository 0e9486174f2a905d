"""The D-Bus client of the systemd adapter: one connection to org.freedesktop.systemd1.

Connection
----------
One connection to the system bus (or to ``address``, for tests), made lazily by the first
call and again after it is lost: a bus restart, systemd leaving the bus or a broken socket
fails the calls and job waits in flight with :class:`SystemdUnavailable`, and the *next*
call reconnects. A failed connection attempt starts a backoff (0.1 s doubling to 5 s);
calls during the backoff fail at once instead of hammering a dead bus, so nothing ever
hangs and nothing crashes. Every call has a timeout (:class:`SystemdTimeout`).

Signals
-------
The match rules for systemd's ``JobRemoved`` and for changes of systemd's bus name are
added when the connection is made; only signals whose sender is systemd's unique name
count. They go to :class:`nsd.systemd.jobs.JobWaits`, which wakes what waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any, Final, Self

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from nsd.systemd.dbus_types import (
    DBUS,
    DBUS_PATH,
    DEFAULT_SYSTEM_BUS,
    MANAGER,
    MANAGER_PATH,
    PROPERTIES,
    SYSTEMD,
    UNIT,
    UNKNOWN_PROPERTY_ERRORS,
    Features,
    SystemdError,
    SystemdTimeout,
    SystemdUnavailable,
)
from nsd.systemd.jobs import JobWaits
from nsd.systemd.properties import unwrap

log = logging.getLogger("nsd.systemd")

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
_ALREADY_SUBSCRIBED: Final = "org.freedesktop.systemd1.AlreadySubscribed"
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 5.0


class SystemdBus:
    """A connection to systemd's Manager: method calls, signals, features. It connects
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
        self.call_timeout = call_timeout
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
        #: the jobs and units being waited for; this client feeds them systemd's signals
        self.jobs = JobWaits()

    @classmethod
    async def connect(
        cls, address: str | None = None, timeout: float = 5.0, *, use_pidfds: bool | None = None
    ) -> Self:
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
        await self.get_bus()
        return self.features

    async def close(self) -> None:
        self._closed = True
        bus, self._bus = self._bus, None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if bus is not None:
            bus.disconnect()
        self.jobs.fail_all(SystemdUnavailable("", "the systemd adapter was closed"))

    # -- connection -----------------------------------------------------------

    async def get_bus(self) -> MessageBus:
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
            async with asyncio.timeout(self.call_timeout):
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
                await self.bus_call(bus, "AddMatch", [rule])
            try:
                (self._owner,) = await self.bus_call(bus, "GetNameOwner", [SYSTEMD])
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
        self.jobs.fail_all(SystemdUnavailable("", reason))

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
            self.jobs.job_removed(job, unit, result)
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            self.jobs.properties_changed(msg.path or "")

    def _owner_changed(self, name: str, _old: str, new: str) -> None:
        if name != SYSTEMD:
            return
        # A new systemd (restarted, re-executed, a fake in tests): subscribe again and
        # detect its features again before the next placement.
        self._owner = new
        self._need_subscribe = True
        self._features_stale = True
        self.jobs.forget_early()
        if not new:
            self.jobs.fail_all(
                SystemdUnavailable("", f"{SYSTEMD} left the bus while jobs were pending")
            )

    # -- calls ----------------------------------------------------------------

    async def bus_call(self, bus: MessageBus, member: str, body: list[str]) -> list[Any]:
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
        limit = self.call_timeout if timeout is None else timeout
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

    async def call(
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
        bus = await self.get_bus()
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

    async def subscribe(self) -> None:
        if not self._need_subscribe:
            return
        try:
            await self.call("Subscribe", "", [])
        except SystemdError as e:
            if e.dbus_name != _ALREADY_SUBSCRIBED:
                raise
        self._need_subscribe = False

    # -- features -------------------------------------------------------------

    async def _detect(self, bus: MessageBus) -> Features:
        (version,) = await self._call_on(
            bus, "Get", "ss", [MANAGER, "Version"], interface=PROPERTIES
        )
        text = str(unwrap(version))
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
            return not (e.dbus_name in UNKNOWN_PROPERTY_ERRORS and "PIDFDs" in e.message)
        with contextlib.suppress(SystemdError):
            await self._call_on(bus, "StopUnit", "ss", [probe, "replace"])
        return True

    async def features_now(self) -> Features:
        """Features, re-detected if systemd changed since (e.g. re-executed after an update)."""
        bus = await self.get_bus()
        if self._features_stale:  # systemd's owner changed since the detection
            self._features = await self._detect(bus)
            self._features_stale = False
        return self.features

    # -- reading units ------------------------------------------------------

    async def load_unit(self, name: str) -> str:
        """Load a unit (no-op if loaded) and return its object path."""
        (path,) = await self.call("LoadUnit", "s", [name])
        return str(path)

    async def get_unit_properties(self, name: str, interface: str = UNIT) -> dict[str, Any]:
        """All properties of ``interface`` (UNIT, SLICE, SCOPE, SERVICE) of a unit.

        Uses LoadUnit, so it works for units that are not active (or not loaded) yet.
        """
        path = await self.load_unit(name)
        (props,) = await self.call("GetAll", "s", [interface], path=path, interface=PROPERTIES)
        return {key: unwrap(value) for key, value in props.items()}

    async def get_unit_property(self, name: str, interface: str, prop: str) -> Any:
        """One property of ``interface`` of a unit (loading it if needed)."""
        path = await self.load_unit(name)
        (value,) = await self.call("Get", "ss", [interface, prop], path=path, interface=PROPERTIES)
        return unwrap(value)
