"""Parsers for the cgroup v2 files of a tenant's slice.

Formats are the kernel's (Documentation/admin-guide/cgroup-v2.rst): single
values (``memory.current``; ``max`` in limit files), flat keyed files
(``memory.stat``, ``memory.events``, ``cpu.stat``: ``key value`` per line),
nested keyed files (``io.stat``: ``MAJ:MIN key=value ...`` per device) and
PSI files (``some avg10=... total=USEC``; Documentation/accounting/psi.rst).

Every file is read with one open and one read (they are small; a second read
only happens if the first filled the buffer). A file that is missing or
unreadable gives ``None`` - never zero - so the exporter can leave the series
out: a host without the memory controller in the unified hierarchy (hybrid
cgroups, no systemd) simply has no memory series, rather than "0 bytes".

Pure functions of a root directory, so tests point them at fixture trees. Lines
end at "\n" only (nsd.kerneltext); a line that does not fit the format is skipped.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from nsd import kerneltext

CGROUP_BASE = "/sys/fs/cgroup"

# The memory.stat kinds nsd exports (bytes). Not all ~50: these answer "what is
# the tenant's memory made of" - process memory (anon), page cache (file) and
# how much of it is dirty or mapped, kernel memory (kernel: slab, stacks, page
# tables) and network buffers (sock), tmpfs/shm (shmem), and the LRU split that
# tells reclaimable cache from the working set.
MEMORY_STAT_KINDS: tuple[str, ...] = (
    "anon",
    "file",
    "kernel",
    "shmem",
    "sock",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "active_anon",
    "inactive_anon",
    "active_file",
    "inactive_file",
    "slab_reclaimable",
    "slab_unreclaimable",
)
# Event counters from memory.stat exported as counters.
MEMORY_STAT_EVENTS: tuple[str, ...] = ("pgfault", "pgmajfault")
# memory.events (hierarchical: the slice and everything below it).
MEMORY_EVENTS: tuple[str, ...] = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")
PRESSURE_RESOURCES: tuple[str, ...] = ("cpu", "memory", "io")
# cpu.stat keys nsd reads (microseconds or counts).
CPU_STAT_KEYS: tuple[str, ...] = (
    "usage_usec",
    "user_usec",
    "system_usec",
    "nr_periods",
    "nr_throttled",
    "throttled_usec",
)
_IO_KEYS = (b"rbytes", b"wbytes", b"dbytes", b"rios", b"wios", b"dios")

# The files a full sample reads, also the names of the "sources" whose
# availability the exporter reports.
FILES: tuple[str, ...] = (
    "memory.current",
    "memory.stat",
    "memory.events",
    "memory.swap.current",
    "memory.peak",
    "memory.pressure",
    "cpu.pressure",
    "io.pressure",
    "cpu.stat",
    "pids.current",
    "io.stat",
)


def read_bytes(path: str) -> bytes | None:
    """The whole file, or None if it cannot be opened or read (any reason)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:  # pragma: no cover - cgroup files are far smaller
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    except OSError:
        # e.g. EOPNOTSUPP reading *.pressure when the kernel runs with psi=0.
        return None
    finally:
        os.close(fd)


def parse_value(data: bytes) -> float | None:
    """A single-value file: an integer, or ``max`` (no limit) as +inf."""
    text = data.strip()
    if text == b"max":
        return math.inf
    try:
        return int(text)
    except ValueError:
        return None


def parse_int(data: bytes | None) -> int | None:
    """A single-value counter or gauge file (never ``max``)."""
    if data is None:
        return None
    value = parse_value(data)
    return value if isinstance(value, int) else None


