#!/usr/bin/env python3
"""/proc/PID/cgroup as the kernel prints it on v2, hybrid and v1 hosts, with cgroup
names a tenant chose (any byte but NUL, "/" and "\\n"): the parser returns exactly the
path of the 0:: line (else the first name=systemd line), the slice lookup finds the
nearest enclosing tenant slice and ends, and the display form is valid UTF-8.
Raw bytes too: no exception, nothing returned that is not an absolute path."""

from __future__ import annotations

from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd import kerneltext
    from nsd.observe import procscan
CONTROLLERS = [b"cpu", b"memory", b"pids", b"name=systemd", b"cpu,cpuacct", b"net_cls,net_prio",
               b"misc", b"rdma", b""]  # fmt: skip
TENANT = procscan.ScanTenant(1001, "/tenant.slice/tenant-1001.slice", None)


def path(fdp: Any) -> bytes:
    parts = [fuzzlib.hostile_name(fdp, b"\0/\n") for _ in range(fdp.ConsumeIntInRange(0, 5))]
    return b"/" + b"/".join(parts)


def structured(fdp: Any) -> None:
    lines, v1_systemd = [], None
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        controllers = fdp.PickValueInList(CONTROLLERS) or b"cpu"
        p = path(fdp)
        lines.append(b"%d:%s:%s" % (fdp.ConsumeIntInRange(1, 15), controllers, p))
        if controllers == b"name=systemd" and v1_systemd is None:
            v1_systemd = p
    v2 = path(fdp) if fdp.ConsumeBool() else None
    if v2 is not None:
        lines.append(b"0::" + v2)
    data = b"".join(line + b"\n" for line in lines)
    got = kerneltext.cgroup_path(data)
    assert got == (v2 if v2 is not None else v1_systemd), (data, got)
    if got is None:
        return
    kerneltext.decode(got).encode("utf-8")
    # Slices at some of the path's own ancestors, and elsewhere.
    ancestors = list(kerneltext.ancestors(got))
    slices = {
        a: procscan.ScanTenant(i, "", None) for i, a in enumerate(ancestors) if fdp.ConsumeBool()
    }
    slices[path(fdp)] = TENANT
    nearest = next((slices[a] for a in ancestors if a in slices), None)
    assert procscan._slice_owner(got, slices) is nearest


def raw(data: bytes) -> None:
    got = kerneltext.cgroup_path(data)
    if got is not None:
        assert got.startswith(b"/") and b"\n" not in got
        assert len(list(kerneltext.ancestors(got))) <= got.count(b"/")
        assert procscan._slice_owner(got, {b"/tenant.slice": TENANT}) in (None, TENANT)
    procscan.parse_cgroup(data)


def test_one_input(data: bytes) -> None:
    if data[:1] == b"R":
        raw(data[1:])
    else:
        structured(fuzzlib.provider(data))


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
