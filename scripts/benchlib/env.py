"""What a bench run sets up, and tears down again even when it fails.

Everything carries the run's unique prefix (``nsdb`` + 4 hex digits): the test users
(``<prefix>t<i>``), the tenants' namespace files (``/run/netns/usr_<user>``, the
wrapper-script layout of the seed, so the seed's script runs unchanged), the shell
anchor's namespaces (``/run/netns/<prefix>s<i>``), and the two "host" namespaces
(``<prefix>-nsd``, ``<prefix>-sh``) that play the host's role for nsd and for the
shell anchor. The machine's own interfaces are never touched: every veth has one
end in a bench-made host namespace and the other in a bench-made tenant namespace.
"""

from __future__ import annotations

import contextlib
import errno
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
from pathlib import Path
from types import FrameType
from typing import Any

from nsd.net import linux
from tests.harness import Daemon

RUN_NETNS = "/run/netns"
_RECONCILE = re.compile(r"reconcile: (\d+) tenant\(s\), (\d+) action\(s\), (\d+) problem\(s\)")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


class Cleanup:
    """A stack of undo actions, run in reverse order; one failing does not stop the rest.

    SIGTERM and SIGHUP are turned into SystemExit so that an interrupted run cleans up
    exactly like a failed one (SIGINT already raises KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._undo.append((what, fn))

    def run(self) -> None:
        # Ignore further interruptions while undoing: a second Ctrl-C must not leave
        # half the users and namespaces behind.
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._undo:
                what, fn = self._undo.pop()
                try:
                    fn()
                except Exception as e:
                    log(f"cleanup: {what} failed: {e}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def active(self) -> Iterator[Cleanup]:
        def stop(signum: int, _frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield self
        finally:
            self.run()
            for s, h in old.items():
                signal.signal(s, h)


def new_prefix() -> str:
    return "nsdb" + secrets.token_hex(2)


# -- users --------------------------------------------------------------------------


def add_users(cleanup: Cleanup, prefix: str, n: int, progress: bool = True) -> list[str]:
    """``n`` users; the first (the launcher's) has a home and a login shell, as a hosting
    user does; the rest are bare accounts (nsd needs only the NSS entry)."""
    names: list[str] = []

    def undo() -> None:
        for name in names:
            if name == names[0]:
                run("pkill", "-KILL", "-u", name, check=False)
            run(
                "userdel", "--force", *(["--remove"] if name == names[0] else []), name, check=False
            )

    cleanup.push(f"delete {prefix}t* users", undo)
    t0 = time.monotonic()
    for i in range(n):
        name = f"{prefix}t{i}"
        if i == 0:
            cmd = ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name]
        else:
            cmd = [
                "useradd",
                "--no-create-home",
                "--no-user-group",
                "--gid",
                "users",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ]
        run(*cmd)
        names.append(name)
        if progress and n >= 200 and (i + 1) % 200 == 0:
            log(f"  {i + 1}/{n} users ({time.monotonic() - t0:.1f} s)")
    return names


# -- namespaces ---------------------------------------------------------------------


def add_host_netns(cleanup: Cleanup, name: str) -> str:
    run("ip", "netns", "add", name)
    cleanup.push(f"delete netns {name}", lambda: _del_netns(name))
    run("ip", "-n", name, "link", "set", "lo", "up")
    return f"{RUN_NETNS}/{name}"


def _del_netns(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


def remove_namespace_files(prefixes: tuple[str, ...], directory: str = RUN_NETNS) -> int:
    """Unmount and unlink the namespace files in ``directory`` whose names start with one
    of ``prefixes`` (only the bench's own); returns how many were removed."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        if not entry.startswith(prefixes):
            continue
        path = os.path.join(directory, entry)
        for _ in range(8):  # stacked mounts, if something made any
            try:
                linux.umount2(path, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    log(f"cleanup: umount {path}: {e.strerror}")
                break
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:  # go on with the others
            log(f"cleanup: unlink {path}: {e.strerror}")
    return removed


# -- the daemon ---------------------------------------------------------------------


class BenchDaemon(Daemon):
    """tests/harness.py's Daemon with production logging and timed starts.

    The harness logs at debug level, which would slow every call; the bench runs nsd
    as an operator would (``log_level = "info"``), with the seed's namespace layout
    (``name_template = "usr_{user}"`` in /run/netns) so the wrapper script can use
    nsd's namespaces unchanged.
    """

    def __init__(
        self,
        host: str,
        tmp: Path,
        *,
        policy: bool = False,
        run_dir: str = RUN_NETNS,
        template: str = "usr_{user}",
        pythonpath: str | None = None,
        extra: str = "",
    ) -> None:
        super().__init__(host, tmp, run_dir)
        self.pythonpath = pythonpath
        #: perf_counter() at the last start's exec
        self.exec_at = 0.0
        self.config.write_text(
            f'[daemon]\nsocket = "{self.socket}"\nstate_dir = "{self.state_dir}"\n'
            'log_level = "info"\nshutdown_timeout = 30\n'
            f'[netns]\nrun_dir = "{run_dir}"\nname_template = "{template}"\n'
            f"[network]\nenabled = {'true' if policy else 'false'}\n" + extra
        )

    def start_timed(self, timeout: float = 900.0) -> float:
        """Start nsd; seconds from exec to READY=1 on a NOTIFY_SOCKET bound here."""
        assert self.proc is None or self.proc.poll() is not None
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        notify_path = str(self.tmp / f"notify{self.starts}")
        self.starts += 1
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        # An installed nsd starts from its bytecode (pip and the package compile it);
        # with PYTHONDONTWRITEBYTECODE inherited from a development shell every start
        # would compile nsd's ~100 modules anew (0.3 s of each start, measured).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if self.pythonpath is not None:  # nsd from another tree, e.g. with a patch applied
            env["PYTHONPATH"] = self.pythonpath
        try:
            with open(self.log, "ab") as logf:
                t0 = self.exec_at = time.perf_counter()
                # nsenter --net execs without forking: proc.pid is nsd's own PID.
                self.proc = subprocess.Popen(
                    self.command(), stdout=logf, stderr=logf, env=env, cwd=self.tmp
                )
            deadline = t0 + timeout
            notify.settimeout(0.05)
            while time.perf_counter() < deadline:
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"nsd exited with {self.proc.returncode}:\n{self.log_tail()}"
                        ) from None
                    continue
                if "READY=1" in msg.split("\n"):
                    return time.perf_counter() - t0
            raise RuntimeError(f"nsd not ready after {timeout} s:\n{self.log_tail()}")
        finally:
            notify.close()
            os.unlink(notify_path)

    def last_reconcile(self) -> dict[str, int] | None:
        """The start-up reconcile's summary line of the last start, as numbers."""
        with open(self.log, "rb") as f:
            f.seek(getattr(self, "log_offset", 0))
            text = f.read().decode(errors="replace")
        found = list(_RECONCILE.finditer(text))
        if not found:
            return None
        m = found[-1]
        return {"tenants": int(m[1]), "actions": int(m[2]), "problems": int(m[3])}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        """RSS and PSS of the daemon in KiB (PSS from /proc/PID/smaps_rollup)."""
        return process_memory(self.pid)


def loadavg() -> list[float]:
    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(x) for x in f.read().split()[:3]]


def process_memory(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Dirty", "Anonymous"):
                out[key.lower() + "_kib"] = int(rest.split()[0])
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["hwm_kib"] = int(line.split()[1])
    return out


def start_daemon(
    cleanup: Cleanup,
    prefix: str,
    host: str,
    *,
    policy: bool = False,
    private_run_dir: bool = False,
    pythonpath: str | None = None,
    extra: str = "",
) -> BenchDaemon:
    """A daemon in ``host``. ``private_run_dir``: namespaces in a run dir of its own
    (template ``{user}``) instead of /run/netns/usr_<user>, so that a second daemon
    can serve the same users."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    os.chmod(tmp, 0o755)  # noqa: S103 -- tenants' clients must reach the socket
    (tmp / "run").mkdir(mode=0o755)
    run_dir = str(tmp / "netns") if private_run_dir else RUN_NETNS

    def remove() -> None:
        if private_run_dir:
            remove_namespace_files(("",), run_dir)
            with contextlib.suppress(OSError):  # the adapter made it a mount point
                linux.umount2(run_dir, linux.MNT_DETACH)
        shutil.rmtree(tmp, ignore_errors=True)

    cleanup.push(f"remove {tmp}", remove)
    d = BenchDaemon(
        host,
        tmp,
        policy=policy,
        run_dir=run_dir,
        template="{user}" if private_run_dir else "usr_{user}",
        pythonpath=pythonpath,
        extra=extra,
    )
    cleanup.push("stop nsd", d.kill)
    d.start_timed()
    return d


def call(d: Daemon, method: str, **params: Any) -> dict[str, Any]:
    return d.call(method, **params)
