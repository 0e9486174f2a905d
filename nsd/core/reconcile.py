"""Reconcile: bring the host in line with the store, and report what changed.

Runs at start-up (after a reboot cleared /run, every namespace is rebuilt before nsd
reports ready), on ``nsctl reconcile`` and after a reload. Every tenant is repaired
under its own lock (TenantManager.operation), so reconcile and API calls interleave
safely; interrupted creations and removals, recorded as intent before acting, are
finished here, one by one. Tenants recorded ready are checked in batches (``BATCH``
tenants under their locks, one job on the netns worker, one listing of the host).
Then, once for all tenants: adoption of unrecorded namespaces, the
network policy, stray links, and the systemd side (template drop-ins, stray slices).
Those listings are taken without a lock; each stray is removed, and each namespace
adopted, under that UID's lock and only while the UID still has no tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nsd import names, users
from nsd.errors import NoSuchTenant, NsdError
from nsd.model import ReconcileReport, TenantRecord, TenantState
from nsd.net.netns import NetnsError

if TYPE_CHECKING:
    from nsd.core.manager import TenantManager

log = logging.getLogger("nsd.reconcile")

#: Tenants recorded ready are checked this many at a time, in one job on the netns
#: worker with one listing of the host (TenantCreation.repair_many): per tenant, a job
#: each and a host route dump each made a restart with 1,000 tenants O(N²) and
#: bound by hand-overs between the event loop and the worker. The batch holds its
#: tenants' locks while it runs (~0.1-0.3 s), so it stays small.
BATCH = 64


class Reconciler:
    """Reconcile for one TenantManager, through the manager's own operations."""

    def __init__(self, manager: TenantManager) -> None:
        self.manager = manager
        #: held by the batch whose job is on the netns worker (see _tenants)
        self._worker_turn = asyncio.Lock()

    async def run(self, progress: Callable[[int, int], None] | None = None) -> ReconcileReport:
        """Bring the host in line with the store; report what changed.

        Tenants whose user changed identity are reported, and their recorded
        network is still restored: a reboot must not take a namespace from
        services that use it because NSS was briefly unreachable. Their records
        are never changed and nothing new is created for the new identity.
        """
        mgr = self.manager
        report = ReconcileReport()
        records = mgr.store.all()
        # NSS may be slow (LDAP): on another thread, while the worker restores
        # namespaces (nothing there depends on the answers).
        problems, _ = await asyncio.gather(
            asyncio.to_thread(users.identity_problems, [(r.uid, r.name) for r in records]),
            self._tenants(records, report, progress),
        )
        for rec, problem in zip(records, problems, strict=True):
            if problem is not None:
                report.problems.append(f"tenant {rec.name} (uid {rec.uid}): {problem}")
        if mgr.cfg.tenants.adopt_existing:
            await self._adopt_unrecorded(report)
        # After the namespaces exist again (the host table itself was loaded before
        # any veth came up: the daemon applies it first), once for everyone.
        await self.manager.networks.reconcile(report)
        await self._remove_stray_links(report)
        if mgr.slices.available:
            await self._reconcile_slices(report)
        for a in report.actions:
            if a.kind != "repair":  # repairs were logged as they happened
                log.info("reconcile: %s%s: %s", a.kind, f" ({a.tenant})" if a.tenant else "",
                         a.detail)  # fmt: skip
        for p in report.problems:
            log.warning("reconcile: %s", p)
        return report

    async def _reconcile_slices(self, report: ReconcileReport) -> None:
        mgr = self.manager
        try:
            records = mgr.store.all()
            changes = await mgr.slices.sync_dropins(records, prune_users=None)
            for unit in changes.written:
                report.add("write-template-dropin", None, f"{unit}: Slice= of its tenant")
            for unit in changes.removed:
                report.add("remove-template-dropin", None, f"{unit}: no tenant or template")
            report.problems.extend(f"{p.unit}: {p.reason}" for p in changes.problems)
            known = {r.uid for r in records}
            for uid, unit in await mgr.slices.stray_slices(known):

                async def forget(unit: str = unit) -> bool:
                    if not await mgr.slices.has_settings(unit):
                        return False
                    await mgr.slices.forget(unit)
                    return True

                if await self._while_unrecorded(uid, unit, forget):
                    report.add("forget-stray-slice", None,
                               f"dropped the settings of {unit}: no tenant owns it")  # fmt: skip
            await mgr.limits.protect_parent()
        except NsdError as e:
            report.problems.append(e.message)

    async def _remove_stray_links(self, report: ReconcileReport) -> None:
        mgr = self.manager
        known = {r.host_ifname for r in mgr.store.all()}
        try:
            links = await mgr.net.list_prefixed_links()
        except NetnsError as e:
            report.problems.append(f"cannot list links: {e}")
            return
        for link in links:
            if link in known:
                continue

            async def delete(link: str = link) -> bool:
                await mgr.net.delete_link(link)
                return True

            uid = int(link.removeprefix(mgr.cfg.netns.link_prefix))
            try:
                deleted = await self._while_unrecorded(uid, link, delete)
            except (NetnsError, NsdError) as e:
                report.problems.append(f"cannot remove stray link {link}: {e}")
            else:
                if deleted:
                    report.add("remove-stray-link", None,
                               f"removed link {link}: no tenant owns it")  # fmt: skip

    async def _while_unrecorded(
        self, uid: int, what: str, act: Callable[[], Awaitable[bool]]
    ) -> bool:
        """``act()`` under ``uid``'s lock if nsd still has no tenant with that UID; its
        answer, False if there is one. Strays are found in a listing taken without
        the lock: a Create that ran meanwhile made them a tenant's."""
        mgr = self.manager
        async with mgr.operation(uid, what):
            if mgr.store.get(uid) is not None:
                return False
            return await act()

    async def _tenants(
        self,
        records: list[TenantRecord],
        report: ReconcileReport,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        ready = [rec for rec in records if rec.state is TenantState.READY]
        # Interrupted creations and removals first, one by one (they write the store).
        done = 0
        for rec in records:
            if rec.state is not TenantState.READY:
                if progress is not None:
                    progress(done, len(records))
                done += 1
                await self._reconcile_alone(rec, report)
        # Two batches in flight: while the worker checks one, the event loop takes the
        # next one's locks, and handles the results of the one before, ready to hand
        # the worker the next job as soon as it is free (one after the other, the
        # batches share the host listing). One at a time, the worker sat idle for
        # those parts (~0.1 s of a 1,000-tenant restart).
        pending: list[asyncio.Task[None]] = []
        try:
            for start in range(0, len(ready), BATCH):
                chunk = ready[start : start + BATCH]
                if progress is not None:
                    for i in range(len(chunk)):
                        progress(done + i, len(records))
                done += len(chunk)
                pending.append(asyncio.create_task(self._batch_then_later(chunk, report)))
                if len(pending) > 1:
                    await pending.pop(0)
            while pending:
                await pending.pop(0)
        finally:
            # Cancelled, or a batch failed: the other one stops too; nothing of this
            # reconcile runs on after it returns.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _batch_then_later(self, chunk: list[TenantRecord], report: ReconcileReport) -> None:
        for rec in await self._reconcile_batch(chunk, report):
            await self._reconcile_alone(rec, report)

    async def _reconcile_alone(self, rec: TenantRecord, report: ReconcileReport) -> None:
        try:
            async with self.manager.operation(rec.uid, rec.name):
                await self._reconcile_one(rec, report)
        except NsdError as e:
            report.problems.append(f"tenant {rec.name}: {e.message}")

    async def _reconcile_batch(
        self, chunk: list[TenantRecord], report: ReconcileReport
    ) -> list[TenantRecord]:
        """Check and repair tenants recorded ready, under all their locks, in one job on
        the worker. Returns those left for one by one: busy with an operation (waiting
        for it while holding the others' locks would stall calls on them), or changed
        since the listing."""
        mgr = self.manager
        later: list[TenantRecord] = []
        async with contextlib.AsyncExitStack() as locks:
            held: list[TenantRecord] = []
            for rec in chunk:
                if mgr.busy(rec.uid):
                    later.append(rec)
                    continue
                try:
                    await locks.enter_async_context(mgr.operation(rec.uid, rec.name))
                except NsdError as e:
                    report.problems.append(f"tenant {rec.name}: {e.message}")
                    continue
                current = mgr.store.get(rec.uid)
                if current is None:
                    continue  # removed meanwhile
                if current.state is not TenantState.READY or current.name != rec.name:
                    later.append(current)
                    continue
                held.append(current)
            # One batch on the worker at a time, the next one's job submitted only
            # when this one's is done: a tenant asked for meanwhile (Enter during the
            # start-up reconcile) has its job queued before the next batch, not after.
            async with self._worker_turn:
                results = await mgr.creation.repair_many(held) if held else []
            for rec, result in zip(held, results, strict=True):
                if isinstance(result, NsdError):
                    report.problems.append(f"tenant {rec.name}: {result.message}")
                    continue
                for action in result:
                    report.add("repair", rec.name, action)
                if result:
                    view = mgr.view(mgr.held_record(rec.uid, rec.name), check_identity=False)
                    mgr.emit("changed", view)
        return later

    async def _reconcile_one(self, rec: TenantRecord, report: ReconcileReport) -> None:
        mgr = self.manager
        current = mgr.store.get(rec.uid)
        if current is None:
            return
        if current.state is TenantState.REMOVING:
            left = await mgr.teardown(current)
            report.add("finish-removal", rec.name, "finished an interrupted removal")
            if left is not None:
                report.problems.append(left.message)
            mgr.emit("removed", mgr.view(current, check_identity=False))
            return
        actions = await mgr.creation.build(current, rollback=False, dropins=False, network=False)
        if current.state is TenantState.CREATING:
            report.add("finish-creation", rec.name, "finished an interrupted creation")
        for action in actions:
            report.add("repair", rec.name, action)
        if actions or current.state is TenantState.CREATING:
            mgr.emit("changed", mgr.view(mgr.held_record(rec.uid, rec.name), check_identity=False))

    async def _adopt_unrecorded(self, report: ReconcileReport) -> None:
        """Adopt namespaces whose file name matches the template for a known user."""
        mgr = self.manager
        pattern = _template_regex(mgr.cfg.netns.name_template)
        try:
            entries = sorted(os.listdir(mgr.cfg.netns.run_dir))
        except FileNotFoundError:
            return
        recorded = {r.netns_name for r in mgr.store.all()}
        for entry in entries:
            m = pattern.fullmatch(entry)
            if m is None or entry in recorded:
                continue
            if mgr.net.namespace_inode(mgr.netns_path(entry)) is None:
                continue
            user = _user_for_match(m)
            if (
                user is None
                or names.netns_name(mgr.cfg.netns.name_template, user.name, user.uid) != entry
            ):
                continue
            t = mgr.cfg.tenants
            if not t.uid_min <= user.uid <= t.uid_max:
                log.debug("not adopting %s: uid %d is outside the managed range", entry, user.uid)
                continue
            path = mgr.netns_path(entry)

            async def adopt(user: users.User = user, path: str = path) -> bool:
                # Looked at without the lock: gone since, it is nothing to adopt,
                # and creating a fresh tenant here is what nobody asked for.
                if mgr.net.namespace_inode(path) is None:
                    return False
                _, created = await mgr.ensure_held(user, user.name, allow_existing=True)
                return created

            try:
                adopted = await self._while_unrecorded(user.uid, user.name, adopt)
            except NsdError as e:
                report.problems.append(f"cannot adopt {entry}: {e.message}")
                continue
            if adopted:
                report.add("adopt-namespace", user.name, f"adopted existing namespace {entry}")

    async def apply_config(self) -> ReconcileReport:
        """After a reload (the manager took the new configuration): re-apply every
        tenant's limits, the template drop-ins and the network policy."""
        mgr = self.manager
        report = ReconcileReport()
        await self.manager.networks.reconcile(report)
        if not mgr.slices.available:
            return report
        for rec in mgr.store.all():
            try:
                # Under the lock, from the record as it is then: a Remove that ran
                # meanwhile must not get its slice re-created.
                async with mgr.operation(rec.uid, rec.name):
                    if not _still(mgr, rec):
                        continue
                    await mgr.slices.ensure(rec.uid, mgr.limits.of(rec.uid))
            except NsdError as e:
                report.problems.append(f"tenant {rec.name}: {e.message}")
            else:
                report.add("apply-limits", rec.name, str(mgr.limits.of(rec.uid).items()))
        await self._reconcile_slices(report)
        return report


def _still(mgr: TenantManager, rec: TenantRecord) -> bool:
    """Whether ``rec``'s tenant still exists and is not being removed."""
    try:
        mgr.held_record(rec.uid, rec.name)
    except NoSuchTenant:
        return False
    return True


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{user\}|\{uid\})", template)
    out = []
    for part in parts:
        if part == "{user}":
            out.append(r"(?P<user>[a-z_][a-z0-9_.-]{0,31}\$?)")
        elif part == "{uid}":
            out.append(r"(?P<uid>[0-9]{1,10})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def _user_for_match(m: re.Match[str]) -> users.User | None:
    groups = m.groupdict()
    if groups.get("user"):
        user = users.by_name(groups["user"])
        if user is not None and groups.get("uid") and str(user.uid) != groups["uid"]:
            return None
        return user
    if groups.get("uid"):
        return users.by_uid(int(groups["uid"]))
    return None
