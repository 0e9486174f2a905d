"""nsd-exec's argument parsing and Enter-reply validation (no privileges needed)."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import pytest

from nsd import exec as nsd_exec
from nsd.exec import Failure, HelpRequested, parse_args, parse_enter_reply


def test_parse_minimal() -> None:
    opts = parse_args(["alice", "--", "php-fpm", "--nodaemonize"])
    assert (opts.user, opts.argv, opts.create) == ("alice", ["php-fpm", "--nodaemonize"], True)
    assert opts.setenv == []


def test_parse_options() -> None:
    opts = parse_args(
        [
            "--socket",
            "/tmp/s",
            "--no-create",
            "--setenv=A=1",
            "--setenv",
            "B",
            "--setenv",
            "C=",
            "--timeout=2.5",
            "alice",
            "--",
            "cmd",
            "--",
            "-x",
        ]
    )
    assert opts.socket_path == "/tmp/s"
    assert opts.create is False
    assert opts.setenv == [("A", "1"), ("B", None), ("C", "")]
    assert opts.timeout == 2.5
    assert opts.argv == ["cmd", "--", "-x"]


def test_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSD_SOCKET", "/run/other.sock")
    assert parse_args(["alice", "--", "cmd"]).socket_path == "/run/other.sock"
    monkeypatch.delenv("NSD_SOCKET")
    assert parse_args(["alice", "--", "cmd"]).socket_path == "/run/nsd/io.nsd.Tenant"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["alice"],
        ["alice", "cmd"],
        ["alice", "--"],
        ["alice", "--", ""],
        ["--bogus", "alice", "--", "cmd"],
        ["--socket"],
        ["--socket=", "alice", "--", "cmd"],
        ["--setenv", "=x", "alice", "--", "cmd"],
        ["--timeout", "soon", "alice", "--", "cmd"],
        ["--timeout", "0", "alice", "--", "cmd"],
    ],
)
def test_parse_errors(args: list[str]) -> None:
    with pytest.raises(Failure) as info:
        parse_args(args)
    assert info.value.status == 125
    assert "\n" not in info.value.message


def test_help() -> None:
    with pytest.raises(HelpRequested):
        parse_args(["--no-create", "-h"])


def test_main_help_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert nsd_exec.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: nsd-exec")


def _reply(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "tenant": {"name": "alice", "uid": 1001, "namespaceInode": 4026532000},
        "namespaceFileDescriptor": 0,
        "umask": 0o022,
        "resourceLimits": [{"name": "nofile", "soft": 1024, "hard": None}],
    }
    params.update(overrides)
    return {"parameters": params}


def _fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_reply_ok_keeps_only_namespace_fd() -> None:
    fds = _fds(3)
    grant = parse_enter_reply(_reply(namespaceFileDescriptor=2), fds)
    try:
        assert grant.ns_fd == fds[2]
        assert (grant.name, grant.uid, grant.ns_inode, grant.umask) == (
            "alice",
            1001,
            4026532000,
            0o022,
        )
        assert grant.limits == [
            ("nofile", resource.RLIMIT_NOFILE, 1024, resource.RLIM_INFINITY),
        ]
        assert [_is_open(fd) for fd in fds] == [False, False, True]
    finally:
        os.close(fds[2])


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        ([], "not an object"),
        ({"parameters": None}, "no parameters"),
        (_reply(tenant=None), "no tenant"),
        (_reply(tenant={"name": "alice", "uid": True}), "tenant.uid"),
        (_reply(tenant={"name": "alice", "uid": "1001"}), "tenant.uid"),
        (_reply(namespaceFileDescriptor=1), "namespaceFileDescriptor"),
        (_reply(namespaceFileDescriptor=-1), "namespaceFileDescriptor"),
        (_reply(umask=0o1000), "umask"),
        (_reply(resourceLimits={}), "resourceLimits"),
        (_reply(resourceLimits=[{"name": "NOFILE", "soft": 1, "hard": 1}]), "name"),
        (_reply(resourceLimits=[{"name": "bogus", "soft": 1, "hard": 1}]), "does not know"),
        (_reply(resourceLimits=[{"name": "nofile", "soft": 9, "hard": 8}]), "above"),
        (_reply(resourceLimits=[{"name": "nofile", "soft": None, "hard": 8}]), "above"),
        (_reply(resourceLimits=[{"name": "nofile", "soft": -1, "hard": None}]), "nofile"),
        (_reply(resourceLimits=[{"name": "core", "soft": 1 << 64, "hard": None}]), "core"),
    ],
)
def test_reply_rejected_and_fds_closed(reply: object, needle: str) -> None:
    fds = _fds(1)
    with pytest.raises(Failure) as info:
        parse_enter_reply(reply, fds)
    assert needle in info.value.message
    assert info.value.status == 125
    assert not _is_open(fds[0])


def test_error_reply_is_one_line() -> None:
    fds = _fds(1)
    reply = {"error": "io.nsd.Tenant.NoSuchTenant", "parameters": {"name": "evil\nname\x1b[2J"}}
    with pytest.raises(Failure) as info:
        parse_enter_reply(reply, fds)
    message = info.value.message
    assert message.startswith("nsd refused: io.nsd.Tenant.NoSuchTenant {")
    assert message.isprintable()
    assert not _is_open(fds[0])


def test_no_heavy_imports() -> None:
    """nsd-exec starts on every service start: it must not drag in the daemon."""
    import subprocess

    code = (
        "import sys, nsd.exec; bad = {'argparse', 'asyncio', 'dataclasses', 'typing', "
        "'logging', 'pyroute2', 'nsd.config', 'nsd.model'} & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": os.path.dirname(os.path.dirname(nsd_exec.__file__))},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
