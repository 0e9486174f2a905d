"""The network policy on a real host, before and after a reboot: egress NAT to an
"internet" behind the VM's uplink, isolation between tenants and from the host.

The VM has no network card, so phase 1 gives it an uplink the way a host has
eth0: ``nsd-e2e-uplink.service`` (enabled, ordered before nsd.service) makes a
veth pair whose far end is an "internet" namespace and points the VM's default
routes at it. nsd is left on its embedded defaults: it finds the uplink from
the default routes. Phase 2 (after the reboot) checks that the same policy
holds with what boot alone set up: the uplink unit, then nsd, which must have
loaded its table before any tenant's veth came up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import NETNS_DIR, nsctl, run, show, wait_active

UPLINK_UNIT = "nsd-e2e-uplink.service"
UPLINK_SCRIPT = Path("/usr/local/libexec/nsd-e2e-uplink")
INTERNET_NETNS = "e2e-inet"
UPLINK = "e2eup0"
# The uplink's own addresses (what masquerading must turn tenants' sources into)
# and a server beyond the uplink's subnet, reachable only via the default routes.
UPLINK_V4, UPLINK_V6 = "198.51.100.1", "2001:db8:1::1"
SERVER_V4, SERVER_V6 = "203.0.113.10", "2001:db8:ffff::10"
PORT = 8080

UPLINK_SCRIPT_TEXT = f"""#!/bin/sh
# The VM's "eth0" for the network-policy tests: a veth whose far end is the
# "internet" namespace {INTERNET_NETNS}, with the VM's default routes through it.
set -eu
ip netns add {INTERNET_NETNS}
ip link add {UPLINK} type veth peer name inet0 netns {INTERNET_NETNS}
ip -n {INTERNET_NETNS} link set lo up
ip -n {INTERNET_NETNS} link set inet0 up
ip -n {INTERNET_NETNS} addr add 198.51.100.2/24 dev inet0
ip -n {INTERNET_NETNS} addr add 2001:db8:1::2/64 dev inet0 nodad
ip -n {INTERNET_NETNS} addr add {SERVER_V4}/32 dev lo
ip -n {INTERNET_NETNS} addr add {SERVER_V6}/128 dev lo
ip link set {UPLINK} up
ip addr add {UPLINK_V4}/24 dev {UPLINK}
ip addr add {UPLINK_V6}/64 dev {UPLINK} nodad
ip route add default via 198.51.100.2 dev {UPLINK}
ip -6 route add default via 2001:db8:1::2 dev {UPLINK}
"""

UPLINK_UNIT_TEXT = f"""[Unit]
Description=nsd e2e: an uplink to an "internet" namespace
DefaultDependencies=no
After=local-fs.target
Before=nsd.service nsd.socket network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={UPLINK_SCRIPT}

[Install]
WantedBy=sysinit.target
"""

# Replies with the address the connection came from, as the server saw it.
SERVER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

# Prints what the server said, or the error ("refused", "timeout", ...).
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(c.recv(100).decode())
except OSError as e:
    print("error", type(e).__name__, e)
"""


def _in_netns(path: str | None, *cmd: str) -> list[str]:
    return ["nsenter", f"--net={path}", *cmd] if path else list(cmd)