def parse_flat_keyed(data: bytes) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, cpu.stat); odd lines skipped."""
    out: dict[str, int] = {}
    for line in kerneltext.lines(data):
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0].decode("ascii")] = int(parts[1])
        except (ValueError, UnicodeDecodeError):
            continue
    return out


@dataclass(frozen=True, slots=True)
class Pressure:
    """PSI totals of one resource, in seconds; ``full`` is None where the kernel has none."""

    some_seconds: float | None
    full_seconds: float | None


def parse_pressure(data: bytes) -> Pressure | None:
    """``some avg10=0.00 avg60=0.00 avg300=0.00 total=123`` (+ ``full`` line); total in µs."""
    totals: dict[bytes, float] = {}
    for line in kerneltext.lines(data):
        parts = line.split()
        if not parts or parts[0] not in (b"some", b"full"):
            continue
        for field in parts[1:]:
            key, _, value = field.partition(b"=")
            if key == b"total":
                with contextlib.suppress(ValueError):
                    totals[parts[0]] = int(value) / 1e6
    if not totals:
        return None
    return Pressure(totals.get(b"some"), totals.get(b"full"))


@dataclass(frozen=True, slots=True)
class IoTotals:
    """io.stat summed over all devices (per-device series would grow with the host's disks)."""

    read_bytes: int
    write_bytes: int
    discard_bytes: int
    reads: int
    writes: int
    discards: int


def parse_io_stat(data: bytes) -> IoTotals:
    """``MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N [other keys]`` per line."""
    sums = dict.fromkeys(_IO_KEYS, 0)
    for line in kerneltext.lines(data):
        for field in line.split()[1:]:
            key, sep, value = field.partition(b"=")
            if sep and key in sums:
                try:
                    sums[key] += int(value)
                except ValueError:
                    continue
    return IoTotals(
        read_bytes=sums[b"rbytes"],
        write_bytes=sums[b"wbytes"],
        discard_bytes=sums[b"dbytes"],
        reads=sums[b"rios"],
        writes=sums[b"wios"],
        discards=sums[b"dios"],
    )


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """What one cgroup's files said; None (or a missing key) where a file was unreadable."""

    exists: bool
    memory_current: int | None = None
    memory_swap_current: int | None = None
    memory_peak: int | None = None
    memory_stat: Mapping[str, int] | None = None
    memory_events: Mapping[str, int] | None = None
    pressure: Mapping[str, Pressure] | None = None  # resource -> totals, readable ones only
    cpu_stat: Mapping[str, int] | None = None
    pids_current: int | None = None
    io: IoTotals | None = None

    @property
    def working_set(self) -> int | None:
        """memory.current - inactive_file, floored at 0: what kubelet/cAdvisor call the
        working set (inactive page cache is the first thing reclaim takes)."""
        if self.memory_current is None or self.memory_stat is None:
            return None
        inactive = self.memory_stat.get("inactive_file")
        if inactive is None:
            return None
        return max(0, self.memory_current - inactive)

    def available(self) -> frozenset[str]:
        """The files of :data:`FILES` that were read."""
        have = {
            "memory.current": self.memory_current is not None,
            "memory.stat": self.memory_stat is not None,
            "memory.events": self.memory_events is not None,
            "memory.swap.current": self.memory_swap_current is not None,
            "memory.peak": self.memory_peak is not None,
            "cpu.stat": self.cpu_stat is not None,
            "pids.current": self.pids_current is not None,
            "io.stat": self.io is not None,
        }
        for resource in PRESSURE_RESOURCES:
            have[f"{resource}.pressure"] = bool(self.pressure and resource in self.pressure)
        return frozenset(k for k, v in have.items() if v)


_MISSING = CgroupStats(exists=False)


def read_cgroup(cgroup_root: str, path: str) -> CgroupStats:
    """Read the statistics files of the cgroup at ``path`` (e.g. ``/tenant.slice/...``)."""
    base = cgroup_root.rstrip("/") + "/" + path.strip("/") + "/"
    # The first read doubles as the existence check: a slice that does not
    # exist costs one failed open, not eleven.
    current = read_bytes(base + "memory.current")
    if current is None and not os.path.isdir(base):
        return _MISSING
    stat = read_bytes(base + "memory.stat")
    events = read_bytes(base + "memory.events")
    cpu = read_bytes(base + "cpu.stat")
    io = read_bytes(base + "io.stat")
    pressure: dict[str, Pressure] = {}
    for resource in PRESSURE_RESOURCES:
        raw = read_bytes(f"{base}{resource}.pressure")
        parsed = parse_pressure(raw) if raw is not None else None
        if parsed is not None:
            pressure[resource] = parsed
    return CgroupStats(
        exists=True,
        memory_current=parse_int(current),
        memory_swap_current=parse_int(read_bytes(base + "memory.swap.current")),
        memory_peak=parse_int(read_bytes(base + "memory.peak")),
        memory_stat=parse_flat_keyed(stat) if stat is not None else None,
        memory_events=parse_flat_keyed(events) if events is not None else None,
        pressure=pressure or None,
        cpu_stat=parse_flat_keyed(cpu) if cpu is not None else None,
        pids_current=parse_int(read_bytes(base + "pids.current")),
        io=parse_io_stat(io) if io is not None else None,
    )


def slice_cgroup_path(unit: str) -> str:
    """Where systemd puts a slice unit in the hierarchy: dashes nest.

    ``tenant-1001.slice`` -> ``/tenant.slice/tenant-1001.slice``;
    ``a-b-7.slice`` -> ``/a.slice/a-b.slice/a-b-7.slice``; ``-.slice`` -> ``/``.
    """
    if not unit.endswith(".slice"):
        raise ValueError(f"{unit!r} is not a slice")
    stem = unit[: -len(".slice")]
    if stem == "-":
        return "/"
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def detect_root(base: str = CGROUP_BASE) -> str | None:
    """The unified (v2) hierarchy: ``base`` itself, or ``base/unified`` on hybrid hosts.

    On a hybrid host the unified tree exists but the memory (and usually cpu,
    io, pids) controllers are bound to v1, so most files are missing there and
    their series absent; the "source available" gauges say so.
    """
    for root in (base, os.path.join(base, "unified")):
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            return root
    return None
