"""The network namespace adapter: namespace files, veth pairs, addresses, routes, sysctls.

This is the asyncio facade. All netlink and namespace work runs on ONE dedicated worker
thread (nsd/netns_worker.py says why), reached through ``loop.run_in_executor``. The
worker builds the namespace files by iproute2's protocol (nsd/netns_mount.py) and the
tenant's links, addresses and routes (nsd/netns_links.py) through nsd/rtnl.py (plain
blocking netlink sockets; that module says why not pyroute2's synchronous ``IPRoute``,
which is kept for the one request it builds for us, the creation of a veth pair).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from nsd.names import valid_ifname
from nsd.net.netns_mount import NamespaceFiles
from nsd.net.netns_spec import (
    FOREIGN,
    EnsureResult,
    NetnsError,
    NetworkRef,
    NetworkSpec,
    validate_sysctl,
)
from nsd.net.netns_worker import Worker
from nsd.net.sysctl_files import SysctlFiles

__all__ = [
    "FOREIGN",
    "EnsureResult",
    "NetnsAdapter",
    "NetnsError",
    "NetworkRef",
    "NetworkSpec",
    "valid_ifname",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

NAME_MAX = 255


def _settle(waiter: asyncio.Future[EnsureResult], outcome: EnsureResult | BaseException) -> None:
    if waiter.done():  # its caller gave up
        return
    if isinstance(outcome, BaseException):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


def _log_failed_job(job: asyncio.Future[None]) -> None:
    # Its callers got the exception; this is for the record, and to retrieve it.
    if not job.cancelled() and (e := job.exception()) is not None:
        log.error("netns worker: an ensure job failed", exc_info=e)


class NetnsAdapter:
    """Async facade; every method that touches netlink or namespaces hops to the worker."""

    def __init__(
        self,
        run_dir: str = "/run/netns",
        link_prefix: str = "nsd",
        host_netns_path: str | None = None,
    ) -> None:
        if not link_prefix or not valid_ifname(link_prefix) or link_prefix[-1].isdigit():
            # a trailing digit would make prefix+uid ambiguous (nsd1+23 == nsd12+3)
            raise ValueError(f"bad link prefix {link_prefix!r}")
        self.run_dir = os.path.abspath(run_dir)
        self.link_prefix = link_prefix
        self.link_re = re.compile(re.escape(link_prefix) + r"(0|[1-9][0-9]*)")
        self.host_netns_path = host_netns_path
        self.files = NamespaceFiles(self.run_dir)
        self._executor: ThreadPoolExecutor | None = None
        self._worker = Worker(self.files, self.link_re)
        self._closed = False
        #: ensure() calls waiting for the worker, taken all at once by the job that
        #: serves them (_ensure_pending); guarded by _pending_lock, as the worker takes
        #: them on its thread
        self._pending: list[tuple[NetworkSpec, bool, asyncio.Future[EnsureResult]]] = []
        self._pending_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None or self._closed:
            raise RuntimeError("NetnsAdapter.start() called twice")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsd-netns")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._worker.start, self.host_netns_path)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # queued jobs run first: close is graceful
            await loop.run_in_executor(executor, self._worker.close)
        finally:
            executor.shutdown(wait=False)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("NetnsAdapter is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._worker.run, fn))

    # -- validation -------------------------------------------------------------------

    def check_path(self, path: str) -> None:
        name = os.path.basename(path)
        if (
            os.path.dirname(path) != self.run_dir
            or name in ("", ".", "..")
            or "\x00" in name
            or len(os.fsencode(name)) > NAME_MAX
        ):
            raise NetnsError(
                "validate", f"{path!r} is not a file directly in {self.run_dir}", errno.EINVAL
            )

    def check_link_name(self, name: str) -> None:
        if not self.link_re.fullmatch(name) or not valid_ifname(name):
            raise NetnsError(
                "validate",
                f"{name!r} is not an nsd link name ({self.link_prefix}<uid>)",
                errno.EINVAL,
            )

    def validate(self, spec: NetworkSpec) -> None:
        self.check_path(spec.netns_path)
        self.check_link_name(spec.host_ifname)
        if not valid_ifname(spec.peer_ifname) or spec.peer_ifname in ("lo", "all", "default"):
            raise NetnsError("validate", f"bad peer name {spec.peer_ifname!r}", errno.EINVAL)
        if not (
            isinstance(spec.ipv4_address, IPv4Address)
            and isinstance(spec.ipv4_gateway, IPv4Address)
            and isinstance(spec.ipv6_prefix, IPv6Network)
            and isinstance(spec.ipv6_address, IPv6Address)
            and isinstance(spec.ipv6_gateway, IPv6Address)
        ):
            raise NetnsError("validate", "address fields have the wrong types", errno.EINVAL)
        if spec.ipv4_address == spec.ipv4_gateway:
            raise NetnsError("validate", "tenant address equals the gateway", errno.EINVAL)
        if spec.ipv6_address not in spec.ipv6_prefix:
            raise NetnsError(
                "validate", f"{spec.ipv6_address} is not in {spec.ipv6_prefix}", errno.EINVAL
            )
        if not spec.ipv6_gateway.is_link_local:
            raise NetnsError(
                "validate", f"IPv6 gateway {spec.ipv6_gateway} is not link-local", errno.EINVAL
            )
        if spec.mtu is not None and not 68 <= spec.mtu <= 65535:
            raise NetnsError("validate", f"bad mtu {spec.mtu}", errno.EINVAL)
        for key, value in spec.sysctls:
            validate_sysctl(key, value)

    # -- operations ---------------------------------------------------------------------

    async def ensure(self, spec: NetworkSpec, *, adopt: bool = True) -> EnsureResult:
        """Create or repair the tenant's namespace and network; idempotent.

        With ``adopt=False`` an already mounted namespace at ``spec.netns_path`` is an
        error (``NetnsError(step="exists", errno=EEXIST)``) instead of being reused.

        Calls made while the worker is busy are served together by one job, in the
        order they were made (Worker.ensure_group): many clients creating tenants at
        once then get their namespaces made ahead as a reconcile batch does.
        """
        self.validate(spec)
        if self._executor is None:
            raise RuntimeError("NetnsAdapter is not running")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[EnsureResult] = loop.create_future()
        with self._pending_lock:
            self._pending.append((spec, adopt, waiter))
            # Not first: a job queued for the ones before has not taken them yet, and
            # will take this one too.
            first = len(self._pending) == 1
        if first:
            try:
                job = loop.run_in_executor(
                    self._executor, functools.partial(self._worker.run, self._ensure_pending)
                )
            except BaseException:  # the executor is shutting down: nobody would take it
                with self._pending_lock:
                    self._pending.clear()  # only this call: no await since it was added
                raise
            job.add_done_callback(_log_failed_job)
        return await waiter

    def _ensure_pending(self) -> None:
        """On the worker: serve every ensure() call queued so far."""
        with self._pending_lock:
            calls, self._pending = self._pending, []
        # Cancelled while waiting (e.g. a request timed out): not done at all.
        calls = [c for c in calls if not c[2].done()]
        unanswered = set(range(len(calls)))

        def deliver(index: int, outcome: EnsureResult | BaseException) -> None:
            unanswered.discard(index)
            waiter = calls[index][2]
            waiter.get_loop().call_soon_threadsafe(_settle, waiter, outcome)

        try:
            self._worker.ensure_group([(spec, adopt) for spec, adopt, _ in calls], deliver)
        except BaseException as e:  # a bug: nobody may wait forever for it
            for index in sorted(unanswered):
                deliver(index, e)
            raise

    async def ensure_many(
        self, specs: list[NetworkSpec], *, adopt: bool = True
    ) -> list[EnsureResult | NetnsError]:
        """``ensure`` for each of ``specs``, in one job on the worker (reconcile's
        batches): each result, or the NetnsError of that tenant, in the order given."""
        invalid: list[NetnsError | None] = []
        for spec in specs:
            try:
                self.validate(spec)
            except NetnsError as e:
                invalid.append(e)
            else:
                invalid.append(None)
        valid = [s for s, e in zip(specs, invalid, strict=True) if e is None]
        done = iter(await self._call(functools.partial(self._worker.ensure_many, valid, adopt)))
        return [e if e is not None else next(done) for e in invalid]

    async def remove(self, target: NetworkSpec | NetworkRef) -> tuple[str, ...]:
        """Delete the host veth (its peer goes with it), detach and unlink the namespace
        file; idempotent. Processes still inside keep the namespace alive, unreachable."""
        ref = target.ref if isinstance(target, NetworkSpec) else target
        self.check_path(ref.netns_path)
        if ref.host_ifname is not None:
            self.check_link_name(ref.host_ifname)
        return await self._call(functools.partial(self._worker.remove, ref))

    def namespace_inode(self, path: str) -> int | None:
        """Inode of the namespace mounted at ``path``, or None if nothing is mounted there."""
        return self.files.namespace_inode(path)

    def open_namespace(self, path: str) -> int:
        """An ``O_RDONLY|O_CLOEXEC`` fd of the network namespace mounted at ``path``."""
        return self.files.open_namespace(path)

    async def list_prefixed_links(self) -> list[str]:
        """Host links named exactly ``<prefix><decimal uid>`` (no leading zeros)."""
        links = await self._call(self._worker.prefixed_links)
        return sorted(name for _, name in links)

    async def delete_link(self, name: str) -> None:
        """Delete a host link; refuses names that are not nsd's. Missing is fine."""
        self.check_link_name(name)
        await self._call(functools.partial(self._worker.delete_link, name, []))

    async def run_in_namespace(self, netns_path: str | None, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ipr)`` on the worker thread while the thread is inside the network
        namespace mounted at ``netns_path`` (None: the host namespace), with ``ipr`` a
        sync pyroute2 ``IPRoute`` of that namespace (do not close or keep it).

        For work that must happen inside a namespace and must not block the event loop:
        tc through ``ipr``, libnftables (its netlink socket opens in the thread's
        namespace), /proc/sys/net files (they show the thread's namespace). ``fn`` must
        not switch namespaces itself; the worker always returns home afterwards.
        """
        if netns_path is not None:
            self.check_path(netns_path)
        return await self._call(functools.partial(self._worker.run_in, netns_path, fn))

    @property
    def worker_sysctl_files(self) -> SysctlFiles:
        """Where the worker opens per-namespace sysctls (nsd/net/sysctl_files.py says
        why not /proc): for ``run_in_namespace`` callbacks only, which run on it."""
        return self._worker.sysctl_files

    async def host_routes(self) -> list[IPv4Network | IPv6Network]:
        """Destinations of the host's routes in every table, without default routes and
        without routes through nsd's own links (for IPAM overlap checks)."""
        return await self._call(self._worker.host_routes)
