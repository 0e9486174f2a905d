"""Varlink wire-level names and exceptions shared by the server and the clients.

Kept tiny (no asyncio, no dataclasses, no typing machinery at run time): nsctl
imports it on every call.
"""

from __future__ import annotations

# typing itself costs ~2 ms to import; mypy honours any constant of this name.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# The errors of org.varlink.service (https://varlink.org/Service) that nsd sends, among
# them two that systemd added to the same interface and that varlinkctl understands.
INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
PERMISSION_DENIED = "org.varlink.service.PermissionDenied"
EXPECTED_MORE = "org.varlink.service.ExpectedMore"

# SCM_MAX_FD in the kernel: one sendmsg() carries at most this many descriptors.
MAX_FDS_PER_MESSAGE = 253


class VarlinkError(Exception):
    """An error reply: a fully qualified error name and its parameters.

    Handlers raise it to answer a call with an error; clients raise it when the
    service answered with one. ``name`` is e.g. ``io.nsd.Tenant.NoSuchTenant``.
    """

    def __init__(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters: dict[str, Any] = dict(parameters) if parameters else {}

    def __str__(self) -> str:
        if not self.parameters:
            return self.name
        details = ", ".join(f"{k}={v!r}" for k, v in self.parameters.items())
        return f"{self.name} ({details})"

    def __repr__(self) -> str:
        return f"VarlinkError({self.name!r}, {self.parameters!r})"

    # Constructors for the standard errors handlers raise most often.
    @classmethod
    def invalid_parameter(cls, parameter: str) -> VarlinkError:
        return cls(INVALID_PARAMETER, {"parameter": parameter})

    @classmethod
    def permission_denied(cls) -> VarlinkError:
        return cls(PERMISSION_DENIED)


class VarlinkConnectionError(ConnectionError):
    """The connection to the service failed or broke."""


class ServiceUnavailable(VarlinkConnectionError):
    """The socket is missing or nobody accepts connections on it (daemon not running)."""


class ProtocolViolation(VarlinkConnectionError):
    """The peer sent something that is not varlink (bad JSON, oversized message...)."""
