"""A small blocking varlink client, for nsctl and the tests (nsd-exec and pam_nsd
have their own in C: native/lib).

Kept cheap to import on purpose (nsctl runs it on every call): only socket, json
and array at run time; typing imports are for mypy only.

One call at a time per client; replies are read with ``recvmsg`` always, so
descriptors the service passes with SCM_RIGHTS are never silently dropped, and
they arrive close-on-exec (MSG_CMSG_CLOEXEC).
"""

from __future__ import annotations

import array
import contextlib  # already loaded by site at start-up
import json
import os
import socket

from .protocol import (
    MAX_FDS_PER_MESSAGE,
    ProtocolViolation,
    ServiceUnavailable,
    VarlinkConnectionError,
    VarlinkError,
)

# typing itself costs ~2 ms to import; mypy honours any constant of this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Generator, Mapping
    from typing import Any

__all__ = ["VarlinkClient", "VarlinkConnectionError", "VarlinkError"]

_RECV_SIZE = 65536
_MAX_REPLY_BYTES = 16 << 20  # systemd's VARLINK_BUFFER_MAX
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _connect(sock: socket.socket, address: str, timeout: float | None) -> None:
    """connect(), waiting while the service's listen queue is full.

    A blocking socket waits in the kernel; one with a timeout is non-blocking
    underneath and gets EAGAIN at once when other clients (say, a connect
    storm of another local user) fill the queue: retry until the timeout.
    """
    if timeout is None:
        sock.connect(address)
        return
    import time  # noqa: PLC0415  (only on this path: nsd-exec imports this module)

    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{address}: the service's listen queue stayed full") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class VarlinkClient:
    """A connection to a varlink service on a Unix socket path (``@name``: abstract)."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        address = "\0" + path[1:] if path.startswith("@") else path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            _connect(sock, address, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ServiceUnavailable(f"cannot connect to {path}: {e.strerror}") from e
        except BaseException:
            sock.close()
            raise
        self.path = path
        self._sock: socket.socket | None = sock
        self._buf = bytearray()
        self._fds: list[int] = []  # received, not yet handed out
        self._streaming = False

    def __enter__(self) -> VarlinkClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _close_all(self._fds)

    # ---------------------------------------------------------------- calls

    def call(self, method: str, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Calls ``method`` (e.g. ``io.nsd.Tenant.Get``); raises VarlinkError on an error reply."""
        reply, fds = self.call_with_fds(method, parameters)
        _close_all(fds)
        return reply

    def call_with_fds(
        self, method: str, parameters: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        """Like :meth:`call`, also returning the descriptors sent with the reply.

        The caller owns the descriptors (close-on-exec) and must close them.
        """
        self._send(method, parameters, oneway=False, more=False)
        reply, continues = self._reply()
        fds, self._fds = self._fds, []
        if continues:
            _close_all(fds)
            self.close()
            raise ProtocolViolation(f"{method}: the service streamed a reply to a plain call")
        return reply, fds

    def call_more(
        self, method: str, parameters: Mapping[str, Any] | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """Calls with ``more`` and yields each reply until the last one.

        Stopping early leaves replies in flight, so the connection is closed then.
        """
        self._send(method, parameters, oneway=False, more=True)
        self._streaming = True
        finished = False
        try:
            while not finished:
                reply, continues = self._reply()
                _close_all(self._fds)
                finished = not continues
                yield reply
        finally:
            self._streaming = False
            if not finished:
                self.close()

    def call_oneway(self, method: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Calls without waiting: the service sends no reply, not even an error."""
        self._send(method, parameters, oneway=True, more=False)

    # ---------------------------------------------------------------- wire

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise VarlinkConnectionError(f"connection to {self.path} is closed")
        if self._streaming:
            raise RuntimeError("a streaming call is still in progress on this connection")
        return self._sock

    def _send(
        self, method: str, parameters: Mapping[str, Any] | None, *, oneway: bool, more: bool
    ) -> None:
        sock = self._socket()
        message: dict[str, Any] = {"method": method, "parameters": dict(parameters or {})}
        if oneway:
            message["oneway"] = True
        if more:
            message["more"] = True
        data = json.dumps(message, separators=(",", ":")).encode() + b"\0"
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            refusal = self._refusal()
            self.close()
            if refusal is not None:
                raise refusal from None
            raise VarlinkConnectionError(f"{self.path}: connection lost: {e.strerror}") from e

    def _refusal(self) -> VarlinkError | None:
        """The error a service that refused us sent before closing (nsd does), if any."""
        sock = self._sock
        if sock is None:  # closed already: nothing left to read
            return None
        buf = bytearray(self._buf)
        with contextlib.suppress(OSError):
            while b"\0" not in buf and len(buf) < _RECV_SIZE:
                data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
                if not data:
                    break
                buf += data
        frame, nul, _rest = bytes(buf).partition(b"\0")
        if not nul:
            return None
        try:
            message = json.loads(frame.decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(message, dict) or not isinstance(message.get("error"), str):
            return None
        parameters = message.get("parameters")
        return VarlinkError(message["error"], parameters if isinstance(parameters, dict) else {})

    def _reply(self) -> tuple[dict[str, Any], bool]:
        message = self._receive()
        parameters = message.get("parameters")
        if parameters is None:
            parameters = {}
        error = message.get("error")
        if not isinstance(parameters, dict) or (error is not None and not isinstance(error, str)):
            self.close()
            raise ProtocolViolation(f"{self.path}: malformed reply")
        if error is not None:
            _close_all(self._fds)
            raise VarlinkError(error, parameters)
        return parameters, message.get("continues") is True

    def _receive(self) -> dict[str, Any]:
        buf = self._buf
        while True:
            end = buf.find(b"\0")
            if end >= 0:
                frame = bytes(buf[:end])
                del buf[: end + 1]
                try:
                    message = json.loads(frame.decode("utf-8"))
                except ValueError as e:
                    self.close()
                    raise ProtocolViolation(f"{self.path}: invalid JSON: {e}") from e
                if not isinstance(message, dict):
                    self.close()
                    raise ProtocolViolation(f"{self.path}: reply is not a JSON object")
                return message
            if len(buf) > _MAX_REPLY_BYTES:
                self.close()
                raise ProtocolViolation(f"{self.path}: reply larger than {_MAX_REPLY_BYTES} bytes")
            self._recv_some()

    def _recv_some(self) -> None:
        sock = self._socket_for_reading()
        try:
            data, ancillary, flags, _addr = sock.recvmsg(
                _RECV_SIZE, _ANCILLARY_SPACE, _MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError as e:
            self.close()
            raise VarlinkConnectionError(f"{self.path}: connection reset") from e
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close()
            raise ProtocolViolation(f"{self.path}: too many descriptors in one reply")
        if not data:
            self.close()
            raise VarlinkConnectionError(f"{self.path}: the service closed the connection")
        self._buf += data

    def _socket_for_reading(self) -> socket.socket:
        if self._sock is None:
            raise VarlinkConnectionError(f"connection to {self.path} is closed")
        return self._sock
