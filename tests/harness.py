"""Test harness: users, a "host" network namespace and a real nsd daemon.

The daemon under test runs inside a network namespace the test made (entered
with ``nsenter --net``, which keeps the host's mount namespace so its
/run/netns mounts are real), with its socket and state in a temp dir. Tests
therefore never change the machine's own network and clean up after themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(
    *cmd: str, check: bool = True, netns: str | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    argv = list(cmd)
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def systemctl_show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show UNIT --property=...`` as a dict (the systemd tier, inside its container)."""
    out = run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unique(prefix: str = "nt") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


# -- users -------------------------------------------------------------------


@dataclass
class TestUsers:
    """Real Unix users with a run-unique prefix, deleted at the end."""

    __test__ = False  # a helper, not a pytest test class

    prefix: str = field(default_factory=unique)
    names: list[str] = field(default_factory=list)

    def add(self, suffix: str = "", groups: tuple[str, ...] = ()) -> str:
        name = f"{self.prefix}u{suffix or len(self.names)}"
        cmd = ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        run(*cmd, name)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            run("pkill", "-KILL", "-u", name, check=False)
            run("userdel", "--remove", "--force", name, check=False)
        self.names.clear()


def uid_of(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


# -- namespaces --------------------------------------------------------------


def close_notify(notify: socket.socket) -> None:
    path = notify.getsockname()
    notify.close()
    os.unlink(path)


@contextlib.contextmanager
def host_netns(name: str | None = None) -> Iterator[str]:
    """A test-made network namespace that plays the host; yields its /run/netns path."""
    name = name or unique("nsdt-host-")
    run("ip", "netns", "add", name)
    path = f"/run/netns/{name}"
    try:
        run("ip", "link", "set", "lo", "up", netns=path)
        yield path
    finally:
        run("ip", "netns", "del", name, check=False)


def run_bench(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a bench script. On timeout it gets SIGTERM, so that its cleanup removes
    the users, namespaces and daemon it made (SIGKILL would leave them), and two
    minutes for that before SIGKILL; the test then fails with its log."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"{cmd[0]} ran out of its {timeout:.0f} s: {err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_bench_left_nothing(stderr: str) -> None:
    """A bench run (its log on ``stderr`` names its run prefix) left no user,
    namespace file, host namespace or mount of its own behind."""
    found = re.search(r"run prefix (nsdb[0-9a-f]{4})", stderr)
    assert found is not None, stderr[-2000:]
    tag = found.group(1)
    with open("/etc/passwd", encoding="utf-8") as f:
        assert not [line for line in f if line.startswith(tag)]
    assert not [e for e in os.listdir("/run/netns") if tag in e]
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        assert tag not in f.read()


def netns_inode(path: str) -> int | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if st.st_dev == os.stat("/proc/self/ns/net").st_dev else None


def mounts_under(directory: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(directory.rstrip("/") + "/"):
                out.append(point)
    return out


def unmount_files(paths: list[str]) -> None:
    for p in paths:
        for _ in range(4):  # stacked mounts, if a test made any
            if run("umount", "--lazy", p, check=False).returncode != 0:
                break
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(p)


# -- the daemon --------------------------------------------------------------

# One varlink call from a separate process (run it as another user with setpriv):
# prints {"ok": reply} or {"error": name}.
CALL_SCRIPT = """
import json, sys
from nsd.varlink.client import VarlinkClient, VarlinkError
sock, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    with VarlinkClient(sock) as c:
        if method.endswith(".Enter"):
            reply, fds = c.call_with_fds(method, params)
        elif method.endswith(".Watch") or params.pop("_stream", False):
            reply = next(iter(c.call_more(method, params)))
        else:
            reply = c.call(method, params)
    print(json.dumps({"ok": reply}))
except VarlinkError as e:
    print(json.dumps({"error": e.name}))
"""


class Daemon:
    """nsd running for real inside a test host namespace."""

    def __init__(self, host: str, tmp: Path, run_dir: str = "/run/netns", extra: str = "") -> None:
        self.host = host
        self.tmp = tmp
        self.socket = str(tmp / "run" / "io.nsd.Tenant")
        self.state_dir = tmp / "state"
        self.run_dir = run_dir
        self.config = tmp / "nsd.toml"
        self.config.write_text(
            f'[daemon]\nsocket = "{self.socket}"\nstate_dir = "{self.state_dir}"\n'
            f'log_level = "debug"\nshutdown_timeout = 5\n'
            f'[netns]\nrun_dir = "{run_dir}"\n' + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "nsd.log"
        self.starts = 0

    def command(self) -> list[str]:
        return [
            "nsenter",
            f"--net={self.host}",
            PY,
            "-m",
            "nsd.daemon",
            "--config",
            str(self.config),
        ]

    def start(self, prefix: list[str] | None = None, wait: bool = True) -> None:
        notify = self.spawn(prefix)
        try:
            if wait:
                self.wait_ready(notify)
        finally:
            close_notify(notify)

    def spawn(self, prefix: list[str] | None = None) -> socket.socket:
        """Start nsd and return the datagram socket its NOTIFY_SOCKET names, for
        :meth:`wait_ready` (the caller closes it with :func:`close_notify`)."""
        assert self.proc is None or self.proc.poll() is not None
        notify_path = str(self.tmp / f"notify{self.starts}")
        self.starts += 1
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        try:
            with open(self.log, "ab") as log:
                # A process group of its own: with a wrapper in ``prefix`` (strace),
                # killing the wrapper alone would leave nsd running (see kill()).
                self.proc = subprocess.Popen(
                    [*(prefix or []), *self.command()],
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=ROOT,
                    process_group=0,
                )
        except BaseException:
            close_notify(notify)
            raise
        return notify

    def wait_ready(self, notify: socket.socket, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                msg = notify.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nsd exited with {self.proc.returncode}:\n{self.log_text()}")
        raise AssertionError(f"nsd not ready after {timeout}s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"nsd did not stop within {timeout}s:\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL it, and whatever else runs in the process group spawn() gave it
        (cleanup after a failure: nsd under a wrapper such as strace)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        # A group led by the process's pid exists only if spawn() made it (subclasses
        # may start nsd themselves, in their own group): it outlives a dead leader for
        # as long as any member runs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        assert self.stop() == 0, self.log_text()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self) -> Any:
        from nsd.varlink.client import VarlinkClient

        return VarlinkClient(self.socket)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with self.client() as c:
            result: dict[str, Any] = c.call(method, params)
            return result

    def nsctl(
        self, *args: str, check: bool = True, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [PY, "-m", "nsd.cli", "--socket", self.socket, *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
        res = run(*cmd, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"nsctl {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def db_rows(self, query: str) -> list[tuple[Any, ...]]:
        import sqlite3

        con = sqlite3.connect(self.state_dir / "nsd.db")
        try:
            return list(con.execute(query))
        finally:
            con.close()

    def host_links(self) -> list[str]:
        res = run("ip", "-j", "link", "show", netns=self.host)
        return [link["ifname"] for link in json.loads(res.stdout)]


def _attach_strace(d: Daemon, *args: str) -> subprocess.Popen[bytes]:
    assert d.proc is not None
    tracer = subprocess.Popen(["strace", "-qq", "-f", "-p", str(d.proc.pid), *args])
    time.sleep(1.0)  # strace attaches to every thread before we act
    return tracer


def crash_at(d: Daemon, syscall: str, n: int, action: Callable[[], object]) -> bool:
    """Run ``action`` while strace SIGKILLs the daemon at its ``n``-th ``syscall``
    (counted per thread); True if the daemon died (the crash point was reached)."""
    from nsd.varlink.client import VarlinkError

    assert d.proc is not None
    # (the syscall must be traced for inject to apply; output is discarded)
    tracer = _attach_strace(
        d, "-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={n}",
        "-o", "/dev/null",
    )  # fmt: skip
    try:
        with contextlib.suppress(VarlinkError, ConnectionError, OSError):
            action()  # the daemon dies while answering
        return d.proc.wait(30) != 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        tracer.kill()
        tracer.wait()


def syscall_counts(d: Daemon, syscalls: list[str], action: Callable[[], object]) -> dict[str, int]:
    """Run ``action`` under strace and return, for each of ``syscalls``, the highest
    number of calls one thread made: the ``n`` up to which ``crash_at`` (whose
    ``inject ... when=n`` counts per thread, checked on strace 6.1) has a point."""
    out = d.tmp / "syscalls.strace"
    tracer = _attach_strace(d, "-e", f"trace={','.join(syscalls)}", "-o", str(out))
    try:
        action()
    finally:
        # SIGTERM, not SIGKILL: strace detaches and flushes its output. Every call
        # before the reply was logged when it entered the kernel.
        tracer.terminate()
        tracer.wait(30)
    per_thread: dict[tuple[str, str], int] = {}
    for line in out.read_text().splitlines():
        # "<tid> name(args..." on entry; "<tid> <... name resumed>" lines are not calls.
        tid, _, call = line.partition(" ")
        name = call.lstrip().partition("(")[0]
        if name in syscalls:
            per_thread[tid, name] = per_thread.get((tid, name), 0) + 1
    out.unlink()
    return {s: max((c for (_, n), c in per_thread.items() if n == s), default=0) for s in syscalls}


def spread(count: int, slots: int) -> list[tuple[str, int]]:
    """(label, n) for ``slots`` points from 1 to ``count``: first, last, evenly spaced
    between (``mid1``...); every n (labelled by number) if there are no more calls
    than slots."""
    if count <= slots:
        return [(str(n), n) for n in range(1, count + 1)]
    points = [("first", 1)]
    points += [(f"mid{i}", round(1 + i * (count - 1) / (slots - 1))) for i in range(1, slots - 1)]
    return [*points, ("last", count)]


CrashPoint = tuple[str, str, int]  # (test id, syscall, n)

PWRITE_SLOTS = 4
CRASH_BUDGET = 13  # points per operation, as many as the runtime allows


def derive_crash_points(
    every: list[str], operation: Callable[[Daemon, str], Callable[[], object]], create: bool
) -> list[CrashPoint]:
    """Crash points for one operation, from the code as it is: run it once under strace
    (after a Create of the same tenant if ``create``) and pick by role. Each call in
    ``every`` marks a step, so every one is a point; pwrite64 (SQLite's WAL frames)
    and sendto (netlink; a pool thread's wake-up of the loop) are frequent, so they
    are spread from the first to the last, sendto with what is left of the budget."""
    with daemon_env() as (d, users):
        name = users.add()
        d.start()
        if create:
            d.call("io.nsd.Tenant.Create", name=name)
        counts = syscall_counts(d, [*every, "pwrite64", "sendto"], operation(d, name))
        assert d.stop() == 0, d.log_text()  # daemon_env removes the tenant's namespace
    # An empty profile would parametrize nothing, and pytest would skip quietly.
    assert counts["sendto"] > 0 and counts["pwrite64"] > 0, counts
    points = [(f"{s}-{n}", s, n) for s in every for n in range(1, counts[s] + 1)]
    points += [
        (f"pwrite64-{lb}", "pwrite64", n) for lb, n in spread(counts["pwrite64"], PWRITE_SLOTS)
    ]
    slots = max(3, CRASH_BUDGET - len(points))
    return points + [(f"sendto-{lb}", "sendto", n) for lb, n in spread(counts["sendto"], slots)]


def parametrize_crash_points(metafunc: Any, derive: Callable[[], list[CrashPoint]]) -> None:
    """Parametrize (syscall, n) with derived points; without root there is no daemon to
    profile, and the test's root mark skips the one placeholder."""
    points = derive() if os.geteuid() == 0 else [("not-root", "sendto", 1)]
    metafunc.parametrize(
        ("syscall", "n"), [(s, n) for _, s, n in points], ids=[i for i, _, _ in points]
    )


@contextlib.contextmanager
def daemon_env(run_dir: str = "/run/netns", extra: str = "") -> Iterator[tuple[Daemon, TestUsers]]:
    """A host namespace, a temp dir, test users and a daemon; everything cleaned up."""
    users = TestUsers()
    tmp = Path(tempfile.mkdtemp(prefix="nsdt-"))
    os.chmod(tmp, 0o755)  # tenants' test clients must reach the socket
    (tmp / "run").mkdir(mode=0o755)
    with host_netns() as host:
        d = Daemon(host, tmp, run_dir, extra)
        try:
            yield d, users
        finally:
            d.kill()
            # Whatever a failed test left: namespace files of its users only.
            leftovers = (
                [
                    os.path.join(run_dir, n)
                    for n in os.listdir(run_dir)
                    if n.startswith(users.prefix)
                ]
                if os.path.isdir(run_dir)
                else []
            )
            unmount_files(leftovers)
            users.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(extra: str = "") -> Iterator[tuple[Daemon, TestUsers]]:
    """``daemon_env`` with the daemon started, and stopped cleanly at the end."""
    with daemon_env(extra=extra) as (d, users):
        d.start()
        yield d, users
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()
