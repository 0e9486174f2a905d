"""Job waits of the systemd adapter: a job's end (``JobRemoved``) and a unit's exit.

``StartUnit``, ``StopUnit``, ``StartTransientUnit`` only *queue* a job; the unit is there
when systemd's ``JobRemoved`` signal names the job. The match rule for it is added when
the connection is made (nsd/systemd_bus.py), and ``Subscribe`` is (re)sent before each job
is queued, so the signal is routed to us before the job exists. A fast job's
``JobRemoved`` can arrive in the same read as the method reply, before the awaiting
coroutine runs: while any job call is in flight, every ``JobRemoved`` is kept, and looked
up by job path as soon as the reply names the job. A job whose result is not ``done``
raises :class:`JobFailed`. A job that does not end within its timeout is cancelled (best
effort) and raises :class:`SystemdTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nsd.systemd.dbus_types import (
    JOB,
    PROPERTIES,
    SERVICE,
    SYSTEMD,
    UNIT,
    JobFailed,
    SystemdError,
    SystemdTimeout,
    SystemdUnavailable,
    UnitExit,
)
from nsd.systemd.properties import unit_object_path

if TYPE_CHECKING:
    from nsd.systemd.bus import SystemdBus


class JobWaits:
    """The jobs and units being waited for, woken by the signals the bus client hands
    over (:meth:`job_removed`, :meth:`properties_changed`)."""

    def __init__(self) -> None:
        #: job path -> future of (unit, result)
        self.waiters: dict[str, asyncio.Future[tuple[str, str]]] = {}
        #: JobRemoved seen while a job call was in flight: job path -> (unit, result)
        self.early: dict[str, tuple[str, str]] = {}
        self._calls = 0
        #: unit object path -> events set on PropertiesChanged
        self.unit_events: dict[str, set[asyncio.Event]] = {}

    # -- fed by the bus client ------------------------------------------------------

    def job_removed(self, job: str, unit: str, result: str) -> None:
        fut = self.waiters.pop(job, None)
        if fut is not None:
            if not fut.done():
                fut.set_result((unit, result))
        elif self._calls > 0:
            self.early[job] = (unit, result)

    def properties_changed(self, path: str) -> None:
        for event in self.unit_events.get(path, ()):
            event.set()

    def forget_early(self) -> None:
        """systemd changed: job paths seen so far name jobs of the old one."""
        self.early.clear()

    def fail_all(self, exc: SystemdError) -> None:
        waiters, self.waiters = self.waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        for events in self.unit_events.values():
            for event in events:
                event.set()

    # -- waiting ----------------------------------------------------------------------

    async def run(
        self,
        client: SystemdBus,
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
        await client.subscribe()
        self._calls += 1
        try:
            (job,) = await client.call(
                member,
                signature,
                body,
                unix_fds=unix_fds,
                timeout=max(0.0, min(client.call_timeout, deadline - loop.time())),
            )
            early = self.early.pop(job, None)
            if early is not None:
                result = early[1]
            else:
                result = await self._wait_job(client, job, unit, deadline - loop.time(), timeout)
        finally:
            self._calls -= 1
            if self._calls == 0:
                self.early.clear()
        if result != "done":
            raise JobFailed(unit, result, job)
        return str(result)

    async def _wait_job(
        self, client: SystemdBus, job: str, unit: str, left: float, timeout: float
    ) -> str:
        fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self.waiters[job] = fut
        try:
            async with asyncio.timeout(max(0.0, left)):
                _unit, result = await fut
                return result
        except TimeoutError:
            self.waiters.pop(job, None)
            with contextlib.suppress(SystemdError):
                await client.call("Cancel", "", [], path=job, interface=JOB, timeout=1.0)
            raise SystemdTimeout(
                "", f"job {job} for {unit} did not finish within {timeout:g} s"
            ) from None
        finally:
            self.waiters.pop(job, None)

    async def wait_unit_exit(
        self, client: SystemdBus, name: str, timeout: float | None, poll: float
    ) -> UnitExit:
        """Wait until a unit is inactive or failed; report how its main process ended.

        For a transient service started with ``("AddRef", "b", True)`` so that the unit
        stays loaded until ``unref_unit`` (this does not unref). Woken by the unit's
        PropertiesChanged signals, with a ``poll`` interval as a safety net.
        """
        bus = await client.get_bus()
        path = unit_object_path(name)
        rule = (
            f"type='signal',sender='{SYSTEMD}',path='{path}',"
            f"interface='{PROPERTIES}',member='PropertiesChanged'"
        )
        event = asyncio.Event()
        self.unit_events.setdefault(path, set()).add(event)
        try:
            await client.bus_call(bus, "AddMatch", [rule])
            await client.subscribe()
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    done = await _unit_exit(client, name)
                    if done is not None:
                        return done
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(poll):
                            await event.wait()
                    if not client.connected:
                        raise SystemdUnavailable("", f"lost the bus while waiting for {name}")
        except TimeoutError:
            raise SystemdTimeout("", f"{name} did not finish within {timeout:g} s") from None
        finally:
            events = self.unit_events.get(path)
            if events is not None:
                events.discard(event)
                if not events:
                    del self.unit_events[path]
            if bus.connected:
                with contextlib.suppress(SystemdError):
                    await client.bus_call(bus, "RemoveMatch", [rule])


async def _unit_exit(client: SystemdBus, name: str) -> UnitExit | None:
    """How the unit ended, or None while it is still active (or has a job queued)."""
    unit = await client.get_unit_properties(name, UNIT)
    job_id = unit.get("Job", [0, "/"])[0]
    if unit["ActiveState"] not in ("inactive", "failed") or job_id:
        return None
    service: dict[str, Any] = {}
    if name.endswith(".service"):
        service = await client.get_unit_properties(name, SERVICE)
    return UnitExit(
        active_state=str(unit["ActiveState"]),
        result=str(service.get("Result", "")),
        exec_main_code=int(service.get("ExecMainCode", 0)),
        exec_main_status=int(service.get("ExecMainStatus", 0)),
    )
