"""Integration tests for nsd-exec (native/exec): real users, real namespaces, checked
from outside.

Every check looks at the launched process through /proc while it runs, from this
(root) test process: nsd-exec must have become the workload in place.

The `enter_server` fixture is the real nsd daemon (in a test-made host
namespace, configured with the umask and limits below) with the test user as a
tenant. Two fault-injection tests need a daemon that misbehaves (a reply naming
the wrong UID) or records requests; they use `enter_provider`, a small stand-in
that answers io.nsd.Tenant.Enter with a real namespace descriptor, and say so.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.native import native_program
from tests.samples import tenant_record

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ip", "useradd", "userdel", "groupadd", "groupdel")),
        reason="needs iproute2 and shadow utils",
    ),
]

# What the daemon under test hands out (its [exec] configuration below, and the stand-in).
REPLY_UMASK = 0o027
REPLY_LIMITS = [
    {"name": "nofile", "soft": 4096, "hard": 8192},
    {"name": "core", "soft": 0, "hard": None},
]
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SYSTEM_PYTHON = "/usr/bin/python3"

ENTRY = [str(native_program("nsd-exec"))]

# Starts nsd-exec from a deliberately messy parent state: SIGHUP ignored, SIGUSR1/2
# blocked (and Python's own SIGPIPE/SIGXFSZ ignores), optionally a socket-activation
# descriptor moved to fd 3 with LISTEN_PID set to its own PID; then execs, so the
# PID Popen reports is nsd-exec's and, after nsd-exec execs, the workload's.
TRAMPOLINE = r"""
import json, os, signal, sys
cfg = json.loads(sys.argv[1])
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
if cfg["listen_fd"] is not None:
    os.dup2(cfg["listen_fd"], 3)
    pid = os.getpid() if cfg["listen_pid"] == "self" else 1
    os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS="1", LISTEN_FDNAMES="web")
