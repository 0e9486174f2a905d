"""pam_nsd's own logic: arguments, the scope decision, the varlink exchange and
what each answer leads to. The exchange runs against a socket server in a
thread that answers like nsd (JSON + NUL, descriptors with SCM_RIGHTS); joining a
namespace is left to tests/integration/test_pam_nsd.py (root, the real daemon).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nsd import pam_nsd as m

ME = pwd.getpwuid(os.getuid()).pw_name


def test_defaults() -> None:
    o = m.parse_args([])
    assert (o.socket, o.unreachable, o.nontenant, o.uid_min) == (
        "/run/nsd/io.nsd.Tenant", "skip", "skip", 1000)  # fmt: skip
    assert (o.create, o.scope, o.timeout, o.debug) == (None, "auto", 5.0, False)


def test_arguments() -> None:
    o = m.parse_args(["socket=/x/y", "unreachable=deny", "nontenant=deny", "uid_min=0",
                      "create=no", "scope=never", "timeout=0.5", "debug"])  # fmt: skip
    assert (o.socket, o.unreachable, o.nontenant) == ("/x/y", "deny", "deny")
    assert o.uid_min == 1  # root is never sent to nsd, whatever the line says
    assert (o.create, o.scope, o.timeout, o.debug) == (False, "never", 0.5, True)


@pytest.mark.parametrize(
    "arg",
    ["bogus", "bogus=1", "socket=relative", "unreachable=maybe", "create=1", "scope=x",
     "timeout=0", "timeout=1e9", "timeout=soon", "uid_min=-1", "debug=yes"],
)  # fmt: skip
def test_bad_arguments(arg: str) -> None:
    with pytest.raises(m.ConfigError):
        m.parse_args([arg])


def test_bad_arguments_deny_everyone_but_root() -> None:
    assert m.open_session("root", ["unreachable=dney"]).action == m.SKIP
    out = m.open_session("nobody-such-user", ["unreachable=dney"], "sshd")
    assert out.action == m.DENY and out.severity == "err"
    assert "invalid module arguments" in out.message and out.message.startswith("sshd: ")


@pytest.mark.parametrize(
    ("policy", "cgroup", "parent", "want"),
    [
        # pam_systemd ran first: the login is in its session scope, which must stay.
        ("auto", "/user.slice/user-1001.slice/session-4.scope", "/system.slice/ssh.service", False),
        # the user manager's own PAM session (systemd-user stack)
        ("auto", "/user.slice/user-1001.slice/user@1001.service/init.scope", "/init.scope", False),
        # cron's job child (no pam_systemd on Debian): forked by the cron daemon
        ("auto", "/system.slice/cron.service", "/system.slice/cron.service", True),
        # a service's main process with PAMName=: nsd's policy (keeps it in its unit)
        ("auto", "/system.slice/app.service", "/init.scope", None),
        ("auto", "/", "/", None),
        ("auto", None, None, None),
        ("always", "/user.slice/user-1001.slice/session-4.scope", None, True),
        ("never", "/system.slice/cron.service", "/system.slice/cron.service", False),
    ],
)  # fmt: skip
def test_scope_request(policy: str, cgroup: str | None, parent: str | None, want: bool) -> None:
    assert m.scope_request(policy, cgroup, parent) is want


def test_own_cgroup(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text("1:name=systemd:/v1\n0::/system.slice/cron.service\n")
    assert m.own_cgroup(7, str(tmp_path)) == "/system.slice/cron.service"
    (tmp_path / "7" / "cgroup").write_text("1:name=systemd:/v1\n4:memory:/x\n")
    assert m.own_cgroup(7, str(tmp_path)) == "/v1"
    assert m.own_cgroup(8, str(tmp_path)) is None


# -- the exchange ----------------------------------------------------------------------

Answer = Callable[[dict[str, Any]], tuple[bytes, list[int]]]


class FakeNsd:
    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.answers: list[Answer] = []
        # Released after each connection is answered and every descriptor the
        # server opened for it is closed (it runs in this process: fd counts).
        self.handled = threading.Semaphore(0)

    def wait(self) -> None:
        assert self.handled.acquire(timeout=5)


@pytest.fixture
def nsd(tmp_path: Path) -> Iterator[FakeNsd]:
    """A socket that answers like nsd: one request, one reply per connection."""
    path = str(tmp_path / "io.nsd.Tenant")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    fake = FakeNsd(path)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\0"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    fake.requests.append(json.loads(data[:-1]))
                    reply, fds = fake.answers.pop(0)(fake.requests[-1])
                    # The client may hang up early (a reply too large): not an error here.
                    with contextlib.suppress(OSError):
                        if fds:
                            socket.send_fds(conn, [reply], fds)
                        elif reply:
                            conn.sendall(reply)
                    for fd in fds:
                        os.close(fd)
            fake.handled.release()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield fake
    stop.set()
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()
    t.join(5)


def ok(uid: int, inode: int | None = None, nfds: int = 1, scope: str | None = None) -> Answer:
    def answer(_req: dict[str, Any]) -> tuple[bytes, list[int]]:
        fds = [os.open("/proc/self/ns/net", os.O_RDONLY) for _ in range(nfds)]
        ino = os.fstat(fds[0]).st_ino if inode is None and fds else inode
        params = {
            "tenant": {"name": "alice", "uid": uid, "namespacePath": "/run/netns/alice",
                       "namespaceInode": ino},
            "namespaceFileDescriptor": 0, "umask": 18, "resourceLimits": [], "scope": scope,
        }  # fmt: skip
        return json.dumps({"parameters": params}).encode() + b"\0", fds

    return answer


def error(name: str) -> Answer:
    def answer(_req: dict[str, Any]) -> tuple[bytes, list[int]]:
        return json.dumps({"error": name, "parameters": {"name": "alice"}}).encode() + b"\0", []

    return answer


def open_fds() -> set[str]:
    """Descriptors of this process that point at a socket or a namespace."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "net:")):
            out.add(f"{fd} {target}")
    return out


