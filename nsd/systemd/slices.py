"""Tenant slices, scopes and transient services: nsd's policy on top of the systemd adapter.

Every tenant has one slice, ``tenant-<uid>.slice`` inside the parent
(``systemd.parent_slice``, default ``tenant.slice``). Its limits are persistent
drop-ins written through ``SetUnitProperties(runtime=false)``, so they hold at
boot before nsd runs, apply at once without a daemon-reload, and an existing
slice is simply adopted on restart (see nsd/systemd.py).

With ``parent_slice = "user.slice"`` the tenant slice is logind's
``user-<uid>.slice``, where logins and ``user@.service`` already run: one budget
per tenant (docs/logins.md). Those names are shared with every user who logs
in, so nsd then never treats a slice it has no tenant for as its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from nsd import limits as limits_mod
from nsd import names
from nsd.config import Config
from nsd.errors import InvalidCommand, SystemdRequestFailed, SystemdUnavailable
from nsd.model import TenantRecord
from nsd.observe.procscan import parse_cgroup
from nsd.systemd import unitfiles
from nsd.systemd.units import (
    INFINITY,
    SERVICE,
    JobFailed,
    Property,
    Systemd,
    SystemdError,
    exec_start,
    limit_properties,
)
from nsd.systemd.units import SystemdUnavailable as BusUnavailable

log = logging.getLogger("nsd.slices")


def _request_failed(unit: str, error: SystemdError) -> SystemdRequestFailed:
    detail = error.message or str(error)
    if isinstance(error, JobFailed):
        detail = f"job for {error.unit} ended with result {error.result!r}"
    return SystemdRequestFailed(unit, detail, error.dbus_name or None)


@dataclass(frozen=True)
class RunResult:
    unit: str
    exit_status: int | None
    result: str | None


def caller_cgroup(pid: int, proc: str = "/proc") -> str | None:
    """The caller's cgroup path in systemd's hierarchy (v2 line, or v1 name=systemd)."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            return parse_cgroup(f.read())
    except OSError:
        return None


#: What the placement policy makes of an Enter caller (``placement``).
STAY = "stay"
MOVE = "move"
#: Inside a service: stays only if it is the service's main process (ask systemd).
MOVE_UNLESS_MAIN = "move_unless_main"


def placement(
    policy: str, requested: bool | None, cgroup: str | None, tenant_slice: str, tenant_uid: int
) -> str:
    """Whether Enter should move the caller into a scope in the tenant's slice.

    ``auto`` keeps the budget: every process that enters a tenant goes into the
    tenant's slice, except those already there and two that must stay home:

    * a unit's own main process (``ExecStart=nsd-exec ...``): moving it out of
      its unit would leave the unit empty, and systemd would consider it gone.
      Its unit belongs in the tenant's slice through the ``Slice=`` drop-in of a
      template marked ``X-NSD-Tenant=yes``; the audit reports it if it is not.
      Only systemd knows the main PID, so this returns MOVE_UNLESS_MAIN;
    * the tenant's own user manager (``user@UID.service``), which the audit
      counts as legitimate too.

    Everything else moves, in particular a service's *other* processes: a job
    of root's crontab (cron.service: Debian's cron jobs have no logind
    session), a program of a root supervisord, a oneshot script's child.
    Before, ``auto`` left those in the calling service, where the tenant's work
    escaped its memory, CPU and task limits and counted against the service.
    """
    if requested is not None:
        return MOVE if requested else STAY
    if policy != "auto":
        return MOVE if policy == "always" else STAY
    if cgroup is None:
        return MOVE
    parts = [p for p in cgroup.split("/") if p]
    if tenant_slice in parts or f"user@{tenant_uid}.service" in parts:
        return STAY
    units = [p for p in parts if p.endswith((".service", ".scope"))]
    if units and units[-1].endswith(".service"):
        return MOVE_UNLESS_MAIN
    return MOVE


