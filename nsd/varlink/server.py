"""An asyncio varlink server (https://varlink.org) on a Unix stream socket.

Design, and why:

* One task per connection processes its requests strictly in order, which is
  what varlink requires for pipelined calls and bounds each client to one call
  in flight. Different connections run concurrently.
* Parameters are validated against the IDL before a handler runs, so handlers
  only see well-typed input; failures answer ``InvalidParameter``.
* Protocol violations (bad JSON, a non-object, unknown message keys, limits
  exceeded) close the connection, as systemd does; method-level problems
  (unknown interface or method, bad parameters) are error replies.
* A handler raising anything but :class:`VarlinkError` is a bug: it is logged
  with its traceback and answered with ``internal_error_name`` (default
  ``io.nsd.InternalError``, parameters ``{}`` so no internals leak to an
  untrusted caller). Varlink defines no standard error for this.
* ``upgrade`` is refused with ``org.varlink.service.InvalidParameter
  {"parameter": "upgrade"}``: no nsd method switches protocols.
* Admission (:mod:`.policy`): connection caps per class of peer and per UID,
  a share reserved for root and the admin group, streams per UID, queued
  output per connection and per UID. Over a cap, a new connection is accepted,
  sent ``<errors>.ConnectionLimitReached`` with the reason, and closed, so the
  client can say why instead of guessing that the daemon is down.
* Timeouts for unprivileged peers: an idle connection (no call in progress,
  none queued) is closed after ``idle_timeout``; a call is cancelled after
  ``call_timeout`` and answered ``<errors>.CallTimedOut``; a message that takes
  longer than ``partial_message_timeout`` to arrive closes the connection.
  ``<errors>`` is the interface of ``internal_error_name`` (io.nsd.Daemon).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from . import idl, wire
from .acceptor import Acceptor
from .calls import Call, CallDoneHook, Handler, Limits, Reply
from .connection import Connection
from .peer import Peer
from .policy import Admission, PeerClass
from .protocol import (
    EXPECTED_MORE,
    INTERFACE_NOT_FOUND,
    MAX_FDS_PER_MESSAGE,
    METHOD_NOT_FOUND,
    VarlinkError,
)
from .requests import HandlerBug, StreamSender, bind_unix_socket, drop, parse_request

__all__ = [
    "Call",
    "CallDoneHook",
    "Handler",
    "Limits",
    "Peer",
    "PeerClass",
    "Reply",
    "VarlinkError",
    "VarlinkServer",
    "bind_unix_socket",
]


#: Seconds a stream may spend sending ready items before it lets the loop turn. A
#: stream whose items are all ready (a Watch client's queue during a burst of 1,000
#: fault events) would otherwise encode and send all of them in one callback while
#: every other call waits (stalls of up to 10 ms, measured). Not one item per turn
#: either: the fault recorder queues 4 events per turn, and a watcher that sends
#: fewer falls behind (the recorder then waits for it, nsd.core.faultrecord._Pacer).
STREAM_TURN = 0.001


@dataclass(frozen=True, slots=True)
class _Method:
    interface: str
    name: str
    handler: Callable[[Call], Any]
    validator: idl.InterfaceValidator


def _service_idl() -> str:
    return (files(__package__) / "org.varlink.service.varlink").read_text(encoding="utf-8")


class VarlinkServer:
    def __init__(
        self,
        *,
        vendor: str,
        product: str,
        version: str,
        url: str,
        limits: Limits | None = None,
        validate_replies: bool = False,
        internal_error_name: str = "io.nsd.InternalError",
        on_call_done: CallDoneHook | None = None,
        logger: logging.Logger | None = None,
        classify: Callable[[Peer], PeerClass] | None = None,
    ) -> None:
        if not idl.is_qualified_name(internal_error_name):
            raise ValueError(f"invalid error name {internal_error_name!r}")
        self._info = {"vendor": vendor, "product": product, "version": version, "url": url}
        self._limits = limits or Limits()
        self._validate_replies = validate_replies
        self._internal_error_name = internal_error_name
        # The server's own errors (limits, timeouts) live in the same interface.
        self._errors = internal_error_name.rpartition(".")[0]
        self._on_call_done = on_call_done
        self._log = logger or logging.getLogger("nsd.varlink")
        self._interfaces: dict[str, idl.Interface] = {}
        self._validators: dict[str, idl.InterfaceValidator] = {}
        self._methods: dict[str, _Method] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        self._admission = Admission(self._limits)
        # Connections the server closed, by Connection.close_kind, and refused.
        self.closes: dict[str, int] = {}
        self._streaming: set[Connection] = set()
        self._acceptor = Acceptor(
            self._admission,
            classify,
            self._limits.uid_limit_exempt,
            self._log,
            errors=self._errors,
            closes=self.closes,
            on_admitted=self._connect,
        )
        self.add_interface(
            _service_idl(),
            {"GetInfo": self._get_info, "GetInterfaceDescription": self._get_description},
        )

    # ---------------------------------------------------------------- set-up

    def add_interface(self, idl_text: str, handlers: Mapping[str, Handler]) -> None:
        """Registers an interface; every method needs a handler, and only those."""
        iface = idl.parse(idl_text)
        if iface.name in self._interfaces:
            raise ValueError(f"interface {iface.name} is already registered")
        missing = set(iface.methods) - set(handlers)
        extra = set(handlers) - set(iface.methods)
        if missing or extra:
            raise ValueError(
                f"handlers for {iface.name} do not match its methods: "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        validator = idl.InterfaceValidator(iface)
        self._interfaces[iface.name] = iface
        self._validators[iface.name] = validator
        for name in iface.methods:
            self._methods[f"{iface.name}.{name}"] = _Method(
                iface.name, name, handlers[name], validator
            )

    @property
    def interfaces(self) -> Mapping[str, idl.Interface]:
        return self._interfaces

    async def start(self, sock: socket.socket) -> None:
        """Serves on a bound, listening AF_UNIX stream socket (e.g. from socket activation)."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("varlink needs an AF_UNIX SOCK_STREAM socket")
        self._loop = asyncio.get_running_loop()
        self._acceptor.listen(sock, self._loop)

    def adopt(self, sock: socket.socket) -> None:
        """Serves a connected socket as if accepted (one end of a socketpair: fuzzing)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._acceptor.admit(sock, self._loop)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _connect(self, sock: socket.socket, peer: Peer, cls: PeerClass) -> None:
        """Serves an admitted connection (the acceptor's ``on_admitted``)."""
        loop = self._running_loop()
        unprivileged = cls is not PeerClass.PRIVILEGED
        conn = Connection(
            loop,
            sock,
            peer=peer,
            peer_class=cls,
            limits=self._limits,
            log=self._log,
            on_closed=self._on_connection_closed,
            budget=self._admission.budget(peer),
            idle_timeout=self._limits.idle_timeout if unprivileged else None,
        )
        self._connections[conn] = loop.create_task(self._serve(conn))
        conn.start_reading()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the varlink server is not serving")
        return self._loop

    def _on_connection_closed(self, conn: Connection) -> None:
        self._admission.release(conn.peer, conn.peer_class)
        if conn.close_kind is not None:
            self.closes[conn.close_kind] = self.closes.get(conn.close_kind, 0) + 1

    # ---------------------------------------------------------------- serving

    async def _serve(self, conn: Connection) -> None:
        high_water = self._limits.max_pending_reply_bytes
        try:
            while not self._closing:
                frame = await conn.next_frame()
                if frame is None:
                    break
                if not await self._process(conn, frame):
                    break
                if conn.pending_output > high_water:
                    await conn.drain(high_water // 4)
            # Deliver what was answered before closing (a client may have
            # half-closed its end and still be reading).
            await conn.drain()
        except asyncio.CancelledError:
            pass
        except Exception:
            self._log.exception("varlink: connection of uid %d failed", conn.peer.uid)
        finally:
            conn.close()
            self._connections.pop(conn, None)

    async def _process(self, conn: Connection, frame: bytes) -> bool:
        """Handles one message; False if it violates the protocol (close the connection)."""
        try:
            message = wire.decode(frame, self._limits.max_json_depth)
        except ValueError as e:
            conn.abort(f"invalid JSON: {e}")
            return False
        request = parse_request(message)
        if request is None:
            conn.abort("malformed call message")
            return False
        method, parameters, oneway, more, upgrade = request
        entry = self._methods.get(method)
        if entry is None:
            if not oneway:
                self._send_error(conn, self._not_found(method))
            return True
        await self._call(
            conn,
            entry,
            Call(entry.interface, entry.name, parameters, conn.peer, more, oneway, conn.sock, conn),
            upgrade,
        )
        return not conn.closed

    async def _call(self, conn: Connection, entry: _Method, call: Call, upgrade: bool) -> None:
        """Validates, runs the handler, replies; every failure becomes an error reply."""
        started = time.perf_counter()
        error_name: str | None = None
        try:
            if upgrade:
                raise VarlinkError.invalid_parameter("upgrade")
            bad = entry.validator.call(entry.name, call.parameters)
            if bad is not None:
                raise VarlinkError.invalid_parameter(bad)
            await self._run(conn, entry, call)
        except VarlinkError as e:
            error_name = self._reply_error(conn, entry, e, call.oneway)
        except HandlerBug as e:
            error_name = self._internal_error(conn, call.oneway, entry, str(e), None)
        except asyncio.CancelledError:
            # The client left mid-stream, or the server is shutting down.
            self._call_done(entry, None, time.perf_counter() - started)
            raise
        except Exception as e:
            error_name = self._internal_error(conn, call.oneway, entry, "handler raised", e)
        self._call_done(entry, error_name, time.perf_counter() - started)

    async def _run(self, conn: Connection, entry: _Method, call: Call) -> None:
        result = entry.handler(call)
        if inspect.isasyncgen(result):
            if not call.more:
                await result.aclose()
                raise VarlinkError(EXPECTED_MORE)
            await self._stream(conn, entry, result)
            return
        if conn.peer_class is PeerClass.PRIVILEGED:
            # Privileged calls change host state (Create, Remove, Reconcile):
            # cancelling one half-way would leave partial state, and their own
            # steps are bounded (lock_timeout, stop_timeout, systemd job waits).
            value = await result
        else:
            seconds = self._limits.call_timeout
            try:
                async with asyncio.timeout(seconds):
                    value = await result
            except TimeoutError:
                raise VarlinkError(f"{self._errors}.CallTimedOut", {"seconds": seconds}) from None
        reply = _as_reply(value)
        if call.oneway:
            drop(reply)
        else:
            self._send_reply(conn, entry, reply, continues=False)

    def _not_found(self, method: str) -> VarlinkError:
        iface, dot, _name = method.rpartition(".")
        if dot and iface not in self._interfaces and idl.is_interface_name(iface):
            return VarlinkError(INTERFACE_NOT_FOUND, {"interface": iface})
        return VarlinkError(METHOD_NOT_FOUND, {"method": method})

    async def _stream(self, conn: Connection, entry: _Method, stream: AsyncIterator[Any]) -> None:
        """Sends a streaming handler's items; see :class:`Reply` for ``continues``."""
        high_water = self._limits.max_pending_reply_bytes
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a stream must be sent from a task")
        token = self._admission.start_stream(conn.peer, conn.peer_class)
        if token is None:
            if aclose := getattr(stream, "aclose", None):
                await aclose()
            raise VarlinkError(
                f"{self._errors}.StreamLimitReached",
                {"maximum": self._limits.max_streams_per_uid},
            )
        sender = StreamSender(lambda r, c: self._send_reply(conn, entry, r, continues=c))
        # The client going away must end the stream (and close the generator)
        # at once, not when the next item fails to send.
        conn.set_hangup_callback(lambda: _cancel(task))
        self._streaming.add(conn)
        turn = time.perf_counter()
        try:
            async for item in stream:
                sender.add(_as_reply(item))
                if sender.finished or conn.closed:
                    break
                if conn.pending_output > high_water:
                    await conn.drain(high_water // 4)
                    turn = time.perf_counter()
                elif time.perf_counter() - turn > STREAM_TURN:
                    await asyncio.sleep(0)
                    turn = time.perf_counter()
        except Exception:
            # The handler failed after yielding: deliver what it produced, then
            # the error reply (sent by our caller) ends the call.
            sender.flush(continues=True)
            raise
        else:
            sender.finish(connected=not conn.closed)
        finally:
            self._admission.end_stream(token)
            self._streaming.discard(conn)
            conn.set_hangup_callback(None)
            sender.discard()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    # ---------------------------------------------------------------- replies

    def _send_reply(self, conn: Connection, entry: _Method, reply: Reply, continues: bool) -> None:
        try:
            if len(reply.fds) > MAX_FDS_PER_MESSAGE:
                raise HandlerBug(f"reply carries {len(reply.fds)} descriptors")
            parameters = reply.parameters
            if type(parameters) is not dict:
                parameters = dict(parameters)
            if self._validate_replies:
                bad = entry.validator.reply(entry.name, parameters)
                if bad is not None:
                    raise HandlerBug(f"reply parameter {bad!r} does not match the IDL")
            message: dict[str, Any] = {"parameters": parameters}
            if continues:
                message["continues"] = True
            try:
                data = wire.encode(message)
            except (TypeError, ValueError) as e:
                raise HandlerBug(f"reply is not JSON: {e}") from e
        except BaseException:
            drop(reply)
            raise
        conn.send(data, reply.fds)
        if reply.released is not None:
            reply.released()

    def _send_error(self, conn: Connection, error: VarlinkError) -> None:
        conn.send(wire.encode({"error": error.name, "parameters": error.parameters}))

    def _reply_error(
        self, conn: Connection, entry: _Method, error: VarlinkError, oneway: bool
    ) -> str:
        problem = self._check_error(error)
        if problem is not None:
            return self._internal_error(conn, oneway, entry, problem, None)
        if not oneway:
            try:
                self._send_error(conn, error)
            except (TypeError, ValueError) as e:
                return self._internal_error(conn, oneway, entry, f"error is not JSON: {e}", None)
        return error.name

    def _check_error(self, error: VarlinkError) -> str | None:
        """Why an error raised by a handler cannot be sent as is, or None."""
        name = error.name
        if not isinstance(name, str) or not idl.is_qualified_name(name):
            return f"invalid error name {name!r}"
        if not self._validate_replies or name == self._internal_error_name:
            return None
        iface, _, short = name.rpartition(".")
        validator = self._validators.get(iface)
        if validator is None or short not in validator.interface.errors:
            return f"error {name} is not defined in a registered interface"
        bad = validator.error(short, error.parameters)
        if bad is not None:
            return f"error {name} parameter {bad!r} does not match the IDL"
        return None

    def _internal_error(
        self,
        conn: Connection,
        oneway: bool,
        entry: _Method,
        problem: str,
        exc: BaseException | None,
    ) -> str:
        self._log.error("varlink: %s.%s: %s", entry.interface, entry.name, problem, exc_info=exc)
        if not oneway and not conn.closed:
            self._send_error(conn, VarlinkError(self._internal_error_name))
        return self._internal_error_name

    def _call_done(self, entry: _Method, error: str | None, seconds: float) -> None:
        if self._on_call_done is None:
            return
        try:
            self._on_call_done(entry.interface, entry.name, error, seconds)
        except Exception:
            self._log.exception("varlink: on_call_done hook failed")

    # ---------------------------------------------------------------- org.varlink.service

    async def _get_info(self, call: Call) -> dict[str, Any]:
        return {**self._info, "interfaces": sorted(self._interfaces)}

    async def _get_description(self, call: Call) -> dict[str, Any]:
        name = call.parameters["interface"]
        iface = self._interfaces.get(name)
        if iface is None:
            raise VarlinkError(INTERFACE_NOT_FOUND, {"interface": name})
        return {"description": iface.text}

    # ---------------------------------------------------------------- shutdown

    async def close(self, grace: float) -> None:
        """Stops accepting, lets calls in progress finish for up to ``grace`` s, then cancels.

        Streaming calls (subscriptions such as Watch) are ended at once: they
        never finish by themselves. Requests queued behind a call are dropped.
        """
        self._closing = True
        self._acceptor.close()
        for conn in list(self._connections):
            conn.shutdown_input()
            if conn in self._streaming:
                self._connections[conn].cancel()
        tasks = list(self._connections.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._connections):
            conn.close()


def _cancel(task: asyncio.Task[Any]) -> None:
    # From the task itself (a failed send closed the connection), the stream
    # notices the closed connection on its own; cancelling would only disturb
    # the generator's clean-up.
    if asyncio.current_task() is not task:
        task.cancel()


def _as_reply(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    if value is None:
        return Reply({})
    if isinstance(value, Mapping):
        return Reply(value)
    raise HandlerBug(f"handler returned {type(value).__name__}, not a Reply, dict or None")
