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