def test_enter_request_and_reply(nsd: FakeNsd) -> None:
    nsd.answers.append(ok(1001, nfds=3, scope="nsd-enter-1001-9-ab.scope"))
    before = open_fds()
    reply, fds = m.call_enter(nsd.path, {"name": "alice", "scope": True}, 5)
    nsd.wait()
    assert nsd.requests == [{"method": "io.nsd.Tenant.Enter",
                         "parameters": {"name": "alice", "scope": True}}]  # fmt: skip
    assert len(fds) == 3
    assert all(os.get_inheritable(fd) is False for fd in fds)  # MSG_CMSG_CLOEXEC
    fd, namespace, scope = m.namespace_of(reply, fds, 1001)
    assert (namespace, scope) == ("/run/netns/alice", "nsd-enter-1001-9-ab.scope")
    # the two extra descriptors are closed
    assert [x.split()[0] for x in open_fds() - before] == [str(fd)]
    os.close(fd)
    assert open_fds() == before


@pytest.mark.parametrize(
    ("answer", "uid", "kind", "text"),
    [
        (error("io.nsd.Tenant.NoSuchTenant"), 1001, m.NotATenant, "NoSuchTenant"),
        (error("io.nsd.Tenant.UidOutOfRange"), 1001, m.NotATenant, "UidOutOfRange"),
        (error("io.nsd.Tenant.NetworkSetupFailed"), 1001, m.Unavailable, "nsd refused"),
        (error("io.nsd.Tenant.PermissionDenied"), 1001, m.Unavailable, "nsd refused"),
        (ok(1002), 1001, m.Unavailable, "not 1001"),
        (ok(1001, inode=1), 1001, m.Unavailable, "not namespace inode 1"),
        (ok(1001, nfds=0), 1001, m.Unavailable, "0 descriptor"),
    ],
)  # fmt: skip
def test_refusals_close_every_descriptor(
    nsd: FakeNsd, answer: Answer, uid: int, kind: type[Exception], text: str
) -> None:
    nsd.answers.append(answer)
    before = open_fds()
    reply, fds = m.call_enter(nsd.path, {"name": "alice"}, 5)
    nsd.wait()
    with pytest.raises(kind, match=text):
        m.namespace_of(reply, fds, uid)
    assert open_fds() == before


def raw(data: bytes) -> Answer:
    return lambda _req: (data, [])


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (raw(b""), "closed the connection"),
        (raw(b"not json\0"), "not valid JSON"),
        (raw(b"[1]\0"), "not an object"),
        (raw(b"x" * (m.MAX_REPLY + 70000)), "too large"),
    ],
)
def test_broken_replies(nsd: FakeNsd, answer: Answer, text: str) -> None:
    nsd.answers.append(answer)
    before = open_fds()
    with pytest.raises(m.Unavailable, match=text):
        m.call_enter(nsd.path, {"name": "alice"}, 5)
    nsd.wait()
    assert open_fds() == before