os.execv(cfg["argv"][0], cfg["argv"])
"""


# --- users, namespace, provider ------------------------------------------------------


class TenantUser(NamedTuple):
    name: str
    uid: int
    gid: int
    home: str
    extra_group: str
    extra_gid: int


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tenant_user() -> Iterator[TenantUser]:
    suffix = secrets.token_hex(4)
    group, name = f"nsdtg{suffix}", f"nsdt{suffix}"
    _run("groupadd", group)
    try:
        _run("useradd", "-m", "-U", "-G", group, "-s", "/bin/sh", name)
        try:
            pw = pwd.getpwnam(name)
            yield TenantUser(
                name, pw.pw_uid, pw.pw_gid, pw.pw_dir, group, grp.getgrnam(group).gr_gid
            )
        finally:
            subprocess.run(["userdel", "-r", name], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@pytest.fixture(scope="module")
def tenant_netns() -> Iterator[tuple[str, int]]:
    name = f"nsdt-exec-{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    try:
        path = f"/run/netns/{name}"
        yield path, os.stat(path).st_ino
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class EnterProvider:
    """Answers io.nsd.Tenant.Enter like nsd would, for one tenant."""

    def __init__(self, directory: str, user: TenantUser, ns_path: str, ns_inode: int) -> None:
        self.path = os.path.join(directory, "io.nsd.Tenant")
        self.user = user
        self.ns_path = ns_path
        self.ns_inode = ns_inode
        self.uid_override: int | None = None
        # Fault injection: rewrites the reply object before it is sent.
        self.mutate: Callable[[dict[str, Any]], object] | None = None
        self.extra_fds = 0
        self.requests: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="enter-provider", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        while b"\0" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        request = json.loads(buf.split(b"\0", 1)[0])
        self.requests.append(request)
        name = request.get("parameters", {}).get("name")
        if request.get("method") != "io.nsd.Tenant.Enter":
            reply: dict[str, Any] = {
                "error": "org.varlink.service.MethodNotFound",
                "parameters": {"method": request.get("method")},
            }
            conn.sendall(json.dumps(reply).encode() + b"\0")
            return
        if name != self.user.name:
            reply = {"error": "io.nsd.Tenant.NoSuchTenant", "parameters": {"name": name}}
            conn.sendall(json.dumps(reply).encode() + b"\0")
            return
        # Two descriptors, the namespace second, so the launcher must honour the
        # index and close the other one.
        decoy = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        ns_fd = os.open(self.ns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            reply = {"parameters": self._enter_parameters()}
            sent = reply if self.mutate is None else self.mutate(reply)
            fds = [decoy, ns_fd] + [decoy] * self.extra_fds
            socket.send_fds(conn, [json.dumps(sent).encode() + b"\0"], fds)
        finally:
            os.close(decoy)
            os.close(ns_fd)

    def _enter_parameters(self) -> dict[str, Any]:
        uid = self.user.uid if self.uid_override is None else self.uid_override
        tenant = tenant_record(
            name=self.user.name,
            uid=uid,
            namespacePath=self.ns_path,
            namespaceInode=self.ns_inode,
            hostInterface=f"nsd{uid}",
            createdUSec=int(time.time() * 1e6),
        )
        return {
            "tenant": tenant,
            "namespaceFileDescriptor": 1,
            "umask": REPLY_UMASK,
            "resourceLimits": REPLY_LIMITS,
        }


class EnterServer(NamedTuple):
    socket_path: str
    expected_ns_inode: int
    user_name: str


@pytest.fixture(scope="module")
def enter_provider(
    tenant_user: TenantUser, tenant_netns: tuple[str, int]
) -> Iterator[EnterProvider]:
    directory = tempfile.mkdtemp(prefix="nsdt-exec-sock-")
    provider = EnterProvider(directory, tenant_user, *tenant_netns)
    try:
        yield provider
    finally:
        provider.close()
        shutil.rmtree(directory, ignore_errors=True)


_DAEMON_EXEC_CONFIG = """
[exec]
umask = "0027"
[exec.rlimits]
nofile = [4096, 8192]
core = [0, "infinity"]
"""


@pytest.fixture(scope="module")
def enter_server(tenant_user: TenantUser) -> Iterator[EnterServer]:
    """The real daemon, with the test user as its tenant."""
    from tests.harness import daemon_env

    with daemon_env(extra=_DAEMON_EXEC_CONFIG) as (daemon, _):
        daemon.start()
        tenant = daemon.call("io.nsd.Tenant.Create", name=tenant_user.name)["tenant"]
        yield EnterServer(daemon.socket, tenant["namespaceInode"], tenant_user.name)
        daemon.call("io.nsd.Tenant.Remove", name=tenant_user.name, force=True)
        assert daemon.stop() == 0, daemon.log_text()


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory every user can read (the tenant cannot reach pytest's tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="nsdt-exec-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- launching and inspecting ------------------------------------------------------


@pytest.fixture
def launch(enter_server: EnterServer) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        *argv: str,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        listen_fd: int | None = None,
        listen_pid: str = "self",
    ) -> subprocess.Popen[bytes]:
        full_env = base_env(enter_server)
        full_env.update(env or {})
        cfg = {"argv": [*ENTRY, *argv], "listen_fd": listen_fd, "listen_pid": listen_pid}
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, json.dumps(cfg)],
            env=full_env,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def base_env(server: EnterServer) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "NSD_SOCKET": server.socket_path,
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TERM": "xterm-256color",
        "STRAY_VARIABLE": "must-not-leak",
        "MAIL": "/var/mail/root",
        "XDG_RUNTIME_DIR": "/run/user/0",
    }


def run_to_end(
    launch: Callable[..., subprocess.Popen[bytes]], *argv: str, **kw: Any
) -> tuple[int, str, str]:
    proc = launch(*argv, **kw)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


def wait_for_exec(proc: subprocess.Popen[bytes], argv0: str, timeout: float = 15) -> None:
    """Waits until the process Popen started runs argv0 (nsd-exec has exec'd it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before exec: {err.decode()}")
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if cmdline.split(b"\0")[0] == argv0.encode():
            return
        time.sleep(0.01)
    pytest.fail(f"process {proc.pid} never exec'd {argv0}")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)


def proc_limit(pid: int, title: str) -> tuple[str, str]:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(rf"^{re.escape(title)}\s+(\S+)\s+(\S+)", text, re.MULTILINE)
    assert match, text
    return match.group(1), match.group(2)


