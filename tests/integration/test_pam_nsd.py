"""pam_nsd.so (native/pam) in a real PAM conversation: pamtester opens a session
through a PAM service file of the test's own, against the real daemon.

Each session runs in a private mount namespace whose /dev is a tmpfs holding
/dev/null and, as /dev/log, a datagram socket of the test's: the module's syslog
lines are read back exactly as the journal would get them, and the host's /dev is
never touched. After pam_nsd, pam_exec reports from the session process's child
which network namespace the session is in and which descriptors the session
process (pamtester) holds. The PAM stacks of sshd and cron run in the VM tier
(tests/e2e/test_80_logins.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Daemon, TestUsers
from tests.native import asan_preload, native_program

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MODULE = native_program("pam_nsd.so")
LOG_AUTHPRIV = 10 << 3
SEVERITY = {"err": 3, "warning": 4, "info": 6, "debug": 7}

# Runs inside `unshare --mount`: a private /dev with null and the test's syslog socket.
PRIVATE_DEV = """
set -e
mount -t tmpfs -o mode=0755 nsdt-dev /dev
mknod -m 0666 /dev/null c 1 3
touch /dev/log
mount --bind "$1" /dev/log
shift
exec "$@"
"""


@dataclass
class Session:
    status: int
    output: str
    netns: int | None
    fds: list[str]
    log: list[tuple[int, str]]  # (priority, message) as sent to /dev/log

    def messages(self) -> list[str]:
        return [m for _, m in self.log]


class PamRunner:
    """Opens sessions through a service file of its own (removed at the end)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.service = f"nsdt-pam-{secrets.token_hex(4)}"
        self.service_file = Path("/etc/pam.d") / self.service
        self.report = tmp / "report"
        self.syslog_path = str(tmp / "log")
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(self.syslog_path)
        # PAM lines have no shell quoting: the probe is a script of its own.
        self.probe = tmp / "probe"
        self.probe.write_text(
            "#!/bin/sh\nreadlink /proc/self/ns/net\n"
            "ls /proc/$PPID/fd | sort -n | tr '\\n' ' '\necho\n"
        )
        self.probe.chmod(0o755)

    def close(self) -> None:
        self.service_file.unlink(missing_ok=True)
        self.syslog.close()

    def stack(self, module_line: str | None) -> str:
        lines = [module_line] if module_line else []
        lines.append(f"session optional pam_exec.so quiet log={self.report} {self.probe}")
        return "\n".join(lines) + "\n"

    def open(
        self, user: str, *args: str, module: bool = True, tool: tuple[str, ...] = ()
    ) -> Session:
        line = f"session required {MODULE} {' '.join(args)}" if module else None
        self.service_file.write_text(self.stack(line))
        self.report.unlink(missing_ok=True)
        proc = subprocess.run(
            [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DEV,
                "private-dev", self.syslog_path, *tool,
                "pamtester", self.service, user, "open_session",
            ],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **asan_preload()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        netns, fds = None, []
        if self.report.exists():
            # pam_exec's log= starts with a "*** date" line of its own
            lines = [x for x in self.report.read_text().splitlines() if not x.startswith("***")]
            link, fd_list = lines
            netns = int(link.strip().removeprefix("net:[").removesuffix("]"))
            fds = fd_list.split()
        return Session(proc.returncode, proc.stdout + proc.stderr, netns, fds, self._drain())

    def _drain(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = self.syslog.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            text = data.decode()
            assert text.startswith("<"), text
            pri, _, rest = text[1:].partition(">")
            ident, _, message = rest.partition(": ")
            assert ident.startswith("pam_nsd["), text
            out.append((int(pri), message))


@contextlib.contextmanager
def pam_runner() -> Iterator[PamRunner]:
    tmp = Path(tempfile.mkdtemp(prefix="nsdt-pam-"))
    runner = PamRunner(tmp)
    try:
        yield runner
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)


HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


@pytest.fixture(scope="module")
def env(module_daemon: tuple[Daemon, TestUsers]) -> tuple[Daemon, TestUsers]:
    return module_daemon


@pytest.fixture
def pam() -> Iterator[PamRunner]:
    with pam_runner() as runner:
        yield runner


def test_tenant_session_joins_the_namespace(env: tuple[Daemon, TestUsers], pam: PamRunner) -> None:
    d, users = env
    name = users.add()
    t = d.call("io.nsd.Tenant.Create", name=name)["tenant"]
    baseline = pam.open(name, module=False)
    out = pam.open(name, f"socket={d.socket}")
    assert out.status == 0, out.output
    assert out.netns == t["namespaceInode"] != HOST_NETNS
    assert out.fds == baseline.fds, "pam_nsd left a descriptor open in the session process"
    assert out.log == [
        (
            LOG_AUTHPRIV | SEVERITY["info"],
            f"{pam.service}: {name}: joined namespace {t['namespacePath']} "
            f"(inode {t['namespaceInode']})",
        )
    ]


def test_missing_tenant_created_or_not(env: tuple[Daemon, TestUsers], pam: PamRunner) -> None:
    d, users = env
    name = users.add()
    out = pam.open(name, f"socket={d.socket}", "create=no")
    assert (out.status, out.netns, out.log) == (0, HOST_NETNS, []), out.output
    out = pam.open(name, f"socket={d.socket}", "create=no", "nontenant=deny")
    assert out.status != 0
    [(pri, message)] = out.log
    assert pri == LOG_AUTHPRIV | SEVERITY["warning"]
    assert message.startswith(f"{pam.service}: {name} is not an nsd tenant (io.nsd.Tenant.")
    assert message.endswith("): login denied (nontenant=deny)")
    out = pam.open(name, f"socket={d.socket}", "create=no", "debug")
    assert out.status == 0 and "(nontenant=skip)" in out.messages()[0]
    out = pam.open(name, f"socket={d.socket}")  # nsd's default: Enter creates the tenant
    assert out.status == 0, out.output
    assert out.netns == d.call("io.nsd.Tenant.Get", name=name)["tenant"]["namespaceInode"]


def test_daemon_stopped(env: tuple[Daemon, TestUsers], pam: PamRunner) -> None:
    d, users = env
    name = users.add()
    d.call("io.nsd.Tenant.Create", name=name)
    assert d.stop() == 0
    try:
        out = pam.open(name, f"socket={d.socket}")
        assert (out.status, out.netns) == (0, HOST_NETNS), out.output
        [(pri, message)] = out.log
        assert pri == LOG_AUTHPRIV | SEVERITY["warning"]
        # the stopped daemon leaves its socket file behind: connection refused
        assert message == (
            f"{pam.service}: {name}: nsd unavailable (cannot reach nsd at {d.socket}: "
            "Connection refused): login continues OUTSIDE the tenant's namespace "
            "(unreachable=skip)"
        )
        out = pam.open(name, f"socket={d.socket}", "unreachable=deny")
        assert out.status != 0
        [(pri, message)] = out.log
        assert pri == LOG_AUTHPRIV | SEVERITY["err"]
        assert message.endswith("login denied (unreachable=deny)")
        # Root is never sent to nsd, so no setting locks it out.
        out = pam.open("root", f"socket={d.socket}", "unreachable=deny")
        assert (out.status, out.netns, out.log) == (0, HOST_NETNS, []), out.output
        # Nor is anyone below uid_min.
        out = pam.open(name, f"socket={d.socket}", "unreachable=deny", "uid_min=4000000000")
        assert (out.status, out.log) == (0, []), out.output
    finally:
        d.start()


def test_silent_nsd_times_out(env: tuple[Daemon, TestUsers], pam: PamRunner) -> None:
    """Fault injection: a root-owned socket that accepts and never answers."""
    _, users = env
    name = users.add()
    path = str(pam.tmp / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen()
        out = pam.open(name, f"socket={path}", "timeout=0.3", "unreachable=deny")
    assert out.status != 0
    assert f"nsd at {path} did not answer within 0.3s" in out.messages()[0]


@pytest.mark.parametrize(
    "arg",
    ["bogus", "unreachable=maybe", "nontenant=", "create=perhaps", "scope=sometimes",
     "timeout=0", "timeout=soon", "uid_min=-1", "socket=relative"],
)  # fmt: skip
def test_bad_arguments_deny_everyone_but_root(
    env: tuple[Daemon, TestUsers], pam: PamRunner, arg: str
) -> None:
    d, users = env
    name = users.names[0] if users.names else users.add()
    out = pam.open(name, f"socket={d.socket}", arg)
    assert out.status != 0
    [(pri, message)] = out.log
    assert pri == LOG_AUTHPRIV | SEVERITY["err"]
    assert message.startswith(f"{pam.service}: invalid module arguments (")
    assert message.endswith(f"); deny {name}")
    out = pam.open("root", f"socket={d.socket}", arg)
    assert out.status == 0, out.output
    assert out.messages()[0].endswith("; skip root")
