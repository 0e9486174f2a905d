"""Logins and cron jobs of a tenant through pam_nsd (phase 1).

PAM is configured the way docs/logins.md tells an operator of the package:
``pam-auth-update --enable nsd`` (the package's profile puts ``pam_nsd.so``
into common-session after pam_systemd, so sshd and su get it) and, since cron's
stack includes common-session-noninteractive instead, the documented line at
the end of /etc/pam.d/cron by hand. nsd runs with ``systemd.parent_slice =
"user.slice"`` (one budget per tenant, test_00_package.py). The tests log in as
alice with key authentication and through su, run cron jobs as alice, and
compare with the profile disabled or the line taken out: the same processes, in
the host's namespace. Figures (process counts, RSS of the privileged
sshd-session, login latency, OOM count) go to the results.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    NETNS_DIR,
    inode,
    nsctl,
    run,
    show,
    slice_cgroup,
    slice_of,
    stop_unit,
    systemd_run,
    tenant,
    uid_of,
    wait_active,
    wait_for,
)

pytestmark = pytest.mark.phase1

MODULE = "pam_nsd.so"
# The line docs/logins.md gives for /etc/pam.d/cron (and for stacks that
# pam-auth-update does not manage).
PAM_LINE = f"session required {MODULE}"
SSHD_PAM = Path("/etc/pam.d/sshd")
CRON_PAM = Path("/etc/pam.d/cron")
COMMON_SESSION = Path("/etc/pam.d/common-session")
SSH = ("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
       "-i", "/root/.ssh/id_ed25519")  # fmt: skip
PROBE = Path("/usr/local/lib/nsd-e2e-probe.py")
CRON_DIR = Path("/home/alice/cron-probes")
BACKEND_PORT = 8088
BACKEND = "e2e-alice-backend.service"

# Runs inside the login or job: where it is, what it can reach, its ancestors.
PROBE_SOURCE = r"""
import json, os, socket, sys, time

def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(l.rstrip("\n").split(":\t", 1) for l in f if ":\t" in l)

def reach(host):
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=3).close()
        return True
    except OSError:
        return False

chain, pid = [], os.getpid()
while pid > 1:
    s = status(pid)
    chain.append({"pid": pid, "comm": s["Name"], "uid": int(s["Uid"].split()[0]),
                  "rssKib": int(s.get("VmRSS", "0 kB").split()[0])})
    pid = int(s["PPid"])
