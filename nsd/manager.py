"""TenantManager: the core. Create, ensure, remove, get, list, enter, reconcile.

Rules this module keeps:

* One event loop owns all state. Store calls run on it; host changes go to the
  netns adapter's worker thread and are awaited.
* Intent before action: a tenant row (state ``creating``/``removing``) is
  committed before the host is changed, so a crash anywhere can be finished by
  reconcile.
* One operation per tenant at a time (a per-UID lock); address allocation and
  the insert that records it happen in one loop turn, so leases never collide.
* Identity is the UID. A user renamed, deleted or a UID reused is reported,
  never silently acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import cgroup, names, netpolicy, procs, users
from . import limits as limits_mod
from .cgroupstats import slice_cgroup_path
from .config import Config
from .errors import (
    InvalidTenantName,
    NamespaceExists,
    NetworkSetupFailed,
    NoSuchTenant,
    NoSuchUser,
    NsdError,
    ShuttingDown,
    TenantBusy,
    TenantExists,
    TenantIdentityChanged,
    TenantLocked,
    UidOutOfRange,
    WatcherTooSlow,
)
from .faults import Fault
from .handouts import Handouts
from .ipam import Ipam
from .model import (
    ReconcileAction,
    ReconcileReport,
    TenantEvent,
    TenantRecord,
    TenantState,
    TenantView,
)
from .netns import FOREIGN, NetnsAdapter, NetnsError, NetworkSpec
from .slices import (
    MOVE_UNLESS_MAIN,
    STAY,
    RunResult,
    TenantSlices,
    caller_cgroup,
    placement,
)

if TYPE_CHECKING:
    from .hostnet import HostNetwork
from .store import Store, now_us

log = logging.getLogger("nsd.manager")

_WATCH_QUEUE = 1024  # events buffered per watcher before it is dropped as too slow


class TenantManager:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        ipam: Ipam,
        net: NetnsAdapter,
        *,
        slices: TenantSlices | None = None,
        network: HostNetwork | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.ipam = ipam
        self.net = net
        self.slices = slices or TenantSlices(cfg, None, "not connected")
        # The nftables policy, NAT, host services and shaping; None when
        # network.enabled is false.
        self.network = network
        # Per-UID locks with a user count: a lock leaves the dict only when no
        # operation holds or awaits it (asyncio.Lock's waiter list is not a
        # reliable signal: wait_for() enqueues the acquire one loop turn later).
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        # UIDs being removed: Enter's lock-free fast path must not hand out
        # their namespace while their processes are being stopped.
        self._removing: set[int] = set()
        # Namespace descriptors Enter handed out that may not have reached their
        # process yet: Remove waits for them before it looks for users.
        self._handouts = Handouts()
        # Changes of the host's nft table. The whole-table load of reconcile and
        # reload computes it from the store; a tenant's removal or addition that
        # completed while that load was on its way would be undone by it.
        self._network_lock = asyncio.Lock()
        self._watchers: set[asyncio.Queue[TenantEvent | None]] = set()
        self._closing = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sysctls = tuple(sorted(cfg.netns.sysctls.items()))

    # -- resolution and identity ----------------------------------------------

    def resolve_user(self, name: str) -> users.User:
        """A valid, existing user whose UID nsd may manage."""
        reason = names.check_user_name(name)
        if reason is not None:
            raise InvalidTenantName(name, reason)
        user = users.by_name(name)
        if user is None:
            raise NoSuchUser(name)
        if user.name != name:
            # NSS backends that match case- or space-insensitively return another
            # spelling; the recorded name and the namespace file use NSS's.
            raise InvalidTenantName(name, f"NSS knows this user as {user.name!r}")
        t = self.cfg.tenants
        if not t.uid_min <= user.uid <= t.uid_max:
            raise UidOutOfRange(name, user.uid, t.uid_min, t.uid_max)
        return user

    # -- queries ---------------------------------------------------------------

    def view(
        self, rec: TenantRecord, *, check_identity: bool = True, inode: int | None = None
    ) -> TenantView:
        """``inode``: the namespace's, when the caller has it open already."""
        path = self.netns_path(rec.netns_name)
        problems: list[str] = []
        if check_identity:
            problem = users.identity_problem(rec.uid, rec.name)
            if problem is not None:
                problems.append(problem)
        if inode is None:
            inode = self.net.namespace_inode(path)
        if inode is None and rec.state is TenantState.READY:
            problems.append(f"namespace {path} is not mounted (reconcile recreates it)")
        return TenantView(
            record=rec,
            namespace_path=path,
            namespace_inode=inode,
            tenant_interface=self.cfg.netns.tenant_interface,
            ipv4_gateway=self.ipam.ipv4_gateway,
            ipv6_gateway=self.ipam.ipv6_gateway,
            slice=self.slices.slice_of(rec.uid) if self.slices.available else None,
            problems=tuple(problems),
        )

    def tenant_uid(self, name: str) -> int:
        """The UID of tenant ``name``; InvalidTenantName before any lookup (a name
        that no UTF-8 can carry, a lone surrogate, must not reach SQLite)."""
        return self._existing(name).uid

    def get(self, name: str) -> TenantView:
        return self.view(self._existing(name))

    async def list(self) -> list[TenantView]:
        records = self.store.all()
        # One NSS lookup per tenant: on a thread, so a slow NSS backend (LDAP,
        # sssd cache miss) cannot stall the event loop and every other caller.
        problems = await asyncio.to_thread(
            lambda: [users.identity_problem(r.uid, r.name) for r in records]
        )
        views = []
        for rec, problem in zip(records, problems, strict=True):
            view = self.view(rec, check_identity=False)
            if problem is not None:
                view = replace(view, problems=(problem, *view.problems))
            views.append(view)
        return views

    def tenant_count(self) -> int:
        return self.store.count()

    def netns_path(self, netns_name: str) -> str:
        return os.path.join(self.cfg.netns.run_dir, netns_name)

    def spec(self, rec: TenantRecord) -> NetworkSpec:
        return NetworkSpec(
            netns_path=self.netns_path(rec.netns_name),
            host_ifname=rec.host_ifname,
            peer_ifname=self.cfg.netns.tenant_interface,
            ipv4_address=rec.ipv4_address,
            ipv4_gateway=self.ipam.ipv4_gateway,
            ipv6_prefix=rec.ipv6_prefix,
            ipv6_address=rec.ipv6_address,
            ipv6_gateway=self.ipam.ipv6_gateway,
            sysctls=self._sysctls,
            mtu=self.cfg.netns.mtu or None,
        )

    # -- mutations -------------------------------------------------------------

    async def create(self, name: str) -> TenantView:
        view, _ = await self._ensure(name, allow_existing=False)
        return view

    async def ensure(self, name: str) -> tuple[TenantView, bool]:
        return await self._ensure(name, allow_existing=True)

    async def enter(
        self,
        name: str,
        create: bool | None,
        scope: bool | None = None,
        caller_pid: int | None = None,
        open_pidfd: Callable[[], int] | None = None,
        *,
        unread: Callable[[], int | None] | None = None,
    ) -> tuple[TenantView, int, str | None]:
        """The tenant's namespace as an open descriptor (the caller owns it), and the
        scope the caller was moved into, if the placement policy moved it.

        ``unread``: how much of the reply carrying the descriptor the process
        ``caller_pid`` has not read yet, counting the descriptor as unread while nsd
        itself still holds it (see ``handouts``); until it says 0, a Remove of the
        tenant waits.
        """
        if self._closing:
            raise ShuttingDown()
        user = self.resolve_user(name)
        rec = self.store.get(user.uid)
        fd = None
        handout = None

        def hand_out(path: str) -> int:
            # Recorded in the loop turn in which it is opened: a Remove that starts
            # after this waits for it to land (handouts).
            nonlocal handout
            opened = self.net.open_namespace(path)
            handout = self._handouts.add(user.uid, unread or (lambda: 0), caller_pid)
            return opened

        if (
            rec is not None
            and rec.state is TenantState.READY
            and rec.name == name
            and user.uid not in self._removing
        ):
            # The fast path opens the namespace straight away (it checks that a
            # network namespace is mounted there); failing that, the slow path repairs.
            with contextlib.suppress(NetnsError):
                fd = hand_out(self.netns_path(rec.netns_name))
        if fd is None:
            # Whether this call may create is decided under the tenant's lock, from
            # the state any running operation (a Remove) left: deciding here, from a
            # record the lock holder is about to change, brought removed tenants back.
            may_create = self.cfg.tenants.enter_creates if create is None else create
            # Creates, finishes or repairs under the tenant's lock; 64 callers
            # racing for a new tenant queue here and all get the one namespace.
            async with self._operation(user.uid, name):
                view, _ = await self._ensure_held(
                    user, name, allow_existing=True, may_create=may_create
                )
                rec = view.record
                try:
                    fd = hand_out(view.namespace_path)
                except NetnsError as e:
                    raise NetworkSetupFailed(name, e.step, e.message, e.errno) from e
                except OSError as e:
                    raise NetworkSetupFailed(name, "open", e.strerror or str(e), e.errno) from e
        assert rec is not None and handout is not None
        placed = None
        try:
            view = self.view(rec, check_identity=False, inode=os.fstat(fd).st_ino)
            if caller_pid is not None and open_pidfd is not None:
                placed = await self._place(rec, scope, caller_pid, open_pidfd)
        except BaseException:
            self._handouts.discard(handout)
            os.close(fd)
            raise
        return view, fd, placed

    async def _place(
        self, rec: TenantRecord, scope: bool | None, pid: int, open_pidfd: Callable[[], int]
    ) -> str | None:
        tenant_slice = self.slices.slice_of(rec.uid)
        policy = self.cfg.systemd.enter_scope
        if not self.slices.available and scope is None:
            return None  # auto or always, on a host without systemd: nothing to place into
        # The caller's cgroup matters only to the "auto" policy's own choice.
        cgroup = caller_cgroup(pid) if scope is None and policy == "auto" else None
        decision = placement(policy, scope, cgroup, tenant_slice, rec.uid)
        if decision == MOVE_UNLESS_MAIN and await self.slices.is_main_process(pid):
            log.info("tenant %s: pid %d stays in its unit (its main process)", rec.name, pid)
            return None
        if decision == STAY:
            return None
        unit = await self.slices.place(rec, pid, open_pidfd)
        log.info("tenant %s: pid %d placed into %s", rec.name, pid, unit)
        return unit

    async def _ensure(self, name: str, *, allow_existing: bool) -> tuple[TenantView, bool]:
        user = self.resolve_user(name)
        async with self._operation(user.uid, name):
            return await self._ensure_held(user, name, allow_existing=allow_existing)

    async def _ensure_held(
        self, user: users.User, name: str, *, allow_existing: bool, may_create: bool = True
    ) -> tuple[TenantView, bool]:
        """Create, finish or repair tenant ``user``; the caller holds its lock.

        ``may_create`` false: a tenant that is absent or being removed is
        ``NoSuchTenant`` and nothing changes (an interrupted creation is finished:
        somebody asked for it).
        """
        rec = self.store.get(user.uid)
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
                await self._teardown(rec)
                rec = None
        if rec is None:
            if not may_create:
                raise NoSuchTenant(name)
            stale = self.store.get_by_name(name)
            if stale is not None:
                raise TenantIdentityChanged(
                    name, stale.uid, stale.name,
                    f"user {name} now has uid {user.uid}, recorded uid {stale.uid}",
                )  # fmt: skip
            rec = self._record_intent(user)
            # A namespace that appeared since the intent was recorded is not
            # adopted behind the operator's back.
            await self._build(rec, rollback=True, adopt=rec.adopted)
            created, actions = True, tuple[str, ...]()
        else:
            actions = await self._build(rec, rollback=False)
            created = False
        rec = self.store.get(user.uid)
        assert rec is not None
        view = self.view(rec, check_identity=False)
        if created or actions:
            self._emit("created" if created else "changed", view)
        return view, created

    def _record_intent(self, user: users.User) -> TenantRecord:
        netns_name = names.netns_name(self.cfg.netns.name_template, user.name, user.uid)
        path = self.netns_path(netns_name)
        adopted = self.net.namespace_inode(path) is not None
        if adopted and not self.cfg.tenants.adopt_existing:
            raise NamespaceExists(path)
        # No await between allocation and insert: the loop cannot run another
        # allocation in between, so two tenants never get the same address.
        v4, v6 = self.ipam.allocate(user.uid)
        rec = TenantRecord(
            uid=user.uid,
            name=user.name,
            state=TenantState.CREATING,
            netns_name=netns_name,
            host_ifname=names.host_ifname(self.cfg.netns.link_prefix, user.uid),
            ipv4_address=v4,
            ipv6_prefix=v6,
            adopted=adopted,
            created_us=now_us(),
        )
        self.store.insert(rec)
        log.info("tenant %s (uid %d): recorded, ipv4 %s, ipv6 %s%s", rec.name, rec.uid, v4, v6,
                 ", adopting existing namespace" if adopted else "")  # fmt: skip
        return rec

    async def _build(
        self,
        rec: TenantRecord,
        *,
        rollback: bool,
        adopt: bool = True,
        dropins: bool = True,
        network: bool = True,
    ) -> tuple[str, ...]:
        try:
            result = await self.net.ensure(self.spec(rec), adopt=adopt)
            # Reconcile applies the policy once for all tenants instead: the host
            # table lists every tenant, so per-tenant re-applies would be O(n^2).
            actions = result.actions + (await self._apply_tenant_network(rec) if network else ())
        except NetnsError as e:
            if rollback:
                # "exists": a namespace appeared at the path after the intent was
                # recorded. It is not ours, so the rollback must leave it alone.
                await self._rollback(rec, remove_network=e.step != "exists")
            raise NetworkSetupFailed(rec.name, e.step, e.message, e.errno) from e
        if self.slices.available:
            try:
                await self.slices.ensure(rec.uid, self.limits_of(rec.uid))
                if dropins:  # reconcile writes all tenants' drop-ins at once
                    await self.slices.sync_dropins([rec], prune_users={rec.name})
            except NsdError:
                if rollback:
                    await self._rollback(rec, remove_network=True)
                raise
        if rec.state is not TenantState.READY:
            self.store.set_state(rec.uid, TenantState.READY)
        for action in actions:
            log.info("tenant %s (uid %d): %s", rec.name, rec.uid, action)
        return actions

    # -- network policy --------------------------------------------------------

    def tenant_net(self, rec: TenantRecord) -> netpolicy.TenantNet:
        egress, ingress = self.store.bandwidth_override(rec.uid)
        bw = self.cfg.network.bandwidth.overlay(netpolicy.Bandwidth(egress, ingress)).effective()
        return netpolicy.TenantNet(
            rec.name, rec.uid, rec.host_ifname, rec.ipv4_address, rec.ipv6_prefix, bw
        )

    def _policy_tenants(self) -> Sequence[netpolicy.TenantNet]:
        return [self.tenant_net(r) for r in self.store.all() if r.state is not TenantState.REMOVING]

    async def apply_network_host(self) -> None:
        """Load the host table before any tenant veth is touched (fail closed)."""
        if self.network is None:
            return
        async with self._network_lock:
            rep = await self.network.apply_host(self._policy_tenants())
        for a in rep.actions:
            log.info("network: %s", a)
        for p in rep.problems:
            log.warning("network: %s", p)

    async def _apply_tenant_network(self, rec: TenantRecord) -> tuple[str, ...]:
        if self.network is None:
            return ()
        # The host table must name this veth before traffic through it is allowed: one
        # element transaction (the full table only when the incremental path fails).
        async with self._network_lock:
            rep = await self.network.set_tenant(self.tenant_net(rec), self._policy_tenants)
            rep.extend(
                await self.network.apply_tenant(
                    self.tenant_net(rec), self.netns_path(rec.netns_name)
                )
            )
        for p in rep.problems:
            log.warning("tenant %s: %s", rec.name, p)
        return tuple(rep.actions)

    async def _reconcile_network(self, report: ReconcileReport) -> None:
        if self.network is None:
            return
        try:
            await self.network.refresh_site()
            async with self._network_lock:  # the store read and the load, as one
                rep = await self.network.apply(
                    self._policy_tenants(),
                    {r.uid: self.netns_path(r.netns_name) for r in self.store.all()},
                )
            report.actions += [ReconcileAction("network", None, a) for a in rep.actions]
            report.problems += rep.problems
            report.problems += await self.network.foreign_drop_policies()
        except (NsdError, NetnsError, OSError, ValueError) as e:
            report.problems.append(f"network policy: {e}")

    async def get_network(self, name: str) -> dict[str, Any]:
        rec = self._existing(name)
        if self.network is None:
            return _NETWORK_OFF
        status = await self.network.tenant_status(
            self.tenant_net(rec), self.netns_path(rec.netns_name)
        )
        egress, ingress = self.store.bandwidth_override(rec.uid)
        return {**status, "egressOverride": egress, "ingressOverride": ingress}

    async def set_bandwidth(
        self, name: str, egress: int | None, ingress: int | None, reset: Sequence[str]
    ) -> dict[str, Any]:
        rec = self._existing(name)
        async with self._operation(rec.uid, name):
            rec = self._held_record(rec.uid, name)
            old_e, old_i = self.store.bandwidth_override(rec.uid)
            new_e = None if "egress" in reset else (egress if egress is not None else old_e)
            new_i = None if "ingress" in reset else (ingress if ingress is not None else old_i)
            self.store.set_bandwidth_override(rec.uid, new_e, new_i)
            await self._apply_tenant_network(rec)
        return await self.get_network(name)

    # -- limits, slices, runs --------------------------------------------------

    def limits_of(self, uid: int) -> limits_mod.Limits:
        """Effective limits: configured defaults overlaid with the tenant's overrides."""
        return self.slices.effective(self.store.limit_overrides(uid))

    def get_limits(self, name: str) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """(effective, overrides) of a tenant."""
        rec = self._existing(name)
        overrides = self.store.limit_overrides(rec.uid)
        return self.slices.effective(overrides), limits_mod.Limits(**overrides)

    async def set_limits(
        self, name: str, changes: dict[str, str | None]
    ) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """Change overrides (None resets a field to the default), apply them live, persist."""
        rec = self._existing(name)
        async with self._operation(rec.uid, name):
            rec = self._held_record(rec.uid, name)
            overrides = self.store.limit_overrides(rec.uid)
            for field, value in changes.items():
                if value is None:
                    overrides.pop(field, None)
                else:
                    overrides[field] = limits_mod.canonical(field, value)
            effective = self.slices.effective(overrides)
            limits_mod.check_consistent(effective)
            # Applied first: if systemd refuses, nothing is recorded. The slice's
            # settings are persistent drop-ins, so both survive a crash in between
            # (reconcile re-applies the store's values).
            await self.slices.ensure(rec.uid, effective)
            self.store.set_limit_overrides(rec.uid, overrides)
            await self._protect_parent()
            log.info("tenant %s: limits now %s", name, effective.items())
            return effective, limits_mod.Limits(**overrides)

    async def _protect_parent(self) -> None:
        if self.slices.available:
            await self.slices.protect_parent(self.limits_of(r.uid) for r in self.store.all())

    async def run(self, name: str, argv: Sequence[str], wait: bool) -> RunResult:
        rec = self._existing(name)
        user = self.resolve_user(name)
        # Started under the lock: a Remove queued behind it then finds the unit's
        # processes (TenantBusy), and one ahead of it leaves nothing to start in.
        async with self._operation(rec.uid, name):
            rec = self._held_record(rec.uid, name)
            if rec.state is not TenantState.READY:  # finish an interrupted creation
                view, _ = await self._ensure_held(user, name, allow_existing=True, may_create=False)
                rec = view.record
            unit = await self.slices.start_run(
                rec, self.netns_path(rec.netns_name), user.home, argv, wait
            )
        if not wait:
            return RunResult(unit, None, None)
        return await self.slices.wait_run(unit)

    def _held_record(self, uid: int, name: str, *, removing: bool = False) -> TenantRecord:
        """The record of ``name`` as it is now; the caller holds the tenant's lock.

        Callers look the record up before they queue for the lock; the operation
        ahead of them may have removed it (or removed and re-created it for another
        user name). Acting on the stale copy re-created slices and nft elements of
        removed tenants, so every mutation checks again here.
        """
        rec = self.store.get(uid)
        if rec is None or rec.name != name or (rec.state is TenantState.REMOVING and not removing):
            raise NoSuchTenant(name)
        return rec

    def _still(self, rec: TenantRecord) -> bool:
        """Whether ``rec``'s tenant still exists and is not being removed."""
        try:
            self._held_record(rec.uid, rec.name)
        except NoSuchTenant:
            return False
        return True

    def _existing(self, name: str) -> TenantRecord:
        reason = names.check_user_name(name)
        if reason is not None:
            raise InvalidTenantName(name, reason)
        rec = self.store.get_by_name(name)
        if rec is None:
            raise NoSuchTenant(name)
        return rec

    async def _rollback(self, rec: TenantRecord, *, remove_network: bool) -> None:
        try:
            if remove_network and not rec.adopted:
                try:
                    await self.net.remove(self.spec(rec))
                except NetnsError as e:
                    if e.step != FOREIGN:
                        raise
                    # All of nsd's is gone; the rest is not nsd's to remove, and the
                    # creation's own error already says what is in the way.
                    log.warning("tenant %s: %s", rec.name, e.message)
            self.store.delete(rec.uid, quarantine=False)
            if self.network is not None:
                # its elements, if the host table got them before the failure
                async with self._network_lock:
                    rep = await self.network.remove_tenant(rec.uid, self._policy_tenants)
                for p in rep.problems:
                    log.warning("tenant %s: %s", rec.name, p)
        except (NetnsError, OSError) as e:
            # Leave the 'creating' row: reconcile will finish or retry it.
            log.error("tenant %s: rollback failed, reconcile will retry: %s", rec.name, e)

    async def remove(self, name: str, force: bool) -> None:
        uid = self._existing(name).uid
        async with self._operation(uid, name):
            # Again under the lock: a queued operation may have changed it (a
            # record left "removing" by a crash is finished here).
            rec = self._held_record(uid, name, removing=True)
            self._removing.add(rec.uid)
            try:
                await self._await_handouts(rec)
                await self._stop_processes(rec, force)
                self.store.set_state(rec.uid, TenantState.REMOVING)
                view = self.view(rec, check_identity=False)
                left = await self._teardown(rec)
            finally:
                self._removing.discard(rec.uid)
            self._emit("removed", view)
            if self.slices.available:
                await self.slices.sync_dropins([], prune_users={rec.name})
                await self.slices.stop_ensure_unit(rec.name)
                await self._protect_parent()
            if left is not None:
                raise left

    async def _await_handouts(self, rec: TenantRecord) -> None:
        """Wait until every namespace descriptor Enter handed out for ``rec`` reached
        its process; TenantBusy if one has not within ``stop_timeout``.

        Why Remove may then trust its scan: the caller put the UID in ``_removing``
        and holds the tenant's lock, so no Enter hands out another descriptor (the
        fast path checks ``_removing`` and records its descriptor in the same loop
        turn it opens it; the slow path needs the lock). Each descriptor handed out
        before is now in some process's descriptor table, or that process joined
        the namespace with it, or it was closed; ``_stop_processes`` looks for
        both the members and the holders. A process that passes its descriptor on
        (SCM_RIGHTS) while that scan runs can escape it: nsd-exec never does.
        """
        left = await self._handouts.wait_landed(rec.uid, self.cfg.tenants.stop_timeout)
        if left:
            log.warning("tenant %s: %d namespace descriptor(s) handed out by Enter not "
                        "yet received; not removing", rec.name, left)  # fmt: skip
            raise TenantBusy(rec.name, left)

    async def _stop_processes(self, rec: TenantRecord, force: bool) -> None:
        """Refuse (or with force, stop) while processes run in the tenant's namespace
        or hold a descriptor of it (they may join it at any time)."""
        inode = self.net.namespace_inode(self.netns_path(rec.netns_name))
        pids = await asyncio.to_thread(_users_of, inode) if inode else []
        # Processes in the tenant's slice count too (a service with Slice= but
        # no namespace): stopping the slice at removal would kill them.
        in_slice = await asyncio.to_thread(cgroup.pids_in, self._slice_path(rec.uid))
        busy = set(pids) | set(in_slice)
        if busy and not force:
            raise TenantBusy(rec.name, len(busy))
        if not pids or inode is None:
            return  # the slice's own processes end when the slice is stopped
        log.info("tenant %s: stopping %d process(es) before removal", rec.name, len(pids))
        # netns_inode: a PID is only signalled if it is still in this namespace
        # after its pidfd is open, so a PID reused since the scan is left alone.
        await procs.stop_processes(
            pids, term_timeout=self.cfg.tenants.stop_timeout, netns_inode=inode, holders=True
        )
        left = await asyncio.to_thread(_users_of, inode)
        if left:
            raise TenantBusy(rec.name, len(left))

    def _slice_path(self, uid: int) -> str:
        return slice_cgroup_path(self.slices.slice_of(uid))

    async def _teardown(self, rec: TenantRecord) -> NetworkSetupFailed | None:
        """Remove the tenant's slice, network and record. Returns (does not raise)
        the error that names what someone else left at the namespace path: all of
        nsd's objects are gone then, so the record goes too and nothing is stuck;
        the caller finishes its own work and then reports it."""
        if self.slices.available:
            await self.slices.remove(rec.uid)
        left = None
        try:
            await self.net.remove(self.spec(rec))
        except NetnsError as e:
            if e.step != FOREIGN:
                raise NetworkSetupFailed(rec.name, e.step, e.message, e.errno) from e
            left = NetworkSetupFailed(rec.name, e.step, f"tenant removed, but {e.message}",
                                      e.errno)  # fmt: skip
            log.warning("tenant %s: %s", rec.name, left.message)
        self.store.delete(rec.uid, quarantine=True)
        log.info("tenant %s (uid %d): removed; addresses quarantined", rec.name, rec.uid)
        if self.network is not None:
            async with self._network_lock:
                await self.network.remove_tenant(rec.uid, self._policy_tenants)
        return left

    # -- reconcile -------------------------------------------------------------

    async def reconcile(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ReconcileReport:
        """Bring the host in line with the store; report what changed.

        Tenants whose user changed identity are reported, and their recorded
        network is still restored: a reboot must not take a namespace from
        services that use it because NSS was briefly unreachable. Their records
        are never changed and nothing new is created for the new identity.
        """
        report = ReconcileReport()
        records = self.store.all()
        problems = await asyncio.to_thread(
            lambda: [users.identity_problem(r.uid, r.name) for r in records]
        )
        for i, (rec, problem) in enumerate(zip(records, problems, strict=True)):
            if progress is not None:
                progress(i, len(records))
            if problem is not None:
                report.problems.append(f"tenant {rec.name} (uid {rec.uid}): {problem}")
            try:
                async with self._operation(rec.uid, rec.name):
                    await self._reconcile_one(rec, report)
            except NsdError as e:
                report.problems.append(f"tenant {rec.name}: {e.message}")
        if self.cfg.tenants.adopt_existing:
            await self._adopt_unrecorded(report)
        # After the namespaces exist again (the host table itself was loaded before
        # any veth came up: the daemon applies it first), once for everyone.
        await self._reconcile_network(report)
        await self._remove_stray_links(report)
        if self.slices.available:
            await self._reconcile_slices(report)
        for a in report.actions:
            if a.kind != "repair":  # repairs were logged as they happened
                log.info("reconcile: %s%s: %s", a.kind, f" ({a.tenant})" if a.tenant else "",
                         a.detail)  # fmt: skip
        for p in report.problems:
            log.warning("reconcile: %s", p)
        return report

    async def _reconcile_slices(self, report: ReconcileReport) -> None:
        try:
            records = self.store.all()
            changes = await self.slices.sync_dropins(records, prune_users=None)
            for unit in changes.written:
                report.add("write-template-dropin", None, f"{unit}: Slice= of its tenant")
            for unit in changes.removed:
                report.add("remove-template-dropin", None, f"{unit}: no tenant or template")
            report.problems.extend(f"{p.unit}: {p.reason}" for p in changes.problems)
            known = {r.uid for r in records}
            for uid, unit in await self.slices.stray_slices(known):

                async def forget(unit: str = unit) -> bool:
                    if not await self.slices.has_settings(unit):
                        return False
                    await self.slices.forget(unit)
                    return True

                if await self._while_unrecorded(uid, unit, forget):
                    report.add("forget-stray-slice", None,
                               f"dropped the settings of {unit}: no tenant owns it")  # fmt: skip
            await self._protect_parent()
        except NsdError as e:
            report.problems.append(e.message)

    async def _remove_stray_links(self, report: ReconcileReport) -> None:
        known = {r.host_ifname for r in self.store.all()}
        try:
            links = await self.net.list_prefixed_links()
        except NetnsError as e:
            report.problems.append(f"cannot list links: {e}")
            return
        for link in links:
            if link in known:
                continue

            async def delete(link: str = link) -> bool:
                await self.net.delete_link(link)
                return True

            uid = int(link.removeprefix(self.cfg.netns.link_prefix))
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
        async with self._operation(uid, what):
            if self.store.get(uid) is not None:
                return False
            return await act()

    async def _reconcile_one(self, rec: TenantRecord, report: ReconcileReport) -> None:
        current = self.store.get(rec.uid)
        if current is None:
            return
        if current.state is TenantState.REMOVING:
            left = await self._teardown(current)
            report.add("finish-removal", rec.name, "finished an interrupted removal")
            if left is not None:
                report.problems.append(left.message)
            self._emit("removed", self.view(current, check_identity=False))
            return
        actions = await self._build(current, rollback=False, dropins=False, network=False)
        if current.state is TenantState.CREATING:
            report.add("finish-creation", rec.name, "finished an interrupted creation")
        for action in actions:
            report.add("repair", rec.name, action)
        if actions or current.state is TenantState.CREATING:
            rec2 = self.store.get(rec.uid)
            assert rec2 is not None
            self._emit("changed", self.view(rec2, check_identity=False))

    async def _adopt_unrecorded(self, report: ReconcileReport) -> None:
        """Adopt namespaces whose file name matches the template for a known user."""
        pattern = _template_regex(self.cfg.netns.name_template)
        try:
            entries = sorted(os.listdir(self.cfg.netns.run_dir))
        except FileNotFoundError:
            return
        recorded = {r.netns_name for r in self.store.all()}
        for entry in entries:
            m = pattern.fullmatch(entry)
            if m is None or entry in recorded:
                continue
            if self.net.namespace_inode(self.netns_path(entry)) is None:
                continue
            user = _user_for_match(m)
            if (
                user is None
                or names.netns_name(self.cfg.netns.name_template, user.name, user.uid) != entry
            ):
                continue
            t = self.cfg.tenants
            if not t.uid_min <= user.uid <= t.uid_max:
                log.debug("not adopting %s: uid %d is outside the managed range", entry, user.uid)
                continue
            path = self.netns_path(entry)

            async def adopt(user: users.User = user, path: str = path) -> bool:
                # Looked at without the lock: gone since, it is nothing to adopt,
                # and creating a fresh tenant here is what nobody asked for.
                if self.net.namespace_inode(path) is None:
                    return False
                _, created = await self._ensure_held(user, user.name, allow_existing=True)
                return created

            try:
                adopted = await self._while_unrecorded(user.uid, user.name, adopt)
            except NsdError as e:
                report.problems.append(f"cannot adopt {entry}: {e.message}")
                continue
            if adopted:
                report.add("adopt-namespace", user.name, f"adopted existing namespace {entry}")

    # -- watch -----------------------------------------------------------------

    async def watch(
        self, uid: int | None
    ) -> AsyncIterator[tuple[str, TenantView | None, Fault | None]]:
        """Events of all tenants, or of the tenant with ``uid`` (its identity, not its name):
        (kind, tenant, the fault for kind "fault")."""
        queue: asyncio.Queue[TenantEvent | None] = asyncio.Queue(_WATCH_QUEUE)
        self._watchers.add(queue)
        try:
            for rec in self.store.all():
                if uid is None or rec.uid == uid:
                    yield "existing", self.view(rec), None
            yield "synced", None, None
            while True:
                event = await queue.get()
                if event is None:
                    if self._closing:
                        raise ShuttingDown()
                    raise WatcherTooSlow()
                if uid is None or event.view.record.uid == uid:
                    yield event.kind, event.view, event.fault
        finally:
            self._watchers.discard(queue)

    def emit_fault(self, fault: Fault) -> None:
        """A Watch event for a recorded fault (nsd.faultrecord), if the tenant is
        still the one the fault was recorded for."""
        rec = self.store.get(fault.uid)
        if rec is None or rec.name != fault.tenant:
            return
        self._emit("fault", self.view(rec, check_identity=False), fault)

    def _emit(self, kind: str, view: TenantView, fault: Fault | None = None) -> None:
        event = TenantEvent(kind, view, fault)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A watcher that does not read must not make nsd buffer forever.
                self._watchers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    # -- lifecycle -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self, uid: int, name: str) -> AsyncIterator[None]:
        if self._closing:
            raise ShuttingDown()
        lock, users_of_lock = self._locks.get(uid, (asyncio.Lock(), 0))
        self._locks[uid] = (lock, users_of_lock + 1)
        self._inflight += 1
        self._idle.clear()
        try:
            try:
                await asyncio.wait_for(lock.acquire(), self.cfg.tenants.lock_timeout)
            except TimeoutError:
                raise TenantLocked(name) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users_of_lock = self._locks[uid]
            if users_of_lock == 1:
                del self._locks[uid]
            else:
                self._locks[uid] = (lock, users_of_lock - 1)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def apply_config(self, cfg: Config) -> ReconcileReport:
        """Take a reloaded configuration; re-apply every tenant's limits."""
        self.cfg = cfg
        self.slices.cfg = cfg
        report = ReconcileReport()
        if self.network is not None:
            self.network.cfg = cfg.network
            await self._reconcile_network(report)
        if not self.slices.available:
            return report
        for rec in self.store.all():
            try:
                # Under the lock, from the record as it is then: a Remove that ran
                # meanwhile must not get its slice re-created.
                async with self._operation(rec.uid, rec.name):
                    if not self._still(rec):
                        continue
                    await self.slices.ensure(rec.uid, self.limits_of(rec.uid))
            except NsdError as e:
                report.problems.append(f"tenant {rec.name}: {e.message}")
            else:
                report.add("apply-limits", rec.name, str(self.limits_of(rec.uid).items()))
        await self._reconcile_slices(report)
        return report

    async def shutdown(self, timeout: float) -> bool:
        """Refuse new work, wait for running operations; True if all finished."""
        self._closing = True
        for queue in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _users_of(inode: int) -> list[int]:
    """Processes in the namespace or holding a descriptor of it (they may join it)."""
    return procs.processes_in_namespace(inode, holders=True)


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


# GetNetwork's answer when the daemon applies no network policy.
_NETWORK_OFF: dict[str, Any] = {
    "enabled": False, "uplinks": [], "egress": "none", "isolation": False, "allowedTo": [],
    "allowedFrom": [], "conntrackLimit": None, "connections": None, "routes": [],
    "services": [], "egressRate": None, "ingressRate": None, "egressOverride": None,
    "ingressOverride": None, "problems": [],
}  # fmt: skip
