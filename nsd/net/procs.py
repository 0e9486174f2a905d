"""Finding the processes inside a network namespace, and stopping them.

A process is "inside" a namespace when ``/proc/PID/ns/net`` links to ``net:[INODE]``.
Only thread-group leaders are looked at (that is what ``/proc`` lists); a thread that
alone ``setns()``-ed elsewhere is not found, which is also how ``ip netns pids`` behaves.

Stopping is PID-reuse safe: every process is pinned by a pidfd *before* it is signalled,
all signals go through ``pidfd_send_signal``, and, when the caller says which namespace
the processes must be in, the namespace is re-checked after the pidfd is open (while the
pidfd's process is still alive, the PID cannot have been handed to another process, so a
match then is a match of the pinned process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from nsd import kerneltext

__all__ = ["StopResult", "processes_in_namespace", "start_time", "stop_processes"]

# include/linux/sched.h: the task is a kernel thread.
_PF_KTHREAD = 0x00200000


def _netns_link(proc_root: str, pid: int) -> str | None:
    try:
        return os.readlink(f"{proc_root}/{pid}/ns/net")
    except OSError:
        # ENOENT: vanished or a zombie (its namespaces are already released);
        # EACCES/EPERM: not ours to look at (only when not root).
        return None


def _stat_fields(proc_root: str, pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` from field 3 (the state) on; None if there is no such process."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return kerneltext.stat_fields(data)


def _is_kernel_thread(proc_root: str, pid: int) -> bool:
    fields = _stat_fields(proc_root, pid) or []
    try:  # field 9: the flags
        return bool(int(fields[6]) & _PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def start_time(pid: int, proc_root: str = "/proc") -> int | None:
    """When process ``pid`` started (clock ticks after boot); None if there is none.
    With the PID it names one process for good: a reused PID starts later."""
    fields = _stat_fields(proc_root, pid) or []
    try:  # field 22
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _holds(proc_root: str, pid: int, inode: int) -> bool:
    """Whether process ``pid`` has a descriptor open on the namespace with ``inode``.

    The link text does not say: a descriptor opened through a bind mount reads as
    that path (``/run/netns/NAME``), one opened through ``/proc`` as ``net:[INODE]``.
    So every descriptor that is not a socket, pipe or anonymous inode is stat()-ed
    (through the magic link: the namespace's own inode on nsfs).
    """
    fd_dir = f"{proc_root}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        path = f"{fd_dir}/{fd}"
        try:
            if os.readlink(path).startswith(_NOT_A_NAMESPACE):
                continue
            st = os.stat(path)
        except OSError:
            continue  # closed meanwhile
        if st.st_ino == inode and st.st_dev == _nsfs_dev():
            return True
    return False


# What the links of descriptors that cannot be a namespace start with.
_NOT_A_NAMESPACE = ("socket:[", "pipe:[", "anon_inode:")


@functools.cache
def _nsfs_dev() -> int:
    """The device of nsfs, where every namespace inode lives."""
    return os.stat("/proc/self/ns/net").st_dev


def _uses(proc_root: str, pid: int, inode: int, holders: bool) -> bool:
    in_it = _netns_link(proc_root, pid) == f"net:[{inode}]"
    return in_it or (holders and _holds(proc_root, pid, inode))


def processes_in_namespace(
    inode: int, proc_root: str = "/proc", *, holders: bool = False
) -> list[int]:
    """PIDs of the processes whose network namespace has inode ``inode``, sorted.

    With ``holders``, also those with a descriptor open on it: they can join it
    with setns() at any time (nsd-exec between receiving Enter's descriptor and
    joining). Vanished processes, zombies and kernel threads are skipped; the
    calling process itself is never listed (nsd must not stop itself).
    """
    self_pid = os.getpid()
    found: list[int] = []
    try:
        entries = os.scandir(proc_root)
    except OSError:
        return found
    with entries:
        for entry in entries:
            name = entry.name
            if not name.isdigit():
                continue
            pid = int(name)
            if pid == self_pid:
                continue
            if not _uses(proc_root, pid, inode, holders):
                continue
            if _is_kernel_thread(proc_root, pid):
                continue
            found.append(pid)
    found.sort()
    return found


@dataclass(frozen=True)
class StopResult:
    """What :func:`stop_processes` did, by PID."""

    #: exited after SIGTERM (or on their own) within ``term_timeout``
    terminated: tuple[int, ...]
    #: needed SIGKILL
    killed: tuple[int, ...]
    #: already gone (or, with ``netns_inode``, no longer in that namespace) before any signal
    skipped: tuple[int, ...]
    #: still alive after SIGKILL and ``kill_timeout`` (e.g. stuck in uninterruptible sleep)
    survivors: tuple[int, ...]


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _open_pidfd(
    pid: int, netns_inode: int | None, proc_root: str, holders: bool = False
) -> int | None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if netns_inode is None:
        return pidfd
    uses = _uses(proc_root, pid, netns_inode, holders)
    # Check liveness *after* reading the links: if the pinned process is still alive
    # now, the PID was its own during the readlink, so the link describes that process.
    if not uses or _pidfd_exited(pidfd):
        os.close(pidfd)
        return None
    return pidfd


def _signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


async def _wait_exit(pidfds: dict[int, int], timeout: float) -> set[int]:
    """Wait until the processes behind ``pidfds`` (pid -> pidfd) exit; return the exited PIDs."""
    loop = asyncio.get_running_loop()
    exited: set[int] = set()
    pending = {pid: fd for pid, fd in pidfds.items() if not _pidfd_exited(fd)}
    exited.update(pid for pid in pidfds if pid not in pending)
    if not pending:
        return exited
    done = asyncio.Event()

    def on_exit(pid: int) -> None:
        loop.remove_reader(pending[pid])
        exited.add(pid)
        if exited.issuperset(pidfds):
            done.set()

    for pid, fd in pending.items():
        loop.add_reader(fd, on_exit, pid)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
    finally:
        for pid, fd in pending.items():
            if pid not in exited:
                loop.remove_reader(fd)
    return exited


async def stop_processes(
    pids: Iterable[int],
    term_timeout: float = 5.0,
    *,
    kill_timeout: float = 5.0,
    netns_inode: int | None = None,
    holders: bool = False,
    proc_root: str = "/proc",
) -> StopResult:
    """SIGTERM ``pids``, wait up to ``term_timeout`` s, SIGKILL the rest, wait up to
    ``kill_timeout`` s for them to die.

    With ``netns_inode``, a PID is only signalled if it is (still) inside that network
    namespace, which makes a list from :func:`processes_in_namespace` safe to act on
    even if some of its PIDs have been reused since; with ``holders``, a process
    with a descriptor open on that namespace counts as inside.
    """
    pidfds: dict[int, int] = {}
    skipped: list[int] = []
    try:
        for pid in dict.fromkeys(pids):
            if pid <= 0 or pid == os.getpid():
                raise ValueError(f"refusing to stop PID {pid}")
            fd = _open_pidfd(pid, netns_inode, proc_root, holders)
            if fd is None:
                skipped.append(pid)
            else:
                pidfds[pid] = fd
        for fd in pidfds.values():
            _signal(fd, signal.SIGTERM)
        terminated = await _wait_exit(pidfds, term_timeout)
        rest = {pid: fd for pid, fd in pidfds.items() if pid not in terminated}
        for fd in rest.values():
            _signal(fd, signal.SIGKILL)
        killed = await _wait_exit(rest, kill_timeout) if rest else set()
        survivors = set(rest) - killed
    finally:
        for fd in pidfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    return StopResult(
        terminated=tuple(sorted(terminated)),
        killed=tuple(sorted(killed)),
        skipped=tuple(sorted(skipped)),
        survivors=tuple(sorted(survivors)),
    )
