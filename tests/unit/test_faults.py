"""Faults: the inotify watcher on cgroup-like files in a tmpfs (IN_MODIFY works there
as on cgroup2, which this host has without a memory controller; the VM tier has the
real kernel), the recorder (coalescing, journal fields through a real datagram
socket, store, Watch callback), the store's retention and its schema migration."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import tempfile
from collections.abc import AsyncGenerator, Iterator
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from nsd import config, faultview
from nsd.api import faults as faultapi
from nsd.config import FaultsConfig
from nsd.core import faultrecord, store
from nsd.core.events import WATCH_QUEUE, TenantEvents
from nsd.core.faultrecord import FaultCounter, FaultRecorder, FaultService
from nsd.core.ipam import Ipam
from nsd.core.manager import TenantManager
from nsd.model import (
    Fault,
    ProcessSample,
    TenantEvent,
    TenantRecord,
    TenantState,
    TenantView,
)
from nsd.net import policy as npol
from nsd.observe.faults import DropTracker, increases, snapshot_processes
from nsd.observe.faultwatch import FaultWatcher
from nsd.systemd import journal

SLICE = "/tenant.slice/tenant-1001.slice"
EVENTS = "low 0\nhigh {high}\nmax {max}\noom 0\noom_kill {kill}\noom_group_kill 0\n"


@pytest.fixture
def cgroot() -> Iterator[Path]:
    """A cgroup-like tree on tmpfs: the tenant's slice with its event and limit files."""
    root = Path(tempfile.mkdtemp(prefix="nsdt-faults-", dir="/dev/shm"))
    s = root / SLICE.lstrip("/")
    (s / "app.service").mkdir(parents=True)
    (s / "memory.events").write_text(EVENTS.format(high=0, max=2, kill=0))  # history
    (s / "pids.events").write_text("max 0\n")
    (s / "memory.max").write_text("67108864\n")
    (s / "memory.high").write_text("max\n")
    (s / "memory.current").write_text("67000000\n")
    (s / "pids.max").write_text("100\n")
    (s / "pids.current").write_text("99\n")
    (s / "cgroup.procs").write_text("")
    (s / "app.service" / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")
    try:
        yield root
    finally:
        for dirpath, dirs, files in os.walk(root, topdown=False):
            for f in files:
                os.unlink(os.path.join(dirpath, f))
            for d in dirs:
                os.rmdir(os.path.join(dirpath, d))
        os.rmdir(root)


def write(path: Path, text: str) -> None:
    # The kernel rewrites a cgroup file in place; so does this (O_TRUNC: IN_MODIFY).
    with open(path, "w") as f:
        f.write(text)


def test_increases() -> None:
    before = {"high": 5, "max": 2, "oom_kill": 0}
    after = {"high": 9, "max": 2, "oom_kill": 1, "oom": 1}
    assert increases(before, after, "memory.events") == [("oom_kill", 1), ("memory_high", 4)]
    assert increases({"max": 3}, {"max": 4}, "pids.events") == [("pids_max", 1)]
    # A counter that went down is a new cgroup (slice restarted): all of it is new.
    assert increases({"oom_kill": 5}, {"oom_kill": 2}, "memory.events") == [("oom_kill", 2)]
    assert increases({}, {}, "memory.events") == []


def test_drop_tracker() -> None:
    t = DropTracker()
    assert t.update({"nsd1001": 7}) == {}  # the baseline: drops from before nsd read them
    assert t.update({"nsd1001": 7}) == {}
    assert t.update({"nsd1001": 9, "nsd1002": 3}) == {"nsd1001": 2, "nsd1002": 3}
    # a counter that went down: the element was made again, all of it is new
    assert t.update({"nsd1001": 1, "nsd1002": 3}) == {"nsd1001": 1}
    assert t.update({}) == {} and t.update({"nsd1002": 2}) == {"nsd1002": 2}


def test_element_counters_of_a_listed_set() -> None:
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "inet", "name": "ctdrops", "table": "nsd", "type": "ifname",
                 "stmt": [{"counter": None}],
                 "elem": [{"elem": {"val": "nsd1001", "counter": {"packets": 4, "bytes": 240}}},
                          {"elem": {"val": "nsd1002"}}, "junk"]}},
    ]}  # fmt: skip
    assert npol.element_counters(listing) == {"nsd1001": 4}
    assert npol.element_counters({"nftables": []}) == {}


