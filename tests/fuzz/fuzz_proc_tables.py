#!/usr/bin/env python3
"""/proc/self/mountinfo (mount points a user chose: a FUSE mount may be at any path; the
kernel writes space, tab, "\\n" and "\\\\" as octal escapes) and /proc/net/dev
(interface names: any byte but NUL, "/", ":" and whitespace). The parsers find what
was written; raw bytes never raise."""

from __future__ import annotations

from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd import kerneltext
    from nsd.core import doctor
    from nsd.observe import procscan
OPTIONAL = [b"shared:5", b"master:3", b"shared:1 master:2", b"", b"propagate_from:2"]


def escape(path: bytes) -> bytes:
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


def expected(optional: bytes) -> str:
    if b"shared:" in optional:
        return "shared"
    return "slave" if b"master:" in optional else "private"


def mountinfo(fdp: Any) -> None:
    lines, mounts = [], []
    for i in range(fdp.ConsumeIntInRange(1, 6)):
        point = b"/" + fuzzlib.hostile_name(fdp, b"\0", 30)
        optional = fdp.PickValueInList(OPTIONAL)
        opt = optional + b" " if optional else b""
        lines.append(
            b"%d 1 0:%d / %s rw,relatime %s- fuse.x x rw" % (i + 20, i, escape(point), opt)
        )
        mounts.append((point, expected(optional)))
    data = b"".join(line + b"\n" for line in lines)
    for point, _ in mounts:
        last = [prop for p, prop in mounts if p == point][-1]
        assert doctor.parse_propagation(data, point) == last, (data, point)
        assert kerneltext.unescape_octal(escape(point)) == point


def net_dev(fdp: Any) -> None:
    names = {fuzzlib.hostile_name(fdp, b"\0/: \t\n\r\x0b\x0c", 15) for _ in range(3)}
    head = b"Inter-|   Receive  |  Transmit\n face |bytes packets|bytes packets\n"
    rows = b"".join(b"%6s: %s\n" % (n, b" ".join(b"%d" % i for i in range(16))) for n in names)
    got = procscan.parse_net_dev(head + rows)
    assert set(got) == {kerneltext.decode(n) for n in names}, (names, got)


def test_one_input(data: bytes) -> None:
    mode, rest = data[:1], data[1:]
    if mode == b"R":
        doctor.parse_propagation(rest, b"/run/netns")
        procscan.parse_net_dev(rest)
        kerneltext.unescape_octal(rest)
        return
    fdp = fuzzlib.provider(rest)
    (net_dev if mode == b"N" else mountinfo)(fdp)


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
