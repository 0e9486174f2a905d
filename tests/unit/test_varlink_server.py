"""The varlink server on real Unix sockets, with real clients (ours, PyPI varlink, raw).

The server runs on its own loop in a thread (nsd.varlink.testing.ServerThread),
so blocking clients can talk to it from the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import varlink

from nsd.varlink import idl
from nsd.varlink.client import VarlinkClient
from nsd.varlink.protocol import ServiceUnavailable, VarlinkConnectionError, VarlinkError
from nsd.varlink.server import (
    STREAM_TURN,
    Call,
    Limits,
    Reply,
    VarlinkServer,
    bind_unix_socket,
)
from nsd.varlink.testing import ServerThread
from tests.samples import tenant_record

DEMO = """\
# A demo interface for the server tests.
interface org.example.demo

# An item of a stream.
type Item (
	# Its position.
	i: int
)

# Echoes a text.
method Ping(
	# The text.
	text: string
) -> (
	# The same text.
	pong: string
)

# Tells who called, as the kernel sees it.
method Whoami() -> (
	# The caller's UID.
	uid: int,
	# The caller's GID.
	gid: int,
	# The caller's PID.
	pid: int,
	# The caller's supplementary groups.
	groups: []int,
	# The PID behind a pidfd of the caller, if the kernel has SO_PEERPIDFD.
	pidfdPid: ?int
)

# Streams n items; needs "more". Fails after |n| items if n is negative.
method Count(
	# How many.
	n: int
) -> (
	# One item.
	item: Item
)

# Streams live events until the client goes away; needs "more".
method Events() -> (
	# One event.
	i: int
)

# Fails in the requested way.
method Fail(
	# "defined", "undefined", "crash", "bad-reply", "bad-error", "not-json".
	kind: string
) -> (
	# Never returned.
	never: ?string
)

# Sleeps, then answers.
method Sleep(
	# How long.
	seconds: float
) -> (
	# Always true.
	slept: bool
)

# Records a note; meant to be called oneway.
method Note(
	# The note.
	text: string
) -> ()

# Opens a file and passes its descriptor.
method Open(
	# The file.
	path: string
) -> (
	# Index of the descriptor among those sent with the reply.
	fileDescriptor: int
)

# Takes everything the IDL knows.
method Types(
	# A bool.
	flag: bool,
	# A float.
	ratio: float,
	# An enum.
	level: (
		# Low.
		low,
		# High.
		high
	),
	# A map.
	counts: [string]int,
	# Items.
	items: []Item,
	# Anything.
	extra: ?object
) -> (
	# The parameters as received.
	echo: object
)

