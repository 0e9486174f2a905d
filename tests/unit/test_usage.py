"""cgroup v2 parsers, the /proc scan and the sampler, against fixture trees in the
kernel's formats (tests/fixtures/cgroup, tests/fixtures/proc)."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from pathlib import Path

import pytest

from nsd import cgroupstats as cs
from nsd import procscan as ps
from nsd.limits import Limits
from nsd.sampler import SOURCES, Sampler, Target, audit_reply, collect, usage_reply

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CGROUP = str(FIXTURES / "cgroup")
PROC = str(FIXTURES / "proc")
ALICE_SLICE = "/tenant.slice/tenant-1001.slice"
BOB_SLICE = "/tenant.slice/tenant-1002.slice"
ALICE_NS, BOB_NS = 4026532301, 4026532302


# -- cgroup v2 files ---------------------------------------------------------------------


def test_single_values_and_max() -> None:
    assert cs.parse_value(b"1073741824\n") == 1073741824
    assert cs.parse_value(b"max\n") == math.inf
    assert cs.parse_value(b"") is None
    assert cs.parse_value(b"12abc") is None
    assert cs.parse_int(b"max\n") is None  # a counter file never says max: treat as unreadable
    assert cs.parse_int(None) is None
    assert cs.parse_int(b"57\n") == 57


def test_flat_keyed_skips_odd_lines() -> None:
    data = b"anon 4096\ngarbage line without value\nfile x\n\nsock 0\n"
    assert cs.parse_flat_keyed(data) == {"anon": 4096, "sock": 0}


def test_pressure() -> None:
    p = cs.parse_pressure(
        b"some avg10=0.12 avg60=0.40 avg300=0.25 total=1234567\n"
        b"full avg10=0.00 avg60=0.10 avg300=0.05 total=234567\n"
    )
    assert p == cs.Pressure(1.234567, 0.234567)
    # cpu.pressure before Linux 5.13 has no "full" line.
    assert cs.parse_pressure(b"some avg10=0.00 avg60=0.00 avg300=0.00 total=10\n") == cs.Pressure(
        1e-5, None
    )
    assert cs.parse_pressure(b"") is None
    assert cs.parse_pressure(b"some avg10=0.00 total=bogus\n") is None


def test_io_stat_sums_devices_and_ignores_other_keys() -> None:
    io = cs.parse_io_stat(
        b"8:0 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
        b"253:0 rbytes=40960 wbytes=4096 rios=10 wios=1 dbytes=8192 dios=2\n"
        b"7:1 rbytes=0 wbytes=0 rios=0 wios=0 dbytes=0 dios=0 cost.vrate=100.00 cost.usage=0\n"
    )
    assert io == cs.IoTotals(1500160, 314777600, 8192, 202, 354, 2)
    assert cs.parse_io_stat(b"") == cs.IoTotals(0, 0, 0, 0, 0, 0)


def test_read_full_slice() -> None:
    s = cs.read_cgroup(CGROUP, ALICE_SLICE)
    assert s.exists
    assert s.memory_current == 1 << 30
    assert s.working_set == (1 << 30) - 268435456
    assert s.memory_peak == 1879048192
    assert s.memory_swap_current == 0
    assert s.memory_stat is not None and s.memory_stat["anon"] == 536870912
    assert s.memory_events == {"low": 0, "high": 17, "max": 4, "oom": 2, "oom_kill": 1,
                               "oom_group_kill": 0}  # fmt: skip
    assert s.pressure is not None and set(s.pressure) == {"cpu", "memory", "io"}
    assert s.pressure["io"] == cs.Pressure(5.0, 4.0)
    assert s.cpu_stat is not None and s.cpu_stat["throttled_usec"] == 3500000
    assert s.pids_current == 57
    assert s.io is not None and s.io.read_bytes == 1500160
    assert s.available() == frozenset(cs.FILES)


def test_read_partial_slice_gives_none_not_zero() -> None:
    s = cs.read_cgroup(CGROUP, BOB_SLICE)
    assert s.exists
    assert s.memory_peak is None and s.memory_swap_current is None and s.memory_events is None
    assert s.cpu_stat == {"usage_usec": 1000, "user_usec": 600, "system_usec": 400}
    assert s.io == cs.IoTotals(0, 0, 0, 0, 0, 0)  # an empty io.stat is "no IO", not missing
    assert s.pressure is not None and set(s.pressure) == {"cpu", "memory"}
    assert s.pressure["cpu"].full_seconds is None
    assert s.memory_stat is not None and "kernel" not in s.memory_stat
    assert s.working_set == 0  # inactive_file exceeds current: floored at 0, as kubelet does
    assert "memory.peak" not in s.available() and "io.pressure" not in s.available()


def test_missing_slice() -> None:
    s = cs.read_cgroup(CGROUP, "/tenant.slice/tenant-1003.slice")
    assert not s.exists and s.memory_current is None and s.working_set is None
    assert s.available() == frozenset()


def test_working_set_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("100\n")
    s = cs.read_cgroup(str(tmp_path), "/")
    assert s.memory_current == 100 and s.working_set is None


@pytest.mark.parametrize(
    ("unit", "path"),
    [
        ("tenant-1001.slice", "/tenant.slice/tenant-1001.slice"),
        ("a-b-7.slice", "/a.slice/a-b.slice/a-b-7.slice"),
        ("tenant.slice", "/tenant.slice"),
        ("-.slice", "/"),
    ],
)
def test_slice_cgroup_path(unit: str, path: str) -> None:
    assert cs.slice_cgroup_path(unit) == path


def test_slice_cgroup_path_refuses_other_units() -> None:
    with pytest.raises(ValueError, match="not a slice"):
        cs.slice_cgroup_path("foo.service")


def test_detect_root() -> None:
    assert cs.detect_root(CGROUP) == CGROUP
    hybrid = str(FIXTURES / "cgroup-hybrid")
    assert cs.detect_root(hybrid) == os.path.join(hybrid, "unified")
    assert cs.detect_root(str(FIXTURES / "proc")) is None


def test_hybrid_host_has_cpu_and_pressure_only() -> None:
    s = cs.read_cgroup(str(FIXTURES / "cgroup-hybrid" / "unified"), ALICE_SLICE)
    assert s.exists and s.memory_current is None and s.memory_stat is None
    assert s.cpu_stat == {"usage_usec": 5000, "user_usec": 3000, "system_usec": 2000}
    assert s.available() == frozenset({"cpu.stat", "cpu.pressure", "memory.pressure",
                                       "io.pressure"})  # fmt: skip


# -- /proc ------------------------------------------------------------------------------

TENANTS = [
    ps.ScanTenant(1001, ALICE_SLICE, ALICE_NS),
    ps.ScanTenant(1002, BOB_SLICE, BOB_NS),
    ps.ScanTenant(1003, "/tenant.slice/tenant-1003.slice", None),
]


def test_parse_status() -> None:
    data = (FIXTURES / "proc" / "100" / "status").read_bytes()
    assert ps.parse_status(data) == ("(sd-pam)", 99, 1001, 1001, 21328 * 1024)
    # Kernel threads and zombies have no memory of their own: skipped.
    assert ps.parse_status((FIXTURES / "proc" / "2" / "status").read_bytes()) is None
    assert ps.parse_status((FIXTURES / "proc" / "150" / "status").read_bytes()) is None
    assert ps.parse_status(b"") is None
    assert ps.parse_status(b"Name:\tx\nPPid:\t1\nUid:\tx y\nVmRSS:\t1 kB\n") is None


def test_parse_cgroup() -> None:
    assert ps.parse_cgroup(b"0::/system.slice/a.service\n") == "/system.slice/a.service"
    hybrid = b"12:memory:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n0::/\n"
    assert ps.parse_cgroup(hybrid) == "/"  # the v2 line wins (nsd.slices.caller_cgroup uses it)
    assert ps.parse_cgroup(b"1:name=systemd:/user.slice\n") == "/user.slice"
    assert ps.parse_cgroup(b"4:memory:/x\n") is None


def scan_fixture(**kw: object) -> ps.ProcScan:
    result = ps.scan(TENANTS, ps.DEFAULT_HELPERS, PROC, **kw)  # type: ignore[arg-type]
    assert result is not None
    return result


def test_scan_classifies_alice() -> None:
    alice = scan_fixture().tenants[1001]
    assert alice.classes == {
        "contained": 1,  # php-fpm worker 101 (the root master 99 is not hers; 150 is a zombie)
        "session": 1,  # 102 in session-4.scope, joined to her namespace (pam_nsd)
        "user_manager": 1,  # systemd --user
        # 104: a system service's main process joined her namespace, not her slice;
        # 107: a job of root's crontab (login UID 0) that nsd-exec left in cron.service
        "outside_slice": 2,
        "outside_namespace": 1,  # 105: in her slice, host namespace
        "outside_slice_and_namespace": 1,  # 106: a plain system service with User=alice
        "session_outside_namespace": 1,  # 103: a cron job (login UID set) in the host's
    }
    assert alice.escaped == 5
    # (sd-pam) of the PAMName= service (in her slice) and of user@1001.service (her UID).
    assert alice.helpers == 2
    assert alice.helper_rss_bytes == (21328 + 5000) * 1024
    assert alice.helper_pss_bytes is None  # 130 has no readable smaps_rollup: no partial sum


def test_scan_attributes_root_helpers_through_the_process_tree() -> None:
    result = scan_fixture()
    bob = result.tenants[1002]
    # su (110, child java runs as bob) and sudo -> sudo -> true (120, 121); not the
    # admin's own sudo (140), whose child runs as root.
    assert bob.helpers == 3
    assert bob.helper_rss_bytes == (4000 + 6000 + 2000) * 1024
    assert bob.helper_pss_bytes == (800 + 1500 + 500) * 1024
    assert bob.classes["contained"] == 1
    # java under su runs in a system service, outside bob's slice and namespace; so
    # does true under sudo in the admin's login session: the admin's login (login
    # UID 0), not bob's, so it is bob's work outside his budget, not his session.
    assert bob.classes["outside_slice_and_namespace"] == 2
    assert bob.classes["session"] == 0
    assert bob.classes["session_outside_namespace"] == 0
    assert result.tenants[1003].helpers == 0 and sum(result.tenants[1003].classes.values()) == 0
    assert result.helpers["sudo"] == ps.HelperTotal(3, (6000 + 2000 + 6000) * 1024)
    assert result.helpers["(sd-pam)"].processes == 2
    assert result.helpers["nsenter"] == ps.HelperTotal(0, 0)
    # 1, 99-107, 110-111, 119-123, 130-131, 140-141, 200: kthread 2, zombie 150 and 160
    # (gone before its namespace could be read) are skipped.
    assert result.processes == 22


def test_scan_findings_for_audit() -> None:
    result = scan_fixture()
    escapes = [(f.tenant_uid, f.pid, f.reason) for f in result.findings if f.reason != "helper"]
    assert escapes == [
        (1001, 103, "session_outside_namespace"),
        (1001, 104, "outside_slice"),
        (1001, 105, "outside_namespace"),
        (1001, 106, "outside_slice_and_namespace"),
        (1001, 107, "outside_slice"),
        (1002, 111, "outside_slice_and_namespace"),
        (1002, 122, "outside_slice_and_namespace"),
    ]
    helpers = [(f.tenant_uid, f.pid) for f in result.findings if f.reason == "helper"]
    assert helpers == [(1001, 100), (1001, 130), (1002, 110), (1002, 120), (1002, 121)]
    first = result.findings[1]
    assert first.command == "/usr/bin/java -jar kafka.jar"
    assert first.cgroup == "/system.slice/kafka-alice.service" and first.netns_inode == ALICE_NS
    su = next(f for f in result.findings if f.pid == 110)
    assert su.uid == 0 and su.pss_bytes == 800 * 1024 and su.rss_bytes == 4000 * 1024
    assert result.findings_dropped == 0


def test_scan_keeps_at_most_max_findings() -> None:
    result = scan_fixture(max_findings=2)
    assert [f.pid for f in result.findings] == [103, 104]
    assert result.findings_dropped == 10
    assert result.tenants[1001].escaped == 5  # counts stay exact


def test_scan_without_slices_judges_the_namespace_only() -> None:
    tenants = [ps.ScanTenant(1001, None, ALICE_NS)]
    result = ps.scan(tenants, ps.DEFAULT_HELPERS, PROC)
    assert result is not None
    classes = result.tenants[1001].classes
    # 101, 102 (a login), 104 and 107 are in her namespace; 105 and 106 are not and
    # are no logins; 103 is her login in the host's namespace.
    assert classes["contained"] == 4 and classes["outside_namespace"] == 2
    assert classes["outside_slice"] == classes["outside_slice_and_namespace"] == 0
    assert classes["session"] == 0 and classes["session_outside_namespace"] == 1
    assert classes["user_manager"] == 1


def test_scan_with_unmounted_namespace_judges_the_slice_only() -> None:
    result = ps.scan([ps.ScanTenant(1001, ALICE_SLICE, None)], (), PROC)
    assert result is not None
    classes = result.tenants[1001].classes
    assert classes["contained"] == 3  # 101, 105 and, with no helpers configured, sd-pam 100
    # 104, 106, 107 and 103: her own cron job, but in cron.service, not a session
    # scope - outside her budget.
    assert classes["outside_slice"] == 4
    assert classes["outside_namespace"] == 0


def test_scan_helper_names_are_configurable_and_truncated_like_comm() -> None:
    result = ps.scan(TENANTS, ["supervisord-is-long-name"], PROC)
    assert result is not None
    # comm is 15 bytes: "supervisord" fits; the configured name is matched on its prefix.
    assert result.helpers == {"supervisord-is-long-name": ps.HelperTotal(0, 0)}
    result = ps.scan(TENANTS, ["supervisord"], PROC)
    assert result is not None
    assert result.helpers["supervisord"].processes == 1
    assert result.tenants[1001].helpers == 1
    # A helper is not also counted as an escape.
    assert result.tenants[1001].classes["outside_slice_and_namespace"] == 0


def test_scan_missing_proc() -> None:
    assert ps.scan(TENANTS, (), str(FIXTURES / "nonexistent")) is None


def test_scan_of_this_host_finds_itself() -> None:
    me = os.getuid()
    result = ps.scan([ps.ScanTenant(me, None, None)], ["python", "pytest"], "/proc")
    assert result is not None and result.processes > 0
    assert sum(result.tenants[me].classes.values()) + result.tenants[me].helpers > 0


def test_net_dev() -> None:
    dev = ps.read_net_dev(PROC)
    assert dev is not None
    assert dev["nsd1001"] == ps.NetDev(1048576, 2048, 1, 2, 2**64 - 1, 4096, 3, 4)
    assert set(dev) == {"lo", "eth0", "nsd1001", "nsd1002"}
    assert ps.read_net_dev(str(FIXTURES / "nonexistent")) is None
    assert "lo" in (ps.read_net_dev("/proc") or {})


# -- the sampler ------------------------------------------------------------------------------


def targets() -> list[Target]:
    return [
        Target(1002, "bob", BOB_SLICE, BOB_NS, "nsd1002"),
        Target(1001, "alice", ALICE_SLICE, ALICE_NS, "nsd1001",
               Limits(memory_max=str(2 << 30), memory_high="infinity", cpu_quota="150%")),
        Target(1003, "carol", "/tenant.slice/tenant-1003.slice", None, "nsd1003"),
    ]  # fmt: skip


def test_collect() -> None:
    snap = collect(targets(), cgroup_root=CGROUP, proc_root=PROC, generation=7)
    assert snap.generation == 7 and [t.uid for t in snap.tenants] == [1001, 1002, 1003]
    alice, bob, carol = snap.tenants
    assert alice.cgroup.memory_current == 1 << 30 and alice.net is not None
    assert alice.processes is not None and alice.processes.helpers == 2
    assert not carol.cgroup.exists and carol.net is None  # no slice, no veth
    assert set(snap.sources) == set(SOURCES)
    assert all(snap.sources.values()) is False
    assert snap.sources["memory.peak"] and snap.sources["proc"] and snap.sources["net_dev"]
    assert not snap.sources["smaps_rollup"]  # alice's user-manager sd-pam has none
    assert snap.processes == 22 and len(snap.findings) == 12
    assert snap.tenant(1002) is bob and snap.tenant(4) is None


def test_collect_without_cgroup2_or_proc() -> None:
    snap = collect(targets(), cgroup_root=None, proc_root=str(FIXTURES / "nonexistent"))
    assert not any(snap.sources.values())
    assert all(not t.cgroup.exists and t.processes is None for t in snap.tenants)
    assert snap.processes is None and snap.findings == ()


def test_collect_probe_tells_sources_without_tenant_slices() -> None:
    snap = collect([], cgroup_root=CGROUP, proc_root=PROC, probe_cgroup="/tenant.slice")
    assert snap.sources["memory.current"] and not snap.sources["memory.stat"]


def test_api_replies() -> None:
    snap = collect(targets(), cgroup_root=CGROUP, proc_root=PROC)
    reply = usage_reply(snap)
    alice = reply["tenants"][0]
    assert alice["memoryCurrentBytes"] == 1 << 30 and alice["memoryMaxBytes"] == 2 << 30
    assert alice["memoryHighBytes"] is None  # infinity
    assert alice["oomKills"] == 1 and alice["helperProcesses"] == 2
    assert alice["escapedProcesses"] == 5 and alice["cpuUsageUSec"] == 123456789
    assert reply["tenants"][2]["memoryCurrentBytes"] is None
    assert [t["uid"] for t in usage_reply(snap, 1002)["tenants"]] == [1002]
    audit = audit_reply(snap)
    assert {p["reason"] for p in audit["processes"]} == {
        "outsideSlice", "outsideNamespace", "outsideSliceAndNamespace",
        "sessionOutsideNamespace"}  # fmt: skip
    with_helpers = audit_reply(snap, 1002, helpers=True)
    assert [p["pid"] for p in with_helpers["processes"]] == [111, 122, 110, 120, 121]
    assert with_helpers["processes"][1]["tenant"] == "bob"


async def test_sampler_swaps_snapshots_and_notifies() -> None:
    calls: list[int] = []
    prerendered: list[int] = []
    sampler = Sampler(
        targets, 0.05, cgroup_root=CGROUP, proc_root=PROC,
        after_sample=lambda s: prerendered.append(s.generation),
        on_sample=lambda s: calls.append(s.generation),
    )  # fmt: skip
    assert sampler.snapshot is None
    waiter = asyncio.create_task(sampler.next_snapshot(0))
    first = await sampler.sample_once()
    assert (await waiter) is first and sampler.snapshot is first and first.generation == 1
    task = sampler.start()
    second = await asyncio.wait_for(sampler.next_snapshot(first.generation), 5)
    third = await asyncio.wait_for(sampler.next_snapshot(second.generation), 5)
    assert third.generation > second.generation > 1
    await sampler.stop()
    assert task.done()
    assert calls == prerendered and calls[:3] == [1, 2, 3]


async def test_sampler_keeps_the_last_snapshot_when_a_sample_fails() -> None:
    fail = False
    errors: list[BaseException] = []

    def flaky() -> list[Target]:
        if fail:
            raise RuntimeError("store unavailable")
        return targets()

    sampler = Sampler(flaky, 0.02, cgroup_root=CGROUP, proc_root=PROC, on_error=errors.append)
    good = await sampler.sample_once()
    fail = True
    sampler.start()
    await asyncio.sleep(0.1)
    await sampler.stop()
    assert sampler.snapshot is good and len(errors) >= 2


def test_sampler_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Sampler(targets, 0, cgroup_root=None)


def test_fixture_trees_are_intact(tmp_path: Path) -> None:
    # Git keeps the ns/net symlinks the scan reads; a checkout that lost them
    # would silently turn every process into an escape.
    link = FIXTURES / "proc" / "101" / "ns" / "net"
    assert os.readlink(link) == f"net:[{ALICE_NS}]"
    copy = tmp_path / "proc"
    shutil.copytree(FIXTURES / "proc", copy, symlinks=True)
    assert ps.scan(TENANTS, (), str(copy)) == ps.scan(TENANTS, (), PROC)


def test_manager_targets() -> None:
    from types import SimpleNamespace

    from nsd.sampler import manager_targets

    rec = SimpleNamespace(uid=1001, name="alice", netns_name="alice", host_ifname="nsd1001")
    bob = SimpleNamespace(uid=1002, name="bob", netns_name="bob", host_ifname="nsd1002")
    defaults = Limits(memory_max="1024", tasks_max="100")
    manager = SimpleNamespace(
        store=SimpleNamespace(
            all=lambda: [rec, bob], all_limit_overrides=lambda: {1002: {"memory_max": "2048"}}
        ),
        net=SimpleNamespace(namespace_inode=lambda path: 42 if path == "/run/netns/alice" else 0),
        slices=SimpleNamespace(
            available=True,
            slice_of=lambda uid: f"tenant-{uid}.slice",
            effective=lambda own: defaults.overlay(Limits(**own)),
        ),
        netns_path=lambda name: f"/run/netns/{name}",
    )
    t, u = manager_targets(manager)
    assert t == Target(1001, "alice", ALICE_SLICE, 42, "nsd1001", defaults)
    # overrides overlay the defaults, tenant by tenant
    assert u.limits == Limits(memory_max="2048", tasks_max="100") and u.netns_inode == 0
    manager.slices.available = False
    assert manager_targets(manager)[0].cgroup is None
