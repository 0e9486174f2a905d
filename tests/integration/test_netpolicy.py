"""Network policy against the real kernel: egress NAT, isolation, host services, DNS,
bandwidth, coexistence with other tables, repair.

Topology, all made by the test (the machine's own network is never touched):

    "internet" ns            test "host" ns                        tenant namespaces
    eth0 192.0.2.1/24 ---- up0.7 192.0.2.2/24 (+ .77 for SNAT)
         2001:db8::1/64         2001:db8::2/64
                                <prefix>1001 100.72.0.1/32 ---- eth0 100.72.0.11 (t1)
                                <prefix>1002 100.72.0.1/32 ---- eth0 100.72.0.12 (t2)
                                <prefix>1003 100.72.0.1/32 ---- eth0 100.72.0.13 (t3)

Tenants are built by the NetnsAdapter (host_netns_path = the test host namespace),
the policy by nsd.net.hostnet on the same adapter, as the daemon will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from nsd.net import policy as npol
from nsd.net.hostnet import HostNetwork
from nsd.net.netns import NetnsAdapter, NetworkSpec

pytestmark = pytest.mark.root

PY = sys.executable
GW4 = IPv4Address("100.72.0.1")
POOL4 = IPv4Network("100.72.0.0/16")
POOL6 = IPv6Network("fd00:72::/48")
#: the uplink's name has a dot, as a VLAN's (eth0.100): sysctl keys must not split it
UPLINK = "up0.7"
UPLINK_V4 = "192.0.2.2"
SNAT_V4 = "192.0.2.77"
INET_V4 = "192.0.2.1"
INET_V6 = "2001:db8::1"


def sh(
    netns: str | None, *argv: str, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    cmd = list(argv) if netns is None else ["nsenter", f"--net={netns}", *argv]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, **kw)


# Small programs run inside namespaces.
SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(64)
    print("ready", flush=True)
    def serve(c, a):
        # echo protocol: "who" -> the peer's address; anything else is echoed
        with c:
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(a[0].encode() if data == b"who" else data)
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a), daemon=True).start()
    """
)
WHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"who")
    print(s.recv(100).decode())
    """
)
# bulk transfer: "send"/"recv" x "listen"/"connect"; the receiver prints bits per second
BULK = textwrap.dedent(
    """
    import socket, sys, time
    role, mode, addr = sys.argv[1:4]
    port, secs = int(sys.argv[4]), float(sys.argv[5])
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    if mode == "listen":
        s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port)); s.listen(1); print("ready", flush=True); s.settimeout(20)
        c, _ = s.accept()
    else:
        c = socket.create_connection((addr, port), timeout=10)
    if role == "send":
        buf = b"x" * 65536; end = time.monotonic() + secs
        while time.monotonic() < end:
            c.sendall(buf)
        c.close()
    else:
        n = 0; first = None; last = None
        while True:
            d = c.recv(262144)
            if not d:
                break
            now = time.monotonic()
            if first is None:
                first = now
            n += len(d); last = now
        print(n * 8 / max(last - first, 1e-3))
    """
)
DNS_SERVER = textwrap.dedent(
    """
    import socket, struct, sys
    # answers every A query with 198.51.100.7 (a minimal authoritative reply)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 53))
    print("ready", flush=True)
    while True:
        q, peer = s.recvfrom(512)
        qid, flags, qd = struct.unpack("!HHH", q[:6])
        end = 12
        while q[end]:
            end += q[end] + 1
        question = q[12 : end + 5]
        answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4)
        answer += socket.inet_aton("198.51.100.7")
        s.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer, peer)
    """
)


@dataclass
class Topo:
    host: str
    inet: str
    adapter: NetnsAdapter
    specs: dict[str, NetworkSpec]
    tenants: dict[str, npol.TenantNet]
    procs: list[subprocess.Popen[str]]
    resolv: str

    def start(self, netns: str, code: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["nsenter", f"--net={netns}", PY, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read() if p.stderr else line
        return p

    def who(self, netns: str, addr: str, port: int, timeout: float = 2.0) -> str | None:
        res = sh(netns, PY, "-c", WHO, addr, str(port), str(timeout), check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    def ns(self, name: str) -> str:
        return self.specs[name].netns_path

    def network(self, **cfg: Any) -> HostNetwork:
        config = npol.config_from_mapping({"uplinks": [UPLINK], **cfg})
        return HostNetwork(
            config,
            self.adapter,
            ipv4_gateway=GW4,
            ipv6_gateway=IPv6Address("fe80::1"),
            ipv4_pool=POOL4,
            ipv6_pool=POOL6,
            link_prefix=self.specs["t1"].host_ifname[:5],
            resolv_conf=self.resolv,
        )

    async def apply(self, hn: HostNetwork, tenants: list[npol.TenantNet] | None = None) -> Any:
        await hn.refresh_site()
        ts = list(self.tenants.values()) if tenants is None else tenants
        report = await hn.apply(ts, {t.uid: self.specs[t.name].netns_path for t in ts})
        assert not report.problems, report.problems
        return report


def _spec(run_dir: str, prefix: str, n: int) -> NetworkSpec:
    return NetworkSpec(
        netns_path=f"{run_dir}/t{n}",
        host_ifname=f"{prefix}{1000 + n}",
        peer_ifname="eth0",
        ipv4_address=IPv4Address("100.72.0.10") + n,
        ipv4_gateway=GW4,
        ipv6_prefix=IPv6Network(f"fd00:72:0:{n:x}::/64"),
        ipv6_address=IPv6Address(f"fd00:72:0:{n:x}::1"),
        ipv6_gateway=IPv6Address("fe80::1"),
        sysctls=(("net.ipv4.ip_unprivileged_port_start", "0"),),
    )


@contextlib.contextmanager
def internet(host: str) -> Iterator[str]:
    name = "nsdt-inet-" + secrets.token_hex(4)
    sh(None, "ip", "netns", "add", name)
    path = f"/run/netns/{name}"
    try:
        sh(
            None,
            "ip",
            "link",
            "add",
            UPLINK,
            "netns",
            host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            name,
        )
        for ns, cmds in (
            (
                path,
                [
                    ["link", "set", "lo", "up"],
                    ["link", "set", "eth0", "up"],
                    ["addr", "add", f"{INET_V4}/24", "dev", "eth0"],
                    ["-6", "addr", "add", f"{INET_V6}/64", "dev", "eth0", "nodad"],
                ],
            ),
            (
                host,
                [
                    ["link", "set", "lo", "up"],
                    ["link", "set", UPLINK, "up"],
                    ["addr", "add", f"{UPLINK_V4}/24", "dev", UPLINK],
                    ["addr", "add", f"{SNAT_V4}/32", "dev", UPLINK],
                    ["-6", "addr", "add", "2001:db8::2/64", "dev", UPLINK, "nodad"],
                    ["route", "add", "default", "via", INET_V4],
                    ["-6", "route", "add", "default", "via", INET_V6],
                ],
            ),
        ):
            for c in cmds:
                sh(ns, "ip", *c)
        yield path
    finally:
        sh(None, "ip", "netns", "del", name, check=False)


@pytest.fixture
async def topo(host_netns: str, run_dir: str, link_prefix: str) -> AsyncIterator[Topo]:
    adapter = NetnsAdapter(run_dir=run_dir, link_prefix=link_prefix, host_netns_path=host_netns)
    await adapter.start()
    procs: list[subprocess.Popen[str]] = []
    with internet(host_netns) as inet, tempfile.NamedTemporaryFile("w", suffix=".conf") as rc:
        rc.write("nameserver 127.0.0.53\noptions edns0\n")
        rc.flush()
        try:
            specs = {f"t{n}": _spec(run_dir, link_prefix, n) for n in (1, 2, 3)}
            for s in specs.values():
                await adapter.ensure(s)
            tenants = {
                name: npol.TenantNet(
                    name, 1000 + int(name[1]), s.host_ifname, s.ipv4_address, s.ipv6_prefix
                )
                for name, s in specs.items()
            }
            yield Topo(host_netns, inet, adapter, specs, tenants, procs, rc.name)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            await adapter.close()


def nft_json(netns: str, *args: str) -> Any:
    return json.loads(sh(netns, "nft", "-j", *args).stdout)


# ----------------------------------------------------------------------------------


async def test_egress_nat_and_isolation(topo: Topo) -> None:
    hn = topo.network(allow=[["t3", "t1"]], snat={"t2": SNAT_V4})
    await topo.apply(hn)
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    topo.start(topo.inet, SERVER, "::", "8081")
    # egress: masquerade to the uplink's address; per-tenant SNAT
    assert topo.who(topo.ns("t1"), INET_V4, 8080) == UPLINK_V4
    assert topo.who(topo.ns("t2"), INET_V4, 8080) == SNAT_V4
    assert topo.who(topo.ns("t1"), INET_V6, 8081) == "2001:db8::2"

    # isolation: every tenant listens; t1 cannot reach t2, the host reaches both
    for name in ("t1", "t2"):
        topo.start(topo.ns(name), SERVER, "0.0.0.0", "9000")
    t1, t2 = (str(topo.specs[n].ipv4_address) for n in ("t1", "t2"))
    assert topo.who(topo.ns("t1"), t2, 9000, timeout=1) is None
    assert topo.who(topo.ns("t2"), t1, 9000, timeout=1) is None
    assert topo.who(topo.host, t1, 9000) == str(GW4)
    assert topo.who(topo.host, t2, 9000) == str(GW4)
    # the allow-list opens t3 -> t1 only (not the other way)
    topo.start(topo.ns("t3"), SERVER, "0.0.0.0", "9000")
    assert topo.who(topo.ns("t3"), t1, 9000) == str(topo.specs["t3"].ipv4_address)
    assert topo.who(topo.ns("t1"), str(topo.specs["t3"].ipv4_address), 9000, timeout=1) is None
    # tenants cannot open connections to the host's own addresses
    topo.start(topo.host, SERVER, "0.0.0.0", "7000")
    assert topo.who(topo.ns("t1"), UPLINK_V4, 7000, timeout=1) is None
    assert topo.who(topo.ns("t1"), str(GW4), 7000, timeout=1) is None
    # the internet cannot open connections to tenants
    sh(topo.inet, "ip", "route", "add", str(POOL4), "via", UPLINK_V4)
    assert topo.who(topo.inet, t1, 9000, timeout=1) is None

    # forwarding was switched on per interface only
    assert sh(topo.host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert sh(topo.host, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "0"
    assert sh(topo.host, "sysctl", "-n", f"net/ipv6/conf/{UPLINK}/forwarding").stdout.strip() == "0"
    # the uplink's name has a dot (as a VLAN's): its own switch was found and set
    assert sh(topo.host, "sysctl", "-n", f"net/ipv4/conf/{UPLINK}/forwarding").stdout.strip() == "1"


async def test_conntrack_limit(topo: Topo) -> None:
    hn = topo.network(conntrack_limit=5)
    await topo.apply(hn)
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    code = textwrap.dedent(
        """
        import socket, sys
        ok = []
        for i in range(10):
            try:
                ok.append(socket.create_connection((sys.argv[1], 8080), timeout=0.5))
            except OSError:
                pass
        print(len(ok))
        """
    )
    assert sh(topo.ns("t1"), PY, "-c", code, INET_V4).stdout.strip() == "5"
    # another tenant has its own budget
    assert topo.who(topo.ns("t2"), INET_V4, 8080) == UPLINK_V4


async def test_host_service_on_loopback_survives_restart(topo: Topo) -> None:
    services = [
        {"name": "mysql", "host": "127.0.0.1:3306", "tenant_address": "127.0.0.1:3306"},
        {"name": "cache", "host": "127.0.0.1:6379", "source": "tenant"},
    ]
    hn = topo.network(host_services=services)
    await topo.apply(hn)
    topo.start(topo.host, SERVER, "127.0.0.1", "3306")
    topo.start(topo.host, SERVER, "127.0.0.1", "6379")
    # the documented addresses: the namespace's own 127.0.0.1:3306, and the gateway
    assert topo.who(topo.ns("t1"), "127.0.0.1", 3306) == "127.0.0.1"
    assert topo.who(topo.ns("t2"), str(GW4), 3306) == "127.0.0.1"
    assert topo.who(topo.ns("t1"), str(GW4), 6379) == str(topo.specs["t1"].ipv4_address)
    # only configured ports: other loopback services of the host stay unreachable
    topo.start(topo.host, SERVER, "127.0.0.1", "5432")
    assert topo.who(topo.ns("t1"), str(GW4), 5432, timeout=1) is None

    # a long-lived connection, then "nsd restarts": a new adapter and HostNetwork
    # re-apply the same policy (the table is replaced), and someone flushes it in between
    client = subprocess.Popen(
        [
            "nsenter",
            f"--net={topo.ns('t1')}",
            PY,
            "-u",
            "-c",
            textwrap.dedent(
                """
            import socket, sys
            s = socket.create_connection(("127.0.0.1", 3306), timeout=5)
            for line in sys.stdin:
                s.sendall(line.strip().encode()); print(s.recv(100).decode(), flush=True)
            """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    topo.procs.append(client)
    assert client.stdin is not None and client.stdout is not None

    def ping(word: str) -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(word + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    assert ping("before") == "before"
    await topo.adapter.close()
    sh(topo.host, "nft", "flush", "table", "inet", "nsd")
    topo.adapter = NetnsAdapter(
        run_dir=os.path.dirname(topo.ns("t1")),
        link_prefix=topo.specs["t1"].host_ifname[:5],
        host_netns_path=topo.host,
    )
    await topo.adapter.start()
    hn2 = topo.network(host_services=services)
    report = await topo.apply(hn2)
    assert "replaced table inet nsd (host)" in report.actions  # the flush was repaired
    assert ping("after") == "after"
    assert topo.who(topo.ns("t3"), "127.0.0.1", 3306) == "127.0.0.1"


async def test_dns_with_the_hosts_loopback_resolver(topo: Topo) -> None:
    hn = topo.network()
    await topo.apply(hn)
    topo.start(topo.host, DNS_SERVER, "127.0.0.53")
    # glibc's resolver inside the tenant namespace, reading a resolv.conf that points at
    # 127.0.0.53 (bind-mounted over /etc/resolv.conf in a private mount namespace)
    res = sh(
        None,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind {topo.resolv} /etc/resolv.conf && exec nsenter --net="$1" '
        "getent ahostsv4 www.example.test",
        "sh",
        topo.ns("t2"),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "198.51.100.7" in res.stdout


async def _rate(
    topo: Topo,
    sender_ns: str,
    receiver_ns: str,
    listen_addr: str,
    connect_addr: str,
    *,
    sender_listens: bool,
    secs: float = 2.5,
) -> float:
    port = str(20000 + secrets.randbelow(20000))
    if sender_listens:
        listener = topo.start(sender_ns, BULK, "send", "listen", listen_addr, port, str(secs))
        out = sh(receiver_ns, PY, "-c", BULK, "recv", "connect", connect_addr, port, "0")
    else:
        listener = topo.start(receiver_ns, BULK, "recv", "listen", listen_addr, port, "0")
        sh(sender_ns, PY, "-c", BULK, "send", "connect", connect_addr, port, str(secs))
        assert listener.stdout is not None
        out = subprocess.CompletedProcess([], 0, listener.stdout.read(), "")
    listener.wait(10)
    return float(out.stdout.strip())


async def test_bandwidth_limits(topo: Topo) -> None:
    t0 = time.monotonic()
    hn = topo.network()
    t1 = replace(topo.tenants["t1"], bandwidth=npol.Bandwidth(10_000_000, 10_000_000))
    await topo.apply(hn, [t1, topo.tenants["t2"], topo.tenants["t3"]])
    ns1 = topo.ns("t1")
    addr1 = str(topo.specs["t1"].ipv4_address)
    up = await _rate(topo, ns1, topo.inet, "0.0.0.0", INET_V4, sender_listens=False)
    down = await _rate(topo, topo.inet, ns1, "0.0.0.0", INET_V4, sender_listens=True)
    # host <-> tenant is the website behind the host's proxy: never limited
    host_down = await _rate(topo, topo.host, ns1, "0.0.0.0", addr1, sender_listens=False, secs=1)
    # (the response of the tenant's website to the host's proxy: a connection the host
    # opened, the tenant sends)
    host_up = await _rate(topo, ns1, topo.host, "0.0.0.0", addr1, sender_listens=True, secs=1)
    print(
        f"upload {up / 1e6:.2f} download {down / 1e6:.2f} host->tenant {host_down / 1e6:.0f} "
        f"tenant->host {host_up / 1e6:.0f} Mbit/s; {time.monotonic() - t0:.1f}s"
    )
    assert 8e6 <= up <= 12e6
    assert 8e6 <= down <= 12e6
    assert host_down > 100e6
    assert host_up > 100e6
    # an unlimited tenant is not slowed down
    free = await _rate(
        topo, topo.ns("t2"), topo.inet, "0.0.0.0", INET_V4, sender_listens=False, secs=1
    )
    assert free > 100e6
    # status shows it, and lifting the limit removes the qdiscs
    status = await hn.tenant_status(t1, ns1)
    assert status.egress_rate == 10_000_000 and not status.problems
    await topo.apply(hn)
    qdiscs = json.loads(sh(ns1, "tc", "-j", "qdisc", "show", "dev", "eth0").stdout)
    assert all(q["kind"] != "htb" for q in qdiscs)


async def test_other_tables_untouched_and_drops_detected(topo: Topo) -> None:
    operator = textwrap.dedent(
        """
        table inet operator {
            set blocked { type ipv4_addr; elements = { 203.0.113.9 } }
            chain input { type filter hook input priority 10; policy accept;
                ip saddr @blocked drop
                tcp dport 22 accept
            }
        }
        """
    )
    sh(topo.host, "nft", "-f", "-", input=operator)
    before = nft_json(topo.host, "list", "table", "inet", "operator")
    hn = topo.network()
    await topo.apply(hn)
    await topo.apply(hn)
    hn2 = topo.network(isolation=False)
    await topo.apply(hn2)
    assert nft_json(topo.host, "list", "table", "inet", "operator") == before
    assert await hn.foreign_drop_policies() == []

    # Docker/ufw style: another table's forward policy drop defeats nsd's accepts
    sh(topo.host, "nft", "add", "table", "ip", "filter")
    sh(
        topo.host,
        "nft",
        "add",
        "chain",
        "ip",
        "filter",
        "FORWARD",
        "{ type filter hook forward priority 0; policy drop; }",
    )
    drops = await hn.foreign_drop_policies()
    assert len(drops) == 1 and "table ip filter chain FORWARD" in drops[0]
    checks = {c.name: c for c in await hn.checks()}
    assert checks["foreign-drop-policy"].severity == "warning"
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    assert topo.who(topo.ns("t1"), INET_V4, 8080, timeout=1) is None
    sh(topo.host, "nft", "delete", "table", "ip", "filter")
    assert topo.who(topo.ns("t1"), INET_V4, 8080) == UPLINK_V4


async def test_fail_closed_for_unknown_tenant_links(topo: Topo) -> None:
    # the table knows t1 only: t2's veth exists but must not get anywhere
    hn = topo.network()
    await topo.apply(hn, [topo.tenants["t1"]])
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    assert topo.who(topo.ns("t1"), INET_V4, 8080) == UPLINK_V4
    assert topo.who(topo.ns("t2"), INET_V4, 8080, timeout=1) is None
    topo.start(topo.host, SERVER, "0.0.0.0", "7000")
    assert topo.who(topo.ns("t2"), str(GW4), 7000, timeout=1) is None
    # once known, it works; removing it from the policy closes it again
    await topo.apply(hn)
    assert topo.who(topo.ns("t2"), INET_V4, 8080) == UPLINK_V4
    await topo.apply(hn, [topo.tenants["t1"]])
    assert topo.who(topo.ns("t2"), INET_V4, 8080, timeout=1) is None


async def test_apply_is_cheap_when_nothing_changed(topo: Topo) -> None:
    hn = topo.network(
        host_services=[
            {"name": "db", "host": "127.0.0.1:3306", "tenant_address": "127.0.0.1:3306"}
        ],
        bandwidth={"egress_mbit": 50, "ingress_mbit": 50},
    )
    ts = [replace(t, bandwidth=hn.cfg.bandwidth) for t in topo.tenants.values()]
    first = await topo.apply(hn, ts)
    assert first.actions
    start = time.monotonic()
    again = await topo.apply(hn, ts)
    elapsed = time.monotonic() - start
    assert again.actions == [], again.actions
    print(f"no-op apply of 3 tenants: {elapsed * 1000:.1f} ms")
    await asyncio.sleep(0)


# conntrack counting: holds `sys.argv[2]` connections open, then one more per input line
HOLDER = textwrap.dedent(
    """
    import socket, sys
    held = [socket.create_connection((sys.argv[1], 8080), timeout=2)
            for _ in range(int(sys.argv[2]))]
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            held.append(socket.create_connection((sys.argv[1], 8080), timeout=1))
            print("open", flush=True)
        except OSError:
            print("refused", flush=True)
    """
)


async def test_conntrack_counts_survive_table_replacement(topo: Topo) -> None:
    """The limit's counting state lives in a dynamic set that no change of the table
    resets: not a tenant's creation (an element transaction), not a replacement of the
    whole table (a repair after someone flushed it, a configuration change)."""
    hn = topo.network(conntrack_limit=5)
    t1, t2, t3 = (topo.tenants[n] for n in ("t1", "t2", "t3"))
    await topo.apply(hn, [t1, t2])
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    holder = subprocess.Popen(
        ["nsenter", f"--net={topo.ns('t1')}", PY, "-u", "-c", HOLDER, INET_V4, "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    topo.procs.append(holder)
    assert holder.stdin is not None and holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready"

    def one_more() -> str:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        return holder.stdout.readline().strip()

    assert one_more() == "refused"
    # another tenant is created: its elements are added, nothing else changes
    report = await hn.set_tenant(t3, lambda: [t1, t2, t3])
    assert report.actions == ["updated the elements of tenant t3 in table inet nsd (host)"]
    assert one_more() == "refused"
    # someone flushes the table; reconcile replaces it (repair)
    sh(topo.host, "nft", "flush", "table", "inet", "nsd")
    report = await topo.apply(hn)
    assert "replaced table inet nsd (host)" in report.actions
    assert one_more() == "refused"
    # a configuration change with the same limit: the whole table is replaced
    report = await topo.apply(topo.network(conntrack_limit=5, isolation=False))
    assert "replaced table inet nsd (host)" in report.actions
    assert one_more() == "refused"
    # the other tenants keep their own budget
    assert topo.who(topo.ns("t3"), INET_V4, 8080) == UPLINK_V4


def listed_summary(netns: str) -> dict[str, Any]:
    return npol.summary(nft_json(netns, "list", "table", "inet", "nsd"))


async def test_incremental_changes_leave_the_table_a_rebuild_would_load(topo: Topo) -> None:
    """Creations, changes and removals as element transactions: afterwards the live table
    is the one host_document derives, and a full apply finds nothing to do."""
    hn = topo.network(allow=[["t1", "t2"], ["t3", "t1"]], snat={"t2": SNAT_V4})
    t1, t2, t3 = (topo.tenants[n] for n in ("t1", "t2", "t3"))
    await topo.apply(hn, [t1])
    everyone: list[npol.TenantNet] = [t1]
    limited = replace(t2, bandwidth=npol.Bandwidth(10**7, 2 * 10**7))
    for step in (
        ("set", t2),
        ("set", t3),
        ("set", limited),
        ("remove", t1),
        ("set", t1),
        ("remove", t3),
        ("set", t3),
        ("set", t2),
    ):
        op, t = step
        everyone = [x for x in everyone if x.uid != t.uid]
        if op == "set":
            everyone.append(t)
        current = list(everyone)

        def now(e: list[npol.TenantNet] = current) -> list[npol.TenantNet]:
            return e

        if op == "set":
            report = await hn.set_tenant(t, now)
        else:
            report = await hn.remove_tenant(t.uid, now)
        assert report.actions == [
            f"updated the elements of tenant {t.name} in table inet nsd (host)"
        ]
        want = npol.host_document(hn.cfg, hn.site, everyone)
        assert listed_summary(topo.host) == npol.summary(want), step
    # exactly the rules a full load gives: nothing to replace
    report = await hn.apply_host(everyone)
    assert not [a for a in report.actions if "table" in a], report.actions
    # and it works: t3 -> t1 is allowed, t2 goes out through its SNAT address
    for name in ("t1", "t2", "t3"):
        topo.start(topo.ns(name), SERVER, "0.0.0.0", "9000")
    topo.start(topo.inet, SERVER, "0.0.0.0", "8080")
    t1_addr = str(topo.specs["t1"].ipv4_address)
    assert topo.who(topo.ns("t3"), t1_addr, 9000) == str(topo.specs["t3"].ipv4_address)
    assert topo.who(topo.ns("t2"), INET_V4, 8080) == SNAT_V4
    assert topo.who(topo.ns("t1"), INET_V4, 8080) == UPLINK_V4


async def test_drift_in_elements_is_repaired(topo: Topo) -> None:
    """An element added or deleted by hand, a rule changed in place: the live table no
    longer is the derived one, and a full apply replaces it."""
    hn = topo.network()
    await topo.apply(hn)
    t2 = topo.tenants["t2"]
    sh(
        topo.host,
        "nft",
        "delete",
        "element",
        "inet",
        "nsd",
        "tenant_ifs",
        f"{{ {t2.host_ifname} }}",
    )
    sh(topo.host, "nft", "add", "element", "inet", "nsd", "tenant_ifs", "{ nsdx9 }")
    report = await topo.apply(hn)
    assert "replaced table inet nsd (host)" in report.actions
    assert (await topo.apply(hn)).actions == []
    # a rule replaced by one with the same comment (same count): caught by the exact
    # comparison with what was loaded
    listed = nft_json(topo.host, "-a", "list", "chain", "inet", "nsd", "to_tenant")
    last = [o["rule"] for o in listed["nftables"] if "rule" in o][-1]
    comment = '"no new connections from outside"'
    sh(topo.host, "nft", "replace", "rule", "inet", "nsd", "to_tenant", "handle",
       str(last["handle"]), "counter", "accept", "comment", comment)  # fmt: skip
    report = await topo.apply(hn)
    assert "replaced table inet nsd (host)" in report.actions
    # the incremental path falls back to a full load when the table is not what it expects
    sh(topo.host, "nft", "delete", "table", "inet", "nsd")
    report = await hn.remove_tenant(t2.uid, lambda: [topo.tenants["t1"], topo.tenants["t3"]])
    assert "loaded table inet nsd (host)" in report.actions