async def test_conntrack_drops_become_faults(tmp_path: Path) -> None:
    db = store.Store(tmp_path / "nsd.db")
    emitted: list[Fault] = []
    rec = FaultRecorder(db, FaultsConfig(coalesce=10.0), emitted.append,
                        journal=journal.Journal(str(tmp_path / "absent.sock")))  # fmt: skip
    readings: list[dict[str, int] | None] = [{"nsd1001": 5}, None, {"nsd1001": 8, "nsd9": 2}]

    async def drops() -> dict[str, int] | None:
        return readings.pop(0)

    svc = FaultService(None, rec, conntrack_drops=drops, conntrack_limit=lambda: 20)
    assert svc.watcher is None  # no cgroup v2 here: conntrack faults only
    tenants = [(1001, "alice", None, "nsd1001"), (1002, "bob", None, None)]
    for _ in readings[:]:  # the baseline; unreadable (nothing lost); 3 new drops
        svc.sync(tenants)  # each sample's targets, then the counters read after it
        svc.sampled()
        assert svc._poll is not None
        await svc._poll
    # alice's 3 new drops; nsd9 belongs to no tenant
    assert rec.counts == {("alice", 1001, "conntrack"): 3}
    got = await rec.record_due()
    assert [(f.tenant, f.kind, f.count, f.limit, f.value, f.processes) for f in got] == [
        ("alice", "conntrack", 3, 20, None, ())
    ]
    assert emitted == got
    await svc.close()
    db.close()


async def test_a_burst_is_recorded_in_steps(tmp_path: Path) -> None:
    """1,000 faults due at once: stored in transactions of COMMIT_BATCH, with the event
    loop free between steps (another task runs at least once per ANNOUNCE_STEP
    faults) - not one long callback that holds every API call up."""
    db = store.Store(tmp_path / "nsd.db")
    emitted: list[Fault] = []
    rec = FaultRecorder(db, FaultsConfig(), emitted.append,
                        journal=journal.Journal(str(tmp_path / "absent.sock")))  # fmt: skip
    for u in range(1000):
        rec.on_faults(70000 + u, f"t{u}", "", [("conntrack", 1)], (1, None))
    commits: list[int] = []
    add_faults = db.add_faults

    def counting(faults: Any, keep: int, keep_after_us: int) -> list[int]:
        commits.append(len(faults))
        return add_faults(faults, keep, keep_after_us)

    db.add_faults = counting  # type: ignore[method-assign]
    turns = 0
    stop = False

    async def other() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    got = await rec.record_due()
    stop = True
    await task
    assert len(got) == len(emitted) == 1000 and len(db.faults(limit=2000)) == 1000
    assert max(commits) <= faultrecord.COMMIT_BATCH and len(commits) < 1000 / 8
    assert turns >= 1000 // faultrecord.ANNOUNCE_STEP
    db.close()