def open_fds(pid: int, expected: list[int] | None = None) -> list[int]:
    """The workload's descriptors. Right after exec, /bin/sleep's own start-up
    (setlocale opening the locale archive) may hold one for a moment; with
    ``expected``, wait up to a second for that to pass."""
    deadline = time.monotonic() + 1.0
    while True:
        fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        if expected is None or fds == expected or time.monotonic() > deadline:
            return fds
        time.sleep(0.02)


# --- the running workload ------------------------------------------------------------


class Sleeper(NamedTuple):
    proc: subprocess.Popen[bytes]
    pid: int


@pytest.fixture
def sleeper(launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer) -> Sleeper:
    # Extra inheritable descriptors in the parent: nsd-exec must not hand them on.
    r1, w1 = os.pipe()
    extra = os.open("/dev/null", os.O_RDONLY)
    try:
        proc = launch(enter_server.user_name, "--", "/bin/sleep", "30", pass_fds=(r1, w1, extra))
    finally:
        for fd in (r1, w1, extra):
            os.close(fd)
    wait_for_exec(proc, "/bin/sleep")
    return Sleeper(proc, proc.pid)


def test_same_pid_no_helper(sleeper: Sleeper) -> None:
    pid = sleeper.pid
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"/bin/sleep\x0030\x00"
    assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text().strip() == ""


def test_joins_tenant_namespace(sleeper: Sleeper, enter_server: EnterServer) -> None:
    ino = os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino
    assert ino == enter_server.expected_ns_inode
    assert ino != os.stat("/proc/self/ns/net").st_ino


def test_identity(sleeper: Sleeper, tenant_user: TenantUser) -> None:
    status = proc_status(sleeper.pid)
    assert status["Uid"].split() == [str(tenant_user.uid)] * 4
    assert status["Gid"].split() == [str(tenant_user.gid)] * 4
    assert {int(g) for g in status["Groups"].split()} == {tenant_user.gid, tenant_user.extra_gid}
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[cap], 16) == 0, cap


def test_signals_reset(sleeper: Sleeper) -> None:
    status = proc_status(sleeper.pid)
    assert int(status["SigIgn"], 16) == 0
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigCgt"], 16) == 0


def test_only_stdio_descriptors(sleeper: Sleeper) -> None:
    assert open_fds(sleeper.pid, [0, 1, 2]) == [0, 1, 2]


def test_clean_environment(sleeper: Sleeper, tenant_user: TenantUser) -> None:
    assert proc_environ(sleeper.pid) == {
        "HOME": tenant_user.home,
        "USER": tenant_user.name,
        "LOGNAME": tenant_user.name,
        "SHELL": "/bin/sh",
        "PATH": DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TERM": "xterm-256color",
    }


def test_cwd_umask_limits(sleeper: Sleeper, tenant_user: TenantUser) -> None:
    assert os.readlink(f"/proc/{sleeper.pid}/cwd") == tenant_user.home
    assert int(proc_status(sleeper.pid)["Umask"], 8) == REPLY_UMASK
    assert proc_limit(sleeper.pid, "Max open files") == ("4096", "8192")
    assert proc_limit(sleeper.pid, "Max core file size") == ("0", "unlimited")


# --- service-manager protocols -------------------------------------------------------


def test_notify_socket_passthrough(
    launch: Callable[..., subprocess.Popen[bytes]],
    enter_server: EnterServer,
    tenant_user: TenantUser,
    shared_dir: Path,
) -> None:
    path = str(shared_dir / f"notify-{secrets.token_hex(4)}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        os.chmod(path, 0o666)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        receiver.settimeout(15)
        if shutil.which("systemd-notify"):
            notify = "systemd-notify --ready --no-block"
        else:
            notify = (
                f"{SYSTEM_PYTHON} -c 'import os,socket; s=socket.socket(socket.AF_UNIX,"
                ' socket.SOCK_DGRAM); s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])\''
            )
        proc = launch(
            enter_server.user_name,
            "--",
            "/bin/sh",
            "-c",
            f"{notify} && exec /bin/sleep 30",
            env={"NOTIFY_SOCKET": path},
        )
        message, ancdata, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(12))
        assert b"READY=1" in message.split(b"\n")
        creds = [d for lvl, t, d in ancdata if t == socket.SCM_CREDENTIALS]
        assert creds, "no sender credentials"
        assert int.from_bytes(creds[0][4:8], sys.byteorder) == tenant_user.uid
        wait_for_exec(proc, "/bin/sleep")
        assert proc_environ(proc.pid)["NOTIFY_SOCKET"] == path


