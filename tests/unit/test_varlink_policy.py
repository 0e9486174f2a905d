"""The connection policy on a real socket: timeouts, class allowances, streams, queued output.

The server runs in a thread (ServerThread); the test process is root, so the
peer class comes from a classifier the test sets (the daemon's classifier, from
the tenant store and the admin group, is covered by tests/integration/test_hostile.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from nsd.varlink import idl
from nsd.varlink.client import VarlinkClient
from nsd.varlink.policy import Admission, PeerClass
from nsd.varlink.protocol import VarlinkError
from nsd.varlink.server import Call, Limits, Peer, Reply, VarlinkServer
from nsd.varlink.testing import ServerThread

POLICY = """\
# Methods to exercise the connection policy.
interface org.example.policy

# Echoes a text.
method Ping(
	# The text.
	text: string
) -> (
	# The same text.
	pong: string
)

# Sleeps, then answers.
method Sleep(
	# How long.
	seconds: float
) -> (
	# Always true.
	slept: bool
)

# Streams events until the client goes away; needs "more".
method Events() -> (
	# One event.
	i: int
)

# Answers with a text of the given size.
method Big(
	# Bytes.
	size: int
) -> (
	# That many "x".
	text: string
)
"""
ERRORS = "io.nsd.Daemon."


class Handlers:
    def __init__(self) -> None:
        self.cancelled = 0

    def table(self) -> dict[str, Any]:
        return {"Ping": self.ping, "Sleep": self.sleep, "Events": self.events, "Big": self.big}

    async def ping(self, call: Call) -> dict[str, Any]:
        return {"pong": call.parameters["text"]}

    async def sleep(self, call: Call) -> dict[str, Any]:
        try:
            await asyncio.sleep(call.parameters["seconds"])
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {"slept": True}

    async def events(self, call: Call) -> AsyncIterator[Reply]:
        i = 0
        while True:
            yield Reply({"i": i}, continues=True)
            i += 1
            await asyncio.sleep(3600)

    async def big(self, call: Call) -> dict[str, Any]:
        return {"text": "x" * call.parameters["size"]}


class Classes:
    """Peer class by the connecting pid's order: the test decides before connecting."""

    def __init__(self) -> None:
        self.next = PeerClass.TENANT

    def __call__(self, peer: Peer) -> PeerClass:
        return self.next


def daemon_idl() -> str:
    return (files("nsd.varlink") / "io.nsd.Daemon.varlink").read_text(encoding="utf-8")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nsd-policy-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(sockdir: Path, classes: Classes, **limits: Any) -> tuple[ServerThread, Handlers]:
    handlers = Handlers()
    # Root plays every class here, so its per-UID allowances must hold them all.
    limits.setdefault("uid_limit_exempt", frozenset())
    limits.setdefault("max_connections_per_uid", 64)
    limits.setdefault("max_connections_per_non_tenant", 64)

    def factory() -> VarlinkServer:
        server = VarlinkServer(
            vendor="t",
            product="t",
            version="1",
            url="u",
            limits=Limits(**limits),
            validate_replies=True,  # the server's own errors must match the shipped IDL
            internal_error_name="io.nsd.Daemon.InternalError",
            classify=classes,
        )
        server.add_interface(POLICY, handlers.table())

        async def unused(call: Call) -> None:
            raise AssertionError("not called")

        methods = idl.parse(daemon_idl()).methods
        server.add_interface(daemon_idl(), dict.fromkeys(methods, unused))
        return server

    return ServerThread(factory, str(sockdir / "sock"), grace=1.0), handlers


def connect(path: str, classes: Classes, cls: PeerClass) -> VarlinkClient:
    """A client admitted as ``cls`` (one round trip makes sure it was accepted)."""
    classes.next = cls
    client = VarlinkClient(path, timeout=5)
    client.call("org.example.policy.Ping", {"text": "hi"})
    return client


