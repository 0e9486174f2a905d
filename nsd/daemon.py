"""Process lifecycle: config, logging, socket activation, sd_notify, signals.

CLI -> Config -> Daemon -> startup / serve / shutdown, as uvicorn does it.
Start-up order matters: the store is opened and the host reconciled before the
daemon reports READY=1, so units ordered after nsd find every tenant's
namespace in place (after a reboot cleared /run, too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import grp
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from nsd import __version__, config
from nsd.api.auditlog import AuditLog
from nsd.api.handlers import DAEMON_INTERFACE, TENANT_INTERFACE, Api, idl
from nsd.core import doctor
from nsd.core.faultrecord import FaultCounter, FaultRecorder, FaultService
from nsd.core.ipam import Ipam
from nsd.core.manager import TenantManager
from nsd.core.store import Store, StoreError
from nsd.net import nft
from nsd.net.netns import NetnsAdapter, NetnsError
from nsd.observe.access import MetricsAccess
from nsd.observe.cgroupstats import detect_root, slice_cgroup_path
from nsd.observe.metrics import MetricsService
from nsd.observe.sampler import Target
from nsd.startup import (
    StartupError,
    bind_unix,
    check_pools,
    connect_systemd,
    host_network,
    purge_leases,
    raise_nofile_limit,
    reconcile_progress,
    server_limits,
    setup_logging,
    take_instance_lock,
    watchdog_pings,
)
from nsd.systemd import notify as sd
from nsd.systemd.slices import TenantSlices
from nsd.varlink.server import VarlinkServer

log = logging.getLogger("nsd")

# Exit statuses (nsd(8), EXIT STATUS). 2 and 3 name problems an operator must fix
# (the configuration, a missing package, overlapping pools, another daemon on the
# socket): nsd.service lists them in RestartPreventExitStatus=, so systemd does
# not restart into the same error every few seconds. 1 is anything unexpected,
# where a restart may help.
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3


class Daemon:
    def __init__(self, cfg: config.Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._stop = asyncio.Event()
        self._manager: TenantManager | None = None
        self.watchdog_pings: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Start up, serve until SIGTERM or SIGINT, shut down (uvicorn's Server.serve)."""
        # Signal handlers first: a SIGTERM during a long reconcile must stop nsd
        # cleanly after it, not kill it mid-step with the default action.
        self._install_signal_handlers()
        raise_nofile_limit()
        # Resources are released in reverse order, on success and on failure.
        async with contextlib.AsyncExitStack() as stack:
            manager = await self.startup(stack)
            await self.serve()
            await self.shutdown(manager)

    async def startup(self, stack: contextlib.AsyncExitStack) -> TenantManager:
        """Everything before READY=1: state, the host table, the listener, reconcile."""
        cfg = self.cfg
        listener, store, net = await self._open(stack)
        manager, degraded = await self._prepare(store, net, stack)
        metrics = self._observe(store, manager, stack)
        # Serving already while the reconcile runs (a reboot rebuilds every namespace:
        # seconds with 1,000 tenants). A tenant asked for is built or checked at once,
        # under its lock, ahead of the others: Enter takes the path it takes for any
        # namespace found missing. READY=1 keeps its meaning for units ordered after
        # nsd: every tenant reconciled.
        server = self._server(manager, net, degraded, metrics)
        await server.start(listener)
        stack.push_async_callback(server.close, 1.0)
        sd.notify("STATUS=Reconciling tenants")
        started = time.perf_counter()
        report = await manager.reconcile(progress=reconcile_progress)
        metrics.daemon.on_reconcile(
            time.perf_counter() - started, report.actions, len(report.problems)
        )
        log.info("reconcile: %d tenant(s), %d action(s), %d problem(s)",
                 store.count(), len(report.actions), len(report.problems))  # fmt: skip
        # After the reconcile, so the first sample sees every namespace mounted.
        await metrics.start()
        stack.push_async_callback(metrics.close)
        if metrics.listen_error:
            degraded.append(metrics.listen_error)
        # What start-up allocated (modules, pyroute2, dbus, the reconcile's state)
        # lives as long as nsd does: keep it out of the cyclic GC's full
        # collections, which otherwise walk all of it and stalled the event loop
        # for 20-40 ms every few metrics samples (1,000 tenants). Garbage first, so
        # that no dead cycle is frozen with the rest.
        gc.collect()
        gc.freeze()
        gc.enable()  # main() turned it off for the start
        sd.notify(f"READY=1\nSTATUS=Serving {store.count()} tenant(s)")
        log.info("nsd %s ready on %s (%d tenants)", __version__, cfg.daemon.socket,
                 store.count())  # fmt: skip
        return manager

    def _observe(
        self, store: Store, manager: TenantManager, stack: contextlib.AsyncExitStack
    ) -> MetricsService:
        """The metrics sampler and exporter, and the fault watcher (started here: it
        records limit hits from now on); the sampler starts after the reconcile."""
        cfg = self.cfg
        cgroup_root = detect_root()
        faults = self._faults(store, manager, cgroup_root)

        def targets() -> tuple[Target, ...]:
            found = manager.sampler_targets()
            if faults is not None:
                # At every sample: watch new tenants' slices, drop removed ones.
                faults.sync((t.uid, t.name, t.cgroup, t.host_ifname) for t in found)
            return found

        metrics = MetricsService(
            targets,
            interval=cfg.metrics.interval,
            listen=cfg.metrics.listen,
            helpers=cfg.metrics.helpers,
            refusal=MetricsAccess(cfg.metrics.scrapers, cfg.metrics.allow_remote).refusal,
            cgroup_root=cgroup_root,
            probe_cgroup=slice_cgroup_path(cfg.systemd.parent_slice),
        )
        if faults is not None:
            metrics.sampled.append(faults.sampled)
            metrics.registry.register(FaultCounter(faults.recorder))
            faults.start()
            stack.push_async_callback(faults.close)
        return metrics

    async def _open(
        self, stack: contextlib.AsyncExitStack
    ) -> tuple[socket.socket, Store, NetnsAdapter]:
        """The instance lock, the listening socket, the store and the netns worker."""
        cfg = self.cfg
        # One daemon per state directory, established before anything on the
        # host is touched: a second instance must not reconcile concurrently.
        stack.callback(os.close, take_instance_lock(Path(cfg.daemon.state_dir)))
        listener = self._listening_socket()
        stack.callback(listener.close)
        try:
            store = Store(cfg.daemon.database)
        except StoreError as e:
            raise StartupError(str(e)) from e
        stack.callback(store.close)
        net = NetnsAdapter(cfg.netns.run_dir, cfg.netns.link_prefix)
        await net.start()
        stack.push_async_callback(net.close)
        return listener, store, net

    async def serve(self) -> None:
        """The varlink server and the sampler run as tasks; serve until asked to stop."""
        await self._stop.wait()

    async def shutdown(self, manager: TenantManager) -> None:
        """Refuse new work first, let running operations finish; the exit stack then
        closes connections, the sampler, the netns worker and the store. A tenant cut
        off mid-build keeps its recorded intent (reconcile finishes it)."""
        sd.notify("STOPPING=1\nSTATUS=Shutting down")
        log.info("shutting down")
        timeout = self.cfg.daemon.shutdown_timeout
        if not await manager.shutdown(timeout):
            log.warning("operations still running after %.0fs; reconcile finishes them",
                        timeout)  # fmt: skip

    def _faults(
        self, store: Store, manager: TenantManager, cgroup_root: str | None
    ) -> FaultService | None:
        """The fault service, if enabled: cgroup events if the host has cgroup v2 to
        watch, conntrack drops if a network policy is on."""
        if not self.cfg.faults.enabled:
            return None
        if cgroup_root is None:
            log.info("no cgroup v2 hierarchy: memory and pids faults are not watched")
        recorder = FaultRecorder(
            store, self.cfg.faults, manager.emit_fault, backlog=manager.watch_backlog
        )
        networks = manager.networks
        return FaultService(
            cgroup_root,
            recorder,
            conntrack_drops=networks.conntrack_drops if self.cfg.network.enabled else None,
            conntrack_limit=lambda: networks.conntrack_limit,
        )

    async def _prepare(
        self, store: Store, net: NetnsAdapter, stack: contextlib.AsyncExitStack
    ) -> tuple[TenantManager, list[str]]:
        cfg = self.cfg
        ipam = Ipam(cfg.ipam, cfg.tenants, store)
        degraded = doctor.degradations()
        for line in degraded:
            log.warning("%s", line)
        if cfg.ipam.check_host_routes:
            await check_pools(ipam, net)
        systemd, reason = await connect_systemd(cfg)
        if systemd is not None:
            stack.push_async_callback(systemd.close)
        hostnet = await host_network(cfg, net, ipam)
        manager = TenantManager(
            cfg, store, ipam, net, slices=TenantSlices(cfg, systemd, reason), network=hostnet
        )
        self._manager = manager
        # Fail closed: nsd's table is loaded before reconcile brings up any veth.
        try:
            await manager.apply_network_host()
        except (nft.NftError, NetnsError, OSError) as e:
            raise StartupError(f"cannot load the nftables table inet nsd: {e}") from e
        if hostnet is not None:
            # Operators (and the VM tier) read the boot order from this line: it comes
            # before the reconcile line that brings tenants' veths up.
            uplinks = ", ".join(hostnet.site.uplinks) or "none"
            log.info("network policy: table inet nsd loaded (uplinks: %s)", uplinks)
        # Kept like the watchdog's: a reference, cancelled on the way out.
        purge = asyncio.create_task(purge_leases(ipam, cfg.ipam.purge_interval))
        stack.callback(purge.cancel)
        interval = sd.watchdog_interval()
        if interval:
            # Keep a reference: the loop holds tasks only weakly.
            self.watchdog_pings = asyncio.create_task(watchdog_pings(interval))
            stack.callback(self.watchdog_pings.cancel)
        return manager, degraded

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can change at runtime.

        Limits, exec settings and the tenant policies apply at once (limits are
        re-applied to every slice); paths, pools and names would change what
        already exists on the host, so those keep their values until a restart.
        """
        manager = self._manager
        if manager is None:
            log.info("SIGHUP during start-up: ignored")
            return
        try:
            new = config.load(self.config_path)
        except config.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        old = self.cfg
        applied = replace(
            old,
            limits=new.limits,
            exec=new.exec,
            tenants=replace(
                old.tenants,
                enter_creates=new.tenants.enter_creates,
                lock_timeout=new.tenants.lock_timeout,
                stop_timeout=new.tenants.stop_timeout,
            ),
            systemd=replace(old.systemd, enter_scope=new.systemd.enter_scope),
            network=new.network,
        )
        if applied != replace(new, source=old.source):
            log.warning("reload: some changes (paths, pools, names, daemon settings) "
                        "need a restart of nsd; they were not applied")  # fmt: skip
        self.cfg = applied
        report = await manager.apply_config(applied)
        log.info("reloaded %s: %d action(s), %d problem(s)", new.source,
                 len(report.actions), len(report.problems))  # fmt: skip

    def _server(
        self,
        manager: TenantManager,
        net: NetnsAdapter,
        degraded: list[str],
        metrics: MetricsService,
    ) -> VarlinkServer:
        cfg = self.cfg
        admin_gid = grp.getgrnam(cfg.daemon.admin_group).gr_gid if cfg.daemon.admin_group else None
        audit_log = AuditLog(
            logging.getLogger("nsd.audit"),
            burst=cfg.daemon.audit_refusal_burst,
            rate=cfg.daemon.audit_refusal_rate,
            on_suppressed=metrics.daemon.on_audit_suppressed,
        )
        api = Api(manager, admin_gid, net.host_routes, degraded, metrics, audit_log=audit_log)
        server = VarlinkServer(
            vendor="nsd",
            product="nsd",
            version=__version__,
            url="https://github.com/nsd/nsd",
            internal_error_name="io.nsd.Daemon.InternalError",
            on_call_done=metrics.daemon.on_call_done,
            limits=server_limits(cfg.daemon),
            classify=api.peer_class,
        )
        handlers = api.handlers()
        for interface in (TENANT_INTERFACE, DAEMON_INTERFACE):
            server.add_interface(idl(interface), handlers[interface])
        return server

    def stop(self) -> None:
        self._stop.set()

    def _listening_socket(self) -> socket.socket:
        activated = sd.listen_fds()
        for name in ("varlink", "nsd.socket", "unknown"):
            for sock in activated.get(name, []):
                if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                    log.info("using socket-activated listener (%s)", name)
                    return sock
        return bind_unix(self.cfg.daemon.socket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsd", description="nsd: per-tenant network namespaces")
    parser.add_argument("--config", type=Path, help=f"TOML file (default {config.DEFAULT_PATH} "
                        "if it exists, else embedded defaults)")  # fmt: skip
    parser.add_argument("--check-config", action="store_true", help="validate and exit")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"nsd {__version__}")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        print(f"nsd: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"nsd: configuration OK ({cfg.source})")
        return 0
    setup_logging(args.log_level or cfg.daemon.log_level)
    if os.geteuid() != 0:
        log.error("nsd must run as root (it mounts namespaces and creates links)")
        return EXIT_STARTUP
    # The event loop shares the interpreter lock with worker threads (the metrics
    # sample, rendering, reads on the netns worker); a thread running Python keeps it
    # for the switch interval, 5 ms by default, before the loop gets it back - every
    # time the loop wants it, several times per API call. 1 ms bounds that wait: `Get`
    # stays within a few milliseconds while a sample runs (scripts/bench-faults).
    sys.setswitchinterval(0.001)
    # No cyclic collections until READY=1 (startup() collects once, freezes what is
    # left and turns them on again): the start allocates for every tenant and keeps
    # nearly all of it, so each full collection walked a growing heap of live
    # objects for nothing; 4 % of a 1,000-tenant restart.
    gc.disable()
    try:
        asyncio.run(Daemon(cfg, args.config).run())
    except StartupError as e:
        log.error("%s", e)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        pass
    except Exception:
        # A bug, or a host failure nothing anticipated: say so once, with the
        # traceback, and exit non-zero so systemd's Restart= policy applies.
        log.exception("nsd stopped on an unexpected error")
        return EXIT_FAILURE
    finally:
        gc.enable()  # main() may be called in a process that goes on (tests)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