cgroup = open("/proc/self/cgroup").read().strip().split(":", 2)[2]
out = {
    "netns": os.stat("/proc/self/ns/net").st_ino,
    "cgroup": cgroup,
    "cgroupProcs": len(open(f"/sys/fs/cgroup{cgroup}/cgroup.procs").read().split()),
    "chain": chain,
    "reach": {h: reach(h) for h in sys.argv[2:]},
    "started": time.time(),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def setup(tenants_ready: dict[str, Any]) -> Iterator[None]:
    """PAM as the operator configures it, the probe, alice's backend and her
    crontab (cron runs it from the next minute on, while the ssh tests run)."""
    pam_profile(enabled=True)
    set_pam(CRON_PAM, PAM_LINE)
    PROBE.write_text(PROBE_SOURCE)
    PROBE.chmod(0o644)
    CRON_DIR.mkdir(exist_ok=True)
    os.chown(CRON_DIR, uid_of("alice"), uid_of("alice"))
    job = "* * * * * /usr/bin/python3 /usr/local/lib/nsd-e2e-probe.py 1 " \
          "> $HOME/cron-probes/new.tmp && mv $HOME/cron-probes/new.tmp " \
          "$HOME/cron-probes/$(date +\\%s).json\n"  # fmt: skip
    run("crontab", "-u", "alice", "-", input=job)
    systemd_run(BACKEND, "/usr/bin/python3", "-m", "http.server", "--bind", "0.0.0.0",
                str(BACKEND_PORT), "--directory", "/tmp",
                properties=(f"NetworkNamespacePath={NETNS_DIR / 'alice'}", "User=alice",
                            f"Slice={slice_of('alice')}"))  # fmt: skip
    try:
        yield
    finally:
        run("crontab", "-u", "alice", "-r", check=False)
        stop_unit(BACKEND)
        # Left on, as an operator leaves it (later tests and phase 2 run with it).
        set_pam(SSHD_PAM, None)
        pam_profile(enabled=True)
        set_pam(CRON_PAM, PAM_LINE)


def pam_profile(*, enabled: bool) -> None:
    """``pam-auth-update --enable/--disable nsd``: the package's profile
    (/usr/share/pam-configs/nsd) in or out of common-session."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run("pam-auth-update", "--enable" if enabled else "--disable", "nsd", env=env)
    modules = [line.split()[2] for line in session_lines(COMMON_SESSION)]
    if enabled:
        # After pam_systemd (docs/logins.md: it must see the session scope).
        assert MODULE in modules and "pam_systemd.so" in modules, modules
        assert modules.index("pam_systemd.so") < modules.index(MODULE), modules
    else:
        assert MODULE not in modules, modules
    # Interactive only: cron's common-session-noninteractive never gets it.
    assert MODULE not in Path("/etc/pam.d/common-session-noninteractive").read_text()


def session_lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.split()[:1] == ["session"]]


def set_pam(path: Path, line: str | None) -> None:
    """Put a pam_nsd line by hand (or none): at the end of cron's stack, right
    after ``@include common-session`` in sshd's (docs/logins.md)."""
    lines = [x for x in path.read_text().splitlines() if MODULE not in x]
    if line is not None:
        if path == SSHD_PAM:
            at = lines.index("@include common-session") + 1
            lines.insert(at, line)
        else:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")


@contextmanager
def without_profile() -> Iterator[None]:
    pam_profile(enabled=False)
    try:
        yield
    finally:
        pam_profile(enabled=True)


@contextmanager
def pam_line(path: Path, line: str | None) -> Iterator[None]:
    set_pam(path, line)
    try:
        yield
    finally:
        set_pam(path, PAM_LINE if path == CRON_PAM else None)


def ssh(user: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*SSH, f"{user}@localhost", *command, check=check, timeout=120)


def probe_login(user: str, *reach: str) -> tuple[dict[str, Any], float]:
    """Log in, run the probe; its report and the wall time of the whole login."""
    start = time.monotonic()
    out = ssh(user, "/usr/bin/python3", str(PROBE), str(BACKEND_PORT), *reach).stdout
    return json.loads(out), time.monotonic() - start


def below(chain: list[dict[str, Any]], main_pid: int) -> list[dict[str, Any]]:
    """The processes between a service's main process (exclusive) and the probe."""
    pids = [p["pid"] for p in chain]
    assert main_pid in pids, (main_pid, chain)
    return chain[: pids.index(main_pid)]


def host_netns() -> int:
    return os.stat("/proc/1/ns/net").st_ino


def running(command: str) -> None:
    """Wait until alice runs ``command`` (the login behind it is complete)."""
    wait_for(lambda: run("pgrep", "-u", "alice", "-fx", command, check=False).returncode == 0,
             f"alice's {command!r}", timeout=60)  # fmt: skip


def journal(tag: str = "pam_nsd") -> str:
    return run("journalctl", "-b", "--no-pager", "-o", "cat", "-t", tag).stdout


def test_ssh_login_joins_the_tenants_namespace_and_slice(figures: dict[str, Any]) -> None:
    t = tenant("alice")
    ssh_main = int(show("ssh.service", "MainPID")["MainPID"])
    probes = [probe_login("alice", t["ipv4Address"], "127.0.0.1") for _ in range(3)]
    report = probes[-1][0]
    assert report["netns"] == inode(NETNS_DIR / "alice") == t["namespaceInode"]
    # pam_systemd put the login into its session scope, which under one budget
    # per tenant is inside the tenant's slice; pam_nsd left it there.
    assert report["cgroup"].startswith(f"{slice_cgroup('alice')}/session-"), report
    assert report["reach"] == {t["ipv4Address"]: True, "127.0.0.1": True}, report
    assert "sshd: alice: joined namespace /run/netns/alice" in journal()

    with without_profile():
        plain = [probe_login("alice", t["ipv4Address"], "127.0.0.1") for _ in range(3)]
    bare = plain[-1][0]
    assert bare["netns"] == host_netns()
    assert bare["reach"]["127.0.0.1"] is False  # the backend is in alice's namespace only

    with_module = below(report["chain"], ssh_main)
    without = below(bare["chain"], ssh_main)
    priv = [p for p in with_module if p["uid"] == 0]
    priv_bare = [p for p in without if p["uid"] == 0]
    figures["ssh_login"] = {
        "processes_below_sshd_with_module": len(with_module),
        "processes_below_sshd_without_module": len(without),
        "session_scope_processes_with_module": report["cgroupProcs"],
        "session_scope_processes_without_module": bare["cgroupProcs"],
        "chain_with_module": [p["comm"] for p in with_module],
        "priv_rss_kib_with_module": [p["rssKib"] for p in priv],
        "priv_rss_kib_without_module": [p["rssKib"] for p in priv_bare],
        "login_seconds_median_with_module": round(statistics.median(s for _, s in probes), 3),
        "login_seconds_median_without_module": round(statistics.median(s for _, s in plain), 3),
    }
    # What the module brings into sshd's privileged process: libpam and json-c, no interpreter.
    module = next(Path("/usr/lib").glob(f"*/security/{MODULE}"))
    figures["ssh_login"]["pam_nsd_links"] = [
        line.split()[0] for line in run("ldd", str(module)).stdout.splitlines() if "=>" in line
    ]
    # No process added: the same chain of processes, the same session scope.
    assert [p["comm"] for p in with_module] == [p["comm"] for p in without]
    assert report["cgroupProcs"] == bare["cgroupProcs"]


def su_probe(user: str) -> dict[str, Any]:
    """``su - USER`` from root (this payload is a system service, not a login),
    running the probe."""
    out = run("su", "-", user, "-c", f"/usr/bin/python3 {PROBE} {BACKEND_PORT} 127.0.0.1",
              timeout=120).stdout  # fmt: skip
    report: dict[str, Any] = json.loads(out)
    return report


def test_su_joins_the_tenants_namespace(figures: dict[str, Any]) -> None:
    """su's stack includes common-session: the profile reaches it too."""
    assert "@include common-session" in Path("/etc/pam.d/su").read_text().splitlines()
    report = su_probe("alice")
    assert report["netns"] == inode(NETNS_DIR / "alice"), report
    assert report["reach"] == {"127.0.0.1": True}, report  # alice's backend, on her lo
    assert "su-l: alice: joined namespace /run/netns/alice" in journal()
    with without_profile():
        bare = su_probe("alice")
    assert bare["netns"] == host_netns(), bare
    assert bare["reach"] == {"127.0.0.1": False}, bare
    figures["su_login"] = {"cgroup_with_profile": report["cgroup"],
                           "cgroup_without_profile": bare["cgroup"]}  # fmt: skip


def test_login_allocation_past_the_tenants_limit_is_oom_killed(figures: dict[str, Any]) -> None:
    d = Path("/sys/fs/cgroup" + slice_cgroup("alice"))
    previous = (d / "memory.max").read_text().strip()

    def oom_kills() -> int:
        events = (d / "memory.events").read_text().splitlines()
        return int(dict(x.split() for x in events)["oom_kill"])

    nsctl("limits", "alice", "--memory-max", "96M", "--memory-swap-max", "0")
    try:
        before = oom_kills()
        hog = "b = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
        # Through a shell that reports the status: ssh itself exits 255 when the
        # remote command dies from a signal.
        res = ssh("alice", f"/usr/bin/python3 -c {shlex.quote(hog)}; echo status=$?")
        assert res.stdout.split()[-1] == f"status={128 + 9}", res.stdout  # SIGKILL
        after = oom_kills()
        assert after > before
        figures["login_oom_kills"] = {"before": before, "after": after}
        # nsd's own view (GetUsage, sampled) counts it too.
        counted = wait_for(
            lambda: (n := _oom(json.loads(nsctl("--json", "top", "alice").stdout))) >= after and n,
            "nsd's usage to count the OOM kill", timeout=40,
        )  # fmt: skip
        figures["login_oom_kills"]["nsd_usage"] = counted
    finally:
        limit = "infinity" if previous == "max" else previous
        nsctl("limits", "alice", "--memory-max", limit, "--reset", "memorySwapMax")


def _oom(usage: dict[str, Any]) -> int:
    """oomKills of the one tenant in a GetUsage reply (``nsctl --json top USER``)."""
    return int(usage["tenants"][0].get("oomKills") or 0)


def _cron_report(after: float, timeout: float = 130) -> dict[str, Any]:
    """The first cron probe that started after ``after``."""

    def found() -> dict[str, Any] | None:
        for f in sorted(CRON_DIR.glob("*.json")):
            data: dict[str, Any] = json.loads(f.read_text())
            if data["started"] > after:
                return data
        return None

    report = wait_for(found, "a cron job of alice to run", timeout=timeout)
    assert report is not None
    return report


def test_cron_job_runs_in_the_tenants_namespace_and_slice(figures: dict[str, Any]) -> None:
    cron_main = int(show("cron.service", "MainPID")["MainPID"])
    job = _cron_report(0)
    assert job["netns"] == inode(NETNS_DIR / "alice"), job
    # cron has no pam_systemd: pam_nsd asked nsd to move the job's process into a
    # scope in the tenant's slice.
    assert job["cgroup"].startswith(f"{slice_cgroup('alice')}/nsd-enter-"), job
    assert "cron: alice: joined namespace /run/netns/alice" in journal()

    with pam_line(CRON_PAM, None):
        bare = _cron_report(time.time())
    assert bare["netns"] == host_netns()
    assert bare["cgroup"] == "/system.slice/cron.service", bare
    with_module, without = below(job["chain"], cron_main), below(bare["chain"], cron_main)
    figures["cron_job"] = {
        "processes_below_cron_with_module": len(with_module),
        "processes_below_cron_without_module": len(without),
        "chain_with_module": [p["comm"] for p in with_module],
        "scope_processes_with_module": job["cgroupProcs"],
    }
    assert [p["comm"] for p in with_module] == [p["comm"] for p in without]
    # The scope holds the job's processes only: cron's child, the shell, the probe.
    assert job["cgroupProcs"] == len(with_module)


def test_nsd_stopped_skip_then_deny(figures: dict[str, Any]) -> None:
    run("systemctl", "stop", "nsd.socket", "nsd.service")
    try:
        report, _ = probe_login("alice")
        assert report["netns"] == host_netns()  # unreachable=skip (the default)
        assert "alice: nsd unavailable" in journal()
        assert "login continues OUTSIDE the tenant's namespace (unreachable=skip)" in journal()
        # The profile takes no arguments: a host that wants deny writes the line
        # itself (docs/logins.md) instead of the profile.
        with without_profile(), pam_line(SSHD_PAM, PAM_LINE + " unreachable=deny"):
            res = ssh("alice", "echo logged-in", check=False)
            assert res.returncode != 0 and "logged-in" not in res.stdout, res
            assert "login denied (unreachable=deny)" in journal()
            # Root is never sent to nsd: it can log in to repair things.
            assert ssh("root", "true").returncode == 0
        figures["pam_nsd_journal"] = [
            line for line in journal().splitlines() if "unavailable" in line
        ][-2:]
    finally:
        run("systemctl", "start", "nsd.socket", "nsd.service")
        wait_active("nsd.service")


def test_audit_flags_a_login_left_in_the_host_namespace(figures: dict[str, Any]) -> None:
    """A login that pam_nsd skipped (nsd stopped) is an escape once nsd is back; a
    login in the tenant's namespace and slice is not."""
    run("systemctl", "stop", "nsd.socket", "nsd.service")
    try:
        stray = subprocess.Popen([*SSH, "alice@localhost", "exec sleep 300"])
        running("sleep 300")
    finally:
        run("systemctl", "start", "nsd.socket", "nsd.service")
        wait_active("nsd.service")
    joined = subprocess.Popen([*SSH, "alice@localhost", "exec sleep 299"])
    running("sleep 299")
    try:

        def flagged() -> dict[str, Any] | None:
            res = nsctl("--json", "audit", "alice", check=False)
            procs = json.loads(res.stdout)["processes"]
            sleeps = {p["command"]: p for p in procs if p["command"].startswith("sleep")}
            return sleeps or None

        sleeps = wait_for(flagged, "the audit to list the stray login", timeout=45)
        assert sleeps is not None
        assert sleeps["sleep 300"]["reason"] == "sessionOutsideNamespace", sleeps
        assert "sleep 299" not in sleeps, sleeps  # joined: not an escape
        figures["audit_stray_login"] = sleeps["sleep 300"]["reason"]
    finally:
        for p in (stray, joined):
            p.kill()
            p.wait()


def test_tenant_slice_overrides_logind_defaults() -> None:
    """nsd's limits (drop-ins in system.control) win over logind's user-.slice.d."""
    unit = slice_of("web-shop")  # test_50 gave it tasks_max 150
    limits = json.loads(nsctl("--json", "limits", "web-shop").stdout)["limits"]
    assert show(unit, "ActiveState")["ActiveState"] == "active"
    dropins = show(unit, "DropInPaths")["DropInPaths"]
    assert "/system.control/" in dropins and "/user-.slice.d/10-defaults.conf" in dropins
    # logind's user-.slice.d/10-defaults.conf says TasksMax=33%; nsd's value wins.
    want = limits["tasksMax"]
    got = show(unit, "TasksMax")["TasksMax"]
    assert got == want, (got, want)
