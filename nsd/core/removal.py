"""Removing a tenant: wait for the namespace descriptors Enter handed out, refuse (or
stop) the processes still inside or holding the namespace, then take down its slice,
network and record. Only what nsd made is removed (nsd.net.netns_mount).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nsd.errors import NetworkSetupFailed, TenantBusy
from nsd.model import TenantRecord, TenantState
from nsd.net import procs
from nsd.net.netns import FOREIGN, NetnsError
from nsd.observe.cgroupstats import slice_cgroup_path
from nsd.systemd import cgroup

if TYPE_CHECKING:
    from nsd.core.manager import TenantManager

log = logging.getLogger("nsd.manager")


class TenantRemoval:
    """Remove and teardown on behalf of the manager (its locks, store and adapters)."""

    def __init__(self, manager: TenantManager) -> None:
        self.m = manager

    async def remove(self, name: str, force: bool) -> None:
        uid = self.m._existing(name).uid
        async with self.m.operation(uid, name):
            # Again under the lock: a queued operation may have changed it (a
            # record left "removing" by a crash is finished here).
            rec = self.m.held_record(uid, name, removing=True)
            self.m._removing.add(rec.uid)
            try:
                await self._await_handouts(rec)
                await self._stop_processes(rec, force)
                self.m.store.set_state(rec.uid, TenantState.REMOVING)
                view = self.m.view(rec, check_identity=False)
                left = await self.teardown(rec)
            finally:
                self.m._removing.discard(rec.uid)
            self.m.emit("removed", view)
            if self.m.slices.available:
                await self.m.slices.sync_dropins([], prune_users={rec.name})
                await self.m.slices.stop_ensure_unit(rec.name)
                await self.m.limits.protect_parent()
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
        left = await self.m._handouts.wait_landed(rec.uid, self.m.cfg.tenants.stop_timeout)
        if left:
            log.warning("tenant %s: %d namespace descriptor(s) handed out by Enter not "
                        "yet received; not removing", rec.name, left)  # fmt: skip
            raise TenantBusy(rec.name, left)

    async def _stop_processes(self, rec: TenantRecord, force: bool) -> None:
        """Refuse (or with force, stop) while processes run in the tenant's namespace
        or hold a descriptor of it (they may join it at any time)."""
        inode = self.m.net.namespace_inode(self.m.netns_path(rec.netns_name))
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
            pids, term_timeout=self.m.cfg.tenants.stop_timeout, netns_inode=inode, holders=True
        )
        left = await asyncio.to_thread(_users_of, inode)
        if left:
            raise TenantBusy(rec.name, len(left))

    def _slice_path(self, uid: int) -> str:
        return slice_cgroup_path(self.m.slices.slice_of(uid))

    async def teardown(self, rec: TenantRecord) -> NetworkSetupFailed | None:
        """Remove the tenant's slice, network and record. Returns (does not raise)
        the error that names what someone else left at the namespace path: all of
        nsd's objects are gone then, so the record goes too and nothing is stuck;
        the caller finishes its own work and then reports it."""
        if self.m.slices.available:
            await self.m.slices.remove(rec.uid)
        left = None
        try:
            await self.m.net.remove(self.m.spec(rec))
        except NetnsError as e:
            if e.step != FOREIGN:
                raise NetworkSetupFailed(rec.name, e.step, e.message, e.errno) from e
            left = NetworkSetupFailed(rec.name, e.step, f"tenant removed, but {e.message}",
                                      e.errno)  # fmt: skip
            log.warning("tenant %s: %s", rec.name, left.message)
        self.m.store.delete(rec.uid, quarantine=True)
        log.info("tenant %s (uid %d): removed; addresses quarantined", rec.name, rec.uid)
        await self.m.networks.remove_tenant(rec)
        return left


def _users_of(inode: int) -> list[int]:
    """Processes in the namespace or holding a descriptor of it (they may join it)."""
    return procs.processes_in_namespace(inode, holders=True)
