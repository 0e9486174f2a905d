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
import errno
import fcntl
import gc
import grp
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import __version__, config, doctor, netpolicy, nft, sd
from .api import DAEMON_INTERFACE, TENANT_INTERFACE, Api, idl
from .cgroupstats import detect_root, slice_cgroup_path
from .faultrecord import FaultCounter, FaultRecorder, FaultService
from .hostnet import HostNetwork
from .ipam import Ipam
from .manager import TenantManager
from .metrics import MetricsService
from .netns import NetnsAdapter, NetnsError
from .sampler import Target, manager_targets
from .slices import TenantSlices
from .store import Store, StoreError
from .systemd import Systemd, SystemdError
from .varlink.server import Limits, VarlinkServer

log = logging.getLogger("nsd")

# Exit statuses (nsd(8), EXIT STATUS). 2 and 3 name problems an operator must fix
# (the configuration, a missing package, overlapping pools, another daemon on the
# socket): nsd.service lists them in RestartPreventExitStatus=, so systemd does
# not restart into the same error every few seconds. 1 is anything unexpected,
# where a restart may help.
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3


class StartupError(Exception):
    """A reason the daemon cannot start, for humans; logged, exit status 3."""


class Daemon:
    def __init__(self, cfg: config.Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._stop = asyncio.Event()
        self._manager: TenantManager | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def run(self) -> None:
        cfg = self.cfg
        # Signal handlers first: a SIGTERM during a long reconcile must stop nsd
        # cleanly after it, not kill it mid-step with the default action.
        self._install_signal_handlers()
        raise_nofile_limit()
        # Resources are released in reverse order, on success and on failure.
        async with contextlib.AsyncExitStack() as stack:
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
            manager, degraded = await self._prepare(store, net, stack)
            cgroup_root = detect_root()
            faults = self._faults(store, manager, cgroup_root)

            def targets() -> list[Target]:
                found = manager_targets(manager)
                if faults is not None:
                    # At every sample: watch new tenants' slices, drop removed ones.
                    faults.sync((t.uid, t.name, t.cgroup) for t in found)
                return found

            metrics = MetricsService(
                targets,
                interval=cfg.metrics.interval,
                listen=cfg.metrics.listen,
                helpers=cfg.metrics.helpers,
                cgroup_root=cgroup_root,
                probe_cgroup=slice_cgroup_path(cfg.systemd.parent_slice),
            )
            if faults is not None:
                metrics.registry.register(FaultCounter(faults.recorder))
                faults.start()
                stack.push_async_callback(faults.close)

            sd.notify("STATUS=Reconciling tenants")
            started = time.perf_counter()
            report = await manager.reconcile(progress=_reconcile_progress)
            metrics.daemon.on_reconcile(
                time.perf_counter() - started, report.actions, len(report.problems)
            )
            log.info("reconcile: %d tenant(s), %d action(s), %d problem(s)",
                     store.count(), len(report.actions), len(report.problems))  # fmt: skip
            server = self._server(manager, net, degraded, metrics)
            await server.start(listener)
            stack.push_async_callback(server.close, 1.0)
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
            sd.notify(f"READY=1\nSTATUS=Serving {store.count()} tenant(s)")
            log.info("nsd %s ready on %s (%d tenants)", __version__, cfg.daemon.socket,
                     store.count())  # fmt: skip
            await self._stop.wait()

            sd.notify("STOPPING=1\nSTATUS=Shutting down")
            log.info("shutting down")
            # Refuse new work first, let running operations finish, then close
            # connections; a tenant cut off mid-build keeps its recorded intent.
            if not await manager.shutdown(cfg.daemon.shutdown_timeout):
                log.warning("operations still running after %.0fs; reconcile finishes them",
                            cfg.daemon.shutdown_timeout)  # fmt: skip

    def _faults(
        self, store: Store, manager: TenantManager, cgroup_root: str | None
    ) -> FaultService | None:
        """The fault watcher, if enabled and the host has cgroup v2 to watch."""
        if not self.cfg.faults.enabled:
            return None
        if cgroup_root is None:
            log.info("no cgroup v2 hierarchy: faults are not watched")
            return None
        recorder = FaultRecorder(store, self.cfg.faults, manager.emit_fault)
        return FaultService(cgroup_root, recorder)

    async def _prepare(
        self, store: Store, net: NetnsAdapter, stack: contextlib.AsyncExitStack
    ) -> tuple[TenantManager, list[str]]:
        cfg = self.cfg
        ipam = Ipam(cfg.ipam, cfg.tenants, store)
        degraded = doctor.degradations()
        for line in degraded:
            log.warning("%s", line)
        if cfg.ipam.check_host_routes:
            await _check_pools(ipam, net)
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
        interval = sd.watchdog_interval()
        if interval:
            # Keep a reference: the loop holds tasks only weakly.
            self._watchdog = asyncio.create_task(_watchdog(interval))
            stack.callback(self._watchdog.cancel)
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
        api = Api(manager, admin_gid, net.host_routes, degraded, metrics)
        server = VarlinkServer(
            vendor="nsd",
            product="nsd",
            version=__version__,
            url="https://github.com/nsd/nsd",
            internal_error_name="io.nsd.Daemon.InternalError",
            on_call_done=metrics.daemon.on_call_done,
            limits=Limits(
                max_message_bytes=cfg.daemon.max_message_bytes,
                max_connections=cfg.daemon.max_connections,
                max_connections_per_uid=cfg.daemon.max_connections_per_uid,
            ),
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


def bind_unix(path: str) -> socket.socket:
    """Bind the varlink socket, replacing a stale one but never a live daemon's."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartupError(f"cannot probe {path}: {e.strerror}") from e
            os.unlink(path)  # stale: nobody listens
        else:
            raise StartupError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Everyone may connect: authorization is per call, from SO_PEERCRED.
    old = os.umask(0o111)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(512)
    return sock


async def connect_systemd(cfg: config.Config) -> tuple[Systemd | None, str]:
    """The systemd adapter, or None and the reason slices and scopes are unavailable."""
    if not cfg.systemd.slices:
        return None, "disabled by systemd.slices = false"
    if not doctor.systemd_is_pid1():
        return None, "systemd is not PID 1 on this host"
    use_pidfds = False if cfg.systemd.use_pidfds == "never" else None
    try:
        bus = await Systemd.connect(timeout=cfg.systemd.call_timeout, use_pidfds=use_pidfds)
    except SystemdError as e:
        log.warning("systemd is unavailable, tenant slices and scopes are off: %s", e)
        return None, str(e)
    f = bus.features
    log.info("systemd %d on the bus; PIDFDs for scopes: %s", f.version, "yes" if f.pidfds else "no")
    return bus, ""


async def host_network(cfg: config.Config, net: NetnsAdapter, ipam: Ipam) -> HostNetwork | None:
    """The network policy (nftables, NAT, host services, shaping), or None if disabled."""
    if not cfg.network.enabled:
        return None
    why = nft.available()
    if why is not None:
        raise StartupError(why + " (install nftables, or set network.enabled = false)")
    hostnet = HostNetwork(
        cfg.network,
        net,
        ipv4_gateway=ipam.ipv4_gateway,
        ipv6_gateway=ipam.ipv6_gateway,
        ipv4_pool=cfg.ipam.ipv4_network,
        ipv6_pool=ipam.ipv6_base,
        tenant_interface=cfg.netns.tenant_interface,
        link_prefix=cfg.netns.link_prefix,
    )
    try:
        await hostnet.refresh_site()
    except netpolicy.NetworkConfigError as e:
        raise StartupError(f"network.{e.key}: {e.reason}") from e
    for line in await hostnet.foreign_drop_policies():
        log.warning("%s", line)
    return hostnet


async def _check_pools(ipam: Ipam, net: NetnsAdapter) -> None:
    overlaps = ipam.overlaps(await net.host_routes())
    if overlaps:
        raise StartupError(
            "; ".join(overlaps) + " (choose another ipam.ipv4_pool/ipv6_prefix, or set "
            "ipam.check_host_routes = false if the overlap is intended)"
        )


def take_instance_lock(state_dir: Path) -> int:
    """An exclusive flock on state_dir/nsd.lock, held for the daemon's lifetime."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "nsd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another nsd is running with state directory {state_dir}") from None
    return fd


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: connections, namespace fds and
    pidfds all need descriptors, and 1024 is too few for a busy host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reconcile_progress(done: int, total: int) -> None:
    # After a reboot, reconciling thousands of tenants can outlast the start
    # timeout; ask systemd for more time as long as progress is made.
    if done % 100 == 0:
        sd.notify(f"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=Reconciling tenants ({done}/{total})")


async def _watchdog(interval: float) -> None:
    # Pinging from the event loop proves the loop is alive, which is what matters.
    while True:
        sd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, journald timestamps each line; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    # Every Enter writes an audit line (~6% of its cost under load): skip what no
    # format here uses (the caller's file and line, thread and process names), as
    # the logging HOWTO's "Optimization" section suggests.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pyroute2 logs every netlink hiccup at warning; we report errors ourselves.
    logging.getLogger("pyroute2").setLevel(logging.ERROR)


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
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
