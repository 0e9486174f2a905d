"""The README's front door: ./scripts/run starts nsd on embedded defaults, nsctl works.

The daemon runs on its default paths (/run/nsd, /var/lib/nsd, /run/netns), so the
test gives it a private mount namespace with empty tmpfs mounts on /run and
/var/lib/nsd, inside a test-made host network namespace: the real machine's
paths and network are never touched, and everything vanishes with the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nsd.core.doctor import systemd_is_pid1
from tests.harness import ROOT, TestUsers, host_netns, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount and network namespaces"),
]


def test_scripts_run_with_no_config_then_nsctl(tmp_path: Path) -> None:
    if Path("/etc/nsd/nsd.toml").exists():
        pytest.skip("this host has /etc/nsd/nsd.toml; the test needs embedded defaults")
    users = TestUsers()
    made_state_dir = not os.path.exists("/var/lib/nsd")
    os.makedirs("/var/lib/nsd", exist_ok=True)  # a mount point for the private tmpfs
    log = tmp_path / "run.log"
    try:
        name = users.add()
        with host_netns() as host, open(log, "wb") as out:
            script = (
                "mount -t tmpfs nsdtest /run && mount -t tmpfs nsdtest /var/lib/nsd && "
                f"exec {ROOT}/scripts/run"
            )
            proc = subprocess.Popen(
                ["nsenter", f"--net={host}", "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", script],
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
            try:
                nsctl = ["nsenter", "-t", str(proc.pid), "-m", "-n", f"{ROOT}/.venv/bin/nsctl"]
                deadline = time.monotonic() + 120
                while run(*nsctl, "status", check=False).returncode != 0:
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                created = run(*nsctl, "create", name).stdout
                assert created.startswith(f"created {name}: 100.64.0.2 fd")
                assert f"/run/netns/{name}" in created
                listed = run(*nsctl, "list").stdout
                assert name in listed and "1 tenant(s)" in listed
                status = run(*nsctl, "status").stdout
                # On a host without systemd as PID 1 the daemon says so and serves anyway.
                degraded = "degraded: systemd is not PID 1" in status
                assert degraded == (not systemd_is_pid1()), status
                run(*nsctl, "remove", name)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                assert proc.wait(30) == 0, log.read_text()
        text = log.read_text()
        assert "ready on /run/nsd/io.nsd.Tenant" in text
        assert "configuration error" not in text
    finally:
        users.cleanup()
        if made_state_dir:
            os.rmdir("/var/lib/nsd")
