"""Creating a tenant, or finishing or repairing one: record the intent, then build
its namespace, veth, addresses, routes, sysctls, slice and policy entries; on a
failure, roll back what this call made (the record says what reconcile must finish).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nsd import names, users
from nsd.errors import (
    NamespaceExists,
    NetworkSetupFailed,
    NoSuchTenant,
    NsdError,
    TenantExists,
    TenantIdentityChanged,
)
from nsd.model import (
    TenantRecord,
    TenantState,
    TenantView,
)
from nsd.net.netns import FOREIGN, NetnsError

if TYPE_CHECKING:
    from nsd.core.manager import TenantManager
from nsd.core.store import now_us

log = logging.getLogger("nsd.manager")


class TenantCreation:
    """Create, finish and repair on behalf of the manager (its locks, store and adapters)."""

    def __init__(self, manager: TenantManager) -> None:
        self.m = manager

    async def ensure_held(
        self, user: users.User, name: str, *, allow_existing: bool, may_create: bool = True
    ) -> tuple[TenantView, bool]:
        """Create, finish or repair tenant ``user``; the caller holds its lock.

        ``may_create`` false: a tenant that is absent or being removed is
        ``NoSuchTenant`` and nothing changes (an interrupted creation is finished:
        somebody asked for it).
        """
        rec = self.m.store.get(user.uid)
        if rec is not None:
            if rec.name != name:
                raise TenantIdentityChanged(
                    name, rec.uid, rec.name,
                    f"uid {rec.uid} was recorded as {rec.name} and is now {name}",
                )  # fmt: skip
            if not allow_existing and rec.state is not TenantState.CREATING:
                raise TenantExists(name)
            if rec.state is TenantState.REMOVING:
                if not may_create:
                    raise NoSuchTenant(name)
                # A removal was interrupted; finish it before creating anew (what
                # someone left at the namespace path then fails the creation itself).
                await self.m.teardown(rec)
                rec = None
        if rec is None:
            if not may_create:
                raise NoSuchTenant(name)
            stale = self.m.store.get_by_name(name)
            if stale is not None:
                raise TenantIdentityChanged(
                    name, stale.uid, stale.name,
                    f"user {name} now has uid {user.uid}, recorded uid {stale.uid}",
                )  # fmt: skip
            rec = self._record_intent(user)
            # A namespace that appeared since the intent was recorded is not
            # adopted behind the operator's back.
            await self.build(rec, rollback=True, adopt=rec.adopted)
            created, actions = True, tuple[str, ...]()
        else:
            actions = await self.build(rec, rollback=False)
            created = False
        rec = self.m.held_record(user.uid, name)
        view = self.m.view(rec, check_identity=False)
        if created or actions:
            self.m.emit("created" if created else "changed", view)
        return view, created

    def _record_intent(self, user: users.User) -> TenantRecord:
        netns_name = names.netns_name(self.m.cfg.netns.name_template, user.name, user.uid)
        path = self.m.netns_path(netns_name)
        adopted = self.m.net.namespace_inode(path) is not None
        if adopted and not self.m.cfg.tenants.adopt_existing:
            raise NamespaceExists(path)
        # No await between allocation and insert: the loop cannot run another
        # allocation in between, so two tenants never get the same address.
        v4, v6 = self.m.ipam.allocate(user.uid)
        rec = TenantRecord(
            uid=user.uid,
            name=user.name,
            state=TenantState.CREATING,
            netns_name=netns_name,
            host_ifname=names.host_ifname(self.m.cfg.netns.link_prefix, user.uid),
            ipv4_address=v4,
            ipv6_prefix=v6,
            adopted=adopted,
            created_us=now_us(),
        )
        self.m.store.insert(rec)
        log.info("tenant %s (uid %d): recorded, ipv4 %s, ipv6 %s%s", rec.name, rec.uid, v4, v6,
                 ", adopting existing namespace" if adopted else "")  # fmt: skip
        return rec

    async def build(
        self,
        rec: TenantRecord,
        *,
        rollback: bool,
        adopt: bool = True,
        dropins: bool = True,
        network: bool = True,
    ) -> tuple[str, ...]:
        try:
            result = await self.m.net.ensure(self.m.spec(rec), adopt=adopt)
            # Reconcile applies the policy once for all tenants instead: the host
            # table lists every tenant, so per-tenant re-applies would be O(n^2).
            actions = result.actions + (await self.m.networks.apply_tenant(rec) if network else ())
        except NetnsError as e:
            if rollback:
                # "exists": a namespace appeared at the path after the intent was
                # recorded. It is not ours, so the rollback must leave it alone.
                await self._rollback(rec, remove_network=e.step != "exists")
            raise NetworkSetupFailed(rec.name, e.step, e.message, e.errno) from e
        if self.m.slices.available:
            try:
                await self.m.slices.ensure(rec.uid, self.m.limits.of(rec.uid))
                if dropins:  # reconcile writes all tenants' drop-ins at once
                    await self.m.slices.sync_dropins([rec], prune_users={rec.name})
            except NsdError:
                if rollback:
                    await self._rollback(rec, remove_network=True)
                raise
        if rec.state is not TenantState.READY:
            self.m.store.set_state(rec.uid, TenantState.READY)
        if actions:
            # One line per tenant: a reboot's reconcile makes 15 changes per tenant,
            # and a line each was ~5% of a 1,000-tenant cold start on the event loop.
            log.info("tenant %s (uid %d): %s", rec.name, rec.uid, "; ".join(actions))
        return actions

    async def repair_many(self, recs: list[TenantRecord]) -> list[tuple[str, ...] | NsdError]:
        """Reconcile's check and repair of tenants recorded ready, whose locks the
        caller holds: ``build(rec, rollback=False, dropins=False, network=False)`` for
        each, with the network of all of them in one job on the netns worker
        (``NetnsAdapter.ensure_many``). Each tenant's actions, or its error."""
        results = await self.m.net.ensure_many([self.m.spec(r) for r in recs])
        out: list[tuple[str, ...] | NsdError] = []
        for rec, result in zip(recs, results, strict=True):
            if isinstance(result, NetnsError):
                out.append(NetworkSetupFailed(rec.name, result.step, result.message, result.errno))
                continue
            if self.m.slices.available:
                try:
                    await self.m.slices.ensure(rec.uid, self.m.limits.of(rec.uid))
                except NsdError as e:
                    out.append(e)
                    continue
            if result.actions:  # one line per tenant, as build() logs
                log.info("tenant %s (uid %d): %s", rec.name, rec.uid, "; ".join(result.actions))
            out.append(result.actions)
        return out

    # -- network policy --------------------------------------------------------

    async def _rollback(self, rec: TenantRecord, *, remove_network: bool) -> None:
        try:
            if remove_network and not rec.adopted:
                try:
                    await self.m.net.remove(self.m.spec(rec))
                except NetnsError as e:
                    if e.step != FOREIGN:
                        raise
                    # All of nsd's is gone; the rest is not nsd's to remove, and the
                    # creation's own error already says what is in the way.
                    log.warning("tenant %s: %s", rec.name, e.message)
            self.m.store.delete(rec.uid, quarantine=False)
            # its elements, if the host table got them before the failure
            await self.m.networks.remove_tenant(rec)
        except (NetnsError, OSError) as e:
            # Leave the 'creating' row: reconcile will finish or retry it.
            log.error("tenant %s: rollback failed, reconcile will retry: %s", rec.name, e)
