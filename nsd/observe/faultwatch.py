"""Watch the tenants' cgroup event files with inotify, on the event loop.

cgroup v2 signals a change of ``memory.events`` and ``pids.events`` as
``IN_MODIFY`` on the file (the kernel's ``cgroup_file_notify``, rate-limited to
once per 10 ms per file), so nsd learns of a limit hit when it happens and pays
nothing for the tenants that hit none - no polling of 1,000 slices. One inotify
descriptor serves every tenant; the loop reads it when it becomes readable.

A watch ends by itself when its cgroup goes away (``IN_IGNORED``: the slice was
stopped); :meth:`FaultWatcher.sync`, called with the tenant list at every
metrics sample, adds it again once the slice exists, and watches new tenants.
The first reading of a file is the baseline: events from before nsd watched are
not reported as faults (the counters still show them).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nsd.observe.faults import WATCHED_FILES, increases, read_counters

log = logging.getLogger("nsd.faultwatch")

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
#: seconds of work on the event loop before yielding to other callbacks (API calls)
STEP = 0.001

#: (uid, name, slice directory, [(kind, new events)]) - called on the event loop
OnFaults = Callable[[int, str, str, list[tuple[str, int]]], None]


class Inotify:
    """A non-blocking inotify descriptor (the libc calls through ctypes)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd

    def add(self, path: str, mask: int = IN_MODIFY) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return int(wd)

    def remove(self, wd: int) -> None:
        # EINVAL: the kernel dropped the watch already (its file went away).
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int]]:
        """(wd, mask) of every pending event; [] if none."""
        out: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            i = 0
            while i + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, i)
                out.append((wd, mask))
                i += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Tenant:
    uid: int
    name: str
    slice_dir: str
    wds: dict[str, int] = field(default_factory=dict)  # file -> watch descriptor
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


class FaultWatcher:
    """Reports new limit events of the tenants' slices to ``on_faults``."""

    def __init__(self, cgroup_root: str, on_faults: OnFaults) -> None:
        self.cgroup_root = cgroup_root.rstrip("/")
        self._on_faults = on_faults
        self._inotify: Inotify | None = None
        self._tenants: dict[int, _Tenant] = {}
        self._by_wd: dict[int, tuple[_Tenant, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: changed files not read yet: wd -> (tenant, file)
        self._dirty: dict[int, tuple[_Tenant, str]] = {}
        self._draining = False

    @property
    def watches(self) -> int:
        return len(self._by_wd)

    def start(self) -> None:
        self._inotify = Inotify()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inotify.fd, self._readable)

    def close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        self._tenants.clear()
        self._by_wd.clear()
        self._dirty.clear()

    def sync(self, tenants: Iterable[tuple[int, str, str | None]]) -> None:
        """Watch exactly these tenants: (uid, name, slice cgroup path or None)."""
        if self._inotify is None:
            return
        wanted = {uid: (name, cg) for uid, name, cg in tenants if cg is not None}
        for uid in [u for u in self._tenants if u not in wanted]:
            self._drop(self._tenants.pop(uid))
        for uid, (name, cgroup) in wanted.items():
            slice_dir = self.cgroup_root + cgroup
            t = self._tenants.get(uid)
            if t is not None and (t.slice_dir != slice_dir or t.name != name):
                self._drop(self._tenants.pop(uid))
                t = None
            if t is None:
                t = self._tenants[uid] = _Tenant(uid, name, slice_dir)
            if len(t.wds) < len(WATCHED_FILES):
                self._watch(t)

    def _watch(self, t: _Tenant) -> None:
        if self._inotify is None:
            raise RuntimeError("the fault watcher is not started")
        for file in WATCHED_FILES:
            if file in t.wds:
                continue
            path = f"{t.slice_dir}/{file}"
            try:
                wd = self._inotify.add(path)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # slice not started yet
                    log.warning("cannot watch %s: %s", path, e.strerror)
                continue
            # The baseline: read after the watch exists, so no event falls between.
            t.counters[file] = read_counters(path) or {}
            t.wds[file] = wd
            self._by_wd[wd] = (t, file)

    def _drop(self, t: _Tenant) -> None:
        for wd in t.wds.values():
            self._by_wd.pop(wd, None)
            self._dirty.pop(wd, None)
            if self._inotify is not None:
                self._inotify.remove(wd)
        t.wds.clear()

    def _readable(self) -> None:
        if self._inotify is None:
            raise RuntimeError("the fault watcher is not started")
        for wd, mask in self._inotify.read():
            found = self._by_wd.get(wd)
            if found is None:
                continue
            if mask & IN_IGNORED:
                t, file = self._by_wd.pop(wd)
                t.wds.pop(file, None)  # the cgroup is gone; sync() watches it again
                self._dirty.pop(wd, None)
                continue
            self._dirty[wd] = found  # several events for one file: one read
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Read the changed files, for at most STEP seconds at a time: a burst of
        1,000 tenants' events must not hold the API's event loop for the whole
        burst; the rest follows in the next loop iteration."""
        self._draining = False
        deadline = time.perf_counter() + STEP
        while self._dirty:
            if time.perf_counter() > deadline:
                if self._loop is None:
                    raise RuntimeError("the fault watcher is not started")
                self._draining = True
                self._loop.call_soon(self._drain)
                return
            wd = next(iter(self._dirty))
            t, file = self._dirty.pop(wd)
            counters = read_counters(f"{t.slice_dir}/{file}")
            if counters is None:
                continue
            new = increases(t.counters.get(file, {}), counters, file)
            t.counters[file] = counters
            if new:
                self._on_faults(t.uid, t.name, t.slice_dir, new)
