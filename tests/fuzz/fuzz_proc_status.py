#!/usr/bin/env python3
"""/proc/PID/status, /proc/PID/stat and /proc/PID/comm with a process name a tenant
chose (any byte but NUL, at most 15): status escapes "\\n" and "\\\\" in Name:, stat
prints it raw between parentheses. The parsers return the fields the kernel wrote;
raw bytes never raise."""

from __future__ import annotations

from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd import kerneltext
    from nsd.observe import procscan


def status(fdp: Any) -> None:
    comm = fuzzlib.hostile_name(fdp, b"\0", 15)
    escaped = comm.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
    ppid, ruid, euid = (fdp.ConsumeIntInRange(0, 2**32 - 1) for _ in range(3))
    rss_kb = fdp.ConsumeIntInRange(0, 2**40)
    thread = fdp.ConsumeBool()  # kernel threads and zombies have no VmRSS
    data = (
        b"Name:\t%s\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nNgid:\t0\nPid:\t7\n"
        b"PPid:\t%d\nTracerPid:\t0\nUid:\t%d\t%d\t%d\t%d\nGid:\t0\t0\t0\t0\n"
        % (escaped, ppid, ruid, euid, euid, euid)
    )
    if not thread:
        data += b"VmPeak:\t   1 kB\nVmRSS:\t%8d kB\nRssAnon:\t 1 kB\n" % rss_kb
    data += b"Threads:\t1\nvoluntary_ctxt_switches:\t3\n"
    expected = None if thread else (kerneltext.decode(escaped), ppid, ruid, euid, rss_kb * 1024)
    assert procscan.parse_status(data) == expected, (data, procscan.parse_status(data))


def stat(fdp: Any) -> None:
    comm = fuzzlib.hostile_name(fdp, b"\0", 15)
    flags = fdp.ConsumeIntInRange(0, 2**32 - 1)
    data = b"7 (%s) S 1 7 7 0 -1 %d 10 0 0 0 1 2 0 0 20 0 1 0 5 1000 100\n" % (comm, flags)
    fields = kerneltext.stat_fields(data)
    assert fields[0] == b"S" and int(fields[6]) == flags, (data, fields)


def test_one_input(data: bytes) -> None:
    mode, rest = data[:1], data[1:]
    if mode == b"R":
        procscan.parse_status(rest)
        kerneltext.stat_fields(rest)
        kerneltext.decode(rest).encode("utf-8")  # comm, cmdline: display form
        return
    fdp = fuzzlib.provider(rest)
    if mode == b"S":
        stat(fdp)
    else:
        status(fdp)


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
