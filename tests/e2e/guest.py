"""Helpers for the end-to-end tests that run inside the VM of ``scripts/vm-test``.

Everything here drives the installed system the way an operator would: real
commands (``systemctl``, ``systemd-run``, ``nsctl``, ``varlinkctl``, ``ping``)
through :func:`run`, and facts read from ``/proc`` and ``/sys``. Nothing imports
nsd: the tests see only what an operator sees.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# Where nsd's Debian package puts its programs (scripts/vm/prepare-guest installs
# it with apt, test_00_package.py checks it; the pip/venv install under /opt/nsd
# is for development only).
NSD = "/usr/sbin/nsd"
NSCTL = "/usr/bin/nsctl"
NSD_EXEC = "/usr/bin/nsd-exec"
NSD_ENSURE = "/usr/bin/nsd-ensure"
# The operator's copy of the packages (version N and N+1) and the local apt
# repository of what they depend on (scripts/vm/prepare-guest, build-repo).
DEBS = Path("/var/local/nsd-e2e/debs")
SOCKET = "/run/nsd/io.nsd.Tenant"
NETNS_DIR = Path("/run/netns")
# Test users made by scripts/vm/prepare-guest; web-shop has a dash, which in a
# slice name would mean nesting.
TENANTS = ("alice", "bob", "web-shop")
# The VM's nsd runs with systemd.parent_slice = "user.slice" (written into the
# packaged /etc/nsd/nsd.toml by test_00_package.py): one budget per tenant, shared with its logins
# (docs/logins.md). The nspawn tier (tests/systemd) covers the default tenant.slice.
PARENT_SLICE = "user.slice"
# Scratch space of one boot, readable by the test users.
SCRATCH = Path("/run/nsd-e2e")

# Set by the guest runner (scripts/vm/guest/nsd-e2e-run).
PHASE = os.environ.get("NSD_E2E_PHASE", "")
STATE_FILE = Path(os.environ.get("NSD_E2E_STATE", "/var/lib/nsd-e2e/state.json"))

T = TypeVar("T")


def run(
    *cmd: str, check: bool = True, timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure (``check``) the assertion shows its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and p.returncode != 0:
        raise AssertionError(
            f"`{shlex.join(cmd)}` exited {p.returncode}\n"
            f"--- stdout\n{p.stdout}--- stderr\n{p.stderr}"
        )
    return p


def apt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``apt-get -y ARGS`` in the directory of the packages, non-interactively, keeping
    the operator's configuration files (``--force-confold``) as an upgrade by hand would."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LANG="C.UTF-8")
    return run("apt-get", "-y", "-o", "Dpkg::Options::=--force-confold", *args,
               timeout=timeout, cwd=DEBS, env=env)  # fmt: skip


def package_files() -> tuple[Path, Path]:
    """nsd's .deb, version N and N+1 (scripts/build-deb and its --version)."""
    debs = sorted(DEBS.glob("nsd_*.deb"))
    assert len(debs) == 2, debs
    a, b = debs
    older = run("dpkg", "--compare-versions", version_of(a), "lt", version_of(b), check=False)
    return (a, b) if older.returncode == 0 else (b, a)


def version_of(deb: Path) -> str:
    return run("dpkg-deb", "-f", str(deb), "Version").stdout.strip()


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, None unless it is installed (not just
    configuration files left after a remove)."""
    p = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", package, check=False)
    status, _, version = p.stdout.partition(" ")
    return version.strip() if p.returncode == 0 and status.strip() == "ii" else None


def nsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(NSCTL, *args, check=check)


def tenant(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(nsctl("--json", "show", name).stdout)
    return data


def tenants() -> dict[str, dict[str, Any]]:
    """``nsctl --json list`` keyed by tenant name."""
    return {t["name"]: t for t in json.loads(nsctl("--json", "list").stdout)}


def show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show UNIT -p A,B,...`` as a dict."""
    out = run("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def is_active(unit: str) -> str:
    return run("systemctl", "is-active", unit, check=False).stdout.strip()


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def wait_active(unit: str, timeout: float = 60) -> dict[str, str]:
    """Wait until ``unit`` is active/running (for Type=notify: READY=1 arrived)."""

    def state() -> dict[str, str] | None:
        s = show(unit, "ActiveState", "SubState", "MainPID")
        return s if (s["ActiveState"], s["SubState"]) == ("active", "running") else None

    return wait_for(state, f"{unit} to be active/running", timeout)


def inode(path: str | Path) -> int:
    """Inode of what ``path`` points at (for /proc/PID/ns/net: the namespace)."""
    return os.stat(path).st_ino


def netns_inode_of(pid: int) -> int:
    return inode(f"/proc/{pid}/ns/net")


def mounted_netns() -> set[str]:
    """Names of the namespace files under /run/netns that are mount points (nsfs)."""
    names = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            point = Path(fields[4])
            if fstype == "nsfs" and point.parent == NETNS_DIR:
                names.add(point.name)
    return names


def ping(address: str, *, netns: str | None = None, count: int = 2) -> None:
    """Ping ``address`` from the host, or from inside tenant namespace ``netns``."""
    cmd = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "3", address]
    if netns is not None:
        cmd = ["nsenter", f"--net={NETNS_DIR / netns}", *cmd]
    run(*cmd, timeout=30)


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def slice_of(user: str) -> str:
    """The tenant's slice unit, as nsd names it (names.slice_name)."""
    return f"{PARENT_SLICE.removesuffix('.slice')}-{uid_of(user)}.slice"


def slice_cgroup(user: str) -> str:
    """The tenant slice's cgroup path, e.g. /user.slice/user-1001.slice."""
    return f"/{PARENT_SLICE}/{slice_of(user)}"


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cgroup_procs(unit: str) -> list[int]:
    """PIDs in the cgroup of a system service (cgroup v2)."""
    cgroup = show(unit, "ControlGroup")["ControlGroup"]
    text = Path(f"/sys/fs/cgroup{cgroup}/cgroup.procs").read_text(encoding="utf-8")
    return [int(x) for x in text.split()]


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()


def load_state() -> dict[str, Any]:
    """What phase 1 recorded for phase 2 (see test_90_reboot.py)."""
    data: dict[str, Any] = json.loads(STATE_FILE.read_text(encoding="utf-8"))
    return data


def save_state(data: dict[str, Any]) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, STATE_FILE)


def systemd_run(unit: str, *cmd: str, properties: tuple[str, ...] = ()) -> int:
    """Start ``cmd`` as transient service ``unit`` (Type=exec); returns its MainPID."""
    props = [arg for p in ("Type=exec", *properties) for arg in ("-p", p)]
    run("systemd-run", "--quiet", f"--unit={unit}", *props, *cmd)
    pid = int(show(unit, "MainPID")["MainPID"])
    assert pid > 0, f"{unit} has no main process"
    return pid


def stop_unit(unit: str) -> None:
    """Stop ``unit`` if it exists; forget it if it failed (transient units linger then)."""
    run("systemctl", "stop", unit, check=False)
    run("systemctl", "reset-failed", unit, check=False)