# The demo failed as asked.
error Failed (
	# Why.
	reason: string
)
"""


class Demo:
    """Handlers with probes the tests look at (from the test's thread)."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.noted = threading.Event()
        self.events_closed = threading.Event()
        self.events_started = threading.Event()
        self.sleep_started = threading.Event()
        self.sleep_cancelled = threading.Event()
        self.calls_done: list[tuple[str, str, str | None, float]] = []
        self._done = threading.Condition()
        #: turns of the server's loop (counted by a task of a test), seen by Count
        self.loop_turns = 0
        self.count_seen_turns: list[int] = []
        #: seconds of work per item of Count (busy, holding the loop)
        self.count_item_cost = 0.0

    def handlers(self) -> dict[str, Any]:
        return {
            "Ping": self.ping,
            "Whoami": self.whoami,
            "Count": self.count,
            "Events": self.events,
            "Fail": self.fail,
            "Sleep": self.sleep,
            "Note": self.note,
            "Open": self.open,
            "Types": self.types,
        }

    async def ping(self, call: Call) -> dict[str, Any]:
        return {"pong": call.parameters["text"]}

    async def whoami(self, call: Call) -> dict[str, Any]:
        p = call.peer
        pidfd = call.open_peer_pidfd()
        pidfd_pid = None
        if pidfd is not None:
            try:
                info = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
                pidfd_pid = int(
                    next(x for x in info.splitlines() if x.startswith("Pid:")).split()[1]
                )
            finally:
                os.close(pidfd)
        return {
            "uid": p.uid,
            "gid": p.gid,
            "pid": p.pid,
            "groups": list(p.groups),
            "pidfdPid": pidfd_pid,
        }

    async def count(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        n = call.parameters["n"]
        for i in range(abs(n)):
            self.count_seen_turns.append(self.loop_turns)
            busy_until = time.perf_counter() + self.count_item_cost
            while time.perf_counter() < busy_until:
                pass
            yield {"item": {"i": i}}
        if n < 0:
            raise VarlinkError("org.example.demo.Failed", {"reason": "negative"})

    async def events(self, call: Call) -> AsyncIterator[Reply]:
        self.events_started.set()
        try:
            i = 0
            while True:
                yield Reply({"i": i}, continues=True)
                i += 1
                await asyncio.sleep(0.01 if i < 3 else 3600)
        finally:
            self.events_closed.set()

    async def fail(self, call: Call) -> dict[str, Any]:
        kind = call.parameters["kind"]
        if kind == "defined":
            raise VarlinkError("org.example.demo.Failed", {"reason": "asked to"})
        if kind == "undefined":
            raise VarlinkError("org.example.demo.NotInTheIdl")
        if kind == "bad-error":
            raise VarlinkError("org.example.demo.Failed", {"reason": 42})
        if kind == "bad-reply":
            return {"never": 1}
        if kind == "not-json":
            return {"never": {1, 2}}
        raise RuntimeError("handler bug")

    async def sleep(self, call: Call) -> dict[str, Any]:
        self.sleep_started.set()
        try:
            await asyncio.sleep(call.parameters["seconds"])
        except asyncio.CancelledError:
            self.sleep_cancelled.set()
            raise
        return {"slept": True}

    async def note(self, call: Call) -> None:
        self.notes.append(call.parameters["text"])
        self.noted.set()

    async def open(self, call: Call) -> Reply:
        fd = os.open(call.parameters["path"], os.O_RDONLY | os.O_CLOEXEC)
        return Reply({"fileDescriptor": 0}, fds=[fd])

    async def types(self, call: Call) -> dict[str, Any]:
        return {"echo": call.parameters}

    def on_call_done(self, interface: str, method: str, error: str | None, seconds: float) -> None:
        # The server calls this after the reply went out (and its descriptors were closed).
        with self._done:
            self.calls_done.append((interface, method, error, seconds))
            self._done.notify_all()

    def wait_calls_done(self, n: int, timeout: float = 5.0) -> None:
        """Until the server reported ``n`` finished calls in all."""
        with self._done:
            if not self._done.wait_for(lambda: len(self.calls_done) >= n, timeout):
                raise AssertionError(f"{len(self.calls_done)} calls reported done, not {n}")


def tenant_handlers() -> dict[str, Any]:
    """Trivial handlers for the shipped io.nsd.Tenant IDL."""
    tenant = tenant_record()

    async def get(call: Call) -> dict[str, Any]:
        if call.parameters["name"] != "alice":
            raise VarlinkError("io.nsd.Tenant.NoSuchTenant", {"name": call.parameters["name"]})
        return {"tenant": tenant}

    async def unsupported(call: Call) -> None:
        raise VarlinkError("io.nsd.Tenant.ShuttingDown")

    async def watch(call: Call) -> AsyncIterator[Reply]:
        yield Reply({"event": "existing", "tenant": tenant}, continues=True)
        yield Reply({"event": "synced"}, continues=False)

    names = [m for m in idl.parse(shipped("io.nsd.Tenant")).methods if m not in ("Get", "Watch")]
    return {"Get": get, "Watch": watch} | dict.fromkeys(names, unsupported)


def shipped(name: str) -> str:
    return (files("nsd.varlink") / f"{name}.varlink").read_text(encoding="utf-8")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not tmp_path: its parents are 0700, and a test connects as nobody.
    path = Path(tempfile.mkdtemp(prefix="nsd-varlink-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(
    sockdir: Path, limits: Limits | None = None, grace: float = 1.0
) -> tuple[ServerThread, Demo]:
    demo = Demo()

    def factory() -> VarlinkServer:
        server = VarlinkServer(
            vendor="nsd project",
            product="nsd",
            version="0.1.0",
            url="https://example.org/nsd",
            limits=limits,
            validate_replies=True,
            on_call_done=demo.on_call_done,
        )
        server.add_interface(DEMO, demo.handlers())
        server.add_interface(shipped("io.nsd.Tenant"), tenant_handlers())
        return server

    return ServerThread(factory, str(sockdir / "varlink"), grace=grace), demo


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[str, Demo]]:
    st, demo = start(sockdir)
    with st:
        yield st.path, demo


class Raw:
    """A bare socket speaking bytes, to send what no proper client would."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\0"
        self.sock.sendall(data)

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None if the server closed the connection."""
        while b"\0" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buf += data
        frame, _, self.buf = self.buf.partition(b"\0")
        result: dict[str, Any] = json.loads(frame)
        return result

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def refusal(self) -> str:
        """The reason of a ConnectionLimitReached refusal, after which the server closed."""
        message = self.receive()
        assert message is not None and message["error"].endswith(".ConnectionLimitReached")
        assert self.closed_by_server()
        reason: str = message["parameters"]["reason"]
        return reason

    def close(self) -> None:
        self.sock.close()


def ping(path: str, text: str = "alive") -> None:
    """The daemon still serves a fresh client."""
    with VarlinkClient(path, timeout=5) as client:
        assert client.call("org.example.demo.Ping", {"text": text}) == {"pong": text}


# --------------------------------------------------------------------------- third-party client


def test_pypi_varlink_client_gets_info_description_and_calls(served: tuple[str, Demo]) -> None:
    path, _ = served
    with varlink.Client(address=f"unix:{path}") as client:
        assert client.get_interfaces() == [
            "io.nsd.Tenant",
            "org.example.demo",
            "org.varlink.service",
        ]
        assert client.info["vendor"] == "nsd project"
        assert client.info["product"] == "nsd"
        assert client.info["version"] == "0.1.0"
        assert client.info["url"] == "https://example.org/nsd"
        # open() fetches and parses our IDL with the package's own parser.
        with client.open("org.example.demo") as demo:
            assert demo.Ping("hello") == {"pong": "hello"}
            assert [r["item"]["i"] for r in demo.Count(3, _more=True)] == [0, 1, 2]
        with client.open("io.nsd.Tenant") as tenants:
            reply = tenants.Get("alice")
            assert reply["tenant"]["uid"] == 1001
            assert reply["tenant"].get("namespaceInode") is None  # it drops nulls
            with pytest.raises(varlink.VarlinkError) as info:
                tenants.Get("bob")
            assert info.value.error() == "io.nsd.Tenant.NoSuchTenant"
            assert info.value.parameters() == {"name": "bob"}
            assert [e["event"] for e in tenants.Watch(_more=True)] == ["existing", "synced"]


def test_interface_description_is_the_idl_verbatim(served: tuple[str, Demo]) -> None:
    path, _ = served
    with VarlinkClient(path) as client:
        for name, text in [("org.example.demo", DEMO), ("io.nsd.Tenant", shipped("io.nsd.Tenant"))]:
            reply = client.call("org.varlink.service.GetInterfaceDescription", {"interface": name})
            assert reply == {"description": text}
        service = client.call(
            "org.varlink.service.GetInterfaceDescription", {"interface": "org.varlink.service"}
        )
        assert "method GetInterfaceDescription" in service["description"]
        with pytest.raises(VarlinkError) as info:
            client.call("org.varlink.service.GetInterfaceDescription", {"interface": "no.such"})
        assert info.value.name == "org.varlink.service.InterfaceNotFound"
        assert info.value.parameters == {"interface": "no.such"}


# systemd >= 255 ships varlinkctl; NSD_VARLINKCTL points at one elsewhere.
VARLINKCTL = os.environ.get("NSD_VARLINKCTL") or shutil.which("varlinkctl")


def varlinkctl(*args: str) -> subprocess.CompletedProcess[str]:
    assert VARLINKCTL is not None
    return subprocess.run(
        [VARLINKCTL, *args], check=False, capture_output=True, text=True, timeout=10
    )


@pytest.mark.skipif(VARLINKCTL is None, reason="varlinkctl missing (systemd < 255)")
def test_varlinkctl(served: tuple[str, Demo]) -> None:
    path, demo = served
    address = f"unix:{path}"
    info = varlinkctl("info", address)
    assert info.returncode == 0, info.stderr
    assert "nsd project" in info.stdout
    assert "org.example.demo" in info.stdout
    # introspect parses what we serve with systemd's own IDL parser.
    for iface in ["io.nsd.Tenant", "org.example.demo", "org.varlink.service"]:
        out = varlinkctl("introspect", address, iface)
        assert out.returncode == 0, out.stderr
        assert f"interface {iface}" in out.stdout
    out = varlinkctl("call", address, "org.example.demo.Ping", '{"text":"x"}')
    assert json.loads(out.stdout) == {"pong": "x"}
    out = varlinkctl("call", "--json=short", "--more", address, "org.example.demo.Count", '{"n":3}')
    # --more output is a JSON sequence (RFC 7464): each record starts with RS.
    records = out.stdout.replace("\x1e", "").splitlines()
    assert [json.loads(r) for r in records] == [{"item": {"i": i}} for i in range(3)]
    out = varlinkctl("call", "--oneway", address, "org.example.demo.Note", '{"text":"ctl"}')
    assert out.returncode == 0, out.stderr
    assert demo.noted.wait(2)
    assert demo.notes == ["ctl"]
    out = varlinkctl("call", address, "org.example.demo.Fail", '{"kind":"defined"}')
    assert out.returncode != 0
    assert "org.example.demo.Failed" in out.stderr
    assert json.loads(out.stdout) == {"reason": "asked to"}
    out = varlinkctl("call", address, "org.example.demo.Count", '{"n":1}')
    assert "org.varlink.service.ExpectedMore" in out.stderr


# --------------------------------------------------------------------------- protocol features


def test_streaming_marks_only_the_last_reply_final(served: tuple[str, Demo]) -> None:
    path, _ = served
    raw = Raw(path)
    raw.send({"method": "org.example.demo.Count", "parameters": {"n": 3}, "more": True})
    replies = [raw.receive() for _ in range(3)]
    assert [r["parameters"]["item"]["i"] for r in replies if r] == [0, 1, 2]
    assert [bool(r.get("continues")) for r in replies if r] == [True, True, False]
    raw.close()
    with VarlinkClient(path) as client:
        assert list(client.call_more("org.example.demo.Count", {"n": 2})) == [
            {"item": {"i": 0}},
            {"item": {"i": 1}},
        ]
        # more on a plain method: one reply, continues false.
        assert list(client.call_more("org.example.demo.Ping", {"text": "x"})) == [{"pong": "x"}]


def stream_turns(sockdir: Path, n: int, item_cost: float) -> list[int]:
    """Count streams ``n`` items costing ``item_cost`` seconds each; for every item,
    how often the server's loop had turned (a task counting turns) when it was made."""
    st, demo = start(sockdir)
    demo.count_item_cost = item_cost
    with st:

        async def count_turns() -> None:
            while True:
                demo.loop_turns += 1
                await asyncio.sleep(0)

        tasks: list[asyncio.Task[None]] = []

        async def stop_counting() -> None:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        st.call_soon(lambda: tasks.append(asyncio.get_running_loop().create_task(count_turns())))
        try:
            with VarlinkClient(st.path) as client:
                items = list(client.call_more("org.example.demo.Count", {"n": n}))
        finally:
            st.run(stop_counting())
        assert len(items) == n
        return demo.count_seen_turns


def test_a_stream_of_ready_items_lets_the_loop_turn(sockdir: Path) -> None:
    """A stream whose items are all ready (a Watch client's queue after a burst of
    1,000 fault events) must not encode and send them all in one callback: every
    other task and call would wait. Items that take longer than the server's
    STREAM_TURN each: the loop turns between any two (before: all in one turn)."""
    seen = stream_turns(sockdir, 10, STREAM_TURN * 1.5)
    assert all(b > a for a, b in itertools.pairwise(seen)), seen


def test_a_stream_of_cheap_items_sends_several_per_turn(sockdir: Path) -> None:
    """Not one item per turn either: a Watch client would fall behind a burst that
    queues several events per turn (nsd.core.faultrecord.ANNOUNCE_STEP)."""
    seen = stream_turns(sockdir, 50, 0.0)
    assert len(set(seen)) < 25, seen


def test_stream_failing_midway_delivers_its_items_then_the_error(
    served: tuple[str, Demo],
) -> None:
    path, _ = served
    raw = Raw(path)
    raw.send({"method": "org.example.demo.Count", "parameters": {"n": -2}, "more": True})
    assert [raw.receive() for _ in range(3)] == [
        {"parameters": {"item": {"i": 0}}, "continues": True},
        {"parameters": {"item": {"i": 1}}, "continues": True},
        {"error": "org.example.demo.Failed", "parameters": {"reason": "negative"}},
    ]
    raw.send({"method": "org.example.demo.Ping", "parameters": {"text": "next"}})
    assert raw.receive() == {"parameters": {"pong": "next"}}


def test_streaming_method_without_more_is_expected_more(served: tuple[str, Demo]) -> None:
    path, _ = served
    with VarlinkClient(path) as client:
        with pytest.raises(VarlinkError) as info:
            client.call("org.example.demo.Count", {"n": 1})
        assert info.value.name == "org.varlink.service.ExpectedMore"
        assert client.call("org.example.demo.Ping", {"text": "after"}) == {"pong": "after"}


def test_stream_with_zero_items_is_a_handler_bug(served: tuple[str, Demo]) -> None:
    path, _ = served
    with VarlinkClient(path) as client:
        with pytest.raises(VarlinkError) as info:
            list(client.call_more("org.example.demo.Count", {"n": 0}))
        assert info.value.name == "io.nsd.InternalError"


def test_client_leaving_mid_stream_closes_the_generator(served: tuple[str, Demo]) -> None:
    path, demo = served
    raw = Raw(path)
    raw.send({"method": "org.example.demo.Events", "more": True})
    first = raw.receive()
    assert first == {"parameters": {"i": 0}, "continues": True}
    raw.receive()
    raw.close()
    assert demo.events_closed.wait(2), "the stream's generator was not closed"
    ping(path)


def test_oneway_gets_no_reply_and_runs(served: tuple[str, Demo]) -> None:
    path, demo = served
    raw = Raw(path)
    raw.send({"method": "org.example.demo.Note", "parameters": {"text": "n1"}, "oneway": True})
    # Oneway errors are not answered either.
    raw.send({"method": "org.example.demo.Nope", "oneway": True})
    raw.send({"method": "org.example.demo.Note", "parameters": {"text": 5}, "oneway": True})
    raw.send({"method": "org.example.demo.Ping", "parameters": {"text": "p"}})
    assert raw.receive() == {"parameters": {"pong": "p"}}
    assert demo.noted.wait(2)
    assert demo.notes == ["n1"]
    with VarlinkClient(path) as client:
        client.call_oneway("org.example.demo.Note", {"text": "n2"})
        assert client.call("org.example.demo.Ping", {"text": "q"}) == {"pong": "q"}
    assert demo.notes == ["n1", "n2"]


def test_pipelined_requests_are_answered_in_order(served: tuple[str, Demo]) -> None:
    path, _ = served
    raw = Raw(path)
    batch = b"".join(
        json.dumps(m).encode() + b"\0"
        for m in [
            {"method": "org.example.demo.Sleep", "parameters": {"seconds": 0.05}},
            {"method": "org.example.demo.Ping", "parameters": {"text": "a"}},
            {"method": "org.example.demo.Nope"},
            {"method": "org.example.demo.Count", "parameters": {"n": 2}, "more": True},
            {"method": "org.example.demo.Ping", "parameters": {"text": "b"}},
        ]
    )
    raw.send(batch)
    replies = [raw.receive() for _ in range(6)]
    assert replies == [
        {"parameters": {"slept": True}},
        {"parameters": {"pong": "a"}},
        {
            "error": "org.varlink.service.MethodNotFound",
            "parameters": {"method": "org.example.demo.Nope"},
        },
        {"parameters": {"item": {"i": 0}}, "continues": True},
        {"parameters": {"item": {"i": 1}}},
        {"parameters": {"pong": "b"}},
    ]


def test_thousand_pipelined_requests_with_a_slow_reader(served: tuple[str, Demo]) -> None:
    # More than max_pending_requests: the server must pause reading, not drop.
    path, _ = served
    raw = Raw(path, timeout=20)
    count = 1000
    sender = threading.Thread(
        target=raw.send,
        args=(
            b"".join(
                json.dumps(
                    {"method": "org.example.demo.Ping", "parameters": {"text": str(i)}}
                ).encode()
                + b"\0"
                for i in range(count)
            ),
        ),
    )
    sender.start()
    time.sleep(0.2)
    for i in range(count):
        assert raw.receive() == {"parameters": {"pong": str(i)}}
    sender.join()


def test_descriptors_are_passed_with_the_reply(served: tuple[str, Demo], sockdir: Path) -> None:
    path, demo = served
    done = len(demo.calls_done)
    target = sockdir / "passed.txt"
    target.write_text("content")
    with VarlinkClient(path) as client:
        reply, fds = client.call_with_fds("org.example.demo.Open", {"path": str(target)})
    assert reply == {"fileDescriptor": 0}
    assert len(fds) == 1
    try:
        mine, theirs = os.fstat(fds[0]), os.stat(target)
        assert (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
        assert not os.get_inheritable(fds[0])  # arrived with O_CLOEXEC
        assert os.read(fds[0], 100) == b"content"
    finally:
        os.close(fds[0])
    # The server closed its copy once sent (it runs in this process).
    demo.wait_calls_done(done + 1)
    open_here = [
        fd for fd in os.listdir("/proc/self/fd") if _readlink(f"/proc/self/fd/{fd}") == str(target)
    ]
    assert open_here == []


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_plain_call_discards_passed_descriptors(served: tuple[str, Demo], sockdir: Path) -> None:
    path, demo = served
    done = len(demo.calls_done)
    with VarlinkClient(path) as client:
        for _ in range(5):
            client.call("org.example.demo.Open", {"path": str(sockdir)})
    demo.wait_calls_done(done + 5)
    # Neither the client (which did not ask for them) nor the server (once sent) keeps a
    # descriptor of the opened directory; both run in this process.
    open_here = [
        fd for fd in os.listdir("/proc/self/fd") if _readlink(f"/proc/self/fd/{fd}") == str(sockdir)
    ]
    assert open_here == []


def test_peer_pidfd(served: tuple[str, Demo]) -> None:
    path, _ = served
    with VarlinkClient(path) as client:
        me = client.call("org.example.demo.Whoami")
    assert me["pid"] == os.getpid()
    if me["pidfdPid"] is not None:  # SO_PEERPIDFD exists from Linux 6.5 on
        assert me["pidfdPid"] == os.getpid()


def test_all_types_round_trip(served: tuple[str, Demo]) -> None:
    path, _ = served
    params = {
        "flag": False,
        "ratio": 3,
        "level": "high",
        "counts": {"a": 1, "b": -(2**63)},
        "items": [{"i": 1}],
        "extra": {"nested": [1, {"x": None}]},
    }
    with VarlinkClient(path) as client:
        assert client.call("org.example.demo.Types", params) == {"echo": params}


# --------------------------------------------------------------------------- errors


def test_method_level_errors_are_replies(served: tuple[str, Demo]) -> None:
    path, _ = served
    cases: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
        (
            {"method": "org.example.demo.Nope"},
            "org.varlink.service.MethodNotFound",
            {"method": "org.example.demo.Nope"},
        ),
        (
            {"method": "org.example.nothing.Ping"},
            "org.varlink.service.InterfaceNotFound",
            {"interface": "org.example.nothing"},
        ),
        ({"method": "nodot"}, "org.varlink.service.MethodNotFound", {"method": "nodot"}),
        ({"method": ""}, "org.varlink.service.MethodNotFound", {"method": ""}),
        (
            {"method": "org.example.demo.Ping", "parameters": {"text": "x"}, "upgrade": True},
            "org.varlink.service.InvalidParameter",
            {"parameter": "upgrade"},
        ),
        (
            {"method": "org.example.demo.Ping", "parameters": {"text": 1}},
            "org.varlink.service.InvalidParameter",
            {"parameter": "text"},
        ),
        (
            {"method": "org.example.demo.Ping", "parameters": {"text": True}},
            "org.varlink.service.InvalidParameter",
            {"parameter": "text"},
        ),
        (
            {"method": "org.example.demo.Ping", "parameters": {}},
            "org.varlink.service.InvalidParameter",
            {"parameter": "text"},
        ),
        (
            {"method": "org.example.demo.Ping", "parameters": {"text": "x", "admin": True}},
            "org.varlink.service.InvalidParameter",
            {"parameter": "admin"},
        ),
        (
            {"method": "org.example.demo.Count", "parameters": {"n": True}, "more": True},
            "org.varlink.service.InvalidParameter",
            {"parameter": "n"},
        ),
        (
            {
                "method": "org.example.demo.Types",
                "parameters": {
                    "flag": True,
                    "ratio": 1.5,
                    "level": "medium",
                    "counts": {},
                    "items": [],
                },
            },
            "org.varlink.service.InvalidParameter",
            {"parameter": "level"},
        ),
        (
            {
                "method": "org.example.demo.Types",
                "parameters": {
                    "flag": True,
                    "ratio": 1.5,
                    "level": "low",
                    "counts": {},
                    "items": [{"i": 1}, {"i": "2"}],
                },
            },
            "org.varlink.service.InvalidParameter",
            {"parameter": "items[1].i"},
        ),
        (
            {"method": "io.nsd.Tenant.Get", "parameters": {"name": ["alice"]}},
            "org.varlink.service.InvalidParameter",
            {"parameter": "name"},
        ),
    ]
    raw = Raw(path)
    for request, error, parameters in cases:
        raw.send(request)
        assert raw.receive() == {"error": error, "parameters": parameters}, request
    # The connection survived all of them.
    raw.send({"method": "org.example.demo.Ping", "parameters": {"text": "still"}})
    assert raw.receive() == {"parameters": {"pong": "still"}}


def test_handler_errors(served: tuple[str, Demo], caplog: pytest.LogCaptureFixture) -> None:
    path, _ = served
    caplog.set_level(logging.ERROR, logger="nsd.varlink")
    with VarlinkClient(path) as client:
        with pytest.raises(VarlinkError) as info:
            client.call("org.example.demo.Fail", {"kind": "defined"})
        assert info.value.name == "org.example.demo.Failed"
        assert info.value.parameters == {"reason": "asked to"}
        # A crash, a reply or error that breaks the IDL, unknown errors: all are
        # handler bugs, answered with the internal error and logged.
        for kind in ["crash", "bad-reply", "bad-error", "undefined", "not-json"]:
            with pytest.raises(VarlinkError) as info:
                client.call("org.example.demo.Fail", {"kind": kind})
            assert info.value.name == "io.nsd.InternalError", kind
            assert info.value.parameters == {}
        assert client.call("org.example.demo.Ping", {"text": "ok"}) == {"pong": "ok"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("Fail" in m and "handler raised" in m for m in messages)
    crash = next(r for r in caplog.records if "handler raised" in r.getMessage())
    assert crash.exc_info is not None and "handler bug" in str(crash.exc_info[1])
    assert any("'never'" in m for m in messages)


def test_shipped_error_passes_through(served: tuple[str, Demo]) -> None:
    path, _ = served
    with VarlinkClient(path) as client, pytest.raises(VarlinkError) as info:
        client.call("io.nsd.Tenant.Get", {"name": "bob"})
    assert info.value.name == "io.nsd.Tenant.NoSuchTenant"
    assert info.value.parameters == {"name": "bob"}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{not json}\0", "malformed JSON"),
        (b'{"method": "org.example.demo.Ping", "parameters": {"text": NaN}}\0', "NaN"),
        (b'{"method": "org.example.demo.Ping", "parameters": {"text": "\xff"}}\0', "not UTF-8"),
        (b"[1, 2]\0", "not an object"),
        (b'"org.example.demo.Ping"\0', "not an object"),
        (b"{}\0", "no method"),
        (b'{"method": 5}\0', "method not a string"),
        (b'{"method": "org.example.demo.Ping", "parameters": [1]}\0', "parameters not an object"),
        (b'{"method": "org.example.demo.Ping", "more": "yes"}\0', "flag not a bool"),
        (b'{"method": "org.example.demo.Ping", "oneway": true, "more": true}\0', "oneway and more"),
        (b'{"method": "org.example.demo.Ping", "sudo": true}\0', "unknown key"),
        (b"\0", "empty message"),
        (b"[" * 10_000 + b"]" * 10_000 + b"\0", "10,000-deep nesting"),
        (b'{"method": "org.example.demo.Ping", "parameters": {"text": "' + b"a" * 70_000, "no NUL"),
        (
            b'{"method": "org.example.demo.Ping", "parameters": {"text": "'
            + b"a" * 70_000
            + b'"}}\0',
            "too large",
        ),
    ],
)
def test_protocol_violations_close_only_that_connection(
    served: tuple[str, Demo], data: bytes, why: str
) -> None:
    path, _ = served
    bystander = Raw(path)
    raw = Raw(path)
    raw.send(data)
    assert raw.closed_by_server(), why
    raw.close()
    bystander.send({"method": "org.example.demo.Ping", "parameters": {"text": "b"}})
    assert bystander.receive() == {"parameters": {"pong": "b"}}
    ping(path)


def test_half_sent_message_times_out(sockdir: Path) -> None:
    st, _ = start(sockdir, Limits(partial_message_timeout=0.3))
    with st:
        slow = Raw(st.path)
        # A message sent in pieces is fine while it completes in time...
        for piece in [
            b'{"method": "org.example',
            b'.demo.Ping", "parameters"',
            b': {"text": "x"}}\0',
        ]:
            slow.send(piece)
            time.sleep(0.1)
        assert slow.receive() == {"parameters": {"pong": "x"}}
        # ...an idle connection between messages is fine too...
        time.sleep(0.5)
        slow.send({"method": "org.example.demo.Ping", "parameters": {"text": "y"}})
        assert slow.receive() == {"parameters": {"pong": "y"}}
        # ...but half a message left hanging is not.
        started = time.monotonic()
        slow.send(b'{"method": "org.example.demo.Ping"')
        assert slow.closed_by_server()
        assert 0.25 < time.monotonic() - started < 3
        ping(st.path)


def test_stream_ends_when_its_connection_is_closed_for_a_violation(sockdir: Path) -> None:
    st, demo = start(sockdir, Limits(partial_message_timeout=0.3))
    with st:
        raw = Raw(st.path)
        raw.send({"method": "org.example.demo.Events", "more": True})
        assert raw.receive() is not None
        raw.send(b'{"method": "org.ex')  # then nothing: the timeout closes the connection
        assert demo.events_closed.wait(3), "the stream outlived its connection"
        while raw.receive() is not None:  # events sent before the close, then EOF
            pass
        ping(st.path)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_pending_requests"):
        Limits(max_pending_requests=0)
    with pytest.raises(ValueError, match="partial_message_timeout"):
        Limits(partial_message_timeout=0)


def test_total_connection_cap(sockdir: Path) -> None:
    st, _ = start(
        sockdir, Limits(max_connections=3, reserved_connections=0, uid_limit_exempt=frozenset())
    )
    with st:
        held = [VarlinkClient(st.path, timeout=5) for _ in range(3)]
        for c in held:
            c.call("org.example.demo.Ping", {"text": "x"})
        assert "max_connections" in Raw(st.path).refusal()
        held.pop().close()
        time.sleep(0.1)
        ping(st.path)
        for c in held:
            c.call("org.example.demo.Ping", {"text": "still"})
            c.close()


def test_per_uid_connection_cap(sockdir: Path) -> None:
    st, _ = start(sockdir, Limits(max_connections_per_uid=2, uid_limit_exempt=frozenset()))
    with st:
        held = [VarlinkClient(st.path, timeout=5) for _ in range(2)]
        for c in held:
            c.call("org.example.demo.Ping", {"text": "x"})
        assert "(max_connections_per_uid)" in Raw(st.path).refusal()
        held.pop().close()
        time.sleep(0.1)
        ping(st.path)
        held[0].close()


def test_exempt_uids_are_not_capped(sockdir: Path) -> None:
    # Root (nsd-exec) must get through even when unprivileged clients fill the server.
    st, _ = start(
        sockdir,
        Limits(
            max_connections=1,
            reserved_connections=0,
            max_connections_per_uid=1,
            uid_limit_exempt=frozenset({os.getuid()}),
        ),
    )
    with st:
        clients = [VarlinkClient(st.path, timeout=5) for _ in range(3)]
        for c in clients:
            assert c.call("org.example.demo.Ping", {"text": "x"}) == {"pong": "x"}
            c.close()


# --------------------------------------------------------------------------- credentials


def run_as(uid: int, gid: int, groups: list[int], fn: Any) -> Any:
    """Runs fn() in a forked child with the given credentials; returns its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            result = {"ok": fn(), "pid": os.getpid()}
        except BaseException as e:
            result = {"error": repr(e)}
            code = 1
        os.write(write_end, json.dumps(result).encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_handler_sees_the_kernel_credentials_of_another_user(served: tuple[str, Demo]) -> None:
    path, _ = served

    def whoami() -> Any:
        with VarlinkClient(path, timeout=5) as client:
            return client.call("org.example.demo.Whoami")

    result = run_as(65534, 65534, [65534, 100], whoami)
    assert "error" not in result, result
    me = result["ok"]
    assert me["uid"] == 65534
    assert me["gid"] == 65534
    assert me["pid"] == result["pid"]
    assert 100 in me["groups"]
    assert 0 not in me["groups"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_per_uid_cap_counts_the_other_user_separately(sockdir: Path) -> None:
    st, _ = start(sockdir, Limits(max_connections_per_uid=2))
    with st:

        def three_connections() -> Any:
            socks = [Raw(st.path) for _ in range(3)]
            for s in socks[:2]:
                s.send({"method": "org.example.demo.Ping", "parameters": {"text": "x"}})
                assert s.receive() == {"parameters": {"pong": "x"}}
            return "max_connections_per_uid" in socks[2].refusal()

        result = run_as(65534, 65534, [65534], three_connections)
        assert result.get("ok") is True, result
        # Root is exempt by default and unaffected.
        clients = [VarlinkClient(st.path, timeout=5) for _ in range(3)]
        for c in clients:
            c.call("org.example.demo.Ping", {"text": "root"})
            c.close()


# --------------------------------------------------------------------------- lifecycle


def test_graceful_close_finishes_calls_in_flight(sockdir: Path) -> None:
    st, demo = start(sockdir, grace=5)
    st.__enter__()
    results: dict[str, Any] = {}

    def slow_call() -> None:
        with VarlinkClient(st.path, timeout=10) as client:
            results["reply"] = client.call("org.example.demo.Sleep", {"seconds": 0.3})

    idle = VarlinkClient(st.path, timeout=5)
    idle.call("org.example.demo.Ping", {"text": "x"})
    streamer = Raw(st.path)
    streamer.send({"method": "org.example.demo.Events", "more": True})
    assert streamer.receive() is not None
    caller = threading.Thread(target=slow_call)
    caller.start()
    assert demo.sleep_started.wait(5)
    started = time.monotonic()
    st.stop()
    caller.join(5)
    assert results["reply"] == {"slept": True}
    assert time.monotonic() - started < 2
    assert demo.events_closed.is_set()  # streams end at once
    with pytest.raises(VarlinkConnectionError):
        idle.call("org.example.demo.Ping", {"text": "x"})
    with pytest.raises(ServiceUnavailable):
        VarlinkClient(st.path)


def test_close_cancels_calls_after_the_grace_period(sockdir: Path) -> None:
    st, demo = start(sockdir, grace=0.2)
    st.__enter__()
    outcome: dict[str, Any] = {}

    def stuck_call() -> None:
        try:
            with VarlinkClient(st.path, timeout=10) as client:
                outcome["reply"] = client.call("org.example.demo.Sleep", {"seconds": 60})
        except VarlinkConnectionError as e:
            outcome["error"] = e

    caller = threading.Thread(target=stuck_call)
    caller.start()
    assert demo.sleep_started.wait(5)
    started = time.monotonic()
    st.stop()
    caller.join(5)
    assert time.monotonic() - started < 2
    assert "error" in outcome
    assert demo.sleep_cancelled.is_set()


def test_on_call_done_hook(served: tuple[str, Demo]) -> None:
    path, demo = served
    with VarlinkClient(path) as client:
        client.call("org.example.demo.Ping", {"text": "x"})
        with pytest.raises(VarlinkError):
            client.call("org.example.demo.Ping", {})
        with pytest.raises(VarlinkError):
            client.call("org.example.demo.NoSuchMethod" + "X" * 10)
        with pytest.raises(VarlinkError):
            client.call("org.example.demo.Fail", {"kind": "defined"})
    demo.wait_calls_done(3)
    seen = [(i, m, e) for i, m, e, _ in demo.calls_done]
    # Unknown methods are not reported: their names are whatever a client sends.
    assert seen == [
        ("org.example.demo", "Ping", None),
        ("org.example.demo", "Ping", "org.varlink.service.InvalidParameter"),
        ("org.example.demo", "Fail", "org.example.demo.Failed"),
    ]
    assert all(0 <= s < 1 for *_, s in demo.calls_done)


# --------------------------------------------------------------------------- set-up errors


def test_handlers_must_match_the_idl() -> None:
    server = VarlinkServer(vendor="v", product="p", version="1", url="u")
    handlers = Demo().handlers()
    with pytest.raises(ValueError, match=r"missing \['Types'\]"):
        server.add_interface(DEMO, {k: v for k, v in handlers.items() if k != "Types"})
    with pytest.raises(ValueError, match=r"unknown \['Extra'\]"):
        server.add_interface(DEMO, handlers | {"Extra": handlers["Ping"]})
    server.add_interface(DEMO, handlers)
    with pytest.raises(ValueError, match="already registered"):
        server.add_interface(DEMO, handlers)
    with pytest.raises(ValueError, match="already registered"):
        server.add_interface(shipped("org.varlink.service"), {})
    with pytest.raises(ValueError, match="invalid error name"):
        VarlinkServer(vendor="v", product="p", version="1", url="u", internal_error_name="Oops")


def test_client_reports_a_missing_daemon(sockdir: Path) -> None:
    with pytest.raises(ServiceUnavailable):
        VarlinkClient(str(sockdir / "nothing"))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sockdir / "dead"))
    dead.close()
    with pytest.raises(ServiceUnavailable):
        VarlinkClient(str(sockdir / "dead"))


def test_bind_unix_socket(sockdir: Path) -> None:
    path = str(sockdir / "s")
    first = bind_unix_socket(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    with pytest.raises(OSError, match="another process serves"):
        bind_unix_socket(path)
    first.close()  # now stale: the file stays, nobody listens
    second = bind_unix_socket(path)
    second.close()
    (sockdir / "file").write_text("")
    with pytest.raises(FileExistsError):
        bind_unix_socket(str(sockdir / "file"))
