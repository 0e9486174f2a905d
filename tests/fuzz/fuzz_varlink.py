"""The varlink server as a hostile peer reaches it: framing, JSON, IDL validation, dispatch.

Each input is the byte stream one client sends on one connection (NUL-framed
messages, split at arbitrary points); the server is nsd's own VarlinkServer with
the shipped io.nsd.Tenant and io.nsd.Daemon interfaces and stub handlers that
answer with declared errors or IDL-valid replies. The properties checked:

* the server answers every input and closes the connection within a bound
  (no hang, no handler left running);
* every reply is a JSON object with ``parameters`` or an ``error`` that one of
  the registered interfaces (or org.varlink.service) declares, never
  ``InternalError`` (that would be a server bug: the stubs never fail);
* the server keeps serving: no exception escapes, no connection is left behind.

Run: ``python tests/fuzz/fuzz_varlink.py tests/fuzz/corpus/varlink -max_total_time=60``
(``scripts/fuzz`` does that for every target); under pytest,
tests/unit/test_fuzz_varlink_seeds.py replays the corpus without the engine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

try:
    import atheris
except ImportError:  # replaying the seeds needs no engine
    atheris = None

_ENGINE = atheris is not None and __name__ == "__main__"
if _ENGINE:
    with atheris.instrument_imports(include=["nsd"]):
        from nsd.varlink import idl, server
else:
    from nsd.varlink import idl, server

DEADLINE = 5.0  # seconds an input may take in total: more is a hang
MAX_INPUT = 256 * 1024
SERVICE_ERRORS = frozenset(
    "org.varlink.service." + e
    for e in ("InterfaceNotFound", "MethodNotFound", "MethodNotImplemented", "InvalidParameter",
              "PermissionDenied", "ExpectedMore")
)  # fmt: skip


def _idl(name: str) -> str:
    return (files("nsd.varlink") / f"{name}.varlink").read_text(encoding="utf-8")


def _handlers(iface: idl.Interface) -> dict[str, Any]:
    """Stubs: Get answers a valid reply for "alice"; streams yield one item; the rest
    answer a declared error (what the real handlers do for most hostile input)."""
    tenant = {"name": "alice", "uid": 1001, "state": "ready", "namespacePath": "/run/netns/alice",
              "namespaceInode": None, "hostInterface": "nsd1001", "tenantInterface": "eth0",
              "ipv4Address": "100.64.0.2", "ipv4Gateway": "100.64.0.1",
              "ipv6Address": "fd00::2", "ipv6Prefix": "fd00::/64", "ipv6Gateway": "fe80::1",
              "adopted": False, "createdUSec": 1, "slice": None, "problems": []}  # fmt: skip

    async def get(call: server.Call) -> dict[str, Any]:
        if call.parameters["name"] != "alice":
            raise server.VarlinkError(
                f"{call.interface}.NoSuchTenant", {"name": call.parameters["name"]}
            )
        return {"tenant": tenant}

    async def watch(call: server.Call) -> AsyncIterator[server.Reply]:
        yield server.Reply({"event": "existing", "tenant": tenant}, continues=True)
        yield server.Reply({"event": "synced"}, continues=False)

    async def refuse(call: server.Call) -> None:
        raise server.VarlinkError.permission_denied()

    table: dict[str, Any] = dict.fromkeys(iface.methods, refuse)
    if iface.name == "io.nsd.Tenant":
        table |= {"Get": get, "Watch": watch}
    return table


def _server() -> server.VarlinkServer:
    srv = server.VarlinkServer(
        vendor="nsd", product="nsd", version="fuzz", url="https://example.org",
        validate_replies=True, internal_error_name="io.nsd.Daemon.InternalError",
        # Small limits, so inputs of a fuzzer's size reach them.
        limits=server.Limits(max_message_bytes=4096, max_json_depth=16, max_pending_requests=4,
                             max_pending_reply_bytes=8192, partial_message_timeout=DEADLINE),
    )  # fmt: skip
    for name in ("io.nsd.Tenant", "io.nsd.Daemon"):
        text = _idl(name)
        srv.add_interface(text, _handlers(idl.parse(text)))
    return srv


_LOOP = asyncio.new_event_loop()
_SERVER = _server()
_DECLARED = (
    frozenset(
        f"{iface.name}.{err}" for iface in _SERVER.interfaces.values() for err in iface.errors
    )
    | SERVICE_ERRORS
)


async def _exchange(data: bytes) -> list[bytes]:
    """Sends ``data`` as one client, half-closes, returns every reply until the close."""
    client, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    _SERVER.adopt(served)
    replies = bytearray()

    async def send() -> None:
        try:
            await _LOOP.sock_sendall(client, data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (a protocol violation): fine

    async def receive() -> None:
        while chunk := await _LOOP.sock_recv(client, 65536):
            replies.extend(chunk)

    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(send(), receive())
    finally:
        client.close()
    frames = bytes(replies).split(b"\0")
    # A clean close never cuts a reply in half.
    assert frames[-1] == b"", f"reply cut short: {frames[-1][:200]!r}"
    return frames[:-1]


def _check(frame: bytes) -> None:
    message = json.loads(frame)
    assert isinstance(message, dict), frame[:200]
    error = message.get("error")
    if error is not None:
        assert error in _DECLARED, f"undeclared error {error!r}"
        assert error != "io.nsd.Daemon.InternalError", "the server failed"
    assert isinstance(message.get("parameters", {}), dict), frame[:200]


def test_one_input(data: bytes) -> None:
    data = data[:MAX_INPUT]
    try:
        frames = _LOOP.run_until_complete(_exchange(data))
    except TimeoutError:
        raise AssertionError(f"no close within {DEADLINE} s: a hang") from None
    for frame in frames:
        _check(frame)
    # Let the connection's task finish; none may be left behind.
    _LOOP.run_until_complete(asyncio.sleep(0))
    for _ in range(100):
        if _SERVER.connection_count == 0:
            break
        _LOOP.run_until_complete(asyncio.sleep(0.001))
    assert _SERVER.connection_count == 0, "a connection outlived its client"


if __name__ == "__main__":
    assert atheris is not None, "pip install atheris (the test extra has it)"
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
