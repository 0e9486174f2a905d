"""The systemd adapter's vocabulary: systemd's D-Bus names, the adapter's errors and the
values it returns. Shared by the bus client (nsd/systemd_bus.py), the job waits
(nsd/systemd_jobs.py), the property builders (nsd/systemd_props.py) and the operations
(nsd/systemd.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

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

# What systemd answers for a transient property it does not know (it says both).
UNKNOWN_PROPERTY_ERRORS: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.PropertyReadOnly",
        "org.freedesktop.DBus.Error.UnknownProperty",
    }
)

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
