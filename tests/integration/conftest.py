"""Fixtures for tests that need real kernel objects (root).

Everything a test creates lives in places the fixtures made for it: a uniquely named
"host" network namespace (``ip netns add nsdt-<random>``) instead of the machine's own,
and a temporary run dir instead of /run/netns. Finalizers remove them even when the
test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import string
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from nsd.net import linux
from tests.harness import Daemon, TestUsers, daemon_env


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces, veth pairs and mounts")


def mount_points_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point == path or mount_point.startswith(prefix):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def unmount_tree(path: str) -> None:
    for _ in range(100):  # stacked mounts need several rounds
        points = mount_points_under(path)
        if not points:
            return
        for point in points:
            with contextlib.suppress(OSError):
                linux.umount2(point, linux.MNT_DETACH)


@pytest.fixture
def host_netns() -> Iterator[str]:
    """Path of a fresh network namespace that plays the host's role."""
    name = "nsdt-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A temporary directory to use instead of /run/netns; unmounted and removed after."""
    path = tempfile.mkdtemp(prefix="nsdt-run-")
    try:
        yield path
    finally:
        unmount_tree(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def link_prefix() -> str:
    """A unique link prefix (5 letters, so prefix + a 10-digit UID fits in 15 bytes)."""
    return "t" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(4))


@pytest.fixture
def running_daemon() -> Iterator[tuple[Daemon, TestUsers]]:
    """A daemon with the harness's settings, started; it must stop cleanly (exit 0)."""
    with daemon_env() as (d, users):
        d.start()
        yield d, users
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[tuple[Daemon, TestUsers]]:
    """The real daemon, started, with a users factory; one per test module."""
    with daemon_env() as (d, users):
        d.start()
        try:
            yield d, users
        finally:
            d.stop()
            users.cleanup()