@pytest.fixture()
def servers() -> Iterator[Any]:
    """Start listeners (in a namespace, or on the host); all stopped at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(netns: str | None, address: str, port: int) -> None:
        p = subprocess.Popen(
            _in_netns(netns, sys.executable, "-c", SERVER, address, str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(p)
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line == "listening", f"server on {address}:{port} did not start: {line!r}"

    yield start
    for p in started:
        p.kill()
        p.wait()


def connect(netns: str | None, address: str, port: int) -> str:
    cmd = _in_netns(netns, sys.executable, "-c", CLIENT, address, str(port))
    return run(*cmd, timeout=30).stdout.strip()


def check_policy(servers: Any) -> dict[str, Any]:
    """Egress and isolation, as an operator would check them by hand."""
    for name in ("alice", "bob"):
        nsctl("ensure", name)
    alice, bob = (json.loads(nsctl("--json", "show", n).stdout) for n in ("alice", "bob"))
    alice_ns = str(NETNS_DIR / "alice")
    bob_ns = str(NETNS_DIR / "bob")
    inet_ns = f"/run/netns/{INTERNET_NETNS}"

    # nsd's table is there, and found the uplink from the default routes.
    table = run("nft", "-j", "list", "table", "inet", "nsd").stdout
    assert UPLINK in table, "the uplink is not in nsd's table"
    net = json.loads(nsctl("--json", "net", "alice").stdout)
    assert UPLINK in net["uplinks"], net
    assert net["isolation"] is True and net["problems"] == [], net

    # Egress: the "internet" sees the uplink's address, never the tenant's.
    servers(inet_ns, SERVER_V4, PORT)
    servers(inet_ns, SERVER_V6, PORT)
    assert connect(alice_ns, SERVER_V4, PORT) == UPLINK_V4
    assert connect(alice_ns, SERVER_V6, PORT) == UPLINK_V6

    # Isolation: bob's service is reachable from the host, not from alice.
    servers(bob_ns, "0.0.0.0", PORT)
    servers(bob_ns, "::", PORT + 1)
    from_host_v4 = connect(None, bob["ipv4Address"], PORT)
    from_host_v6 = connect(None, bob["ipv6Address"], PORT + 1)
    assert not from_host_v4.startswith("error"), from_host_v4
    assert not from_host_v6.startswith("error"), from_host_v6
    to_bob_v4 = connect(alice_ns, bob["ipv4Address"], PORT)
    to_bob_v6 = connect(alice_ns, bob["ipv6Address"], PORT + 1)
    assert to_bob_v4.startswith("error"), to_bob_v4
    assert to_bob_v6.startswith("error"), to_bob_v6

    # The host's own services are closed to tenants (no host service configured).
    servers(None, "0.0.0.0", PORT + 2)
    assert connect(None, UPLINK_V4, PORT + 2) == UPLINK_V4
    to_host = connect(alice_ns, alice["ipv4Gateway"], PORT + 2)
    assert to_host.startswith("error"), to_host
    to_host_uplink = connect(alice_ns, UPLINK_V4, PORT + 2)
    assert to_host_uplink.startswith("error"), to_host_uplink
    return {"to_bob": to_bob_v4, "to_host": to_host}


@pytest.mark.phase1
def test_policy_before_reboot(servers: Any, figures: dict[str, Any]) -> None:
    UPLINK_SCRIPT.write_text(UPLINK_SCRIPT_TEXT)
    UPLINK_SCRIPT.chmod(0o755)
    Path("/etc/systemd/system", UPLINK_UNIT).write_text(UPLINK_UNIT_TEXT)
    run("systemctl", "daemon-reload")
    run("systemctl", "enable", "--now", "--quiet", UPLINK_UNIT)
    # nsd picks its uplinks from the default routes when it applies the policy:
    # restart it, as after adding an uplink to a running host.
    run("systemctl", "restart", "nsd.service")
    wait_active("nsd.service")
    figures["network_policy_phase1"] = check_policy(servers)


@pytest.mark.phase2
def test_policy_after_reboot(servers: Any, figures: dict[str, Any]) -> None:
    # Boot alone set this up: the uplink before nsd, nsd before any tenant veth.
    up = show(UPLINK_UNIT, "ActiveState", "ActiveEnterTimestampMonotonic")
    assert up["ActiveState"] == "active", up
    nsd = wait_active("nsd.service", timeout=120)
    key = "ExecMainStartTimestampMonotonic"
    started = int(show("nsd.service", key)[key])
    assert int(up["ActiveEnterTimestampMonotonic"]) < started, (up, nsd)
    # Fail closed: the table was loaded before the reconcile that brought the
    # tenants' veths up (daemon.py logs one line for each, in that order).
    journal = run("journalctl", "-b", "-o", "cat", "-u", "nsd.service").stdout.splitlines()
    loaded = [i for i, line in enumerate(journal) if "table inet nsd loaded" in line]
    reconciled = [i for i, line in enumerate(journal) if "nsd: reconcile:" in line]
    assert loaded and reconciled and loaded[0] < reconciled[0], journal[-30:]
    assert f"uplinks: {UPLINK}" in journal[loaded[0]], journal[loaded[0]]
    deadline = time.monotonic() + 60
    while not (NETNS_DIR / "alice").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    figures["network_policy_phase2"] = check_policy(servers)