async def test_a_burst_waits_for_a_watch_client_that_keeps_up(tmp_path: Path) -> None:
    """2,000 faults at once (1,000 tenants' OOM kills and their max events) and a Watch
    client whose stream takes one event per turn of the loop, slower than the recorder
    announces them: the burst waits for it, and it gets every event rather than being
    dropped as too slow when its queue (WATCH_QUEUE) overflows."""
    db = store.Store(tmp_path / "nsd.db")
    events = TenantEvents()
    view = TenantView(
        TenantRecord(1001, "alice", TenantState.READY, "alice", "nsd1001",
                     IPv4Address("100.64.0.2"), IPv6Network("fd00:1:2:3::/64"), False, 0),
        "/run/netns/alice", 4026532301, "eth0", IPv4Address("100.64.0.1"),
        IPv6Address("fe80::1"),
    )  # fmt: skip
    rec = FaultRecorder(db, FaultsConfig(), lambda f: events.emit("fault", view, f),
                        journal=journal.Journal(str(tmp_path / "absent.sock")),
                        backlog=events.backlog)  # fmt: skip
    n = 2 * WATCH_QUEUE - 48
    for u in range(n // 2):
        rec.on_faults(70000 + u, f"t{u}", "", [("oom_kill", 1), ("memory_max", 1)], (1, 2))
    got: list[TenantEvent] = []
    subscribed = asyncio.Event()

    async def watcher() -> None:
        async with events.subscribe() as stream:
            subscribed.set()
            async for event in stream:
                got.append(event)
                if len(got) == n:
                    return
                await asyncio.sleep(0)  # one event per turn, as a slow stream sends

    task = asyncio.create_task(watcher())
    await subscribed.wait()
    stored = await rec.record_due()
    await asyncio.wait_for(task, 30)  # WatcherTooSlow would end it with an error
    assert len(stored) == len(got) == n
    db.close()


def test_process_snapshot_reads_the_slice_and_below(cgroot: Path) -> None:
    procs = snapshot_processes(str(cgroot) + SLICE, 10)
    assert [(p.pid, p.cgroup) for p in procs] == [(os.getpid(), "/app.service")]  # 999999999 gone
    assert procs[0].rss_bytes > 1 << 20 and procs[0].comm
    assert snapshot_processes(str(cgroot) + SLICE, 0) == ()


async def test_watcher_reports_events_as_they_happen(cgroot: Path) -> None:
    got: asyncio.Queue[tuple[int, str, str, list[tuple[str, int]]]] = asyncio.Queue()
    w = FaultWatcher(str(cgroot), lambda *a: got.put_nowait(a))
    w.start()
    try:
        w.sync([(1001, "alice", SLICE), (1002, "bob", None)])  # bob: no slices here
        assert w.watches == 2
        s = cgroot / SLICE.lstrip("/")
        write(s / "memory.events", EVENTS.format(high=0, max=5, kill=1))
        uid, name, slice_dir, new = await asyncio.wait_for(got.get(), 5)
        # The 2 "max" events from before the watch are history, not faults.
        assert (uid, name, new) == (1001, "alice", [("oom_kill", 1), ("memory_max", 3)])
        assert slice_dir == str(cgroot) + SLICE
        write(s / "pids.events", "max 4\n")
        assert (await asyncio.wait_for(got.get(), 5))[3] == [("pids_max", 4)]
        write(s / "memory.events", EVENTS.format(high=0, max=5, kill=1))  # no change
        write(s / "pids.events", "max 5\n")
        assert (await asyncio.wait_for(got.get(), 5))[3] == [("pids_max", 1)]
        w.sync([])  # the tenant is gone: its watches go
        assert w.watches == 0
        write(s / "pids.events", "max 9\n")
        await asyncio.sleep(0)  # nothing is delivered for an unwatched file
        assert got.empty()
    finally:
        w.close()


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[journal.Journal, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    j = journal.Journal(path)
    try:
        yield j, sock
    finally:
        j.close()
        sock.close()


async def test_recorder_counts_coalesces_records_and_announces(
    cgroot: Path, tmp_path: Path, journal_socket: tuple[journal.Journal, socket.socket]
) -> None:
    j, sock = journal_socket
    db = store.Store(tmp_path / "nsd.db")
    emitted: list[Fault] = []
    now = [1000.0]
    cfg = FaultsConfig(coalesce=10.0, processes=5)
    rec = FaultRecorder(db, cfg, emitted.append, journal=j, clock=lambda: now[0])
    slice_dir = str(cgroot) + SLICE
    rec.on_faults(1001, "alice", slice_dir, [("oom_kill", 1), ("memory_max", 3)])
    first = await rec.record_due()
    assert [(f.kind, f.count, f.limit, f.value) for f in first] == [
        ("oom_kill", 1, 67108864, 67000000), ("memory_max", 3, 67108864, 67000000)
    ]  # fmt: skip
    assert first[0].processes[0].pid == os.getpid() and first[0].id is not None
    entry = journal.decode(sock.recv(65536))
    assert entry["NSD_TENANT"] == "alice" and entry["NSD_UID"] == "1001"
    assert entry["NSD_FAULT"] == "oom_kill" and entry["NSD_LIMIT"] == "67108864"
    assert entry["NSD_VALUE"] == "67000000" and entry["PRIORITY"] == "4"
    assert entry["MESSAGE"].startswith("tenant alice (uid 1001): oom_kill x1, limit 67108864")
    # Within the window: counted at once, recorded once at its end, with the total.
    for _ in range(50):
        rec.on_faults(1001, "alice", slice_dir, [("memory_max", 2)])
    assert rec.counts[("alice", 1001, "memory_max")] == 103
    assert await rec.record_due() == []
    now[0] += 10.0
    later = await rec.record_due()
    assert [(f.kind, f.count) for f in later] == [("memory_max", 100)]
    assert emitted == first + later
    stored = db.faults("alice")
    assert [(f.kind, f.count) for f in stored] == [("oom_kill", 1), ("memory_max", 3),
                                                   ("memory_max", 100)]  # fmt: skip
    assert stored[0] == first[0]  # the processes survive the round trip
    reg = CollectorRegistry()
    reg.register(FaultCounter(rec))
    text = generate_latest(reg).decode()
    assert 'nsd_tenant_faults_total{kind="memory_max",tenant="alice",uid="1001"} 103.0' in text
    rec.forget(set())
    assert rec.counts == {}
    db.close()


def test_recorder_runs_without_journald(cgroot: Path, tmp_path: Path) -> None:
    missing = journal.Journal(str(tmp_path / "absent.sock"))
    assert not missing.send("x", journal.INFO, {"NSD_TENANT": "a"})
    with pytest.raises(ValueError, match="not a journal field"):
        journal.encode("x", journal.INFO, {"nsd_tenant": "a"})
    multi = journal.encode("two\nlines", journal.INFO, {"NSD_FAULT": "oom_kill"})
    assert journal.decode(multi)["MESSAGE"] == "two\nlines"


def fault(tenant: str, at_us: int) -> Fault:
    return Fault(1001, tenant, "oom_kill", at_us, 1, None, 5, (ProcessSample(7, "x", 1, "/"),))


def test_store_retention_by_count_and_age(tmp_path: Path) -> None:
    db = store.Store(tmp_path / "nsd.db")
    db.add_faults([fault("alice", t) for t in range(100, 110)], keep=5, keep_after_us=0)
    assert [f.at_us for f in db.faults()] == [105, 106, 107, 108, 109]  # the newest 5
    db.add_faults([fault("bob", 200)], keep=100, keep_after_us=108)
    assert [(f.tenant, f.at_us) for f in db.faults()] == [("alice", 108), ("alice", 109),
                                                         ("bob", 200)]  # fmt: skip
    assert [f.tenant for f in db.faults("bob")] == ["bob"]
    assert [f.at_us for f in db.faults(since_us=109)] == [109, 200]
    assert [f.at_us for f in db.faults(limit=1)] == [200]  # the newest
    db.close()


def test_v3_database_gains_the_faults_table(tmp_path: Path) -> None:
    db = store.Store(tmp_path / "nsd.db")
    db.set_meta("x", "kept")
    db.close()
    con = sqlite3.connect(tmp_path / "nsd.db")
    con.execute("DROP TABLE faults")  # what version 3 did not have
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    db = store.Store(tmp_path / "nsd.db")
    assert db.get_meta("schema_version") == "4" == str(store.SCHEMA_VERSION)
    assert db.get_meta("x") == "kept"
    db.add_faults([fault("alice", 1)], keep=10, keep_after_us=0)
    assert len(db.faults()) == 1
    db.close()


class _Net:
    """The one thing TenantManager.view asks of the netns adapter."""

    def namespace_inode(self, path: str) -> int:
        return 4026532301


async def test_a_recorded_fault_is_a_watch_event(tmp_path: Path) -> None:
    cfg = config.from_mapping({})
    db = store.Store(tmp_path / "nsd.db")
    ipam = Ipam(cfg.ipam, cfg.tenants, db)
    v4, v6 = ipam.allocate(1001)
    db.insert(TenantRecord(1001, "alice", TenantState.READY, "alice", "nsd1001", v4, v6,
                           False, store.now_us()))  # fmt: skip
    net: Any = _Net()
    manager = TenantManager(cfg, db, ipam, net)
    events = manager.watch(1001)
    assert isinstance(events, AsyncGenerator)  # so that it can be closed
    assert (await anext(events))[0] == "existing"
    assert (await anext(events))[0] == "synced"
    manager.emit_fault(fault("bob", 5))  # uid 1001 is alice now: not hers, not sent
    manager.emit_fault(fault("alice", 6))
    kind, view, sent = await asyncio.wait_for(anext(events), 5)
    assert kind == "fault" and view is not None and view.record.name == "alice"
    assert sent == fault("alice", 6)
    assert faultapi.fault_json(sent)["processes"] == [
        {"pid": 7, "comm": "x", "rssBytes": 1, "cgroup": "/"}
    ]
    await events.aclose()
    db.close()


def test_nsctl_faults_since_and_table() -> None:
    now = 1_800_000_000.0
    assert faultview.parse_since("15min", now) == int((now - 900) * 1e6)
    assert faultview.parse_since("-2h", now) == int((now - 7200) * 1e6)
    assert faultview.parse_since("1d ago", now) == int((now - 86400) * 1e6)
    local = faultview.parse_since("2026-12-05 04:00", now)
    assert local == int(datetime(2026, 12, 5, 4, 0).timestamp() * 1e6)
    with pytest.raises(ValueError, match="not an age"):
        faultview.parse_since("yesterday-ish", now)
    reply = {"faults": [faultapi.fault_json(fault("alice", 1_800_000_000_000_000))]}
    rows = faultview.fault_rows(reply["faults"])
    assert rows[0][1:] == ("alice", "1001", "oom_kill", "1", "max", "5B", "x[7] 1B")
    assert faultview.format_faults({"faults": []}) == "no faults recorded"
