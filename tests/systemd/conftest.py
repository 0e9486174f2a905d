"""A real systemd 252 to test the adapter against: this host's own /usr, booted in a container.

The machines nsd is developed on do not run systemd as PID 1, so the fixtures here boot
one with ``systemd-nspawn --directory=/ --volatile=yes --boot`` (about a second): the
root is a tmpfs with the host's /usr mounted read-only, /etc starts empty (systemd
populates what it needs), so nothing the tests do inside reaches the host. The repository
is bound read-only at its own path, so the venv and the code are the same inside.

Tests in ``inside/`` run *inside* such a container (``nsenter`` into all its namespaces,
talking to its system bus at /run/dbus/system_bus_socket); they are collected only when
``NSD_SYSTEMD_INSIDE=1``, which the runner sets. The outer tests (this directory) need
root and ``systemd-nspawn`` (Debian package ``systemd-container``); they skip otherwise.

Limits are not enforced in this container (cgroup v1 controllers are mounted read-only
inside, no memory controller on v2), so what is tested here is systemd's D-Bus
behaviour: units, properties, drop-ins, jobs, placement.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import PYTHON, Container

INSIDE = os.environ.get("NSD_SYSTEMD_INSIDE") == "1"

# The inside tests are not for the host: they need the container's systemd.
collect_ignore_glob = [] if INSIDE else ["inside/*"]


def _can_boot() -> str | None:
    if os.geteuid() != 0:
        return "needs root to boot a systemd container"
    if shutil.which("systemd-nspawn") is None:
        return "needs systemd-nspawn (Debian package systemd-container)"
    if not Path(PYTHON).exists():
        return f"needs the venv at {PYTHON}"
    return None


@pytest.fixture(scope="session")
def boot() -> Iterator[type[Container]]:
    """The Container class, after checking that containers can be booted here."""
    reason = _can_boot()
    if reason is not None:
        pytest.skip(reason)
    yield Container


@pytest.fixture(scope="session")
def container(boot: type[Container]) -> Iterator[Container]:
    """One container for the session, powered off at the end even when tests fail."""
    c = boot().boot()
    try:
        yield c
    finally:
        c.shutdown()
