"""What a handler of the varlink server sees and returns, and the server's limits.

:class:`Call` (one method call, with the peer's kernel credentials), :class:`Reply`
(parameters plus descriptors or an explicit ``continues``), the handler types, and
:class:`Limits` (connection, stream, message and output bounds; :mod:`.policy` says
why each exists).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .connection import Connection
from .peer import Peer, open_peer_pidfd


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-server limits; see :mod:`.policy` for the reasoning.

    The defaults are the daemon's defaults; docs/configuration.md explains each.
    """

    # A message (without its NUL) may be at most this long; a client sending
    # more bytes without a NUL is disconnected.
    max_message_bytes: int = 65536
    # All counted connections (root's are not counted), of which
    # reserved_connections only root and the admin group may use.
    max_connections: int = 4096
    reserved_connections: int = 256
    # Per UID: tenants and admins; accounts that are not tenants; and all
    # non-tenant accounts together.
    max_connections_per_uid: int = 16
    max_connections_per_non_tenant: int = 2
    max_non_tenant_connections: int = 64
    # UIDs subject to no connection cap (root by default): unprivileged clients must
    # not be able to fill the server and lock out nsd-exec, which runs as root
    # on every service start. Their connections do not count towards the total.
    uid_limit_exempt: frozenset[int] = frozenset({0})
    # Seconds a message may take to arrive once its first byte is in (slowloris).
    partial_message_timeout: float = 10.0
    # Seconds an unprivileged connection may stay open with no call in progress.
    idle_timeout: float = 15.0
    # Seconds an unprivileged peer's call (not a stream) may run before it is
    # cancelled and answered with <errors>.CallTimedOut.
    call_timeout: float = 45.0
    # Streaming calls one unprivileged UID may run at once.
    max_streams_per_uid: int = 4
    # Nesting of arrays/objects in a message, checked on the raw bytes.
    max_json_depth: int = 32
    # Complete requests queued on one connection before we stop reading from it.
    max_pending_requests: int = 32
    # Unsent reply bytes on one connection above which no further request is
    # started and streams pause, until the client has read them.
    max_pending_reply_bytes: int = 256 * 1024
    # Unsent reply bytes above which the connection is closed: per connection,
    # and per UID for unprivileged peers (a client that never reads).
    max_queued_output_bytes: int = 16 << 20
    max_queued_output_bytes_per_uid: int = 1 << 20

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_connections",
            "max_connections_per_uid",
            "max_connections_per_non_tenant",
            "max_non_tenant_connections",
            "max_streams_per_uid",
            "max_json_depth",
            "max_pending_requests",
            "max_pending_reply_bytes",
            "max_queued_output_bytes",
            "max_queued_output_bytes_per_uid",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if not 0 <= self.reserved_connections < self.max_connections:
            raise ValueError("Limits.reserved_connections must be below max_connections")
        for name in ("partial_message_timeout", "idle_timeout", "call_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive")


@dataclass(frozen=True, slots=True)
class Call:
    """One method call, as a handler sees it."""

    interface: str  # e.g. "io.nsd.Tenant"
    method: str  # the short name, e.g. "Get"
    parameters: dict[str, Any]  # validated against the method's input
    peer: Peer  # from the kernel, never from the message
    more: bool
    oneway: bool
    # The connection's socket, kept private: handlers reply by returning.
    _sock: socket.socket | None = field(default=None, repr=False, compare=False)
    _conn: Connection | None = field(default=None, repr=False, compare=False)

    def open_peer_pidfd(self) -> int | None:
        """A pidfd of the calling process (Linux >= 6.5) owned by the caller, else None."""
        return None if self._sock is None else open_peer_pidfd(self._sock)

    def unread_output(self) -> int | None:
        """What the server sent on this connection that the peer has not read yet
        (0: everything, descriptors included, reached the peer or was dropped; None:
        unknown, see ``Connection.unread_output``)."""
        return 0 if self._conn is None else self._conn.unread_output()


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply with extras: file descriptors, or an explicit ``continues`` flag.

    ``fds`` are sent with SCM_RIGHTS along with this message; the server owns
    them from now on and closes them once sent (or if the reply is dropped).

    ``continues`` matters for streaming handlers only. By default the server
    looks one item ahead to mark the last one ``continues: false``, which delays
    each item until the next one exists. Live streams (events) yield
    ``Reply(..., continues=True)`` to have each item sent at once; such a stream
    ends with a ``continues=False`` item or by raising VarlinkError.
    """

    parameters: Mapping[str, Any] = field(default_factory=dict)
    fds: Sequence[int] = ()
    continues: bool | None = None
    # Called once the server let go of ``fds``: handed to the socket or queued in
    # the connection's output (``Call.unread_output`` counts it from then on), or
    # closed because the reply was dropped.
    released: Callable[[], None] | None = field(default=None, compare=False)


ReplyValue: TypeAlias = Reply | Mapping[str, Any] | None
# A plain handler is an async function returning the reply parameters; a
# streaming handler (for methods called with "more") is an async generator.
Handler: TypeAlias = (
    Callable[[Call], Awaitable[ReplyValue]]
    | Callable[[Call], AsyncIterator[Reply | Mapping[str, Any]]]
)
# on_call_done(interface, method, error name or None, seconds). Called only for
# methods that exist, so metric labels stay bounded whatever clients send.
CallDoneHook: TypeAlias = Callable[[str, str, "str | None", float], None]