def wait_closed(sock: socket.socket, timeout: float = 5.0) -> float:
    """Seconds until the server closed ``sock`` (reading and discarding what it sends)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except ConnectionResetError:
            return time.monotonic() - started


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_idle_unprivileged_connections_are_closed_privileged_ones_kept(sockdir: Path) -> None:
    classes = Classes()
    st, _ = serve(sockdir, classes, idle_timeout=0.3)
    with st:
        admin = connect(st.path, classes, PeerClass.PRIVILEGED)
        tenant = connect(st.path, classes, PeerClass.TENANT)
        other = connect(st.path, classes, PeerClass.OTHER)
        idle_since = time.monotonic()
        for client in (tenant, other):
            sock = client._sock
            assert sock is not None
            wait_closed(sock)
            assert 0.2 < time.monotonic() - idle_since < 3
        time.sleep(0.4)  # past the idle bound: the admin's connection stays
        assert admin.call("org.example.policy.Ping", {"text": "a"}) == {"pong": "a"}
        assert st.server is not None and st.server.closes == {"idle": 2}
        # A call in progress is not idleness.
        classes.next = PeerClass.TENANT
        with VarlinkClient(st.path, timeout=5) as busy:
            assert busy.call("org.example.policy.Sleep", {"seconds": 0.6}) == {"slept": True}
        admin.close()


def test_slow_message_closes_the_connection(sockdir: Path) -> None:
    classes = Classes()
    st, _ = serve(sockdir, classes, partial_message_timeout=0.3, idle_timeout=5.0)
    with st:
        s = raw(st.path)
        started = time.monotonic()
        for byte in b'{"method":"org.example.policy.Ping"':  # one byte every 50 ms
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert wait_closed(s) + (time.monotonic() - started) < 3
        assert st.server is not None and st.server.closes == {"slow": 1}
        s.close()


def test_unprivileged_call_time_is_bounded(sockdir: Path) -> None:
    classes = Classes()
    st, handlers = serve(sockdir, classes, call_timeout=0.3)
    with st:
        with connect(st.path, classes, PeerClass.TENANT) as tenant:
            with pytest.raises(VarlinkError) as e:
                tenant.call("org.example.policy.Sleep", {"seconds": 30})
            assert e.value.name == ERRORS + "CallTimedOut"
            assert e.value.parameters == {"seconds": 0.3}
            assert handlers.cancelled == 1
            # The connection goes on serving.
            assert tenant.call("org.example.policy.Ping", {"text": "b"}) == {"pong": "b"}
        with connect(st.path, classes, PeerClass.PRIVILEGED) as admin:
            assert admin.call("org.example.policy.Sleep", {"seconds": 0.5}) == {"slept": True}


def test_streams_are_counted_per_uid(sockdir: Path) -> None:
    classes = Classes()
    st, _ = serve(sockdir, classes, max_streams_per_uid=2)
    with st:
        streams = []
        for _ in range(2):
            client = connect(st.path, classes, PeerClass.TENANT)
            items = client.call_more("org.example.policy.Events")
            assert next(items) == {"i": 0}
            streams.append((client, items))
        with connect(st.path, classes, PeerClass.TENANT) as third:
            with pytest.raises(VarlinkError) as e:
                next(third.call_more("org.example.policy.Events"))
            assert e.value.name == ERRORS + "StreamLimitReached"
            assert e.value.parameters == {"maximum": 2}
        # Ending a stream frees its slot.
        client, items = streams.pop()
        items.close()
        client.close()
        deadline = time.monotonic() + 5
        while True:
            with connect(st.path, classes, PeerClass.TENANT) as again:
                try:
                    assert next(again.call_more("org.example.policy.Events")) == {"i": 0}
                    break
                except VarlinkError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        # Privileged peers are not counted.
        with connect(st.path, classes, PeerClass.PRIVILEGED) as admin:
            assert next(admin.call_more("org.example.policy.Events")) == {"i": 0}
        for client, _items in streams:
            client.close()


def refusal(path: str) -> VarlinkError:
    """What our client reports for a connection the server refuses."""
    with VarlinkClient(path, timeout=5) as client, pytest.raises(VarlinkError) as e:
        client.call("org.example.policy.Ping", {"text": "x"})
    assert e.value.name == ERRORS + "ConnectionLimitReached"
    return e.value


def test_allowances_by_class_and_the_reserved_share(sockdir: Path) -> None:
    classes = Classes()
    st, _ = serve(
        sockdir,
        classes,
        max_connections=12,
        reserved_connections=4,
        max_connections_per_uid=5,
        max_connections_per_non_tenant=1,
        max_non_tenant_connections=3,
    )
    with st:
        held = [connect(st.path, classes, PeerClass.OTHER)]
        classes.next = PeerClass.OTHER
        assert "max_connections_per_non_tenant" in refusal(st.path).parameters["reason"]
        # The UID's connections count whatever class they were admitted in.
        held += [connect(st.path, classes, PeerClass.TENANT) for _ in range(4)]
        classes.next = PeerClass.TENANT
        assert "max_connections_per_uid" in refusal(st.path).parameters["reason"]
    # One UID cannot show the pools; test_admission_pools does (every peer is root here).
    for client in held:
        client.close()


def test_admission_pools() -> None:
    lim = Limits(
        max_connections=10,
        reserved_connections=3,
        max_connections_per_uid=4,
        max_connections_per_non_tenant=2,
        max_non_tenant_connections=3,
        uid_limit_exempt=frozenset({0}),
    )
    a = Admission(lim)

    def peer(uid: int) -> Peer:
        return Peer(uid=uid, gid=uid, pid=1, groups=())

    # Non-tenants: 2 per UID, 3 together.
    assert a.admit(peer(2000), PeerClass.OTHER) is None
    assert a.admit(peer(2000), PeerClass.OTHER) is None
    assert "max_connections_per_non_tenant" in (a.admit(peer(2000), PeerClass.OTHER) or "")
    assert a.admit(peer(2001), PeerClass.OTHER) is None
    assert "max_non_tenant_connections" in (a.admit(peer(2002), PeerClass.OTHER) or "")
    # Tenants fill the unprivileged share (7): 3 non-tenants + 4 of one tenant.
    for _ in range(4):
        assert a.admit(peer(1000), PeerClass.TENANT) is None
    assert "reserved_connections" in (a.admit(peer(1001), PeerClass.TENANT) or "")
    # The reserved 3 are the admins'; root is not counted at all.
    for _ in range(3):
        assert a.admit(peer(900), PeerClass.PRIVILEGED) is None
    assert "(max_connections)" in (a.admit(peer(901), PeerClass.PRIVILEGED) or "")
    for _ in range(50):
        assert a.admit(peer(0), PeerClass.PRIVILEGED) is None
    # Releasing gives the slot back to the same pool.
    a.release(peer(1000), PeerClass.TENANT)
    assert a.admit(peer(1001), PeerClass.TENANT) is None
    a.release(peer(2000), PeerClass.OTHER)
    assert a.admit(peer(2002), PeerClass.OTHER) is None


def big_request(size: int) -> bytes:
    return json.dumps({"method": "org.example.policy.Big", "parameters": {"size": size}}).encode()


def count_becomes(st: ServerThread, want: Any, timeout: float = 5.0) -> int:
    """Waits until the server's connection count satisfies ``want``; returns it."""
    server = st.server
    assert server is not None
    n: int = becomes(lambda: server.connection_count, want, timeout)
    return n


