"""The systemd adapter against a real systemd 252, booted in a container (see conftest).

``test_adapter_inside_the_container`` runs tests/systemd/inside in one container;
``test_limits_hold_after_reboot`` boots a container twice with the same /etc/systemd
directories (the rest is volatile) to show that slice limits set through the adapter
hold at the next boot, before and without nsd.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from nspawn import PYTHON, ROOT, Container

pytestmark = pytest.mark.slow


def test_adapter_inside_the_container(container: Container) -> None:
    started = time.monotonic()
    result = container.run(
        [
            PYTHON,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            str(ROOT / "tests/systemd/inside"),
        ],
        check=False,
        cwd=str(ROOT),
        timeout=600,
        env={"NSD_SYSTEMD_INSIDE": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    elapsed = time.monotonic() - started
    report = (
        f"container boot {container.boot_seconds:.1f} s, inside tests {elapsed:.1f} s\n"
        f"{result.stdout}\n{result.stderr}"
    )
    print(report)
    assert result.returncode == 0, report


UNIT = """\
[Unit]
Description=stands for a tenant's own service, started at boot before any nsd

[Service]
Slice=tenant-1001.slice
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


def test_limits_hold_after_reboot(boot: type[Container], tmp_path: Path) -> None:
    control = tmp_path / "system.control"
    units = tmp_path / "system"
    control.mkdir()
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "nsd-boot-probe.service").write_text(UNIT)
    os.symlink(
        "../nsd-boot-probe.service", units / "multi-user.target.wants/nsd-boot-probe.service"
    )
    binds = [f"--bind={control}:/etc/systemd/system.control", f"--bind={units}:/etc/systemd/system"]

    first = boot(binds).boot()
    try:
        before = json.loads(first.python("tests/systemd/inside/reboot_phase.py", "set"))
    finally:
        first.shutdown()
    assert before["slice_state"] == "active"
    assert (control / "tenant-1001.slice.d" / "50-MemoryMax.conf").exists()

    second = boot(binds).boot()  # the "reboot": nothing of phase one runs again
    try:
        after = json.loads(second.python("tests/systemd/inside/reboot_phase.py", "check"))
    finally:
        second.shutdown()
    assert (
        after["limits"]
        == before["limits"]
        == {
            "MemoryMax": 512 << 20,
            "MemoryHigh": 256 << 20,
            "CPUWeight": 50,
            "TasksMax": 200,
            "IOWeight": 40,
        }
    )
    assert after["probe_state"] == "active"
    assert after["probe_cgroup"] == "/tenant.slice/tenant-1001.slice/nsd-boot-probe.service"
    assert all(p.startswith("/etc/systemd/system.control/") for p in after["dropins"])