def test_silent_nsd_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)  # accepts (the backlog), never answers
    try:
        with pytest.raises(m.Unavailable, match=r"did not answer within 0\.3s"):
            m.call_enter(path, {"name": "alice"}, 0.3)
    finally:
        srv.close()


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(m.Unavailable, match="cannot reach nsd"):
        m.call_enter(str(tmp_path / "absent"), {"name": "alice"}, 1)


# -- decisions --------------------------------------------------------------------------


def test_unreachable_skip_and_deny(tmp_path: Path) -> None:
    sock = f"socket={tmp_path}/absent"
    out = m.open_session(ME, [sock, "uid_min=1"], "sshd")
    if os.getuid() == 0:
        assert out.action == m.SKIP and "below uid_min" in out.message
        return
    assert out.action == m.SKIP and out.severity == "warning"
    assert "login continues OUTSIDE the tenant's namespace (unreachable=skip)" in out.message
    out = m.open_session(ME, [sock, "uid_min=1", "unreachable=deny"], "sshd")
    assert out.action == m.DENY and out.severity == "err"
    assert "login denied (unreachable=deny)" in out.message


def test_root_is_never_sent_to_nsd(tmp_path: Path) -> None:
    out = m.open_session("root", [f"socket={tmp_path}/absent", "unreachable=deny"])
    assert out.action == m.SKIP and out.severity == ""
    assert m.open_session("root", ["debug", "unreachable=deny"]).severity == "debug"


def test_unknown_user_is_skipped() -> None:
    assert m.open_session("no-such-user-here", ["unreachable=deny"]).action == m.SKIP


def test_nontenant_policy(nsd: FakeNsd, monkeypatch: pytest.MonkeyPatch) -> None:
    path, requests, answers = nsd.path, nsd.requests, nsd.answers
    monkeypatch.setattr(m, "_uid", lambda _user: 1001)
    answers.append(error("io.nsd.Tenant.NoSuchTenant"))
    out = m.open_session("alice", [f"socket={path}", "create=no"])
    assert out.action == m.SKIP and out.severity == ""
    assert requests[-1]["parameters"]["create"] is False
    answers.append(error("io.nsd.Tenant.UidOutOfRange"))
    out = m.open_session("alice", [f"socket={path}", "nontenant=deny"], "cron")
    assert out.action == m.DENY and "alice is not an nsd tenant" in out.message


class FakePamh:
    PAM_SUCCESS = 0
    PAM_SESSION_ERR = 14
    PAM_IGNORE = 25

    class exception(Exception):  # pam_python's name
        pass

    def __init__(self, user: str | None, service: str = "sshd") -> None:
        self.user = user
        self.service = service

    def get_user(self, _prompt: object) -> str | None:
        return self.user


def test_pam_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[tuple[str, str]] = []
    monkeypatch.setattr(m, "log", lambda sev, msg: logged.append((sev, msg)))
    h = FakePamh("root")
    assert m.pam_sm_open_session(h, 0, [m.__file__, "unreachable=deny"]) == h.PAM_IGNORE
    assert m.pam_sm_open_session(FakePamh(None), 0, [m.__file__]) == h.PAM_SESSION_ERR
    assert logged[-1][0] == "err"
    bad = FakePamh("no-such-user-here")
    assert m.pam_sm_open_session(bad, 0, [m.__file__, "oops"]) == h.PAM_SESSION_ERR
    assert m.pam_sm_close_session(h, 0, [m.__file__]) == h.PAM_SUCCESS


def test_log_writes_one_syslog_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "log")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    real = socket.socket.sendto

    def sendto(self: socket.socket, data: bytes, addr: Any) -> int:
        return real(self, data, path if addr == "/dev/log" else addr)

    monkeypatch.setattr(socket.socket, "sendto", sendto)
    before = open_fds()
    m.log("warning", "alice: hello")
    assert open_fds() == before
    assert rx.recv(9000) == f"<84>pam_nsd[{os.getpid()}]: alice: hello".encode()
    rx.close()
