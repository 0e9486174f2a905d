"""valgrind --track-fds=yes over the native programs: no descriptor and no allocation
left behind, on the success path and on every failure path.

nsd-exec's success path ends in execve: with --trace-children=yes valgrind follows
into the workload, whose descriptor table at exit is what nsd-exec handed on.
pam_nsd.so runs inside pamtester (the session process), whose descriptors and heap
at exit include everything the module left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import Daemon, daemon_env
from tests.integration.test_pam_nsd import PamRunner, pam_runner
from tests.native import SANITIZED, native_program

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(SANITIZED, reason="valgrind runs on the release build, ASan on its own"),
]

VALGRIND = [
    "valgrind",
    "--track-fds=yes",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite,indirect,possible",
    "--error-exitcode=99",
]


def check(output: str) -> None:
    """Every process valgrind watched: only 0-2 open at exit, no error, no leak."""
    fd_lines = re.findall(r"FILE DESCRIPTORS: (\d+) open \((\d+) std\) at exit", output)
    assert fd_lines, output
    assert all(n == std == "3" for n, std in fd_lines), output
    assert re.findall(r"ERROR SUMMARY: (\d+) errors", output) == ["0"] * len(fd_lines), output
    assert "definitely lost" not in output or "definitely lost: 0 bytes" in output, output


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, str, str]]:
    """The daemon, a tenant, and a user who is not (yet) one."""
    with daemon_env() as (d, users):
        d.start()
        name = users.add()
        missing = users.add("missing")
        d.call("io.nsd.Tenant.Create", name=name)
        try:
            yield d, name, missing
        finally:
            d.stop()
            users.cleanup()


def run_exec(d: Daemon, *args: str, trace: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [*VALGRIND, f"--trace-children={'yes' if trace else 'no'}"]
    return subprocess.run(
        [*argv, str(native_program("nsd-exec")), "--socket", d.socket, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        close_fds=True,
        stdin=subprocess.DEVNULL,
    )


def test_exec_success_hands_on_nothing(env: tuple[Daemon, str, str]) -> None:
    d, name, _ = env
    res = run_exec(d, name, "--", "/bin/true", trace=True)
    assert res.returncode == 0, res.stderr
    check(res.stderr)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--bogus", "USER", "--", "/bin/true"], 125),
        (["nsdt-no-such-user", "--", "/bin/true"], 125),
        (["--no-create", "nobody", "--", "/bin/true"], 125),
        (["USER", "--", "nsdt-no-such-command"], 127),
        (["USER", "--", "/etc/hostname"], 126),
    ],
)
def test_exec_failure_paths(env: tuple[Daemon, str, str], args: list[str], status: int) -> None:
    d, name, _ = env
    res = run_exec(d, *(name if a == "USER" else a for a in args))
    assert res.returncode == status, res.stderr
    check(res.stderr)


def test_exec_daemon_unreachable(env: tuple[Daemon, str, str]) -> None:
    _, name, _ = env
    res = subprocess.run(
        [*VALGRIND, str(native_program("nsd-exec")), "--socket", "/nonexistent/s", name, "--",
         "/bin/true"],
        capture_output=True, text=True, timeout=120, check=False, close_fds=True,
    )  # fmt: skip
    assert res.returncode == 125, res.stderr
    check(res.stderr)


@pytest.mark.parametrize("user", ["TENANT", "nsdt-no-such-user"])
def test_ensure_paths(env: tuple[Daemon, str, str], user: str) -> None:
    d, name, _ = env
    res = subprocess.run(
        [*VALGRIND, str(native_program("nsd-ensure")), "--socket", d.socket,
         name if user == "TENANT" else user],
        capture_output=True, text=True, timeout=120, check=False, close_fds=True,
    )  # fmt: skip
    assert res.returncode == (0 if user == "TENANT" else 1), res.stderr
    check(res.stderr)


@pytest.fixture
def pam() -> Iterator[PamRunner]:
    with pam_runner() as runner:
        yield runner


@pytest.mark.parametrize(
    "args",
    [
        [],  # joins
        ["create=no"],  # a missing tenant: skipped
        ["create=no", "nontenant=deny"],
        ["socket=/nonexistent/s", "unreachable=deny"],
        ["bogus"],
    ],
)
def test_pam_paths(env: tuple[Daemon, str, str], pam: PamRunner, args: list[str]) -> None:
    d, name, missing = env
    user = missing if "create=no" in args else name
    argv = [f"socket={d.socket}", *args] if not any(a.startswith("socket=") for a in args) else args
    out = pam.open(user, *argv, tool=tuple(VALGRIND))
    check(out.output)
