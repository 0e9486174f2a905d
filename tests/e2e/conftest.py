"""End-to-end tests: run INSIDE the Debian 13 VM that ``scripts/vm-test`` boots.

The VM has systemd 257 as PID 1, a pure cgroup v2 hierarchy, nsd installed from
its Debian package with apt (test_00_package.py checks how), and the test users
alice, bob and web-shop (and upg01..upg20 for test_99_package.py). Tests run as
root and use real commands.

Phases. A test is marked ``phase1`` (first boot) or ``phase2`` (after a
reboot of the same disk); the guest runner runs ``pytest -m phaseN``. Phase 1
ends with test_90_reboot.py recording what phase 2 checks. Modules run in file
name order (the number prefix), so a module may rely on an earlier one having
run; fixtures such as ``tenants_ready`` still let a single module run alone.

Figures. Tests put measurements into the session's ``figures`` dict; it is
written to ``$NSD_E2E_FIGURES`` and printed by scripts/vm-test.

Outside the VM (a plain ``pytest`` on a developer machine) every test here is
skipped: they would change the machine's own systemd and network.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import guest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "phase1: first boot of the e2e VM")
    config.addinivalue_line("markers", "phase2: second boot of the same disk (after a reboot)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if guest.PHASE:
        return
    skip = pytest.mark.skip(reason="runs only inside the VM of scripts/vm-test")
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, Any]]:
    data: dict[str, Any] = {}
    yield data
    target = os.environ.get("NSD_E2E_FIGURES")
    if target and data:
        Path(target).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A directory every test user may read and write (sticky, like /tmp)."""
    guest.SCRATCH.mkdir(mode=0o1777, exist_ok=True)
    guest.SCRATCH.chmod(0o1777)
    yield guest.SCRATCH
    shutil.rmtree(guest.SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tenants_ready() -> dict[str, dict[str, Any]]:
    """The three test tenants exist (``nsctl ensure``: a no-op if a test made them)."""
    for name in guest.TENANTS:
        guest.nsctl("ensure", name)
    return guest.tenants()
