"""Boot this host's own /usr as a systemd container (systemd-nspawn) and run things inside.

See conftest.py for what the container is and is not good for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
BOOT_TIMEOUT = 60.0


class Container:
    """One booted container; ``run`` executes a command inside all its namespaces."""

    def __init__(
        self, binds: Sequence[str] = (), *, directory: Path | None = None, setup: str = ""
    ) -> None:
        """``directory``: boot that OS tree (as it is, writable) instead of this host's
        /usr on a volatile root; ``setup``: shell commands run first in a private mount
        namespace that nspawn then runs in (e.g. mounting an overlay at ``directory``)."""
        self.name = "nsdt-" + secrets.token_hex(4)
        self.binds = list(binds)
        self.directory = directory
        self.setup = setup
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0  # PID (on the host) of the container's systemd
        self.boot_seconds = 0.0
        self.log = Path(f"/tmp/{self.name}.log")

    def _args(self) -> list[str]:
        if self.directory is None:
            root = [
                "--directory=/",
                "--volatile=yes",  # tmpfs root + the host's /usr read-only
                f"--bind-ro={ROOT}",
                # PAM for the logind tests (su creates a session); read-only, harmless.
                "--bind-ro=/etc/pam.d",
                "--bind-ro=/etc/security",
                "--bind-ro=/etc/login.defs",
            ]
        else:
            root = [f"--directory={self.directory}"]
        args = [
            "systemd-nspawn",
            "--quiet",
            f"--machine={self.name}",
            "--boot",
            "--register=no",  # no systemd on the host to register with
            "--keep-unit",
            "--console=passive",
            "--private-network",
            *root,
            *self.binds,
            "--",
            "systemd.firstboot=off",
        ]
        if self.setup:
            # exec: nspawn keeps the PID Popen knows (its children are the container).
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                    self.setup + '\nexec "$@"', "sh", *args]  # fmt: skip
        return args

    def boot(self) -> Container:
        started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # No orphaned container if pytest is killed. Only prctl() runs in the child.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        try:
            self.leader = self._wait_leader(started)
            self._wait_running(started)
        except BaseException:
            self.shutdown()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _fail(self, why: str) -> None:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        pytest.fail(f"container {self.name}: {why}\n--- nspawn log ---\n{tail}")

    def _wait_leader(self, started: float) -> int:
        assert self.proc is not None
        while time.monotonic() - started < BOOT_TIMEOUT:
            if self.proc.poll() is not None:
                self._fail(f"systemd-nspawn exited with {self.proc.returncode}")
            for child in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            time.sleep(0.05)
        self._fail("no systemd in the container")
        raise AssertionError  # unreachable

    def _wait_running(self, started: float) -> None:
        state = ""
        while time.monotonic() - started < BOOT_TIMEOUT:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        self._fail(f"systemd did not finish booting (state {state!r})")

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str = "/",
    ) -> subprocess.CompletedProcess[str]:
        environment = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        result = subprocess.run(
            # env -C: nsenter's own --wd resolves the directory before entering the mounts.
            ["nsenter", "-t", str(self.leader), "-a", "env", "-C", cwd, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"in {self.name}: {' '.join(argv)} exited {result.returncode}\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def python(self, script: str, *args: str, timeout: float = 120.0) -> str:
        """Run a script of the repository with the venv's Python inside; its stdout."""
        return self.run(
            [PYTHON, str(ROOT / script), *args],
            cwd=str(ROOT),
            timeout=timeout,
            env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)},
        ).stdout

    def shutdown(self) -> None:
        """Power the container off (SIGTERM to nspawn); kill it if that takes too long."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.log.unlink()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (nspawn's "power off") when the parent dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [
                    int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return found
