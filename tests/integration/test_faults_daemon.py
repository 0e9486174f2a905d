"""Faults through the real daemon: GetFaults and `nsctl faults` (table, --json,
--since), who may read which faults, and bad queries. This host's cgroup v2 has
no memory controller, so the faults are put into the daemon's own store while it
is stopped (the real SQLite file, then read by the restarted daemon); the watcher
itself is tested on tmpfs files (tests/unit/test_faults.py) and on the real
kernel in the VM tier."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from nsd import store
from nsd.faults import Fault, ProcessSample
from tests.harness import Daemon, daemon_env, uid_of
from tests.integration.test_auth import call_as

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
]

T = "io.nsd.Tenant."
DENIED = {"error": "org.varlink.service.PermissionDenied"}


@pytest.fixture(scope="module")
def faults_env() -> Iterator[tuple[Daemon, str, str, int]]:
    with daemon_env() as (d, users):
        d.start()
        alice, bob = users.add(), users.add()
        d.call(T + "Create", name=alice)
        d.call(T + "Create", name=bob)
        assert d.stop() == 0, d.log_text()
        now = int(time.time() * 1e6)
        hour = 3600 * 10**6
        db = store.Store(d.state_dir / "nsd.db")
        procs = (ProcessSample(4711, "python3", 63 << 20, "/nsd-enter-1.scope"),)
        db.add_faults(
            [
                Fault(uid_of(alice), alice, "oom_kill", now - 2 * hour, 1, 64 << 20, 64 << 20,
                      procs),
                Fault(uid_of(alice), alice, "memory_max", now - 60 * 10**6, 14, 64 << 20,
                      (64 << 20) - 4096, procs),
                Fault(uid_of(bob), bob, "pids_max", now - 30 * 10**6, 3, 100, 100, ()),
            ],
            keep=100,
            keep_after_us=0,
        )  # fmt: skip
        db.close()
        d.start()
        yield d, alice, bob, now
        assert d.stop() == 0, d.log_text()


def test_get_faults(faults_env: tuple[Daemon, str, str, int]) -> None:
    d, alice, bob, now = faults_env
    every = d.call(T + "GetFaults")["faults"]
    assert [(f["name"], f["kind"]) for f in every] == [
        (alice, "oom_kill"), (alice, "memory_max"), (bob, "pids_max")
    ]  # fmt: skip
    first = every[0]
    assert first["limit"] == 64 << 20 and first["count"] == 1 and first["uid"] == uid_of(alice)
    assert first["processes"] == [
        {"pid": 4711, "comm": "python3", "rssBytes": 63 << 20, "cgroup": "/nsd-enter-1.scope"}
    ]
    mine = d.call(T + "GetFaults", name=alice, sinceUSec=now - 3600 * 10**6)["faults"]
    assert [f["kind"] for f in mine] == ["memory_max"]
    assert [f["kind"] for f in d.call(T + "GetFaults", limit=1)["faults"]] == ["pids_max"]


def test_nsctl_faults(faults_env: tuple[Daemon, str, str, int]) -> None:
    d, alice, _bob, _ = faults_env
    out = d.nsctl("faults", alice).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "USER", "UID", "KIND"]
    assert [line.split()[4] for line in lines[1:]] == ["oom_kill", "memory_max"]
    assert "64M" in lines[1] and "python3[4711] 63M" in lines[1]
    recent = d.nsctl("faults", alice, "--since", "1h").stdout
    assert "memory_max" in recent and "oom_kill" not in recent
    as_json = json.loads(d.nsctl("--json", "faults", "--since", "90min").stdout)
    assert [f["kind"] for f in as_json["faults"]] == ["memory_max", "pids_max"]
    bad = d.nsctl("faults", "--since", "yesterday-ish", check=False)
    assert bad.returncode != 0 and "not an age" in bad.stderr
    bad = d.nsctl("faults", "--limit", "0", check=False)
    assert bad.returncode == 1 and "io.nsd.Tenant.InvalidFaultQuery" in bad.stderr
    assert "invalid limit: must be an integer from 1 to 10000" in bad.stderr


def test_a_tenant_reads_only_its_own_faults(faults_env: tuple[Daemon, str, str, int]) -> None:
    d, alice, bob, _ = faults_env
    own = call_as(d, alice, T + "GetFaults", name=alice)["ok"]
    assert [f["name"] for f in own["faults"]] == [alice, alice]  # type: ignore[index]
    assert call_as(d, alice, T + "GetFaults", name=bob) == DENIED
    assert call_as(d, alice, T + "GetFaults") == DENIED
