"""The network policy through the real daemon (issue 6's acceptance at daemon level).

Topology, all made by the test: a "host" namespace running nsd, an "internet"
namespace behind an uplink veth (up0 <-> inet0), and two tenants. The module
tests in test_netpolicy.py cover the mechanisms in depth (host services, DNS,
bandwidth, conntrack limits); this proves the daemon wires them up: NAT to the
internet, isolation between tenants, the host reaching both, an operator's own
table untouched, a flushed table repaired by reconcile, `nsctl net`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from nsd.core.doctor import systemd_is_pid1
from tests.harness import Daemon, TestUsers, daemon_env, run, unique

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, nftables"),
]

T = "io.nsd.Tenant."
SERVER = (
    "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen()\n"
    "while True:\n c,a=s.accept();c.sendall(a[0].encode());c.close()\n"
)
CLIENT = (
    "import socket,sys\ntry:\n"
    " c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2)\n"
    " print(c.recv(100).decode() or 'open')\nexcept OSError as e: print('closed', e)\n"
)
# An operator's own table (nft wants the chain's statements on lines of their own).
OPERATOR_TABLE = """table inet opfw {
    chain keep {
        type filter hook input priority 10; policy accept;
    }
}
"""


def connect(netns: str, address: str, port: int) -> str:
    return run("nsenter", f"--net={netns}", "python3", "-I", "-c", CLIENT, address,
               str(port)).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers, str]]:
    with uplinked_daemon() as found:
        yield found


@contextlib.contextmanager
def uplinked_daemon(network: str = "", extra: str = "") -> Iterator[tuple[Daemon, TestUsers, str]]:
    """The daemon in its host namespace with an uplink to an "internet" namespace, whose
    path is yielded too, where a server answers on 10.99.0.2:8080 with the client's
    address. ``network``: more lines of ``[network]``; ``extra``: more sections."""
    internet = unique("nsdt-inet-")
    config = '[network]\nuplinks = ["up0"]\n' + network + extra
    with daemon_env(extra=config) as (d, users):
        run("ip", "netns", "add", internet)
        inet = f"/run/netns/{internet}"
        servers: list[subprocess.Popen[bytes]] = []
        try:
            run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "inet0",
                "netns", inet, netns=d.host)  # fmt: skip
            run("ip", "addr", "add", "10.99.0.1/24", "dev", "up0", netns=d.host)
            run("ip", "link", "set", "up0", "up", netns=d.host)
            run("ip", "route", "add", "default", "via", "10.99.0.2", netns=d.host)
            run("ip", "addr", "add", "10.99.0.2/24", "dev", "inet0", netns=inet)
            run("ip", "link", "set", "inet0", "up", netns=inet)
            run("ip", "link", "set", "lo", "up", netns=inet)
            run("nft", "-f", "-", netns=d.host, input=OPERATOR_TABLE)
            servers.append(subprocess.Popen(
                ["nsenter", f"--net={inet}", "python3", "-I", "-c", SERVER, "10.99.0.2", "8080"]
            ))  # fmt: skip
            d.start()
            yield d, users, inet
            assert d.stop() == 0, d.log_text()
        finally:
            for s in servers:
                s.kill()
                s.wait()
            run("ip", "netns", "del", internet, check=False)


def wait_open(netns: str, address: str, port: int) -> str:
    deadline = time.monotonic() + 5
    while True:
        out = connect(netns, address, port)
        if not out.startswith("closed") or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def test_egress_nat_isolation_and_host_access(env: tuple[Daemon, TestUsers, str]) -> None:
    d, users, _ = env
    a, b = users.add(), users.add()
    ta = d.call(T + "Create", name=a)["tenant"]
    tb = d.call(T + "Create", name=b)["tenant"]
    # The internet sees the uplink's address: masquerade.
    assert wait_open(ta["namespacePath"], "10.99.0.2", 8080) == "10.99.0.1"
    server_b = subprocess.Popen(["nsenter", f"--net={tb['namespacePath']}", "python3", "-I",
                                 "-c", SERVER, tb["ipv4Address"], "9000"])  # fmt: skip
    try:
        # The host (e.g. the web proxy) reaches tenant b ...
        assert wait_open(d.host, tb["ipv4Address"], 9000) == "100.64.0.1"
        # ... tenant a does not.
        assert connect(ta["namespacePath"], tb["ipv4Address"], 9000).startswith("closed")
    finally:
        server_b.kill()
        server_b.wait()
    net = d.nsctl("net", a).stdout
    assert "masquerade via up0" in net and "Isolation: on" in net
    assert d.call(T + "GetNetwork", name=a)["network"]["uplinks"] == ["up0"]


def test_operator_table_untouched_and_flushed_table_repaired(
    env: tuple[Daemon, TestUsers, str],
) -> None:
    d, users, _ = env
    before = run("nft", "-j", "list", "table", "inet", "opfw", netns=d.host).stdout
    a = users.add()
    ta = d.call(T + "Create", name=a)["tenant"]
    d.call("io.nsd.Daemon.Reconcile")  # re-applies nsd's table
    after = run("nft", "-j", "list", "table", "inet", "opfw", netns=d.host).stdout
    assert json.loads(after) == json.loads(before)
    run("nft", "flush", "table", "inet", "nsd", netns=d.host)  # someone flushed it
    report = d.call("io.nsd.Daemon.Reconcile")
    assert any(x["kind"] == "network" for x in report["actions"]), report
    rules = run("nft", "-j", "list", "table", "inet", "nsd", netns=d.host).stdout
    assert '"rule"' in rules
    assert wait_open(ta["namespacePath"], "10.99.0.2", 8080) == "10.99.0.1"


def test_doctor_reports_the_network_policy_and_limits(env: tuple[Daemon, TestUsers, str]) -> None:
    # nsctl doctor prints the network policy's checks and what of the limits is in
    # effect, besides the host prerequisites (docs/networking.md, docs/configuration.md).
    d, _, _ = env
    res = d.nsctl("--json", "doctor", check=False)
    checks = {c["name"]: (c["severity"], c["message"]) for c in json.loads(res.stdout)}
    assert checks["nftables"] == ("ok", "table inet nsd is loaded")
    assert checks["uplinks"] == ("ok", "egress through up0")
    assert checks["forwarding"][0] in ("ok", "warning") and checks["forwarding"][1]
    assert "foreign-drop-policy" not in checks  # the operator's table accepts
    assert "netns-propagation" in checks and "address-pools" in checks
    severity, message = checks["slices"]
    if systemd_is_pid1():
        assert severity == "ok" and message.startswith("systemd ")
    else:  # no limits are configured here, so their absence is no warning
        assert (severity, message) == (
            "ok", "tenant slices are unavailable: systemd is not PID 1 on this host")  # fmt: skip


def test_creations_and_removals_leave_the_derived_table(
    env: tuple[Daemon, TestUsers, str],
) -> None:
    """Creations, a bandwidth change and removals go through element transactions; the
    next reconcile, which derives the whole table and compares it exactly, finds
    nothing to repair, and the removed tenants' veths are no longer in the table."""
    d, users, _ = env
    d.call("io.nsd.Daemon.Reconcile")
    names = [users.add() for _ in range(4)]
    made = [d.call(T + "Create", name=n)["tenant"] for n in names]
    d.nsctl("net", names[0], "--egress", "20M")
    for n in names[1:3]:
        d.call(T + "Remove", name=n, force=True)
    report = d.call("io.nsd.Daemon.Reconcile")
    assert not [x for x in report["actions"] if x["kind"] == "network"], report
    listed = json.loads(run("nft", "-j", "list", "set", "inet", "nsd", "tenant_ifs",
                            netns=d.host).stdout)  # fmt: skip
    elems = next(o["set"] for o in listed["nftables"] if "set" in o).get("elem", [])
    host_ifs = {t["hostInterface"] for t in made}
    assert len(host_ifs & set(elems)) == 2, elems
    shaped = run("nft", "list", "set", "inet", "nsd", "upload_shaped", netns=d.host).stdout
    assert made[0]["hostInterface"] in shaped


