"""Objects someone else put where nsd keeps a tenant's namespace file.

nsd removes only what it makes at ``/run/netns/<name>``: network namespace bind
mounts and the empty regular file under them. Anything else (a symbolic link, a
FIFO, a directory, a file with content) stays where it is, the call that met it
says what it is, and the tenant's row is never left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from nsd.net import linux
from nsd.varlink.protocol import VarlinkError
from tests.harness import Daemon, TestUsers, running_daemon, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
]

T = "io.nsd.Tenant."


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with running_daemon() as env:
        yield env


@pytest.fixture
def bait() -> Iterator[str]:
    """A file outside /run/netns that a planted symbolic link points to."""
    fd, path = tempfile.mkstemp(prefix="nsdt-bait-")
    os.write(fd, b"precious\n")
    os.close(fd)
    yield path
    os.unlink(path)


def plant_symlink(path: str, bait: str) -> None:
    os.symlink(bait, path)


def plant_fifo(path: str, bait: str) -> None:
    os.mkfifo(path)


def plant_directory(path: str, bait: str) -> None:
    os.mkdir(path)
    with open(os.path.join(path, "inside"), "w") as f:
        f.write("precious\n")


def plant_file(path: str, bait: str) -> None:
    with open(path, "w") as f:
        f.write("precious\n")


PLANTS: dict[str, tuple[Callable[[str, str], None], str]] = {
    "symlink": (plant_symlink, "a symbolic link"),
    "fifo": (plant_fifo, "a FIFO"),
    "directory": (plant_directory, "a directory"),
    "file": (plant_file, "a file with content"),
}


def unplant(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def error_of(d: Daemon, method: str, **params: object) -> VarlinkError:
    with pytest.raises(VarlinkError) as info:
        d.call(T + method, **params)
    return info.value


def assert_untouched(path: str, kind: str, bait: str) -> None:
    if kind == "symlink":
        assert os.readlink(path) == bait
        with open(bait) as f:
            assert f.read() == "precious\n"
    elif kind == "directory":
        with open(os.path.join(path, "inside")) as f:
            assert f.read() == "precious\n"
    elif kind == "file":
        with open(path) as f:
            assert f.read() == "precious\n"
    else:
        assert os.path.exists(path)


def refused_and_untouched(d: Daemon, method: str, name: str, kind: str, bait: str) -> str:
    """``method`` answers what is in the way and leaves it; no row, no link remain."""
    path = f"/run/netns/{name}"
    e = error_of(d, method, name=name)
    assert e.name == T + "NetworkSetupFailed", e
    assert e.parameters["step"] == "foreign"
    message: str = e.parameters["message"]
    assert f"{path} is {PLANTS[kind][1]} that nsd did not make; left in place" in message
    assert_untouched(path, kind, bait)
    assert error_of(d, "Get", name=name).name == T + "NoSuchTenant"
    assert d.db_rows(f"SELECT count(*) FROM tenants WHERE uid = {uid_of(name)}") == [(0,)]
    assert f"nsd{uid_of(name)}" not in d.host_links()
    return message


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_create_leaves_a_planted_object_and_no_row(
    env: tuple[Daemon, TestUsers], bait: str, kind: str
) -> None:
    d, users = env
    name = users.add()
    path = f"/run/netns/{name}"
    PLANTS[kind][0](path, bait)
    try:
        refused_and_untouched(d, "Create", name, kind, bait)
    finally:
        unplant(path)
    # Nothing stuck: once the object is gone, the same name works.
    d.call(T + "Create", name=name)
    d.call(T + "Remove", name=name)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_remove_leaves_an_object_that_replaced_the_namespace(
    env: tuple[Daemon, TestUsers], bait: str, kind: str
) -> None:
    """Someone unmounted a tenant's namespace and put something else there."""
    d, users = env
    name = users.add()
    path = f"/run/netns/{name}"
    d.call(T + "Create", name=name)
    linux.umount2(path, linux.MNT_DETACH)
    os.unlink(path)
    PLANTS[kind][0](path, bait)
    try:
        message = refused_and_untouched(d, "Remove", name, kind, bait)
        assert message.startswith("tenant removed, but "), message
    finally:
        unplant(path)
