"""The state database cannot be written (its directory full, or read-only): every
mutating call answers StateWriteFailed, nothing is left half-made on the host, and
once the database is writable again the next reconcile converges and a second one is
a no-op. A real daemon in a test host namespace, its state directory on a small tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.harness import Daemon, TestUsers, daemon_env, netns_inode, run, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, mounts"),
]

T = "io.nsd.Tenant."
FAILED = T + "StateWriteFailed"


@contextlib.contextmanager
def full(d: Daemon) -> Iterator[None]:
    """Fill the state directory's file system to the last byte."""
    filler = d.state_dir / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


@contextlib.contextmanager
def read_only(d: Daemon) -> Iterator[None]:
    """Every write of the daemon to its database fails with EROFS (injected: a file
    system cannot be remounted read-only while the daemon holds files open on it)."""
    assert d.proc is not None
    tracer = subprocess.Popen(
        ["strace", "-qq", "-f", "-p", str(d.proc.pid), "-e", "trace=pwrite64",
         "-e", f"inject=pwrite64:error={errno.errorcode[errno.EROFS]}", "-o", "/dev/null"],
    )  # fmt: skip
    time.sleep(1.0)  # strace attaches to every thread before we act
    try:
        yield
    finally:
        tracer.kill()
        tracer.wait()


@pytest.fixture
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env() as (d, users):
        d.state_dir.mkdir(mode=0o700)
        run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "nsdt-state", str(d.state_dir))
        try:
            yield d, users
        finally:
            d.kill()  # before the unmount: it holds the database open
            run("umount", "--lazy", str(d.state_dir), check=False)


def _error(d: Daemon, method: str, **params: object) -> str | None:
    from nsd.varlink.client import VarlinkError

    try:
        d.call(method, **params)
    except VarlinkError as e:
        assert e.parameters.get("path") == str(d.state_dir / "nsd.db")
        assert e.parameters.get("reason")
        return e.name
    return None


def _whole(d: Daemon, name: str) -> None:
    t = d.call(T + "Get", name=name)["tenant"]
    assert t["state"] == "ready" and t["problems"] == []
    assert netns_inode(t["namespacePath"]) is not None
    run("ping", "-c1", "-W2", t["ipv4Address"], netns=d.host)
    assert d.call(T + "GetNetwork", name=name)["network"]["problems"] == []


@pytest.mark.parametrize("fault", [full, read_only], ids=["full", "read-only"])
def test_state_write_failure_is_clean_and_converges(
    env: tuple[Daemon, TestUsers], fault: object
) -> None:
    d, users = env
    d.start()
    kept, new = users.add(), users.add()
    d.call(T + "Create", name=kept)
    assert callable(fault)
    with fault(d):
        assert _error(d, T + "Create", name=new) == FAILED
        assert _error(d, T + "Remove", name=kept) == FAILED
        assert _error(d, T + "SetBandwidth", name=kept, egressRate="10mbit") == FAILED
        # Reads still work, and nothing was left half-made.
        assert [t["name"] for t in d.call(T + "List")["tenants"]] == [kept]
        _whole(d, kept)
        assert not os.path.exists(f"/run/netns/{new}")
        assert f"nsd{uid_of(new)}" not in d.host_links()
        assert d.call(T + "GetNetwork", name=kept)["network"]["egressOverride"] is None
    # Writable again: the next reconcile converges, the one after it is a no-op.
    d.call("io.nsd.Daemon.Reconcile")
    assert d.call("io.nsd.Daemon.Reconcile")["actions"] == []
    d.call(T + "Create", name=new)
    d.call(T + "SetBandwidth", name=kept, egressRate="10mbit")
    for name in (kept, new):
        _whole(d, name)
    for name in (kept, new):
        d.call(T + "Remove", name=name)
        assert not os.path.exists(f"/run/netns/{name}")
    assert d.stop() == 0, d.log_text()


def test_nsctl_names_the_state_write_failure(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    d.start()
    name = users.add()
    with full(d):
        res = d.nsctl("create", name, check=False)
    assert res.returncode == 1
    assert "cannot write nsd's state database" in res.stderr
    assert "[io.nsd.Tenant.StateWriteFailed]" in res.stderr
    assert d.stop() == 0