def test_listen_fds_passthrough(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("")  # autobind: an abstract address, enough for an identity check
        listener.listen()
        stray = os.open("/dev/null", os.O_RDONLY)
        try:
            proc = launch(
                enter_server.user_name,
                "--",
                "/bin/sleep",
                "30",
                pass_fds=(listener.fileno(), stray),
                listen_fd=listener.fileno(),
            )
        finally:
            os.close(stray)
        wait_for_exec(proc, "/bin/sleep")
        assert open_fds(proc.pid, [0, 1, 2, 3]) == [0, 1, 2, 3]
        ino = os.fstat(listener.fileno()).st_ino
        assert os.readlink(f"/proc/{proc.pid}/fd/3") == f"socket:[{ino}]"
        env = proc_environ(proc.pid)
        assert env["LISTEN_PID"] == str(proc.pid)
        assert env["LISTEN_FDS"] == "1"
        assert env["LISTEN_FDNAMES"] == "web"


def test_listen_fds_for_another_pid_are_dropped(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("")
        listener.listen()
        proc = launch(
            enter_server.user_name,
            "--",
            "/bin/sleep",
            "30",
            pass_fds=(listener.fileno(),),
            listen_fd=listener.fileno(),
            listen_pid="other",
        )
        wait_for_exec(proc, "/bin/sleep")
        assert open_fds(proc.pid, [0, 1, 2]) == [0, 1, 2]
        assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & proc_environ(proc.pid).keys()


def test_sigterm_reaches_workload(
    launch: Callable[..., subprocess.Popen[bytes]],
    enter_server: EnterServer,
    tenant_user: TenantUser,
    shared_dir: Path,
) -> None:
    script = shared_dir / "trap_term.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "marker = sys.argv[1]\n"
        "def on_term(signum, frame):\n"
        "    with open(marker, 'w') as f:\n"
        "        f.write(f'SIGTERM {os.getpid()}')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "open(marker + '.ready', 'w').close()\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    script.chmod(0o644)
    marker = Path(tenant_user.home) / f"term-{secrets.token_hex(4)}"
    proc = launch(enter_server.user_name, "--", SYSTEM_PYTHON, str(script), str(marker))
    ready = Path(f"{marker}.ready")
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "workload never got ready"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert marker.read_text() == f"SIGTERM {proc.pid}"


# --- options -------------------------------------------------------------------------


def test_setenv(launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer) -> None:
    proc = launch(
        "--setenv",
        "APP_MODE=production",
        "--setenv=PATH=/opt/app/bin:/usr/bin:/bin",
        "--setenv",
        "STRAY_VARIABLE",
        enter_server.user_name,
        "--",
        "/bin/sleep",
        "30",
    )
    wait_for_exec(proc, "/bin/sleep")
    env = proc_environ(proc.pid)
    assert env["APP_MODE"] == "production"
    assert env["PATH"] == "/opt/app/bin:/usr/bin:/bin"
    assert env["STRAY_VARIABLE"] == "must-not-leak"  # explicitly asked for


def test_missing_home_falls_back_to_root(
    launch: Callable[..., subprocess.Popen[bytes]],
    enter_server: EnterServer,
    tenant_user: TenantUser,
) -> None:
    home = Path(tenant_user.home)
    moved = home.with_name(home.name + ".away")
    home.rename(moved)
    try:
        proc = launch(enter_server.user_name, "--", "/bin/sleep", "30")
        wait_for_exec(proc, "/bin/sleep")
        assert os.readlink(f"/proc/{proc.pid}/cwd") == "/"
        proc.kill()
        _, err = proc.communicate(timeout=10)
    finally:
        moved.rename(home)
    assert err.decode().startswith(f"nsd-exec: warning: cannot change directory to {home}")


def test_workload_exit_status(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, _, err = run_to_end(launch, enter_server.user_name, "--", "/bin/sh", "-c", "exit 7")
    assert code == 7, err


def test_command_found_on_path(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, out, err = run_to_end(launch, enter_server.user_name, "--", "id", "-u")
    assert code == 0, err
    assert out.strip().isdigit()


# --- exit codes ----------------------------------------------------------------------


def assert_one_line_failure(code: int, err: str, expected: int) -> None:
    assert code == expected, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nsd-exec: ")


def test_exit_125_daemon_socket_missing(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, _, err = run_to_end(
        launch, "--socket", "/nonexistent/nsd.sock", enter_server.user_name, "--", "/bin/true"
    )
    assert_one_line_failure(code, err, 125)
    assert "/nonexistent/nsd.sock" in err


def test_exit_125_peer_not_root(
    launch: Callable[..., subprocess.Popen[bytes]], tenant_user: TenantUser
) -> None:
    """A socket served by anyone but root is not nsd, whatever its path."""
    path = f"{tenant_user.home}/fake-nsd-{secrets.token_hex(4)}"
    server = subprocess.Popen(
        [
            SYSTEM_PYTHON,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(sys.argv[1]); s.listen(); print('ready', flush=True)\n"
            "c, _ = s.accept(); time.sleep(10)\n",
            path,
        ],
        user=tenant_user.uid,
        group=tenant_user.gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"ready\n"
        code, _, err = run_to_end(launch, "--socket", path, tenant_user.name, "--", "/bin/true")
    finally:
        server.kill()
        server.communicate()
    assert_one_line_failure(code, err, 125)
    assert "does not run as root" in err


def test_exit_125_error_reply(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    # "nobody" exists in NSS but is no tenant (the real daemon may say UidOutOfRange).
    code, _, err = run_to_end(launch, "--no-create", "nobody", "--", "/bin/true")
    assert_one_line_failure(code, err, 125)
    assert "io.nsd.Tenant." in err
    assert '"name": "nobody"' in err


def test_exit_125_no_such_user(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, _, err = run_to_end(launch, "nsdt-no-such-user", "--", "/bin/true")
    assert_one_line_failure(code, err, 125)


def test_exit_125_usage(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, _, err = run_to_end(launch, enter_server.user_name, "/bin/true")
    assert_one_line_failure(code, err, 125)
    code, _, err = run_to_end(launch, "--bogus", enter_server.user_name, "--", "/bin/true")
    assert_one_line_failure(code, err, 125)


def test_exit_126_not_executable(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer, shared_dir: Path
) -> None:
    path = shared_dir / "not-executable"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    code, _, err = run_to_end(launch, enter_server.user_name, "--", str(path))
    assert_one_line_failure(code, err, 126)
    assert str(path) in err


def test_exit_127_missing_command(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    code, _, err = run_to_end(launch, enter_server.user_name, "--", "nsdt-no-such-command")
    assert_one_line_failure(code, err, 127)
    assert "nsdt-no-such-command" in err
    code, _, err = run_to_end(launch, enter_server.user_name, "--", "/nonexistent/cmd")
    assert_one_line_failure(code, err, 127)


def test_help(launch: Callable[..., subprocess.Popen[bytes]]) -> None:
    code, out, _ = run_to_end(launch, "--help")
    assert code == 0
    assert out.startswith("usage: nsd-exec")


# --- stand-in specific ---------------------------------------------------------------


def test_exit_125_identity_mismatch(
    launch: Callable[..., subprocess.Popen[bytes]], enter_provider: EnterProvider
) -> None:
    """Uses the stand-in's knob: the reply names a different UID than NSS."""
    enter_provider.uid_override = enter_provider.user.uid + 1
    try:
        code, _, err = run_to_end(
            launch, "--socket", enter_provider.path, enter_provider.user.name, "--", "/bin/true"
        )
    finally:
        enter_provider.uid_override = None
    assert_one_line_failure(code, err, 125)
    assert "identity mismatch" in err


def test_request_shape(
    launch: Callable[..., subprocess.Popen[bytes]], enter_provider: EnterProvider
) -> None:
    """Uses the stand-in's request log: the exact varlink call nsd-exec makes."""
    enter_provider.requests.clear()
    sock = ("--socket", enter_provider.path)
    code, _, err = run_to_end(
        launch, *sock, "--no-create", enter_provider.user.name, "--", "/bin/true"
    )
    assert code == 0, err
    code, _, err = run_to_end(launch, *sock, enter_provider.user.name, "--", "/bin/true")
    assert code == 0, err
    name = enter_provider.user.name
    assert enter_provider.requests == [
        {"method": "io.nsd.Tenant.Enter", "parameters": {"name": name, "create": False}},
        {"method": "io.nsd.Tenant.Enter", "parameters": {"name": name}},
    ]


def _set(path: str, value: object) -> Callable[[dict[str, Any]], object]:
    """A reply rewrite: sets parameters[path...] (dotted) to value."""

    def mutate(reply: dict[str, Any]) -> object:
        *parents, last = path.split(".")
        target = reply["parameters"]
        for key in parents:
            target = target[key]
        target[last] = value
        return reply

    return mutate


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: [], "not an object"),
        (lambda r: {"parameters": None}, "no parameters"),
        (_set("tenant", None), "no tenant"),
        (_set("tenant.uid", True), "tenant.uid"),
        (_set("tenant.uid", "1001"), "tenant.uid"),
        (_set("tenant.name", 7), "tenant has no name"),
        (_set("tenant.namespaceInode", 1), "namespace inode"),
        (_set("namespaceFileDescriptor", 2), "namespaceFileDescriptor 2 but 2 descriptor(s)"),
        (_set("namespaceFileDescriptor", -1), "namespaceFileDescriptor"),
        (_set("umask", 0o1000), "umask"),
        (_set("resourceLimits", {}), "resourceLimits"),
        (_set("resourceLimits", [{"name": "NOFILE", "soft": 1, "hard": 1}]), "name"),
        (_set("resourceLimits", [{"name": "bogus", "soft": 1, "hard": 1}]), "does not know"),
        (_set("resourceLimits", [{"name": "nofile", "soft": 9, "hard": 8}]), "above"),
        (_set("resourceLimits", [{"name": "nofile", "soft": None, "hard": 8}]), "above"),
        (_set("resourceLimits", [{"name": "nofile", "soft": -1, "hard": None}]), "nofile"),
        (_set("resourceLimits", [{"name": "core", "soft": 1 << 64, "hard": None}]), "core"),
        (_set("resourceLimits", [{"name": "core", "soft": 1.5, "hard": None}]), "core"),
        (
            lambda r: {"error": "io.nsd.Tenant.NoSuchTenant", "parameters": {"n": "a\nb\x1b[2J"}},
            "nsd refused: io.nsd.Tenant.NoSuchTenant {",
        ),
    ],
)
def test_exit_125_bad_reply(
    launch: Callable[..., subprocess.Popen[bytes]],
    enter_provider: EnterProvider,
    mutate: Callable[[dict[str, Any]], object],
    needle: str,
) -> None:
    """Uses the stand-in's knob: every malformed reply fails closed, in one printable line."""
    enter_provider.mutate = mutate
    try:
        code, _, err = run_to_end(
            launch, "--socket", enter_provider.path, enter_provider.user.name, "--", "/bin/true"
        )
    finally:
        enter_provider.mutate = None
    assert_one_line_failure(code, err, 125)
    assert needle in err
    assert err.rstrip("\n").isprintable()


def test_exit_125_too_many_descriptors(
    launch: Callable[..., subprocess.Popen[bytes]], enter_provider: EnterProvider
) -> None:
    """Uses the stand-in's knob: more descriptors than any Enter reply carries."""
    enter_provider.extra_fds = 10
    try:
        code, _, err = run_to_end(
            launch, "--socket", enter_provider.path, enter_provider.user.name, "--", "/bin/true"
        )
    finally:
        enter_provider.extra_fds = 0
    assert_one_line_failure(code, err, 125)
    assert "more file descriptors than expected" in err


def test_listen_fds_must_be_sockets(
    launch: Callable[..., subprocess.Popen[bytes]], enter_server: EnterServer
) -> None:
    """A root-opened file at fd 3 with a matching LISTEN_PID never reaches the workload."""
    secret = os.open("/etc/shadow", os.O_RDONLY)
    try:
        code, _, err = run_to_end(
            launch,
            enter_server.user_name,
            "--",
            "/bin/true",
            pass_fds=(secret,),
            listen_fd=secret,
        )
    finally:
        os.close(secret)
    assert_one_line_failure(code, err, 125)
    assert "descriptor 3 is not a socket" in err


# --- the caller's terminal -----------------------------------------------------------

# The stand-in for root's interactive shell: a session leader with the pty as its
# controlling terminal (raw mode, so every injected byte is counted), which runs the
# launcher in the foreground like a shell would, then reports what the workload said
# and how many bytes wait in its terminal's input queue.
ROOT_SHELL = r"""
import fcntl, json, os, subprocess, sys, termios, tty
slave = os.open(sys.argv[1], os.O_RDWR)
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
tty.setraw(slave)
os.dup2(slave, 0)
r, w = os.pipe()
proc = subprocess.run(sys.argv[3:], stdin=0, stdout=w, stderr=w, close_fds=True, pass_fds=(w,))
os.close(w)
out = os.read(r, 65536).decode()
queued = fcntl.ioctl(0, termios.FIONREAD, b"\0\0\0\0")
with open(int(sys.argv[2]), "w") as report:
    json.dump({"status": proc.returncode, "out": out,
               "queued": int.from_bytes(queued, sys.byteorder)}, report)
"""

# The tenant's workload: try to type a command into the terminal on its stdin.
INJECTOR = (
    "import fcntl, termios\n"
    "tty_nr = open('/proc/self/stat').read().rsplit(')', 1)[1].split()[4]\n"
    "try:\n"
    "    fcntl.ioctl(0, termios.TIOCSTI, b'X')\n"
    "    print('INJECTED', tty_nr)\n"
    "except OSError as e:\n"
    "    print('REFUSED', e.errno, tty_nr)\n"
)


def _legacy_tiocsti() -> bool:
    try:
        return Path("/proc/sys/dev/tty/legacy_tiocsti").read_text().strip() == "1"
    except OSError:
        return True  # kernels before 6.2 have no switch: TIOCSTI always works


def _from_root_shell(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    master, slave = os.openpty()
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ROOT_SHELL, os.ttyname(slave), str(w), *argv],
            env=env,
            pass_fds=(w,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        os.close(w)
        w = -1
        report = os.read(r, 65536)
        assert proc.returncode == 0, proc.stderr.decode()
        data: dict[str, Any] = json.loads(report)
        return data
    finally:
        for fd in (master, slave, r, w):
            if fd >= 0:
                os.close(fd)


def test_tiocsti_injection_refused(enter_server: EnterServer) -> None:
    """The workload has no controlling terminal, so the kernel refuses TIOCSTI on the
    terminal root started it from: nothing reaches root's shell."""
    env = base_env(enter_server)
    out = _from_root_shell(
        [*ENTRY, enter_server.user_name, "--", SYSTEM_PYTHON, "-c", INJECTOR], env
    )
    assert out["status"] == 0, out
    assert out["out"] == f"REFUSED {1} 0\n", out  # EPERM, tty_nr 0: no controlling terminal
    assert out["queued"] == 0


def test_tiocsti_injection_reproduced_without_nsd_exec(
    enter_server: EnterServer, tenant_user: TenantUser
) -> None:
    """The control: the same workload started by runuser without --pty keeps root's
    terminal and does type into it (the defect nsd-exec fixes)."""
    if not _legacy_tiocsti():
        pytest.skip("dev.tty.legacy_tiocsti=0: this kernel refuses TIOCSTI to everyone")
    env = base_env(enter_server)
    out = _from_root_shell(
        ["runuser", "-u", tenant_user.name, "--", SYSTEM_PYTHON, "-c", INJECTOR], env
    )
    assert out["out"].startswith("INJECTED "), out
    assert out["queued"] == 1