class TenantSlices:
    """Slices for tenants; ``systemd`` None when the host has none (all methods then refuse)."""

    def __init__(self, cfg: Config, systemd: Systemd | None, unavailable_reason: str) -> None:
        self.cfg = cfg
        self.systemd = systemd
        self.unavailable_reason = unavailable_reason
        stem = cfg.systemd.parent_slice.removesuffix(".slice")
        self._own_slice = re.compile(rf"{re.escape(stem)}-(0|[1-9][0-9]*)\.slice")

    def reconfigure(self, cfg: Config) -> None:
        """Take a reloaded configuration (limits, enter_scope); the next ensure applies it."""
        self.cfg = cfg

    @property
    def shares_parent(self) -> bool:
        """Whether the tenant slices are logind's ``user-<uid>.slice`` (parent_slice =
        "user.slice", one budget per tenant, docs/logins.md): names nsd does not own
        alone - every user who logs in gets one, tenant or not."""
        return self.cfg.systemd.parent_slice == "user.slice"

    @property
    def available(self) -> bool:
        return self.systemd is not None and self.cfg.systemd.slices

    def slice_of(self, uid: int) -> str:
        return names.slice_name(self.cfg.systemd.parent_slice, uid)

    def _bus(self) -> Systemd:
        if self.systemd is None or not self.cfg.systemd.slices:
            reason = self.unavailable_reason or "disabled by systemd.slices = false"
            raise SystemdUnavailable(reason)
        return self.systemd

    def effective(self, overrides: dict[str, str]) -> limits_mod.Limits:
        return self.cfg.limits.overlay(limits_mod.Limits(**overrides))

    async def ensure(self, uid: int, limits: limits_mod.Limits) -> None:
        """Create or adopt the tenant's slice with ``limits``; persistent, no reload."""
        bus = self._bus()
        unit = self.slice_of(uid)
        props: list[Property] = [
            *limit_properties(**limits_mod.to_systemd(limits)),  # type: ignore[arg-type]
        ]
        try:
            await bus.ensure_slice(unit, props, timeout=self.cfg.systemd.call_timeout)
        except BusUnavailable as e:
            raise SystemdUnavailable(str(e)) from e
        except SystemdError as e:
            raise _request_failed(unit, e) from e

    async def protect_parent(self, all_limits: Iterable[limits_mod.Limits]) -> None:
        """MemoryMin/MemoryLow protect a slice only if its parent is protected too:
        give the parent the sum of its tenants' protections."""
        bus = self._bus()
        total = {"memory_min": 0, "memory_low": 0}
        for lim in all_limits:
            for field in total:
                value = getattr(lim, field)
                if value is not None and value != limits_mod.INFINITY:
                    total[field] += int(value)
        props = limit_properties(memory_min=total["memory_min"], memory_low=total["memory_low"])
        parent = self.cfg.systemd.parent_slice
        try:
            await bus.set_unit_properties(parent, props, runtime=False)
        except SystemdError as e:
            raise _request_failed(parent, e) from e

    async def remove(self, uid: int) -> None:
        """Stop the slice (whatever still runs in it) and drop its persistent settings."""
        bus = self._bus()
        unit = self.slice_of(uid)
        try:
            await bus.stop_unit(unit, timeout=self.cfg.systemd.call_timeout)
            await bus.revert_unit_files([unit])
        except SystemdError as e:
            raise _request_failed(unit, e) from e

    async def stray_slices(self, known_uids: set[int]) -> list[tuple[int, str]]:
        """(UID, slice) of tenant slices systemd knows whose tenant nsd does not (e.g.
        after a crash).

        Only UIDs in the tenant range count: ``user-0.slice`` (root's logins) or a
        system account's slice is never a tenant's. Under a shared parent
        (user.slice) there are none at all: any user's slice there may carry an
        administrator's ``systemctl set-property`` drop-ins, which look exactly like
        nsd's, and nsd must never touch a non-tenant's slice.
        """
        if self.shares_parent:
            return []
        bus = self._bus()
        stem = self.cfg.systemd.parent_slice.removesuffix(".slice")
        try:
            units = await bus.list_units_by_patterns([], [f"{stem}-*.slice"])
        except SystemdError as e:
            raise _request_failed(f"{stem}-*.slice", e) from e
        t = self.cfg.tenants
        out = []
        for u in units:
            m = self._own_slice.fullmatch(u.name)
            if m is None:
                continue
            uid = int(m[1])
            if uid not in known_uids and t.uid_min <= uid <= t.uid_max:
                out.append((uid, u.name))
        return out

    async def forget(self, unit: str) -> None:
        """Drop a stray slice's persistent settings; never stop it.

        A slice nsd has no tenant for may still be in use: on a fresh host,
        services enabled for a tenant nsd does not know yet start their slice
        before nsd runs, and stopping it would cancel their start jobs.
        """
        bus = self._bus()
        try:
            await bus.revert_unit_files([unit])
        except SystemdError as e:
            raise _request_failed(unit, e) from e

    async def has_settings(self, unit: str) -> bool:
        """Whether the slice has persistent settings (nsd's control drop-ins) to drop;
        keeps a second reconcile from reporting the same stray slice again."""
        bus = self._bus()
        try:
            props = await bus.get_unit_properties(unit)
        except SystemdError as e:
            raise _request_failed(unit, e) from e
        return any("/system.control/" in str(p) for p in props.get("DropInPaths", []))

    async def sync_dropins(
        self, tenants: Iterable[TenantRecord], prune_users: set[str] | None
    ) -> unitfiles.Changes:
        """Write the template drop-ins (Slice=) for ``tenants``; reload systemd if needed.

        ``prune_users``: only these users' drop-ins may be removed (one tenant at a
        time); None makes the drop-ins exactly those of ``tenants`` (reconcile).
        """
        bus = self._bus()
        parent = self.cfg.systemd.parent_slice
        refs = [unitfiles.TenantRef.of(r.name, r.uid, parent) for r in tenants]
        changes = await asyncio.to_thread(unitfiles.sync, refs, prune_users=prune_users)
        for problem in changes.problems:
            log.warning("template drop-in for %s: %s", problem.unit, problem.reason)
        for skipped in changes.skipped:
            log.warning("no template drop-ins for %s: %s", skipped.user, skipped.reason)
        try:
            # A unit systemd has not loaded reads its drop-ins when it is first
            # loaded; only loaded ones (say a start job queued behind
            # nsd-tenant@USER) need a daemon-reload, which is costly for PID 1 on
            # a busy host - so reload only then, once per change set.
            for unit in (*changes.written, *changes.removed):
                if await bus.is_loaded(unit):
                    await bus.reload()
                    break
        except SystemdError as e:
            raise _request_failed("daemon-reload", e) from e
        return changes

    async def stop_ensure_unit(self, user: str) -> None:
        """Stop nsd-tenant@USER.service after removal, so that a later start of the
        user's services runs `nsctl ensure` again instead of finding it active."""
        bus = self._bus()
        unit = unitfiles.unit_name("nsd-tenant@.service", user)
        try:
            await bus.stop_unit(unit, timeout=self.cfg.systemd.call_timeout)
        except SystemdError as e:
            log.debug("stopping %s: %s", unit, e)

    async def place_caller(
        self, rec: TenantRecord, scope: bool | None, pid: int, open_pidfd: Callable[[], int]
    ) -> str | None:
        """Enter's placement: move the caller into a scope in the tenant's slice if the
        policy (systemd.enter_scope, or the call's ``scope``) says so; the scope's name."""
        tenant_slice = self.slice_of(rec.uid)
        policy = self.cfg.systemd.enter_scope
        if not self.available and scope is None:
            return None  # auto or always, on a host without systemd: nothing to place into
        # The caller's cgroup matters only to the "auto" policy's own choice.
        cgroup = caller_cgroup(pid) if scope is None and policy == "auto" else None
        decision = placement(policy, scope, cgroup, tenant_slice, rec.uid)
        if decision == MOVE_UNLESS_MAIN and await self.is_main_process(pid):
            log.info("tenant %s: pid %d stays in its unit (its main process)", rec.name, pid)
            return None
        if decision == STAY:
            return None
        unit = await self.place(rec, pid, open_pidfd)
        log.info("tenant %s: pid %d placed into %s", rec.name, pid, unit)
        return unit

    async def is_main_process(self, pid: int) -> bool:
        """Whether ``pid`` is the main process of the service systemd says it is in.

        A failed question counts as "no": the caller is then moved into the
        tenant's slice, which keeps the budget (and if systemd is unreachable the
        placement itself reports that).
        """
        bus = self._bus()
        try:
            unit = await bus.unit_for_pid(pid)
            if unit is None or not unit.endswith(".service"):
                return False
            main = await bus.get_unit_property(unit, SERVICE, "MainPID")
        except SystemdError as e:
            log.debug("main process of pid %d: %s", pid, e)
            return False
        return int(main) == pid

    async def place(self, rec: TenantRecord, pid: int, open_pidfd: Callable[[], int]) -> str:
        """Move process ``pid`` into a new scope in the tenant's slice; return its name."""
        bus = self._bus()
        scope = f"nsd-enter-{rec.uid}-{pid}-{secrets.token_hex(4)}.scope"
        props: list[Property] = [
            ("Description", "s", f"{rec.name} entered by pid {pid} (nsd)"),
            ("Slice", "s", self.slice_of(rec.uid)),
            # Failed scopes (an OOM kill, say) are garbage-collected, not kept.
            ("CollectMode", "s", "inactive-or-failed"),
        ]
        pidfd = open_pidfd()
        try:
            await bus.start_scope_for_process(
                scope, pid, pidfd, props, timeout=self.cfg.systemd.call_timeout
            )
        except BusUnavailable as e:
            raise SystemdUnavailable(str(e)) from e
        except SystemdError as e:
            # Nothing to roll back that could hurt the caller: a scope the process
            # never reached, or one it leaves when it exits with our error, is
            # collected (CollectMode); it is never stopped, which would kill it.
            raise _request_failed(scope, e) from e
        finally:
            os.close(pidfd)
        return scope

    async def start_run(
        self,
        rec: TenantRecord,
        netns_path: str,
        home: str,
        argv: Sequence[str],
        wait: bool,
    ) -> str:
        """Start a transient service as the tenant, in its namespace and slice; its
        name. With ``wait`` the unit stays loaded until ``wait_run`` read how it
        ended. Split from the wait so the manager starts it under the tenant's lock
        (a Remove then sees its processes) and waits without holding it."""
        bus = self._bus()
        unit = f"nsd-run-{rec.uid}-{secrets.token_hex(4)}.service"
        try:
            command = exec_start(argv)
        except ValueError as e:
            raise InvalidCommand(str(e)) from e
        props: list[Property] = [
            ("Description", "s", f"{argv[0]} for {rec.name} (nsctl run)"),
            command,
            ("Type", "s", "exec"),
            # The UID, never the name: NSS could map the recorded name to another
            # account by now (rename, reuse); the caller checked this UID's identity.
            ("User", "s", str(rec.uid)),
            ("NetworkNamespacePath", "s", netns_path),
            ("Slice", "s", self.slice_of(rec.uid)),
            ("WorkingDirectory", "s", home),
            ("CollectMode", "s", "inactive-or-failed"),
        ]
        if wait:
            # Keep the unit loaded after it ends until we have read its exit status.
            props.append(("AddRef", "b", True))
        with _request_errors(unit):
            try:
                await bus.start_transient_unit(unit, props, timeout=self.cfg.systemd.call_timeout)
            except JobFailed:
                # A command that ends at once (even exec failing) can fail its start
                # job before systemd reports the job done; with AddRef the unit is
                # still there and says how it ended, which is the answer wanted.
                if not wait:
                    raise
        return unit

    async def wait_run(self, unit: str) -> RunResult:
        """How a unit ``start_run`` started with ``wait`` ended."""
        bus = self._bus()
        with _request_errors(unit):
            try:
                end = await bus.wait_unit_exit(unit)
            finally:
                await bus.unref_unit(unit)
        return RunResult(unit, end.exit_status, end.result)


@contextlib.contextmanager
def _request_errors(unit: str) -> Iterator[None]:
    """systemd's failures as nsd's errors."""
    try:
        yield
    except BusUnavailable as e:
        raise SystemdUnavailable(str(e)) from e
    except SystemdError as e:
        raise _request_failed(unit, e) from e


__all__ = [
    "INFINITY",
    "RunResult",
    "TenantSlices",
    "caller_cgroup",
    "placement",
]
