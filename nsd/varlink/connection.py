"""Byte-level I/O of one accepted varlink connection.

The socket is driven directly with ``loop.add_reader``/``add_writer`` instead of
an asyncio transport, for one reason: replies may carry file descriptors, which
need ``sendmsg()`` with SCM_RIGHTS, and transports cannot send ancillary data.
Owning the socket also keeps per-message overhead to one ``recv``/``send``.

This class only frames NUL-terminated messages and enforces the byte-level
limits; decoding and dispatching are the server's job.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .peer import Peer
    from .policy import OutputBudget, PeerClass
    from .server import Limits

_RECV_SIZE = 65536
_SEND_FLAGS = socket.MSG_NOSIGNAL  # EPIPE as an error, never SIGPIPE


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _send_queue(sock: socket.socket) -> int:
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)  # == SIOCOUTQ
    except OSError:
        return 0  # the socket is gone: nothing of it can still be read
    return int(struct.unpack("i", raw)[0])


class _Outgoing:
    """Unsent bytes of one message, and the descriptors still to go with its first byte."""

    __slots__ = ("data", "fds")

    def __init__(self, data: memoryview, fds: Sequence[int]) -> None:
        self.data = data
        self.fds = fds


class Connection:
    """A non-blocking Unix stream socket with NUL framing, limits and fd passing."""

    __slots__ = (
        "_budget",
        "_drain_waiter",
        "_frame_bytes",
        "_frames",
        "_hangup_callback",
        "_idle_timeout",
        "_idle_timer",
        "_input_open",
        "_limits",
        "_log",
        "_loop",
        "_on_closed",
        "_out",
        "_out_bytes",
        "_partial_timer",
        "_rbuf",
        "_reading",
        "_unread_at_close",
        "_waiter",
        "_writing",
        "close_kind",
        "closed",
        "eof",
        "fd",
        "peer",
        "peer_class",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        *,
        peer: Peer,
        peer_class: PeerClass,
        limits: Limits,
        log: logging.Logger,
        on_closed: Callable[[Connection], None],
        budget: OutputBudget,
        idle_timeout: float | None = None,
    ) -> None:
        self._loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.peer_class = peer_class
        self._budget = budget  # unsent bytes of all this UID's connections
        # None: the connection may stay open with nothing to do (privileged peers).
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._frame_bytes = 0  # bytes in self._frames
        self._limits = limits
        self._log = log
        self._on_closed = on_closed
        self._rbuf = bytearray()  # bytes after the last NUL: a message being received
        self._frames: deque[bytes] = deque()  # complete messages not yet processed
        self._waiter: asyncio.Future[None] | None = None
        self._out: deque[_Outgoing] = deque()
        self._out_bytes = 0
        self._unread_at_close = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading = False
        self._writing = False
        self._input_open = True
        self._partial_timer: asyncio.TimerHandle | None = None
        self._hangup_callback: Callable[[], None] | None = None
        self.eof = False
        self.closed = False
        # Why abort() closed it: "idle", "slow", "output", "protocol" (None: a plain close).
        self.close_kind: str | None = None

    # ----------------------------------------------------------------- input

    def start_reading(self) -> None:
        if not self._reading and self._input_open and not self.eof and not self.closed:
            self._loop.add_reader(self.fd, self._on_readable)
            self._reading = True
            if self._rbuf:
                self._arm_partial_timer()

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False
        # While we do not read, a half-received message is our doing, not the client's.
        self._cancel_partial_timer()

    def shutdown_input(self) -> None:
        """Stops taking requests (server shutdown): queued ones are dropped."""
        self._input_open = False
        self._stop_reading()
        self._frames.clear()
        self._frame_bytes = 0
        self._wake()

    def set_hangup_callback(self, callback: Callable[[], None] | None) -> None:
        """Called when the client closes its end or the connection is closed (ends streams)."""
        self._hangup_callback = callback
        if callback is not None and (self.eof or self.closed):
            callback()

    async def next_frame(self) -> bytes | None:
        """The next complete message without its NUL; None once there will be none."""
        frames = self._frames
        while True:
            if self.closed:
                return None
            if frames:
                frame = frames.popleft()
                self._frame_bytes -= len(frame)
                if not self._reading and not self._input_full():
                    self.start_reading()
                return frame
            if self.eof or not self._input_open:
                return None
            waiter = self._loop.create_future()
            self._waiter = waiter
            if self._idle_timeout is not None:
                self._idle_timer = self._loop.call_later(self._idle_timeout, self._on_idle)
            try:
                await waiter
            finally:
                self._waiter = None
                if self._idle_timer is not None:
                    self._idle_timer.cancel()
                    self._idle_timer = None

    def _input_full(self) -> bool:
        # Count and bytes: 32 queued maximum-size requests would pin 2 MiB per
        # connection; one message's worth keeps pipelining and bounds memory.
        return (
            len(self._frames) >= self._limits.max_pending_requests
            or self._frame_bytes > self._limits.max_message_bytes
        )

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._rbuf:
            return  # a message is arriving: partial_message_timeout decides
        self.abort(f"idle for {self._idle_timeout:g} s", "idle")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.abort(f"read failed: {e}")
            return
        if not data:
            self._on_eof()
            return
        completed = self._split(data)
        if completed is None:
            return
        if self._rbuf:
            # The timer measures how long the current message has been arriving.
            if completed or self._partial_timer is None:
                self._arm_partial_timer()
        else:
            self._cancel_partial_timer()
        if completed:
            self._wake()
            if self._input_full():
                # Backpressure: a client that pipelines faster than we answer
                # waits in its own send() instead of growing our memory.
                self._stop_reading()

    def _split(self, data: bytes) -> bool | None:
        """Moves complete messages to the queue: True if any, None if a limit broke."""
        limit = self._limits.max_message_bytes
        rbuf = self._rbuf
        if not rbuf and data.find(b"\0") == len(data) - 1:
            # The common case: exactly one whole message in one read, no copying.
            if len(data) - 1 > limit:
                self.abort(f"message of {len(data) - 1} bytes exceeds the limit of {limit}")
                return None
            self._frames.append(data[:-1])
            self._frame_bytes += len(data) - 1
            return True
        # NULs can only be in the new data: the old remainder had none.
        scan = len(rbuf)
        rbuf += data
        start = 0
        while (end := rbuf.find(b"\0", scan)) >= 0:
            if end - start > limit:
                self.abort(f"message of {end - start} bytes exceeds the limit of {limit}")
                return None
            self._frames.append(bytes(rbuf[start:end]))
            self._frame_bytes += end - start
            start = scan = end + 1
        if start:
            del rbuf[:start]
        if len(rbuf) > limit:
            self.abort(f"no NUL within {limit} bytes (message too large)")
            return None
        return start > 0

    def _on_eof(self) -> None:
        self.eof = True
        self._stop_reading()
        self._rbuf.clear()  # a half-sent message can never complete now
        self._wake()
        if self._hangup_callback is not None:
            self._hangup_callback()

    def _arm_partial_timer(self) -> None:
        self._cancel_partial_timer()
        self._partial_timer = self._loop.call_later(
            self._limits.partial_message_timeout, self._on_partial_timeout
        )

    def _cancel_partial_timer(self) -> None:
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None

    def _on_partial_timeout(self) -> None:
        self._partial_timer = None
        self.abort(
            f"message incomplete after {self._limits.partial_message_timeout:g} s "
            f"({len(self._rbuf)} bytes received)",
            "slow",
        )

    # ----------------------------------------------------------------- output

    @property
    def pending_output(self) -> int:
        return self._out_bytes

    def unread_output(self) -> int | None:
        """How much of what was sent the peer has not read yet: bytes still queued
        here plus the socket's send queue, which for an AF_UNIX stream holds each
        message (and the descriptors it carries) until the peer has read it
        (SIOCOUTQ counts buffer space, not bytes: only zero is exact). None when
        this side closed with output unread: the peer can still read it, and it
        can no longer be observed."""
        if self.closed:
            return None if self._unread_at_close else 0
        return self._out_bytes + _send_queue(self.sock)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queues one encoded message; takes ownership of ``fds`` (closed once sent)."""
        if self.closed:
            close_fds(fds)
            return
        if not self._out:
            try:
                sent = self._send_now(data, fds)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                close_fds(fds)
                self.abort(f"write failed: {e}")
                return
            if sent:
                # The descriptors travel with the first byte; they are the peer's now.
                close_fds(fds)
                fds = ()
                if sent == len(data):
                    return
            view = memoryview(data)[sent:]
        else:
            view = memoryview(data)
        self._out.append(_Outgoing(view, fds))
        self._out_bytes += len(view)
        self._budget.used += len(view)
        if self._out_bytes > self._limits.max_queued_output_bytes:
            self.abort(f"{self._out_bytes} reply bytes unread (max_queued_output_bytes)", "output")
            return
        if self._budget.exceeded():
            self.abort(
                f"uid {self.peer.uid} leaves {self._budget.used} reply bytes unread "
                "(max_queued_output_bytes_per_uid)",
                "output",
            )
            return
        if not self._writing:
            self._loop.add_writer(self.fd, self._on_writable)
            self._writing = True

    def _send_now(self, data: bytes | memoryview, fds: Sequence[int]) -> int:
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            return self.sock.sendmsg([data], ancillary, _SEND_FLAGS)
        return self.sock.send(data, _SEND_FLAGS)

    def _on_writable(self) -> None:
        out = self._out
        while out:
            entry = out[0]
            view, fds = entry.data, entry.fds
            try:
                sent = self._send_now(view, fds)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.abort(f"write failed: {e}")
                return
            if fds:
                close_fds(fds)
                entry.fds = ()
            self._out_bytes -= sent
            self._budget.used -= sent
            if sent < len(view):
                entry.data = view[sent:]
                break
            out.popleft()
        if not out and self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self, low_water: int = 0) -> None:
        """Waits until at most ``low_water`` bytes are unsent (or the connection closed)."""
        while self._out_bytes > low_water and not self.closed:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            # An unprivileged client that reads nothing for the idle time is
            # gone as far as we are concerned; every byte it reads restarts this.
            timer = None
            if self._idle_timeout is not None:
                timer = self._loop.call_later(
                    self._idle_timeout,
                    self.abort,
                    f"replies unread for {self._idle_timeout:g} s",
                    "idle",
                )
            try:
                await waiter
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()

    # ----------------------------------------------------------------- closing

    def abort(self, reason: str, kind: str = "protocol") -> None:
        """Closes the connection because of ``reason`` (logged at debug level)."""
        if not self.closed:
            self.close_kind = kind
            self._log.debug(
                "varlink: closing connection of uid %d pid %d: %s",
                self.peer.uid,
                self.peer.pid,
                reason,
            )
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        for entry in self._out:
            close_fds(entry.fds)
        self._out.clear()
        self._budget.used -= self._out_bytes
        self._out_bytes = 0
        self._frames.clear()
        self._frame_bytes = 0
        self._unread_at_close = _send_queue(self.sock)
        self.sock.close()
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._hangup_callback is not None:
            self._hangup_callback()
        self._on_closed(self)
