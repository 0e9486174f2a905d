"""TenantManager: the core. Create, ensure, remove, get, list, enter.

Its parts live beside it: nsd.core.reconcile (bring the host in line with the store),
nsd.core.tenant_locks (one operation per tenant), nsd.core.events (Watch), nsd.core.tenant_network
(the core's side of the network policy) and nsd.core.tenant_limits (limits and slices).
It returns dataclasses (nsd.model); nsd.api.views turns them into replies.

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from nsd import limits as limits_mod
from nsd import names, users
from nsd.config import Config
from nsd.core import doctor
from nsd.core.creation import TenantCreation
from nsd.core.events import TenantEvents
from nsd.core.handouts import Handouts
from nsd.core.ipam import Ipam
from nsd.core.reconcile import Reconciler
from nsd.core.removal import TenantRemoval
from nsd.errors import (
    InvalidTenantName,
    NetworkSetupFailed,
    NoSuchTenant,
    NoSuchUser,
    ShuttingDown,
    TenantIdentityChanged,
    UidOutOfRange,
)
from nsd.model import (
    Check,
    Fault,
    NetworkStatus,
    ReconcileReport,
    TenantRecord,
    TenantState,
    TenantView,
)
from nsd.net.netns import NetnsAdapter, NetnsError, NetworkSpec
from nsd.observe.cgroupstats import slice_cgroup_path
from nsd.observe.sampler import Target
from nsd.systemd.slices import RunResult, TenantSlices

if TYPE_CHECKING:
    from nsd.net.hostnet import HostNetwork
from nsd.core.store import Store
from nsd.core.tenant_limits import TenantLimits
from nsd.core.tenant_locks import TenantLocks
from nsd.core.tenant_network import TenantNetworks

log = logging.getLogger("nsd.manager")


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
        # The nftables policy, NAT, host services and shaping (no-ops when
        # network.enabled is false).
        self.networks = TenantNetworks(network, cfg.network, store, self.netns_path)
        self.limits = TenantLimits(self.slices, store)
        self._locks = TenantLocks()
        # UIDs being removed: Enter's lock-free fast path must not hand out
        # their namespace while their processes are being stopped.
        self._removing: set[int] = set()
        self._events = TenantEvents()
        # Namespace descriptors Enter handed out that may not have reached their
        # process yet: Remove waits for them before it looks for users.
        self._handouts = Handouts()
        self._removal = TenantRemoval(self)
        # Building a tenant on the host; reconcile repairs through it too.
        self.creation = TenantCreation(self)
        self._sysctls = tuple(sorted(cfg.netns.sysctls.items()))
        self._reconciler = Reconciler(self)
        # One reconcile at a time: nsd serves while its start-up reconcile runs, and
        # an operator's Reconcile (or a reload) then waits for it to finish.
        self._reconciling = asyncio.Lock()
        #: set when the first (start-up) reconcile has finished: until then a namespace
        #: found mounted may not be checked yet (or be half built by the reconcile), so
        #: Enter takes the path that checks it under the tenant's lock
        self.started = False

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

    def get(self, name: str, *, strict: bool = True) -> TenantView:
        """``strict``: refuse a tenant whose user changed identity (see ``checked``);
        otherwise (an operator inspecting it) the change is listed in its problems."""
        if strict:
            return self.view(self.checked(name), check_identity=False)
        return self.view(self._existing(name))

    async def list(self) -> list[TenantView]:
        records = self.store.all()
        # On a thread, so a slow NSS backend (LDAP, sssd cache miss) cannot stall the
        # event loop and every other caller.
        problems = await asyncio.to_thread(
            users.identity_problems, [(r.uid, r.name) for r in records]
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

    def record(self, name: str) -> TenantRecord:
        """The recorded tenant of that name; NoSuchTenant if there is none."""
        rec = self.store.get_by_name(name)
        if rec is None:
            raise NoSuchTenant(name)
        return rec

    def record_of_uid(self, uid: int) -> TenantRecord | None:
        """The recorded tenant with that UID, if any (identity checks of callers)."""
        return self.store.get(uid)

    def sampler_targets(self) -> tuple[Target, ...]:
        """Every tenant as the metrics sampler reads it; call on the event loop (store).

        It runs on the event loop, so it must stay short (a stall here is a stall of
        every API call; it took ~40 ms with 1,000 tenants, one SQLite query per
        tenant): the records come from the store's cache, the limit overrides from one
        query, and the effective limits of the tenants without overrides are computed
        once. What remains per tenant is one namespace lstat (~3 ms for 1,000 tenants).
        """
        slices = self.slices.available
        limits = self.limits.all()
        return tuple(
            Target(
                uid=rec.uid,
                name=rec.name,
                cgroup=slice_cgroup_path(self.slices.slice_of(rec.uid)) if slices else None,
                netns_inode=self.net.namespace_inode(self.netns_path(rec.netns_name)),
                host_ifname=rec.host_ifname,
                limits=limits[rec.uid],
            )
            for rec in self.store.all()
        )

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
            self.started
            and rec is not None
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
            async with self.operation(user.uid, name):
                view, _ = await self.ensure_held(
                    user, name, allow_existing=True, may_create=may_create
                )
                rec = view.record
                try:
                    fd = hand_out(view.namespace_path)
                except NetnsError as e:
                    raise NetworkSetupFailed(name, e.step, e.message, e.errno) from e
                except OSError as e:
                    raise NetworkSetupFailed(name, "open", e.strerror or str(e), e.errno) from e
        if rec is None or handout is None:  # the fast or the slow path set both: never true
            raise NoSuchTenant(name)
        placed = None
        try:
            view = self.view(rec, check_identity=False, inode=os.fstat(fd).st_ino)
            if caller_pid is not None and open_pidfd is not None:
                placed = await self.slices.place_caller(rec, scope, caller_pid, open_pidfd)
        except BaseException:
            self._handouts.discard(handout)
            os.close(fd)
            raise
        return view, fd, placed

    async def _ensure(self, name: str, *, allow_existing: bool) -> tuple[TenantView, bool]:
        user = self.resolve_user(name)
        async with self.operation(user.uid, name):
            return await self.ensure_held(user, name, allow_existing=allow_existing)

    async def ensure_held(
        self, user: users.User, name: str, *, allow_existing: bool, may_create: bool = True
    ) -> tuple[TenantView, bool]:
        """Create, finish or repair tenant ``user``; the caller holds its lock
        (nsd.core.creation)."""
        return await self.creation.ensure_held(
            user, name, allow_existing=allow_existing, may_create=may_create
        )

    async def apply_network_host(self) -> None:
        """Load the host table before any tenant veth is touched (fail closed)."""
        await self.networks.apply_host()

    async def get_network(self, name: str) -> NetworkStatus:
        return await self.networks.status(self.checked(name))

    async def set_bandwidth(
        self, name: str, egress: int | None, ingress: int | None, reset: Sequence[str]
    ) -> NetworkStatus:
        rec = self.checked(name)
        async with self.operation(rec.uid, name):
            rec = self.held_record(rec.uid, name)
            old_e, old_i = self.store.bandwidth_override(rec.uid)
            new_e = None if "egress" in reset else (egress if egress is not None else old_e)
            new_i = None if "ingress" in reset else (ingress if ingress is not None else old_i)
            self.store.set_bandwidth_override(rec.uid, new_e, new_i)
            await self.networks.apply_tenant(rec)
        return await self.get_network(name)

    # -- limits, slices, runs --------------------------------------------------

    def get_limits(self, name: str) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """(effective, overrides) of a tenant."""
        return self.limits.get(self.checked(name).uid)

    async def set_limits(
        self, name: str, changes: dict[str, str | None]
    ) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """Change overrides (None resets a field to the default), apply them live, persist."""
        rec = self.checked(name)
        async with self.operation(rec.uid, name):
            return await self.limits.change(self.held_record(rec.uid, name), changes)

    async def run(self, name: str, argv: Sequence[str], wait: bool) -> RunResult:
        rec = self.checked(name)
        # The home of the UID just checked, not of whoever NSS now calls ``name``.
        user = users.by_uid(rec.uid)
        if user is None or user.name != rec.name:
            raise TenantIdentityChanged(name, rec.uid, rec.name, "the user changed meanwhile")
        # Started under the lock: a Remove queued behind it then finds the unit's
        # processes (TenantBusy), and one ahead of it leaves nothing to start in.
        async with self.operation(rec.uid, name):
            rec = self.held_record(rec.uid, name)
            if rec.state is not TenantState.READY:  # finish an interrupted creation
                view, _ = await self.ensure_held(user, name, allow_existing=True, may_create=False)
                rec = view.record
            unit = await self.slices.start_run(
                rec, self.netns_path(rec.netns_name), user.home, argv, wait
            )
        if not wait:
            return RunResult(unit, None, None)
        return await self.slices.wait_run(unit)

    def held_record(self, uid: int, name: str, *, removing: bool = False) -> TenantRecord:
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

    def _existing(self, name: str) -> TenantRecord:
        reason = names.check_user_name(name)
        if reason is not None:
            raise InvalidTenantName(name, reason)
        return self.record(name)

    def checked(self, name: str) -> TenantRecord:
        """The record of ``name``, whose user is still the one recorded (name <-> UID).

        Every path that acts for a tenant or reports on it goes through here, as
        Enter and Create do: after a rename, a deletion or a UID reused by a new
        account, the record's old UID must not read or act on it (nor the new
        holder of the name), until an operator resolves it (Remove stays allowed).
        """
        rec = self._existing(name)
        problem = users.identity_problem(rec.uid, rec.name)
        if problem is not None:
            raise TenantIdentityChanged(name, rec.uid, rec.name, problem)
        return rec

    async def remove(self, name: str, force: bool) -> None:
        """Remove a tenant (nsd.core.removal): refused while it is busy, unless forced."""
        await self._removal.remove(name, force)

    async def teardown(self, rec: TenantRecord) -> NetworkSetupFailed | None:
        """Remove the tenant's slice, network and record (nsd.core.removal)."""
        return await self._removal.teardown(rec)

    async def checks(self, routes: Sequence[IPv4Network | IPv6Network]) -> tuple[Check, ...]:
        """``nsctl doctor``: host prerequisites, what of the configured limits is in
        effect here, and the network policy's own checks (nftables, forwarding)."""
        slices = self.slices
        bus = slices.systemd if slices.available else None
        configured = [set(limits.items()) for limits in self.limits.all().values()]
        out = doctor.run(self.cfg.netns.run_dir, self.ipam, list(routes))
        out += doctor.limit_checks(
            None if bus is not None else slices.unavailable_reason or "disabled by systemd.slices",
            bus.features.version if bus is not None else None,
            bus.features.pidfds if bus is not None else None,
            self.cfg.systemd.parent_slice,
            configured,
        )
        out += await self.networks.checks()
        return tuple(out)

    # -- watch -----------------------------------------------------------------

    async def watch(
        self, uid: int | None
    ) -> AsyncIterator[tuple[str, TenantView | None, Fault | None]]:
        """Events of all tenants, or of the tenant with ``uid`` (its identity, not its name):
        (kind, tenant, the fault for kind "fault")."""
        async with self._events.subscribe() as events:
            for rec in self.store.all():
                if uid is None or rec.uid == uid:
                    yield "existing", self.view(rec), None
            yield "synced", None, None
            async for event in events:
                if uid is None or event.view.record.uid == uid:
                    yield event.kind, event.view, event.fault

    def emit_fault(self, fault: Fault) -> None:
        """A Watch event for a recorded fault (nsd.core.faultrecord), if the tenant is
        still the one the fault was recorded for."""
        rec = self.store.get(fault.uid)
        if rec is None or rec.name != fault.tenant:
            return
        self.emit("fault", self.view(rec, check_identity=False), fault)

    def emit(self, kind: str, view: TenantView, fault: Fault | None = None) -> None:
        self._events.emit(kind, view, fault)

    def watch_backlog(self) -> int:
        """Events queued for the Watch stream furthest behind (the fault recorder
        paces a burst by it)."""
        return self._events.backlog()

    def faults(self, name: str | None, since_us: int, limit: int) -> Sequence[Fault]:
        """Recorded faults (GetFaults), newest last."""
        return self.store.faults(name, since_us, limit)

    # -- lifecycle -------------------------------------------------------------

    @property
    def _closing(self) -> bool:
        return self._locks.closed

    def operation(self, uid: int, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The tenant's lock, for one operation (nsd.core.tenant_locks)."""
        return self._locks.hold(uid, name, self.cfg.tenants.lock_timeout)

    def busy(self, uid: int) -> bool:
        """Whether an operation on tenant ``uid`` runs or waits (reconcile's batches
        leave such tenants for later rather than wait for them holding other locks)."""
        return self._locks.busy(uid)

    async def reconcile(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ReconcileReport:
        """Bring the host in line with the store (nsd.core.reconcile); report what changed."""
        async with self._reconciling:
            report = await self._reconciler.run(progress)
            self.started = True
            return report

    async def apply_config(self, cfg: Config) -> ReconcileReport:
        """Take a reloaded configuration; re-apply every tenant's limits and the policy."""
        async with self._reconciling:
            if self._closing:  # a reload that waited for the start-up reconcile
                return ReconcileReport()
            self.cfg = cfg
            self.slices.reconfigure(cfg)
            self.networks.reconfigure(cfg.network)
            return await self._reconciler.apply_config()

    async def shutdown(self, timeout: float) -> bool:
        """Refuse new work, wait for running operations; True if all finished."""
        self._events.close()
        return await self._locks.close(timeout)
