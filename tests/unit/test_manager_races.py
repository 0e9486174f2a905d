"""Every path that reads a tenant's record before queueing for its lock checks again
under the lock, so an operation that ran meanwhile (a Remove, a Create) is not undone.

Each test holds the tenant's lock the way a running Remove or Create does, lets
the path under test queue behind it, changes the store as that operation would
and releases the lock. The store and IPAM are real (SQLite in a temp dir); the
host adapters are recorders that only note what they were asked to do: the
faults injected here are the interleavings. Reconcile's own paths (stray links, stray
slices, adoption) are driven through nsd.reconcile, the host table's through
nsd.tenant_network, where they live.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nsd import config, users
from nsd.core import store
from nsd.core.ipam import Ipam
from nsd.core.manager import TenantManager
from nsd.core.reconcile import Reconciler
from nsd.core.tenant_network import TenantNetworks
from nsd.errors import NoSuchTenant
from nsd.limits import Limits
from nsd.model import ReconcileReport, TenantRecord, TenantState

# A real account, so that name -> UID resolution (NSS) is real too.
USER = "nobody"


class Recorder:
    """Answers any awaited method call with ``result`` and notes it in ``calls``."""

    def __init__(self, results: dict[str, Any] | None = None, **attrs: Any) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._results = results or {}
        self.hooks: dict[str, Callable[[], None]] = {}
        for k, v in attrs.items():
            setattr(self, k, v)

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((method, args))
            hook = self.hooks.get(method)
            if hook is not None:
                hook()
            return self._results.get(method)

        return call

    def called(self, method: str) -> list[tuple[Any, ...]]:
        return [args for m, args in self.calls if m == method]


@pytest.fixture
def user() -> users.User:
    found = users.by_name(USER)
    if found is None:
        pytest.fail(f"this machine has no user {USER!r}")
    return found


@pytest.fixture
def m(tmp_path: Path, user: users.User) -> TenantManager:
    cfg = config.from_mapping(
        {
            "tenants": {"uid_min": 1, "uid_max": user.uid, "enter_creates": True},
            "netns": {"run_dir": str(tmp_path / "netns")},
        }
    )
    s = store.Store(tmp_path / "nsd.db")
    net = Recorder({"list_prefixed_links": [], "remove": ()})
    net.namespace_inode = lambda path: None  # type: ignore[attr-defined]
    slices = Recorder(
        {
            "start_run": "nsd-run-x.service",
            "stray_slices": [],
            "has_settings": True,
            "sync_dropins": SimpleNamespace(written=[], removed=[], problems=[]),
        },
        available=True,
        reconfigure=lambda cfg: None,
        slice_of=lambda uid: f"tenant-{uid}.slice",
        effective=lambda overrides: Limits(**overrides),
    )
    manager = TenantManager(cfg, s, Ipam(cfg.ipam, cfg.tenants, s), net, slices=slices)  # type: ignore[arg-type]
    return manager


def add_tenant(m: TenantManager, user: users.User) -> TenantRecord:
    v4, v6 = m.ipam.allocate(user.uid)
    rec = TenantRecord(
        user.uid, user.name, TenantState.READY, user.name, f"nsd{user.uid}", v4, v6, False,
        store.now_us(),
    )  # fmt: skip
    m.store.insert(rec)
    return rec


async def behind_a_removal(m: TenantManager, rec: TenantRecord, call: Awaitable[Any]) -> Any:
    """Run ``call`` while a Remove of ``rec`` holds the tenant's lock; the removal
    deletes the record, then lets go. The call's result, or its exception."""
    async with m.operation(rec.uid, rec.name):
        m._removing.add(rec.uid)
        task = asyncio.ensure_future(call)
        for _ in range(10):  # let it run up to the lock
            await asyncio.sleep(0)
        assert not task.done(), "the call did not queue for the lock"
        m.store.delete(rec.uid, quarantine=True)
        m._removing.discard(rec.uid)
    try:
        return await task
    except Exception as e:
        return e


async def test_enter_without_create_behind_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    result = await behind_a_removal(m, rec, m.enter(user.name, create=False))
    assert isinstance(result, NoSuchTenant)
    assert m.net.called("ensure") == [] and m.store.get(user.uid) is None  # type: ignore[attr-defined]


async def test_set_limits_behind_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    result = await behind_a_removal(m, rec, m.set_limits(user.name, {"memory_max": "1G"}))
    assert isinstance(result, NoSuchTenant)
    assert m.slices.called("ensure") == []  # type: ignore[attr-defined]  # no slice re-created
    assert m.store.limit_overrides(user.uid) == {}


