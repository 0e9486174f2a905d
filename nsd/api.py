"""Varlink method handlers: parameters -> manager -> reply.

Handlers convert types, authorize by the peer's kernel credentials and
delegate; they hold no logic of their own (firewalld's lesson). Identity fields
inside requests are never trusted: who the caller is comes from SO_PEERCRED and
SO_PEERGROUPS only. Every mutating call is logged with the caller's uid and pid,
the method, the tenant and the result: the audit trail in the journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, cast

from . import __version__, doctor, faultapi, netpolicy
from . import limits as limits_mod
from .errors import NsdError, PermissionDenied
from .manager import TenantManager
from .model import TenantView
from .sampler import Snapshot, UsageUnavailable, audit_reply, escaped_by_tenant, usage_reply
from .varlink.server import Call, Handler, Peer, Reply, VarlinkError

if TYPE_CHECKING:
    from .metrics import MetricsService

audit = logging.getLogger("nsd.audit")

TENANT_INTERFACE = "io.nsd.Tenant"
DAEMON_INTERFACE = "io.nsd.Daemon"


def idl(interface: str) -> str:
    return resources.files("nsd.varlink").joinpath(f"{interface}.varlink").read_text("utf-8")


@functools.lru_cache(maxsize=64)
def _text(address: IPv4Address | IPv6Address) -> str:
    # The gateways are the same for every tenant; formatting an IPv6 address costs.
    return str(address)


def tenant_json(view: TenantView) -> dict[str, Any]:
    rec = view.record
    ipv4, ipv6, prefix = rec.address_texts
    return {
        "name": rec.name,
        "uid": rec.uid,
        "state": rec.state.value,
        "namespacePath": view.namespace_path,
        "namespaceInode": view.namespace_inode,
        "hostInterface": rec.host_ifname,
        "tenantInterface": view.tenant_interface,
        "ipv4Address": ipv4,
        "ipv4Gateway": _text(view.ipv4_gateway),
        "ipv6Address": ipv6,
        "ipv6Prefix": prefix,
        "ipv6Gateway": _text(view.ipv6_gateway),
        "adopted": rec.adopted,
        "createdUSec": rec.created_us,
        "slice": view.slice,
        "problems": list(view.problems),
    }


def _varlink_error(interface: str, e: NsdError) -> VarlinkError:
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
    ) -> None:
        self.manager = manager
        self.admin_gid = admin_gid
        self._routes = routes
        self._degraded = degraded
        self._metrics = metrics

    # -- authorization -----------------------------------------------------------

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        gid = self.admin_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    def _require_admin(self, call: Call) -> None:
        if not self.is_admin(call.peer):
            raise PermissionDenied(f"{call.method} needs root or the admin group")

    def _require_self_or_admin(self, call: Call, name: str) -> None:
        if self.is_admin(call.peer):
            return
        # Compare UIDs, not names: the caller's name could be spoofed by NSS
        # tricks, its UID cannot. Unknown names get the same answer as other
        # tenants' names, so a caller cannot probe which tenants exist.
        rec = self.manager.store.get(call.peer.uid)
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
                "Watch": self.watch,
                # Plain call or, with "more", a stream: the handler returns either.
                "GetUsage": cast(Handler, self.get_usage),
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
                if mutating or isinstance(e, PermissionDenied):
                    self._audit(call, e.name)
                raise _varlink_error(interface, e) from None
            if mutating:
                self._audit(call, "ok")
            return result

        return handler

    def _audit(self, call: Call, result: str) -> None:
        # The tenant name comes from the caller: repr() quotes and escapes it, so
        # a name with a newline cannot forge a second audit line in the journal.
        name = call.parameters.get("name")
        audit.info(
            "uid=%d pid=%d method=%s.%s tenant=%s result=%s",
            call.peer.uid,
            call.peer.pid,
            call.interface,
            call.method,
            "-" if name is None else repr(name),
            result,
        )

    # -- io.nsd.Tenant -----------------------------------------------------------

    async def create(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        view = await self.manager.create(call.parameters["name"])
        return {"tenant": tenant_json(view)}

    async def ensure(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        view, created = await self.manager.ensure(call.parameters["name"])
        return {"tenant": tenant_json(view), "created": created}

    async def remove(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        await self.manager.remove(call.parameters["name"], bool(call.parameters.get("force")))
        return {}

    async def get(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        return {"tenant": tenant_json(self.manager.get(name))}

    async def list(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        return {"tenants": [tenant_json(v) for v in await self.manager.list()]}

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
            limits = [
                {"name": name, "soft": lim.soft, "hard": lim.hard}
                for name, lim in sorted(self.manager.cfg.exec.rlimits.items())
            ]
            params = {
                "tenant": tenant_json(view),
                "namespaceFileDescriptor": 0,
                "umask": self.manager.cfg.exec.umask,
                "resourceLimits": limits,
                "scope": scope,
            }
        except BaseException:
            os.close(fd)
            release()
            raise
        return Reply(params, fds=(fd,), released=release)

    async def get_limits(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        effective, overrides = self.manager.get_limits(name)
        return {"limits": limits_mod.to_api(effective), "overrides": limits_mod.to_api(overrides)}

    async def set_limits(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        changes: dict[str, str | None] = {}
        for api_name, value in call.parameters["limits"].items():
            if value is not None:
                changes[limits_mod.API_NAMES[api_name]] = value
        for api_name in call.parameters.get("reset") or []:
            field = limits_mod.API_NAMES.get(api_name)
            if field is None:
                raise limits_mod.InvalidLimit(api_name, "", "unknown limit")
            changes[field] = None
        effective, overrides = await self.manager.set_limits(call.parameters["name"], changes)
        return {"limits": limits_mod.to_api(effective), "overrides": limits_mod.to_api(overrides)}

    async def get_network(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        return {"network": await self.manager.get_network(name)}

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
                raise limits_mod.InvalidLimit(field, str(value), e.reason) from e

        reset = p.get("reset") or []
        for r in reset:
            if r not in ("egress", "ingress"):
                raise limits_mod.InvalidLimit("reset", r, 'must be "egress" or "ingress"')
        network = await self.manager.set_bandwidth(
            p["name"], rate("egressRate"), rate("ingressRate"), reset
        )
        return {"network": network}

    async def run(self, call: Call) -> dict[str, Any]:
        name = call.parameters["name"]
        self._require_self_or_admin(call, name)
        result = await self.manager.run(
            name, call.parameters["command"], bool(call.parameters.get("wait"))
        )
        return {"unit": result.unit, "exitStatus": result.exit_status, "result": result.result}

    async def watch(self, call: Call) -> AsyncIterator[Reply]:
        name = call.parameters.get("name")
        try:
            if name is None:
                self._require_admin(call)
                uid = None
            else:
                self._require_self_or_admin(call, name)
                uid = self.manager.tenant_uid(name)
            # continues=True on every item: a live stream must send each event
            # at once instead of holding it back to learn whether it is the last.
            async for kind, view, fault in self.manager.watch(uid):
                params = {"event": kind, "tenant": None if view is None else tenant_json(view)}
                if fault is not None:
                    params["fault"] = faultapi.fault_json(fault)
                yield Reply(params, continues=True)
        except NsdError as e:
            if isinstance(e, PermissionDenied):
                self._audit(call, e.name)
            raise _varlink_error(TENANT_INTERFACE, e) from None

    # -- usage and audit: the metrics sampler's last snapshot ----------------------

    def _usage_uid(self, call: Call) -> int | None:
        """None (every tenant: admins only) or the UID of the one tenant asked about."""
        name = call.parameters.get("name")
        if name is None:
            self._require_admin(call)
            return None
        self._require_self_or_admin(call, name)
        return self.manager.tenant_uid(name)

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

    def get_usage(self, call: Call) -> Any:
        return self._usage_stream(call) if call.more else self._usage_once(call)

    async def _usage_once(self, call: Call) -> dict[str, Any]:
        try:
            return usage_reply(await self._snapshot(), self._usage_uid(call))
        except NsdError as e:
            if isinstance(e, PermissionDenied):
                self._audit(call, e.name)
            raise _varlink_error(TENANT_INTERFACE, e) from None

    async def _usage_stream(self, call: Call) -> AsyncIterator[Reply]:
        try:
            uid = self._usage_uid(call)
            snap = await self._snapshot()
            while True:
                yield Reply(usage_reply(snap, uid), continues=True)
                snap = await self._snapshot(snap.generation)
        except NsdError as e:
            if isinstance(e, PermissionDenied):
                self._audit(call, e.name)
            raise _varlink_error(TENANT_INTERFACE, e) from None

    async def audit_processes(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        uid = None
        name = call.parameters.get("name")
        if name is not None:
            uid = self.manager.tenant_uid(name)
        snap = await self._snapshot()
        return audit_reply(snap, uid, bool(call.parameters.get("helpers")))

    async def get_faults(self, call: Call) -> dict[str, Any]:
        name = call.parameters.get("name")
        if name is None:
            self._require_admin(call)
        else:
            self._require_self_or_admin(call, name)
        since, limit = faultapi.query(call.parameters)
        faults = self.manager.store.faults(name, since, limit)
        return {"faults": [faultapi.fault_json(f) for f in faults]}

    # -- io.nsd.Daemon -----------------------------------------------------------

    async def doctor(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        checks = doctor.run(self.manager.cfg.netns.run_dir, self.manager.ipam, await self._routes())
        snap = self._metrics.sampler.snapshot if self._metrics is not None else None
        checks.append(doctor.escape_check(escaped_by_tenant(snap) if snap is not None else None))
        return {
            "checks": [
                {"name": c.name, "severity": c.severity, "message": c.message} for c in checks
            ]
        }

    async def reconcile(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        started = time.perf_counter()
        report = await self.manager.reconcile()
        if self._metrics is not None:
            self._metrics.daemon.on_reconcile(
                time.perf_counter() - started, report.actions, len(report.problems)
            )
        return {
            "actions": [
                {"kind": a.kind, "tenant": a.tenant, "detail": a.detail} for a in report.actions
            ],
            "problems": report.problems,
        }

    async def status(self, call: Call) -> dict[str, Any]:
        self._require_admin(call)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "tenants": self.manager.tenant_count(),
            "degraded": self._degraded,
        }
