"""Issue 20: the /proc and cgroupfs parsers with fields a tenant controls (any byte the
kernel allows in a process name or a cgroup name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsd import kerneltext
from nsd.core import doctor
from nsd.net import procs
from nsd.observe import cgroupstats, procscan

SLICE = b"/tenant.slice/tenant-1001.slice"
V1 = b"12:pids:/user.slice\n9:name=systemd:/user.slice/user-1000.slice/x\r0::" + SLICE + b"\n"


def test_carriage_return_does_not_forge_the_v2_line() -> None:
    hybrid = V1 + b"0::/user.slice/user-1000.slice/x\r0::" + SLICE + b"\n"
    # bytes.splitlines() sees "0::/tenant.slice/..." first: the old parser's answer.
    assert next(ln for ln in hybrid.splitlines() if ln.startswith(b"0::")) == b"0::" + SLICE
    assert kerneltext.cgroup_path(hybrid) == b"/user.slice/user-1000.slice/x\r0::" + SLICE
    # No v2 line (v1-only host): the name=systemd line, whole.
    assert kerneltext.cgroup_path(V1) == b"/user.slice/user-1000.slice/x\r0::" + SLICE
    assert procscan.parse_cgroup(V1) == "/user.slice/user-1000.slice/x\r0::" + SLICE.decode()


@pytest.mark.parametrize(
    "data",
    [
        b"0::abc\n",  # not absolute: no line of the kernel's
        b"x::/a\n",  # the ID is not decimal
        b"0:/a\n",  # one ":" only
        b"",
        b"\n\n\n",
    ],
)
def test_lines_the_kernel_does_not_print_are_not_paths(data: bytes) -> None:
    assert kerneltext.cgroup_path(data) is None


def test_slice_lookup_ends_on_any_path() -> None:
    tenant = procscan.ScanTenant(1001, SLICE.decode(), None)
    by_slice = {SLICE: tenant}
    for path in (b"abc", b"x\r0::abc", b"//", b"/a//b", b"a/b/c", b"/"):
        assert procscan._slice_owner(path, by_slice) is None
    assert procscan._slice_owner(SLICE + b"/x\rq.scope/y", by_slice) is tenant
    assert procscan._slice_owner(SLICE + b"x", by_slice) is None
    assert list(kerneltext.ancestors(b"/a/b/c")) == [b"/a/b/c", b"/a/b", b"/a"]
    assert list(kerneltext.ancestors(b"abc")) == [b"abc"]


def test_decode_policy_is_valid_utf8_and_keeps_utf8() -> None:
    assert kerneltext.decode(b"caf\xc3\xa9") == "café"
    shown = kerneltext.decode(b"/a\xff\xfe\r")
    assert shown == "/a\\xff\\xfe\r"
    shown.encode("utf-8")  # never a lone surrogate: JSON replies and logs can carry it


def test_status_with_any_name() -> None:
    status = b"Name:\t%s\nUmask:\t0022\nPPid:\t1\nUid:\t1001\t1001\t1001\t1001\nVmRSS:\t4 kB\n"
    for comm, shown in ((b"a\rb", "a\rb"), (b"\xff\xfe", "\\xff\\xfe"), (b"x\\\\n", "x\\\\n")):
        assert procscan.parse_status(status % comm) == (shown, 1, 1001, 1001, 4096)
    # A name cannot forge a field: the kernel escapes "\n" in it.
    assert procscan.parse_status(b"Name:\tVmRSS: 1") is None


def test_stat_fields_after_the_last_parenthesis() -> None:
    assert kerneltext.stat_fields(b"7 (a) b\n) c) S 1 7 7 0 -1 2097152 0\n")[:7] == [
        b"S", b"1", b"7", b"7", b"0", b"-1", b"2097152",
    ]  # fmt: skip
    assert kerneltext.stat_fields(b"no parenthesis") == []


def test_kernel_thread_flag_read_past_a_hostile_comm(tmp_path: Path) -> None:
    (tmp_path / "5").mkdir()
    stat = tmp_path / "5" / "stat"
    stat.write_bytes(b"5 (x) S 1 2 3 4 5 0 (y) R 2 2 2 2 0 2097152 0 0\n")
    assert procs._is_kernel_thread(str(tmp_path), 5)
    stat.write_bytes(b"5 (\xff\n) S 1 2 3 4 5 0\n")
    assert not procs._is_kernel_thread(str(tmp_path), 5)


def test_flat_keyed_files_split_at_newline_only() -> None:
    data = b"anon 4096\rfile 8192\nfile_dirty 1\n\xff 3\nshort\n"
    # "anon 4096\rfile 8192" is one line of three fields: skipped, not read as two.
    assert cgroupstats.parse_flat_keyed(data) == {"file_dirty": 1}
    psi = b"some avg10=0.00 avg60=0.00 avg300=0.00 total=5000000\nfull total=x\nfull"
    assert cgroupstats.parse_pressure(psi) == cgroupstats.Pressure(5.0, None)
    io = b"8:0 rbytes=1 wbytes=2 rios=3\n8:16 rbytes=10 dbytes=x rbytes =5\n\n"
    assert cgroupstats.parse_io_stat(io).read_bytes == 11


def test_mountinfo_paths_are_bytes_with_escapes_undone() -> None:
    line = b"36 35 0:30 / %s rw,relatime shared:5 - tmpfs tmpfs rw\n"
    data = (
        line % b"/run/netns"
        + b"37 35 0:31 / /home/u/\\134x\xff\\040y rw master:1 - fuse fuse rw\n"
        + b"garbage\n"
        + b"38 35 0:32 / /no/separator rw\n"
    )
    assert doctor.parse_propagation(data, b"/run/netns") == "shared"
    assert doctor.parse_propagation(data, b"/home/u/\\x\xff y") == "slave"
    assert doctor.parse_propagation(data, b"/no/separator") is None
    assert kerneltext.unescape_octal(b"a\\011b\\12\\999\\") == b"a\tb\\12\\999\\"


def test_net_dev_names_decoded_by_the_policy() -> None:
    head = b"Inter-|   Receive\n face |bytes\n"
    row = b" nsd\xff1: 1 2 3 4 0 0 0 0 5 6 7 8 0 0 0 0\n"
    devs = procscan.parse_net_dev(head + row + b"bad: 1 2\n")
    assert list(devs) == ["nsd\\xff1"] and devs["nsd\\xff1"].tx_bytes == 5


def test_cgroup_walk_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """A delegated subtree may nest cgroups deeper than Python's recursion limit
    (os.walk recursed in 3.11); names are the tenant's, shown by the decode policy."""
    import os
    import sys

    from nsd.observe import faults
    from nsd.systemd import cgroup

    depth = sys.getrecursionlimit() + 100
    levels = [tmp_path.joinpath(*["d"] * i) for i in range(1, depth + 1)]
    try:
        for level in levels:
            level.mkdir()
        (levels[-1] / "cgroup.procs").write_text(f"{os.getpid()}\n")
        assert cgroup.pids_in("", roots=(str(tmp_path),)) == [os.getpid()]
        odd = tmp_path / os.fsdecode(b"x\r\xff")
        odd.mkdir()
        (odd / "cgroup.procs").write_text(f"{os.getpid()}\n")
        samples = faults.snapshot_processes(str(tmp_path), 10)
        assert [s.cgroup for s in samples if s.cgroup.startswith("/x")] == ["/x\r\\xff"]
    finally:
        # Bottom up, here: pytest's clean-up of old temp dirs uses shutil.rmtree, which
        # recurses in 3.11 too and would fail a later session on this tree.
        (levels[-1] / "cgroup.procs").unlink(missing_ok=True)
        for level in reversed(levels):
            if level.exists():
                level.rmdir()
