"""Varlink method handlers: parameters -> manager -> reply.

Handlers convert types, authorize by the peer's kernel credentials and
delegate; they hold no logic of their own (firewalld's lesson). Identity fields
inside requests are never trusted: who the caller is comes from SO_PEERCRED and
SO_PEERGROUPS only. Every mutating call is logged with the caller's uid and pid,
the method, the tenant and the result: the audit trail in the journal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from nsd import __version__
from nsd.api import faults as faultapi
from nsd.api import views
from nsd.api.auditlog import AuditLog
from nsd.core import doctor
from nsd.core.manager import TenantManager
from nsd.errors import InvalidLimit, NsdError, PermissionDenied, UsageUnavailable
from nsd.net import policy as netpolicy
from nsd.observe.sampler import Snapshot, escaped_by_tenant
from nsd.varlink.server import Call, Handler, Peer, PeerClass, Reply, VarlinkError

if TYPE_CHECKING:
    from nsd.observe.metrics import MetricsService

audit = logging.getLogger("nsd.audit")

TENANT_INTERFACE = "io.nsd.Tenant"
DAEMON_INTERFACE = "io.nsd.Daemon"


def idl(interface: str) -> str:
    return resources.files("nsd.varlink").joinpath(f"{interface}.varlink").read_text("utf-8")


def varlink_error(interface: str, e: NsdError) -> VarlinkError:
    """The one mapping from the core's errors (nsd.errors) to what goes on the wire."""
    if isinstance(e, PermissionDenied):
        return VarlinkError("org.varlink.service.PermissionDenied", {})
    params = {k: v for k, v in e.parameters.items() if v is not None}
    return VarlinkError(f"{interface}.{e.name}", params)


