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
import os
import select
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from nsd import kerneltext

__all__ = ["StopResult", "processes_in_namespace", "stop_processes"]

# include/linux/sched.h: the task is a kernel thread.
_PF_KTHREAD = 0x00200000


def _netns_link(proc_root: str, pid: int) -> str | None:
    try:
        return os.readlink(f"{proc_root}/{pid}/ns/net")
    except OSError:
        # ENOENT: vanished or a zombie (its namespaces are already released);
        # EACCES/EPERM: not ours to look at (only when not root).
        return None


def _is_kernel_thread(proc_root: str, pid: int) -> bool:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    # Field 3 is the state and field 9 the flags.
    fields = kerneltext.stat_fields(data)
    try:
        return bool(int(fields[6]) & _PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def processes_in_namespace(inode: int, proc_root: str = "/proc") -> list[int]:
    """PIDs of the processes whose network namespace has inode ``inode``, sorted.

    Vanished processes, zombies and kernel threads are skipped; the calling process
    itself is never listed (nsd must not stop itself).
    """
    wanted = f"net:[{inode}]"
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
            if _netns_link(proc_root, pid) != wanted:
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


def _open_pidfd(pid: int, netns_inode: int | None, proc_root: str) -> int | None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if netns_inode is None:
        return pidfd
    link = _netns_link(proc_root, pid)
    # Check liveness *after* reading the link: if the pinned process is still alive now,
    # the PID was its own during the readlink, so the link describes that process.
    if link != f"net:[{netns_inode}]" or _pidfd_exited(pidfd):
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
    proc_root: str = "/proc",
) -> StopResult:
    """SIGTERM ``pids``, wait up to ``term_timeout`` s, SIGKILL the rest, wait up to
    ``kill_timeout`` s for them to die.

    With ``netns_inode``, a PID is only signalled if it is (still) inside that network
    namespace, which makes a list from :func:`processes_in_namespace` safe to act on
    even if some of its PIDs have been reused since.
    """
    pidfds: dict[int, int] = {}
    skipped: list[int] = []
    try:
        for pid in dict.fromkeys(pids):
            if pid <= 0 or pid == os.getpid():
                raise ValueError(f"refusing to stop PID {pid}")
            fd = _open_pidfd(pid, netns_inode, proc_root)
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