ECHO = (
    "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('127.0.0.1',3306));s.listen()\nc,a=s.accept()\n"
    "while (d:=c.recv(100)):\n c.sendall(d)\n"
)
# Inside a tenant: connect to the in-namespace service address, echo once, wait for
# "go" on stdin (the daemon restarts meanwhile), echo again over the same connection.
PERSISTENT_CLIENT = (
    "import socket,sys\nc=socket.create_connection(('127.0.0.1',3306),timeout=5)\n"
    "c.sendall(b'one');print(c.recv(10).decode(),flush=True)\nsys.stdin.readline()\n"
    "c.sendall(b'two');print(c.recv(10).decode(),flush=True)\n"
)


def test_loopback_host_service_survives_a_restart() -> None:
    """A service bound to 127.0.0.1 in the host namespace, reached from a tenant at
    127.0.0.1:3306 inside its namespace; an established connection survives an nsd
    restart (kernel NAT and conntrack, no proxy in nsd)."""
    extra = (
        '[network]\nuplinks = []\n[[network.host_services]]\nname = "db"\n'
        'host = "127.0.0.1:3306"\ntenant_address = "127.0.0.1:3306"\n'
    )
    with daemon_env(extra=extra) as (d, users):
        server = subprocess.Popen(["nsenter", f"--net={d.host}", "python3", "-I", "-c", ECHO])
        try:
            d.start()
            name = users.add()
            t = d.call(T + "Create", name=name)["tenant"]
            client = subprocess.Popen(
                ["nsenter", f"--net={t['namespacePath']}", "python3", "-I", "-c",
                 PERSISTENT_CLIENT],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline().strip() == "one"
            d.restart()
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "two"
            assert client.wait(10) == 0
            assert d.stop() == 0
        finally:
            server.kill()
            server.wait()