class Api:
    def __init__(
        self,
        manager: TenantManager,
        admin_gid: int | None,
        routes: Callable[[], Awaitable[list[Any]]],
        degraded: list[str],
        metrics: MetricsService | None = None,
        *,
        audit_log: AuditLog | None = None,
    ) -> None:
        self.manager = manager
        self.admin_gid = admin_gid
        self._routes = routes
        self._degraded = degraded
        self._metrics = metrics
        self._audit_log = audit_log or AuditLog(audit, burst=10, rate=1.0)

    # -- authorization -----------------------------------------------------------

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        gid = self.admin_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    def peer_class(self, peer: Peer) -> PeerClass:
        """The varlink server's admission class of a peer (see nsd.varlink.policy)."""
        if self.is_admin(peer):
            return PeerClass.PRIVILEGED
        if self.manager.store.get(peer.uid) is not None:
            return PeerClass.TENANT
        return PeerClass.OTHER

    def _require_admin(self, call: Call) -> None:
        if not self.is_admin(call.peer):
            raise PermissionDenied(f"{call.method} needs root or the admin group")

    def _require_self_or_admin(self, call: Call, name: str) -> None:
        if self.is_admin(call.peer):
            return
        # Compare UIDs, not names: the caller's name could be spoofed by NSS
        # tricks, its UID cannot. Unknown names get the same answer as other
        # tenants' names, so a caller cannot probe which tenants exist.
        rec = self.manager.record_of_uid(call.peer.uid)
        if rec is None or rec.name != name:
            raise PermissionDenied(f"uid {call.peer.uid} may only ask about itself")

    # -- plumbing ----------------------------------------------------------------

    def handlers(self) -> dict[str, Mapping[str, Handler]]:
        return {
            TENANT_INTERFACE: {
                "Create": self._wrap(TENANT_INTERFACE, self.create, mutating=True),
                "Ensure": self._wrap(TENANT_INTERFACE, self.ensure, mutating=True),
                "Remove": self._wrap(TENANT_INTERFACE, self.remove, mutating=True),
                "Get": self._wrap(TENANT_INTERFACE, self.get),
                "List": self._wrap(TENANT_INTERFACE, self.list),
                "Enter": self._wrap(TENANT_INTERFACE, self.enter, mutating=True),
                "GetLimits": self._wrap(TENANT_INTERFACE, self.get_limits),
                "SetLimits": self._wrap(TENANT_INTERFACE, self.set_limits, mutating=True),
                "Run": self._wrap(TENANT_INTERFACE, self.run, mutating=True),
                "GetNetwork": self._wrap(TENANT_INTERFACE, self.get_network),
                "SetBandwidth": self._wrap(TENANT_INTERFACE, self.set_bandwidth, mutating=True),
                "Watch": self._wrap_stream(TENANT_INTERFACE, self.watch),
                # Plain call or, with "more", a stream.
                "GetUsage": self._by_more(
                    self._wrap(TENANT_INTERFACE, self._usage_once),
                    self._wrap_stream(TENANT_INTERFACE, self._usage_stream),
                ),
                "Audit": self._wrap(TENANT_INTERFACE, self.audit_processes),
                "GetFaults": self._wrap(TENANT_INTERFACE, self.get_faults),
            },
            DAEMON_INTERFACE: {
                "Doctor": self._wrap(DAEMON_INTERFACE, self.doctor),
                "Reconcile": self._wrap(DAEMON_INTERFACE, self.reconcile, mutating=True),
                "Status": self._wrap(DAEMON_INTERFACE, self.status),
            },
        }

    def _wrap(
        self,
        interface: str,
        fn: Callable[[Call], Awaitable[Reply | dict[str, Any]]],
        *,
        mutating: bool = False,
    ) -> Handler:
        async def handler(call: Call) -> Reply | dict[str, Any]:
            try:
                result = await fn(call)
            except NsdError as e:
                raise self._refused(call, interface, e, mutating=mutating) from None
            if mutating:
                self._audit(call, "ok")
            return result

        return handler

    def _wrap_stream(
        self, interface: str, fn: Callable[[Call], AsyncIterator[Reply]]
    ) -> Callable[[Call], AsyncIterator[Reply]]:
        """_wrap for a streaming ("more") method: the same error mapping and audit."""

        async def handler(call: Call) -> AsyncIterator[Reply]:
            try:
                async for reply in fn(call):
                    yield reply
            except NsdError as e:
                raise self._refused(call, interface, e, mutating=False) from None

        return handler

    @staticmethod
    def _by_more(once: Handler, stream: Handler) -> Handler:
        def handler(call: Call) -> Any:
            return stream(call) if call.more else once(call)

        return cast(Handler, handler)

    def _refused(self, call: Call, interface: str, e: NsdError, *, mutating: bool) -> VarlinkError:
        """An error for the wire; refused mutations and permission denials are audited."""
        if mutating or isinstance(e, PermissionDenied):
            self._audit(call, e.name)
        return varlink_error(interface, e)

    def _audit(self, call: Call, result: str) -> None:
        # The tenant name comes from the caller: AuditLog bounds and escapes it,
        # so a name with a newline cannot forge a second audit line in the
        # journal, and rate-limits refusals so a loop cannot flood it.
        self._audit_log.record(
            call.peer.uid,
            call.peer.pid,
            f"{call.interface}.{call.method}",
            call.parameters.get("name"),
            result,
            refused=result != "ok",
        )

    # -- io.nsd.Tenant -----------------------------------------------------------

    async def create(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        view = await self.manager.create(call.parameters["name"])
        return {"tenant": views.tenant(view)}

    async def ensure(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        view, created = await self.manager.ensure(call.parameters["name"])
        return {"tenant": views.tenant(view), "created": created}

    async def remove(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        await self.manager.remove(call.parameters["name"], bool(call.parameters.get("force")))
        return {}

    async def get(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        # An operator sees a tenant whose user changed identity, with the change in
        # its problems (to resolve it); the tenant's own UID is refused.
        view = self.manager.get(name, strict=not self.is_admin(call.peer))
        return {"tenant": views.tenant(view)}

    async def list(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        return {"tenants": [views.tenant(v) for v in await self.manager.list()]}

    async def enter(self, call: Call) -> Reply:
        self._require_admin(call)
        peer_pid = call.peer.pid

        def open_pidfd() -> int:
            # SO_PEERPIDFD (Linux >= 6.5) pins the very process that connected;
            # otherwise a pidfd from SO_PEERCRED's pid, which the systemd adapter
            # checks before and after placement.
            fd = call.open_peer_pidfd()
            return fd if fd is not None else os.pidfd_open(peer_pid)

        # The descriptor is on its way from here until the caller read the reply:
        # first in nsd's hands (this call, then the server until it queued the
        # reply), then in the connection's output (Call.unread_output).
        queued = False

        def unread() -> int | None:
            return call.unread_output() if queued else 1

        def release() -> None:
            nonlocal queued
            queued = True

        view, fd, scope = await self.manager.enter(
            call.parameters["name"],
            call.parameters.get("create"),
            call.parameters.get("scope"),
            peer_pid,
            open_pidfd,
            unread=unread,
        )
        try:
            exec_cfg = self.manager.cfg.exec
            params = views.enter_reply(view, exec_cfg.umask, exec_cfg.rlimits, scope)
        except BaseException:
            os.close(fd)
            release()
            raise
        return Reply(params, fds=(fd,), released=release)

    async def get_limits(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        return views.limits_reply(*self.manager.get_limits(name))

    async def set_limits(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        changes: dict[str, str | None] = {}
        for api_name, value in call.parameters["limits"].items():
            if value is not None:
                changes[views.LIMIT_FIELDS[api_name]] = value
        for api_name in call.parameters.get("reset") or []:
            field = views.LIMIT_FIELDS.get(api_name)
            if field is None:
                raise InvalidLimit(api_name, "", "unknown limit")
            changes[field] = None
        try:
            effective, overrides = await self.manager.set_limits(call.parameters["name"], changes)
        except InvalidLimit as e:
            # The core names Python fields; the IDL promises the names of Limits.
            p = e.parameters
            raise InvalidLimit(views.limit_name(p["field"]), p["value"], p["reason"]) from None
        return views.limits_reply(effective, overrides)

    async def get_network(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        return {"network": views.network(await self.manager.get_network(name))}

    async def set_bandwidth(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        p = call.parameters

        def rate(field: str) -> int | None:
            value = p.get(field)
            if value is None:
                return None
            try:
                return netpolicy.parse_rate(value, field) or 0  # 0: explicitly unlimited
            except netpolicy.NetworkConfigError as e:
                raise InvalidLimit(field, str(value), e.reason) from e

        reset = p.get("reset") or []
        for r in reset:
            if r not in ("egress", "ingress"):
                raise InvalidLimit("reset", r, 'must be "egress" or "ingress"')
        network = await self.manager.set_bandwidth(
            p["name"], rate("egressRate"), rate("ingressRate"), reset
        )
        return {"network": views.network(network)}

    async def run(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        result = await self.manager.run(
            name, call.parameters["command"], bool(call.parameters.get("wait"))
        )
        return views.run_reply(result)

    async def watch(self, call: Call) -> AsyncIterator[Reply]:
        uid = self._asked_uid(call)
        # continues=True on every item: a live stream must send each event
        # at once instead of holding it back to learn whether it is the last.
        async for kind, view, fault in self.manager.watch(uid):
            params = {"event": kind, "tenant": None if view is None else views.tenant(view)}
            if fault is not None:
                params["fault"] = faultapi.fault_json(fault)
            yield Reply(params, continues=True)

    # -- usage and audit: the metrics sampler's last snapshot ----------------------

    def _asked_uid(self, call: Call) -> int | None:
        """None (every tenant: admins only) or the UID of the one tenant asked about."""
        name = call.parameters.get("name")
        if name is None:
            self._require_admin(call)
            return None
        self._require_self_or_admin(call, name)
        return self.manager.checked(name).uid

    async def _snapshot(self, after: int = 0) -> Snapshot:
        if self._metrics is None:
            raise UsageUnavailable("metrics sampling is not running")
        sampler = self._metrics.sampler
        if sampler.snapshot is not None and sampler.snapshot.generation > after:
            return sampler.snapshot
        if after == 0:
            # Only right after start: wait for the first sample, but not forever.
            try:
                return await asyncio.wait_for(sampler.next_snapshot(0), 30)
            except TimeoutError:
                raise UsageUnavailable("no sample yet") from None
        return await sampler.next_snapshot(after)

    async def _usage_once(self, call: Call) -> dict[str, Any]:
        uid = self._asked_uid(call)
        return views.usage_reply(await self._snapshot(), uid)

    async def _usage_stream(self, call: Call) -> AsyncIterator[Reply]:
        uid = self._asked_uid(call)
        snap = await self._snapshot()
        while True:
            yield Reply(views.usage_reply(snap, uid), continues=True)
            snap = await self._snapshot(snap.generation)

    async def audit_processes(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        uid = None
        name = call.parameters.get("name")
        if name is not None:
            uid = self.manager.checked(name).uid
        snap = await self._snapshot()
        return views.audit_reply(snap, uid, bool(call.parameters.get("helpers")))

    async def get_faults(self, call: Call) -> dict[str, Any]:
        name = call.parameters.get("name")
        if name is None:
            self._require_admin(call)
        else:
            self._require_self_or_admin(call, name)
        since, limit = faultapi.query(call.parameters)
        faults = self.manager.faults(name, since, limit)
        return {"faults": [faultapi.fault_json(f) for f in faults]}

    # -- io.nsd.Daemon -----------------------------------------------------------

    async def doctor(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        checks = await self.manager.checks(await self._routes())
        snap = self._metrics.sampler.snapshot if self._metrics is not None else None
        escaped = doctor.escape_check(escaped_by_tenant(snap) if snap is not None else None)
        return views.checks_reply((*checks, escaped))

    async def reconcile(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        started = time.perf_counter()
        report = await self.manager.reconcile()
        if self._metrics is not None:
            self._metrics.daemon.on_reconcile(
                time.perf_counter() - started, report.actions, len(report.problems)
            )
        return views.reconcile_reply(report)

    async def status(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "tenants": self.manager.tenant_count(),
            "degraded": self._degraded,
        }