async def test_set_bandwidth_behind_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    result = await behind_a_removal(m, rec, m.set_bandwidth(user.name, 1000, None, ()))
    assert isinstance(result, NoSuchTenant)
    assert m.store.bandwidth_override(user.uid) == (None, None)


async def test_run_behind_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    result = await behind_a_removal(m, rec, m.run(user.name, ["/bin/true"], wait=False))
    assert isinstance(result, NoSuchTenant)
    assert m.slices.called("start_run") == []  # type: ignore[attr-defined]


async def test_reload_behind_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    report = await behind_a_removal(m, rec, m.apply_config(m.cfg))
    assert isinstance(report, ReconcileReport)
    assert [args for args in m.slices.called("ensure") if args[0] == user.uid] == []  # type: ignore[attr-defined]


def created_meanwhile(m: TenantManager, user: users.User) -> Callable[[], None]:
    """A Create that completes while a listing is on its way."""

    def create() -> None:
        add_tenant(m, user)

    return create


async def test_stray_link_that_a_create_made_meanwhile(m: TenantManager, user: users.User) -> None:
    link = f"{m.cfg.netns.link_prefix}{user.uid}"
    m.net._results["list_prefixed_links"] = [link]  # type: ignore[attr-defined]
    m.net.hooks["list_prefixed_links"] = created_meanwhile(m, user)  # type: ignore[attr-defined]
    report = ReconcileReport()
    await Reconciler(m)._remove_stray_links(report)
    assert m.net.called("delete_link") == []  # type: ignore[attr-defined]
    assert report.actions == []


async def test_stray_slice_that_a_create_made_meanwhile(m: TenantManager, user: users.User) -> None:
    unit = f"tenant-{user.uid}.slice"
    m.slices._results["stray_slices"] = [(user.uid, unit)]  # type: ignore[attr-defined]
    m.slices.hooks["stray_slices"] = created_meanwhile(m, user)  # type: ignore[attr-defined]
    report = ReconcileReport()
    await Reconciler(m)._reconcile_slices(report)
    assert m.slices.called("forget") == []  # type: ignore[attr-defined]
    assert report.problems == []


async def test_adoption_of_a_namespace_that_vanished(
    m: TenantManager, user: users.User, tmp_path: Path
) -> None:
    """Reconcile lists a namespace to adopt; it is gone when the lock is taken."""
    cfg = config.from_mapping(
        {
            "tenants": {"uid_min": 1, "uid_max": user.uid, "adopt_existing": True},
            "netns": {"run_dir": m.cfg.netns.run_dir},
        }
    )
    m.cfg = cfg
    os.makedirs(cfg.netns.run_dir)
    open(m.netns_path(user.name), "w").close()
    looks = iter([4026530000])  # mounted at the listing, then not any more
    m.net.namespace_inode = lambda path: next(looks, None)  # type: ignore[method-assign]
    report = ReconcileReport()
    await Reconciler(m)._adopt_unrecorded(report)
    assert m.store.get(user.uid) is None, "a tenant nobody asked for"
    assert m.net.called("ensure") == []  # type: ignore[attr-defined]


class Table:
    """The host table as a HostNetwork keeps it: a full load computed from a list of
    tenants, and one tenant's elements taken out."""

    def __init__(self) -> None:
        self.uids: set[int] = set()
        self.loading = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(self, tenants: list[Any], paths: dict[int, str]) -> Any:
        planned = {t.uid for t in tenants}
        self.loading.set()
        await self.release.wait()  # nft -f is on its way
        self.uids = planned
        return SimpleNamespace(actions=[], problems=[])

    async def remove_tenant(self, uid: int, everyone: Any) -> Any:
        self.uids.discard(uid)
        return SimpleNamespace(actions=[], problems=[])

    async def refresh_site(self) -> None:
        pass

    async def foreign_drop_policies(self) -> list[str]:
        return []


async def test_full_table_load_against_a_removal(m: TenantManager, user: users.User) -> None:
    rec = add_tenant(m, user)
    table = Table()
    table.uids = {rec.uid}
    m.networks = TenantNetworks(table, m.cfg.network, m.store, m.netns_path)  # type: ignore[arg-type]
    load = asyncio.ensure_future(m.networks.reconcile(ReconcileReport()))
    await table.loading.wait()
    removal = asyncio.ensure_future(m.teardown(rec))
    for _ in range(10):
        await asyncio.sleep(0)
    table.release.set()
    await asyncio.gather(load, removal)
    assert table.uids == set(), "the load put the removed tenant back"


@pytest.fixture(autouse=True)
async def _no_stray_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
