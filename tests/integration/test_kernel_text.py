"""Issue 20 against the real kernel: cgroup names a tenant could choose, printed raw in
/proc/PID/cgroup, must neither fool the parser nor hang the scan.

The cgroups are made under a test-unique directory of this host's hierarchies (hybrid:
v1 name=systemd plus a v2 mount; or pure v2), hold one `sleep` started by the test, and
are removed afterwards, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from nsd import kerneltext
from nsd.observe import procscan
from nsd.observe.cgroupstats import detect_root
from tests.harness import unique

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes cgroups and moves a process"),
]

V1_SYSTEMD = b"/sys/fs/cgroup/systemd"
TENANT_UID = 3_999_123  # no user needed: the scan goes by the process's UID


@contextlib.contextmanager
def process_in(root: bytes, path: bytes) -> Iterator[int]:
    """A `sleep` running as TENANT_UID inside the cgroup ``root + path`` (made here)."""
    parts = [p for p in path.split(b"/") if p]
    made: list[bytes] = []
    proc = subprocess.Popen(["setpriv", f"--reuid={TENANT_UID}", "sleep", "600"])
    try:
        wait_for_exec(proc.pid, b"sleep")
        directory = root
        for part in parts:
            directory += b"/" + part
            os.mkdir(directory)
            made.append(directory)
        with open(directory + b"/cgroup.procs", "w") as f:
            f.write(str(proc.pid))
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        for directory in reversed(made):
            # The killed process leaves its cgroup asynchronously; rmdir says EBUSY
            # until it has. Retrying is bounded by the kernel's own exit path.
            for _ in range(1000):
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    os.sched_yield()


def wait_for_exec(pid: int, comm: bytes) -> None:
    """Until setpriv has dropped to TENANT_UID and exec'd ``comm``: a scan before that
    sees a root-owned `setpriv`, neither a helper nor the tenant's process."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/comm", "rb") as f:
            if f.read().rstrip(b"\n") == comm:
                return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} did not exec {comm!r} within 30 s")


def scan_with_deadline(tenants: list[procscan.ScanTenant], helpers: tuple[str, ...]) -> object:
    """procscan.scan in a thread: a parser that loops fails the test instead of hanging it."""
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(procscan.scan(tenants, helpers)))
    worker.daemon = True  # a looping scan must not keep pytest from exiting
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "procscan.scan did not return (a parser loops)"
    return result[0]


@pytest.mark.skipif(
    not os.path.isdir(V1_SYSTEMD),
    reason="needs a hybrid cgroup layout (v1 name=systemd lines before the 0:: line)",
)
def test_carriage_return_in_a_cgroup_name_does_not_forge_a_line() -> None:
    slice_path = f"/tenant.slice/tenant-{TENANT_UID}.slice"
    forged = b"/" + unique("nsdt").encode() + b"/x\r0::" + slice_path.encode()
    with process_in(V1_SYSTEMD, forged) as pid:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            data = f.read()
        # The kernel printed the name raw: bytes.splitlines() would see a "0::" line
        # naming the tenant's slice before the real one.
        assert b"\r0::" + slice_path.encode() + b"\n" in data
        assert any(line == b"0::" + slice_path.encode() for line in data.splitlines())
        real_v2 = next(line[3:] for line in data.split(b"\n") if line.startswith(b"0::"))
        assert kerneltext.cgroup_path(data) == real_v2 != slice_path.encode()
        tenant = procscan.ScanTenant(TENANT_UID, slice_path, None)
        scan = scan_with_deadline([tenant], ())
        assert isinstance(scan, procscan.ProcScan)
        classes = scan.tenants[TENANT_UID].classes
        assert classes[procscan.CONTAINED] == 0
        assert classes[procscan.OUTSIDE_SLICE] == 1
        (record,) = [r for r in scan.findings if r.pid == pid]
        assert record.reason == procscan.OUTSIDE_SLICE and record.cgroup is not None


def test_cgroup_path_without_a_slash_cannot_stop_the_scan() -> None:
    root = detect_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy on this host")
    # Under the old parser "x\r0::abc" gave the path "abc", and the helper's slice
    # lookup cut at a "/" that never came.
    name = b"/" + unique("nsdt").encode() + b"/x\r0::abc"
    with process_in(root.encode(), name) as pid:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            path = kerneltext.cgroup_path(f.read())
        assert path is not None and path.endswith(b"/x\r0::abc")
        tenant = procscan.ScanTenant(TENANT_UID, f"/tenant.slice/tenant-{TENANT_UID}.slice", None)
        scan = scan_with_deadline([tenant], ("sleep",))
        assert isinstance(scan, procscan.ProcScan)
        (record,) = [r for r in scan.findings if r.pid == pid]
        # A helper by name, owned by UID; the path is shown with the policy's decoding.
        assert record.reason == procscan.HELPER and record.tenant_uid == TENANT_UID
        assert record.cgroup == kerneltext.decode(path) and record.cgroup.endswith("x\r0::abc")
