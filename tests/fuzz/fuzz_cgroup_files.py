#!/usr/bin/env python3
"""The cgroup v2 files nsd samples: memory.stat, memory.events and cpu.stat (flat keyed),
*.pressure (PSI), io.stat (nested keyed) and single values. Generated as the kernel
writes them, the parsers return exactly what was written; raw bytes never raise."""

from __future__ import annotations

from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd.observe import cgroupstats
KEYS = ["anon", "file", "kernel", "pgfault", "oom_kill", "usage_usec", "nr_throttled"]


def flat(fdp: Any) -> None:
    want = {k: fdp.ConsumeIntInRange(0, 2**64 - 1) for k in KEYS if fdp.ConsumeBool()}
    data = b"".join(b"%s %d\n" % (k.encode(), v) for k, v in want.items())
    assert cgroupstats.parse_flat_keyed(data) == want


def pressure(fdp: Any) -> None:
    some, full = (fdp.ConsumeIntInRange(0, 2**63) for _ in range(2))
    has_full = fdp.ConsumeBool()
    data = b"some avg10=1.00 avg60=0.50 avg300=0.10 total=%d\n" % some
    if has_full:
        data += b"full avg10=0.00 avg60=0.00 avg300=0.00 total=%d\n" % full
    got = cgroupstats.parse_pressure(data)
    assert got == cgroupstats.Pressure(some / 1e6, full / 1e6 if has_full else None)


def io_stat(fdp: Any) -> None:
    sums = dict.fromkeys(("rbytes", "wbytes", "rios", "wios", "dbytes", "dios"), 0)
    lines = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        fields = []
        for k in sums:
            v = fdp.ConsumeIntInRange(0, 2**64 - 1)
            sums[k] += v
            fields.append(b"%s=%d" % (k.encode(), v))
        lines.append(b"%d:%d " % (fdp.ConsumeIntInRange(0, 4095), fdp.ConsumeIntInRange(0, 2**20))
                     + b" ".join(fields))  # fmt: skip
    got = cgroupstats.parse_io_stat(b"".join(line + b"\n" for line in lines))
    assert (got.read_bytes, got.write_bytes, got.reads, got.writes, got.discard_bytes,
            got.discards) == tuple(sums[k] for k in ("rbytes", "wbytes", "rios", "wios",
                                                      "dbytes", "dios"))  # fmt: skip


def raw(data: bytes) -> None:
    assert all(isinstance(v, int) for v in cgroupstats.parse_flat_keyed(data).values())
    cgroupstats.parse_pressure(data)
    cgroupstats.parse_io_stat(data)
    value = cgroupstats.parse_value(data)
    assert value is None or isinstance(value, int | float)
    cgroupstats.parse_int(data)


def test_one_input(data: bytes) -> None:
    mode, rest = data[:1], data[1:]
    if mode in (b"", b"R"):
        raw(rest)
        return
    fdp = fuzzlib.provider(rest)
    {b"F": flat, b"P": pressure}.get(mode, io_stat)(fdp)


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
