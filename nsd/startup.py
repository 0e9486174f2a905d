"""What the daemon needs from the host before and while it serves: the listening
socket, the instance lock, the descriptor limit, systemd and the host network,
logging, and its periodic chores (watchdog, lease purge). Used by nsd.daemon only.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import socket
import sqlite3
import stat
import sys
from pathlib import Path

from nsd import config
from nsd.core import doctor
from nsd.core.ipam import Ipam
from nsd.errors import StateWriteFailed
from nsd.net import nft
from nsd.net import policy as netpolicy
from nsd.net.hostnet import HostNetwork
from nsd.net.netns import NetnsAdapter
from nsd.systemd import notify as sd
from nsd.systemd.units import Systemd, SystemdError
from nsd.varlink.server import Limits

log = logging.getLogger("nsd")


class StartupError(Exception):
    """A reason the daemon cannot start, for humans; logged, exit status 3."""


def server_limits(d: config.DaemonConfig) -> Limits:
    """The varlink server's limits from the [daemon] section."""
    return Limits(
        max_message_bytes=d.max_message_bytes,
        max_connections=d.max_connections,
        reserved_connections=d.reserved_connections,
        max_connections_per_uid=d.max_connections_per_uid,
        max_connections_per_non_tenant=d.max_connections_per_non_tenant,
        max_non_tenant_connections=d.max_non_tenant_connections,
        max_streams_per_uid=d.max_streams_per_uid,
        idle_timeout=d.idle_timeout,
        call_timeout=d.call_timeout,
        partial_message_timeout=d.message_timeout,
        max_queued_output_bytes=d.max_queued_output_bytes,
        max_queued_output_bytes_per_uid=d.max_queued_output_bytes_per_uid,
    )


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
    # As nsd.socket's Backlog=: every local user can connect, and a connect
    # storm of hostile ones must not fill the queue for root and the admins
    # (the kernel caps it at net.core.somaxconn).
    sock.listen(4096)
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


async def check_pools(ipam: Ipam, net: NetnsAdapter) -> None:
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


def reconcile_progress(done: int, total: int) -> None:
    # After a reboot, reconciling thousands of tenants can outlast the start
    # timeout; ask systemd for more time as long as progress is made.
    if done % 100 == 0:
        sd.notify(f"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=Reconciling tenants ({done}/{total})")


async def purge_leases(ipam: Ipam, interval: float) -> None:
    """Released address leases leave the database once their quarantine has ended:
    at start and every ``ipam.purge_interval`` seconds."""
    while True:
        try:
            purged = ipam.purge_expired()
        except (StateWriteFailed, sqlite3.Error, OSError) as e:
            # A full or read-only state directory: nothing lost, the next round retries.
            log.warning("cannot purge expired address leases: %s", e)
        else:
            if purged:
                log.info("purged %d address lease(s) whose quarantine ended", purged)
        await asyncio.sleep(interval)


async def watchdog_pings(interval: float) -> None:
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
