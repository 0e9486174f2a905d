"""nsd-ensure (native/ensure), the ExecStart= of nsd-tenant@.service, against the real
daemon: the same call and the same output as `nsctl ensure`, idempotent, one line and
status 1 on failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import PY, Daemon, TestUsers
from tests.native import native_program

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


@pytest.fixture(scope="module")
def env(module_daemon: tuple[Daemon, TestUsers]) -> tuple[Daemon, TestUsers]:
    return module_daemon


def ensure(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(native_program("nsd-ensure")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_creates_then_confirms(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    first = ensure("--socket", d.socket, name)
    assert first.returncode == 0, first.stderr
    t = d.call("io.nsd.Tenant.Get", name=name)["tenant"]
    tail = f"{name}: {t['ipv4Address']} {t['ipv6Address']} in {t['namespacePath']}\n"
    assert first.stdout == f"created {tail}"
    again = ensure("--socket", d.socket, name)
    assert (again.returncode, again.stdout, again.stderr) == (0, f"ok {tail}", "")
    # the same answer `nsctl ensure` gives
    nsctl = subprocess.run(
        [str(Path(PY).with_name("nsctl")), "--socket", d.socket, "ensure", name],
        capture_output=True,
        text=True,
        check=True,
    )
    assert nsctl.stdout == again.stdout


def test_failures_are_one_line_and_status_1(env: tuple[Daemon, TestUsers]) -> None:
    d, _ = env
    res = ensure("--socket", d.socket, "nsdt-no-such-user")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("nsd-ensure: nsd refused: io.nsd.Tenant.")
    assert res.stderr.count("\n") == 1
    res = ensure("--socket", "/nonexistent/s", "root")
    assert (res.returncode, res.stderr) == (
        1,
        "nsd-ensure: cannot reach nsd at /nonexistent/s: No such file or directory\n",
    )
    res = ensure("a", "b")
    assert res.returncode == 1 and "exactly one USER" in res.stderr
