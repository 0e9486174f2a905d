"""The server's handling of single messages and sockets, outside any connection's state:
parsing a call message, refusing a connection with a reason, sending a stream's
replies one step behind, binding the listening socket."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, Final

from . import wire
from .calls import Reply
from .connection import close_fds
from .protocol import VarlinkError


class HandlerBug(Exception):
    """A handler bug detected by the server (bad reply); answered with internal_error_name."""


_MESSAGE_KEYS: Final = frozenset({"method", "parameters", "oneway", "more", "upgrade"})


def refuse(sock: socket.socket, error: VarlinkError) -> None:
    """Answers a connection we will not serve with ``error``, then closes it.

    Varlink has no greeting, so the error goes out as the reply to whatever the
    client sends first; the kernel keeps it readable after the close, and
    nsd's client also looks for it when its send fails (EPIPE).
    """
    with contextlib.suppress(OSError):
        sock.send(wire.encode({"error": error.name, "parameters": error.parameters}),
                  socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)  # fmt: skip
    sock.close()


def parse_request(message: Any) -> tuple[str, dict[str, Any], bool, bool, bool] | None:
    """Method, parameters, oneway, more, upgrade of a call message; None if malformed.

    Malformed means what systemd also refuses: not an object, unknown keys,
    wrong types, or both oneway and more.
    """
    if type(message) is not dict or not _MESSAGE_KEYS.issuperset(message):
        return None
    method = message.get("method")
    parameters = message.get("parameters")
    oneway = message.get("oneway", False)
    more = message.get("more", False)
    upgrade = message.get("upgrade", False)
    if (
        type(method) is not str
        or type(oneway) is not bool
        or type(more) is not bool
        or type(upgrade) is not bool
        or (oneway and more)
    ):
        return None
    if parameters is None:
        parameters = {}
    elif type(parameters) is not dict:
        return None
    return method, parameters, oneway, more, upgrade


class StreamSender:
    """Sends a stream's replies, holding one back to learn whether it is the last.

    Items with an explicit ``continues`` go out at once (live streams).
    """

    def __init__(self, send: Callable[[Reply, bool], None]) -> None:
        self._send = send
        self._pending: Reply | None = None
        self.finished = False  # a continues=False reply went out

    def add(self, reply: Reply) -> None:
        self.flush(continues=True)
        if reply.continues is None:
            self._pending = reply
        else:
            self.finished = not reply.continues
            self._send(reply, reply.continues)

    def flush(self, *, continues: bool) -> None:
        held, self._pending = self._pending, None
        if held is not None:
            self._send(held, continues)

    def finish(self, *, connected: bool) -> None:
        """The generator is exhausted: the held reply is the last one."""
        if self._pending is not None:
            self.flush(continues=False)
        elif not self.finished and connected:
            raise HandlerBug("stream ended without a final reply (yield continues=False or raise)")

    def discard(self) -> None:
        held, self._pending = self._pending, None
        if held is not None:
            drop(held)


def drop(reply: Reply) -> None:
    """A reply that will not be sent: close its descriptors, tell who handed them out."""
    close_fds(reply.fds)
    if reply.released is not None:
        reply.released()


def bind_unix_socket(path: str, mode: int = 0o666, backlog: int = 4096) -> socket.socket:
    """Binds and listens on ``path``, replacing a stale socket file but never a live one.

    Mode 0666 is deliberate: every tenant may connect; what it may do is decided
    per call from its kernel credentials.
    """
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left over from a crash
        else:
            raise OSError(errno.EADDRINUSE, "another process serves this socket", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
