"""The systemd adapter: units, properties and jobs over org.freedesktop.systemd1 (D-Bus).

A thin, typed layer over systemd's Manager API with dbus-fast. It knows units, properties
and jobs; it knows nothing about tenants. Everything nsd asks systemd goes through here,
so the core never imports a D-Bus library. The parts: nsd/systemd_bus.py (the connection,
calls and signals), nsd/systemd_jobs.py (waiting for jobs and unit exits),
nsd/systemd_props.py (property values), nsd/systemd_types.py (names, errors, values);
this module has the operations on units, slices and scopes, and is what the rest of nsd
imports.

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

import logging
import select
import signal
from collections.abc import Iterable
from typing import Final

from nsd.systemd.bus import SystemdBus
from nsd.systemd.dbus_types import (
    INFINITY,
    MANAGER,
    MANAGER_PATH,
    SCOPE,
    SERVICE,
    SLICE,
    SYSTEMD,
    UINT64_MAX,
    UNIT,
    UNKNOWN_PROPERTY_ERRORS,
    Fd,
    Features,
    JobFailed,
    ProcessGone,
    Property,
    SystemdError,
    SystemdTimeout,
    SystemdUnavailable,
    UnitExit,
    UnitState,
)
from nsd.systemd.properties import (
    exec_start,
    limit_properties,
    marshal_properties,
    unit_name_from_path,
    unit_object_path,
)

__all__ = [
    "INFINITY",
    "MANAGER",
    "MANAGER_PATH",
    "SCOPE",
    "SERVICE",
    "SLICE",
    "SYSTEMD",
    "UINT64_MAX",
    "UNIT",
    "Fd",
    "Features",
    "JobFailed",
    "ProcessGone",
    "Property",
    "Systemd",
    "SystemdError",
    "SystemdTimeout",
    "SystemdUnavailable",
    "UnitExit",
    "UnitState",
    "check_pidfd",
    "exec_start",
    "limit_properties",
    "unit_name_from_path",
    "unit_object_path",
]

log = logging.getLogger("nsd.systemd")

NO_UNIT_FOR_PID: Final = "org.freedesktop.systemd1.NoUnitForPID"


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


class Systemd(SystemdBus):
    """systemd's Manager: the bus client (nsd/systemd_bus.py) plus the operations nsd
    uses on units, slices and scopes. Construct it, then call methods; it connects (and
    reconnects) by itself. :meth:`connect` constructs and connects at once.
    """

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
        props = marshal_properties(properties, fds)
        aux_units = [[aux_name, marshal_properties(aux_props, fds)] for aux_name, aux_props in aux]
        return await self.jobs.run(
            self,
            name,
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            [name, mode, props, aux_units],
            unix_fds=fds,
            timeout=timeout,
        )

    async def start_unit(self, name: str, mode: str = "replace", timeout: float = 30.0) -> str:
        return await self.jobs.run(self, name, "StartUnit", "ss", [name, mode], timeout=timeout)

    async def stop_unit(self, name: str, mode: str = "replace", timeout: float = 30.0) -> str:
        return await self.jobs.run(self, name, "StopUnit", "ss", [name, mode], timeout=timeout)

    async def set_unit_properties(
        self, name: str, properties: Iterable[Property], runtime: bool
    ) -> None:
        """Change properties of a unit (loading it if needed), live.

        ``runtime=False`` also persists them as drop-ins in /etc/systemd/system.control,
        read again at every load of the unit - across reboots, no daemon-reload needed
        (for a *transient* unit systemd puts them in /run/systemd/transient instead).
        """
        fds: list[int] = []
        props = marshal_properties(properties, fds)
        await self.call("SetUnitProperties", "sba(sv)", [name, runtime, props], unix_fds=fds)

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

    async def revert_unit_files(self, names: Iterable[str]) -> list[tuple[str, str, str]]:
        """Remove the units' drop-ins and overrides in /etc and /run (``systemctl revert``).

        Returns systemd's list of changes (type, path, destination). The loaded units keep
        their current properties until they are unloaded (stopped and collected).
        """
        (changes,) = await self.call("RevertUnitFiles", "as", [list(names)])
        return [(str(a), str(b), str(c)) for a, b, c in changes]

    async def reload(self, timeout: float = 120.0) -> None:
        """daemon-reload: systemd re-reads unit files and drop-ins (answers when done).

        Not needed for properties set with :meth:`set_unit_properties`; only for
        unit-file drop-ins written to disk (nsd's template drop-ins).
        """
        await self.call("Reload", "", [], timeout=timeout)

    async def reset_failed_unit(self, name: str) -> None:
        await self.call("ResetFailedUnit", "s", [name])

    async def kill_unit(self, name: str, whom: str = "all", signal: int = 15) -> None:
        await self.call("KillUnit", "ssi", [name, whom, signal])

    async def unref_unit(self, name: str) -> None:
        """Drop the reference taken with the ``AddRef`` property."""
        await self.call("Unref", "", [], path=unit_object_path(name), interface=UNIT)

    async def list_units_by_patterns(
        self, states: Iterable[str], patterns: Iterable[str]
    ) -> list[UnitState]:
        """Loaded units matching glob ``patterns`` whose state is in ``states`` (any if empty)."""
        (units,) = await self.call("ListUnitsByPatterns", "asas", [list(states), list(patterns)])
        return [UnitState(str(u[0]), str(u[3]), str(u[4])) for u in units]

    async def is_loaded(self, name: str) -> bool:
        """Whether systemd has the unit loaded now (GetUnit, which never loads it)."""
        try:
            await self.call("GetUnit", "s", [name])
        except SystemdError as e:
            if e.dbus_name == "org.freedesktop.systemd1.NoSuchUnit":
                return False
            raise
        return True

    async def unit_for_pid(self, pid: int) -> str | None:
        """The unit a process belongs to (GetUnitByPID), or None if none."""
        try:
            (path,) = await self.call("GetUnitByPID", "u", [pid])
        except SystemdError as e:
            if e.dbus_name == NO_UNIT_FOR_PID:
                return None
            raise
        return unit_name_from_path(str(path))

    async def wait_unit_exit(
        self, name: str, timeout: float | None = None, poll: float = 1.0
    ) -> UnitExit:
        """Wait until a unit is inactive or failed; report how its main process ended
        (see :meth:`nsd.systemd.jobs.JobWaits.wait_unit_exit`)."""
        return await self.jobs.wait_unit_exit(self, name, timeout, poll)

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
                used_pidfds and e.dbus_name in UNKNOWN_PROPERTY_ERRORS and "PIDFDs" in e.message
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