def becomes(read: Callable[[], Any], want: Any, timeout: float = 5.0) -> Any:
    """Waits until ``read()`` satisfies ``want`` (the server runs in another thread);
    returns its last value."""
    deadline = time.monotonic() + timeout
    while not want(value := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def test_queued_output_is_bounded_per_connection(sockdir: Path) -> None:
    classes = Classes()
    st, _ = serve(sockdir, classes, max_queued_output_bytes=512 * 1024)
    with st:
        classes.next = PeerClass.PRIVILEGED  # the per-connection bound holds for everyone
        small, large = raw(st.path), raw(st.path)
        small.sendall(big_request(300_000) + b"\0")  # fits: kernel buffer + queue
        large.sendall(big_request(2_000_000) + b"\0")  # does not: closed
        # The close itself first: the count is 1 too while the server has accepted
        # only one of the two connections.
        server = st.server
        assert server is not None
        assert becomes(lambda: dict(server.closes), lambda c: c) == {"output": 1}
        assert count_becomes(st, lambda n: n == 1) == 1
        reply = b""
        while not reply.endswith(b"\0"):
            reply += small.recv(1 << 20)
        assert len(json.loads(reply[:-1])["parameters"]["text"]) == 300_000
        small.close()
        large.close()


@pytest.mark.parametrize(
    ("cls", "survivors"), [(PeerClass.TENANT, "fewer"), (PeerClass.PRIVILEGED, "all")]
)
def test_queued_output_is_bounded_per_uid(sockdir: Path, cls: PeerClass, survivors: str) -> None:
    classes = Classes()
    st, _ = serve(
        sockdir,
        classes,
        max_pending_reply_bytes=64 * 1024,
        max_queued_output_bytes_per_uid=300 * 1024,
        idle_timeout=30.0,
    )
    with st:
        classes.next = cls
        socks = []
        for _ in range(6):
            s = raw(st.path)
            s.sendall((big_request(150_000) + b"\0") * 4)  # 600 KB of replies, never read
            socks.append(s)
        server = st.server
        assert server is not None
        assert count_becomes(st, lambda n: n == 6 or server.closes.get("output"))
        if survivors == "fewer":
            # Connections of the UID are closed once its queued bytes pass 300 KiB.
            assert count_becomes(st, lambda n: n < 6) < 6
            assert st.server is not None and st.server.closes.get("output", 0) >= 1
        else:
            time.sleep(0.5)  # privileged peers have no per-UID bound: nothing to await
            assert st.server is not None and st.server.connection_count == 6
            assert "output" not in st.server.closes
        for s in socks:
            s.close()
        classes.next = PeerClass.TENANT
        with connect(st.path, classes, PeerClass.TENANT) as fine:
            assert fine.call("org.example.policy.Ping", {"text": "ok"}) == {"pong": "ok"}


def test_client_waits_while_the_listen_queue_is_full(sockdir: Path) -> None:
    # A connect storm of other users can fill the queue; a client with a timeout
    # (non-blocking underneath) must wait for room, not fail at once with EAGAIN.
    path = str(sockdir / "full")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        while True:  # fill the queue
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            VarlinkClient(path, timeout=0.3)
        assert time.monotonic() - started >= 0.25

        # Room appears: the waiting client gets in.
        def make_room() -> None:
            listener.accept()[0].close()

        threading.Timer(0.2, make_room).start()
        VarlinkClient(path, timeout=5).close()
    finally:
        for s in queued:
            s.close()
        listener.close()
