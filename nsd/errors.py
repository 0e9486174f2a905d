"""Errors the core raises, each named for the state it reports.

The core knows nothing about varlink; the API layer prefixes ``name`` with the
interface (``io.nsd.Tenant.NoSuchTenant``) and sends ``parameters`` as they are,
so every error has one stable machine name and typed parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NsdError(Exception):
    """Base class: ``name`` is the error's stable name, ``parameters`` its typed fields."""

    name: ClassVar[str] = "Error"

    def __init__(self, text: str, /, **parameters: Any) -> None:
        super().__init__(text)
        self.parameters: dict[str, Any] = parameters

    @property
    def message(self) -> str:
        return str(self.args[0])


class NoSuchTenant(NsdError):
    name = "NoSuchTenant"

    def __init__(self, name: str) -> None:
        super().__init__(f"no tenant named {name!r}", name=name)


class TenantExists(NsdError):
    name = "TenantExists"

    def __init__(self, name: str) -> None:
        super().__init__(f"tenant {name!r} already exists", name=name)


class InvalidTenantName(NsdError):
    name = "InvalidTenantName"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid tenant name {name!r}: {reason}", name=name, reason=reason)


class NoSuchUser(NsdError):
    name = "NoSuchUser"

    def __init__(self, name: str) -> None:
        super().__init__(f"no Unix user named {name!r}", name=name)


class UidOutOfRange(NsdError):
    name = "UidOutOfRange"

    def __init__(self, name: str, uid: int, minimum: int, maximum: int) -> None:
        super().__init__(
            f"user {name!r} has uid {uid}, outside the managed range {minimum}-{maximum}",
            name=name,
            uid=uid,
            minimum=minimum,
            maximum=maximum,
        )


class TenantIdentityChanged(NsdError):
    name = "TenantIdentityChanged"

    def __init__(self, name: str, uid: int, recorded_name: str, reason: str) -> None:
        super().__init__(
            f"tenant {recorded_name!r} (uid {uid}): {reason}; resolve it before nsd acts on it",
            name=name,
            uid=uid,
            recordedName=recorded_name,
            reason=reason,
        )


class AddressPoolExhausted(NsdError):
    name = "AddressPoolExhausted"

    def __init__(self, family: str, pool: str) -> None:
        super().__init__(f"no free {family} address left in pool {pool}", family=family, pool=pool)


class AddressConflict(NsdError):
    """The address a UID derives under the ``uid`` strategy is leased to another tenant
    (one that got it while the strategy was ``pool``)."""

    name = "AddressConflict"

    def __init__(self, family: str, pool: str, address: str) -> None:
        super().__init__(
            f"{family} address {address} derived for this uid is already leased",
            family=family,
            pool=pool,
            address=address,
        )


class NamespaceExists(NsdError):
    name = "NamespaceExists"

    def __init__(self, path: str) -> None:
        super().__init__(
            f"namespace {path} exists and was not made by nsd (adopt_existing is off)", path=path
        )


class TenantBusy(NsdError):
    name = "TenantBusy"

    def __init__(self, name: str, processes: int) -> None:
        super().__init__(
            f"tenant {name!r} still has {processes} process(es) using its namespace "
            "(stop them, or remove with force)",
            name=name,
            processes=processes,
        )


class TenantLocked(NsdError):
    name = "TenantLocked"

    def __init__(self, name: str) -> None:
        super().__init__(f"another operation on tenant {name!r} did not finish in time", name=name)


class NetworkSetupFailed(NsdError):
    name = "NetworkSetupFailed"

    def __init__(self, name: str, step: str, message: str, errno: int | None) -> None:
        super().__init__(
            f"network set-up of tenant {name!r} failed at {step}: {message}",
            name=name,
            step=step,
            message=message,
            errno=errno,
        )


class InvalidCommand(NsdError):
    name = "InvalidCommand"

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid command: {reason}", reason=reason)


class SystemdUnavailable(NsdError):
    """The operation needs systemd, which this host or configuration does not offer.

    Not nsd.systemd.units.SystemdUnavailable, the bus adapter's own error: the core turns that
    (and a host without systemd) into this one.
    """

    name = "SystemdUnavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"systemd is unavailable: {reason}", reason=reason)


class SystemdRequestFailed(NsdError):
    name = "SystemdRequestFailed"

    def __init__(self, unit: str, detail: str, dbus_error: str | None) -> None:
        super().__init__(
            f"systemd could not handle {unit}: {detail}",
            unit=unit,
            dbusError=dbus_error,
            message=detail,
        )


class ShuttingDown(NsdError):
    name = "ShuttingDown"

    def __init__(self) -> None:
        super().__init__("nsd is shutting down")


class WatcherTooSlow(NsdError):
    name = "WatcherTooSlow"

    def __init__(self) -> None:
        super().__init__("the watcher did not read its events in time and was dropped")


class PermissionDenied(NsdError):
    """Mapped to the standard ``org.varlink.service.PermissionDenied``."""

    name = "PermissionDenied"

    def __init__(self, reason: str) -> None:
        super().__init__(f"permission denied: {reason}")


class StateWriteFailed(NsdError):
    """The state database refused a write (state directory full, read-only, I/O error)."""

    name = "StateWriteFailed"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot write nsd's state database {path}: {reason}; the operation did not "
            "complete (once the database is writable, reconcile finishes or undoes what it "
            "started)",
            path=path,
            reason=reason,
        )


class UsageUnavailable(NsdError):
    """GetUsage/Audit before the first sample, or with sampling disabled."""

    name = "UsageUnavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"usage is unavailable: {reason}", reason=reason)


class InvalidLimit(NsdError):
    name = "InvalidLimit"

    #: characters of a refused value repeated in the error
    ECHO = 40

    def __init__(self, field: str, value: str, reason: str) -> None:
        # A refused value is echoed back shortened: it may be a megabyte long.
        shown = value if len(value) <= self.ECHO else value[: self.ECHO] + "..."
        super().__init__(f"invalid {field} {shown!r}: {reason}", field=field, value=shown,
                         reason=reason)  # fmt: skip


class InvalidFaultQuery(NsdError):
    name = "InvalidFaultQuery"

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"invalid {parameter}: {reason}", parameter=parameter, reason=reason)
