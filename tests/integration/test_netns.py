"""The namespace adapter against the real kernel: namespaces, veth pairs, addresses,
routes, sysctls, the ip-netns mount protocol, and the process helpers.

The adapter runs with ``host_netns_path`` = a test-made namespace, so every host-side
link and route lands there, never in the machine's own namespace; namespace files go
to a temporary run dir instead of /run/netns.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any

import pytest

from nsd.net import linux
from nsd.net.netns import FOREIGN, EnsureResult, NetnsAdapter, NetnsError, NetworkRef, NetworkSpec
from nsd.net.netns_worker import WrongThread
from nsd.net.procs import processes_in_namespace, stop_processes

pytestmark = pytest.mark.root

PY = sys.executable

# ICMP echo with a raw socket (the test machine has no ping binary).
PING = textwrap.dedent(
    """
    import os, select, socket, struct, sys, time
    addr = sys.argv[1]
    v6 = ":" in addr
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    s = socket.socket(fam, socket.SOCK_RAW, proto)
    ident = os.getpid() & 0xFFFF
    msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"nsd-test"
    if not v6:
        total = sum(struct.unpack("!%dH" % (len(msg) // 2), msg))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        msg = msg[:2] + struct.pack("!H", ~total & 0xFFFF) + msg[4:]
    s.sendto(msg, (addr, 0))
    end = time.monotonic() + float(sys.argv[2])
    while (left := end - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data = s.recv(2048)
        if not v6:
            data = data[(data[0] & 0xF) * 4 :]
        kind, _, _, got = struct.unpack("!BBHH", data[:6])
        if kind == (129 if v6 else 0) and got == ident:
            sys.exit(0)
    sys.exit(1)
    """
)


# ----------------------------------------------------------------------------------
# helpers


def run_in(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv],
        check=check,
        capture_output=True,
        text=True,
        timeout=30,
    )


def ip_json(netns: str, *argv: str) -> Any:
    return json.loads(run_in(netns, "ip", "-j", *argv).stdout or "[]")


def ping(netns: str, addr: str, timeout: float = 2.0) -> bool:
    return run_in(netns, PY, "-c", PING, addr, str(timeout), check=False).returncode == 0


def addrs(netns: str, dev: str) -> set[str]:
    out = ip_json(netns, "addr", "show", "dev", dev)
    return {f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"]}


def links(netns: str) -> list[str]:
    return sorted(link["ifname"] for link in ip_json(netns, "link", "show"))


def mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split() for line in f]


def procfs_mounts() -> list[list[str]]:
    # the filesystem type follows the "-" that ends the optional fields
    return [m for m in mountinfo() if m[m.index("-") + 1] == "proc"]


def mounts_at(path: str) -> list[list[str]]:
    return [m for m in mountinfo() if m[4] == path]


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().strip()


def sysctl_in(netns: str, key: str) -> str:
    return run_in(netns, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()


def make_spec(run_dir: str, prefix: str, n: int, **over: Any) -> NetworkSpec:
    fields: dict[str, Any] = {
        "netns_path": f"{run_dir}/tenant{n}",
        "host_ifname": f"{prefix}{1000 + n}",
        "peer_ifname": "eth0",
        "ipv4_address": IPv4Address("100.72.0.10") + n,
        "ipv4_gateway": IPv4Address("100.72.0.1"),
        "ipv6_prefix": IPv6Network(f"fd00:72:0:{n:x}::/64"),
        "ipv6_address": IPv6Address(f"fd00:72:0:{n:x}::2"),
        "ipv6_gateway": IPv6Address("fe80::1"),
        "sysctls": (
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("net.ipv4.ping_group_range", "0 2147483647"),
        ),
    }
    fields.update(over)
    return NetworkSpec(**fields)


@pytest.fixture
async def adapter(run_dir: str, link_prefix: str, host_netns: str) -> AsyncIterator[NetnsAdapter]:
    a = NetnsAdapter(run_dir=run_dir, link_prefix=link_prefix, host_netns_path=host_netns)
    await a.start()
    try:
        yield a
    finally:
        await a.close()


@pytest.fixture
def spec(run_dir: str, link_prefix: str) -> NetworkSpec:
    return make_spec(run_dir, link_prefix, 1)


async def on_worker(adapter: NetnsAdapter, fn: Callable[[], Any]) -> Any:
    return await adapter._call(fn)  # looking inside on purpose


# ----------------------------------------------------------------------------------
# ensure: creation, verified from outside


async def test_ensure_creates_everything(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str, run_dir: str
) -> None:
    result = await adapter.ensure(spec)
    assert not result.adopted_existing
    assert f"created namespace {spec.netns_path}" in result.actions
    assert result.inode == os.stat(spec.netns_path).st_ino
    assert adapter.namespace_inode(spec.netns_path) == result.inode

    # tenant side
    ns = spec.netns_path
    assert links(ns) == ["eth0", "lo"]
    assert addrs(ns, "eth0") >= {"100.72.0.11/32", "fd00:72:0:1::2/64"}
    eth0 = ip_json(ns, "link", "show", "dev", "eth0")[0]
    assert "UP" in eth0["flags"]
    assert "UP" in ip_json(ns, "link", "show", "dev", "lo")[0]["flags"]
    v6 = ip_json(ns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert any(a["local"] == "fd00:72:0:1::2" and a.get("nodad") for a in v6)
    routes4 = ip_json(ns, "-4", "route", "show")
    assert {"dst": "default", "gateway": "100.72.0.1", "dev": "eth0"}.items() <= next(
        r for r in routes4 if r["dst"] == "default"
    ).items()
    assert "onlink" in next(r for r in routes4 if r["dst"] == "default")["flags"]
    gw_route = next(r for r in routes4 if r["dst"] == "100.72.0.1")
    assert gw_route["dev"] == "eth0" and gw_route["scope"] == "link"
    default6 = next(r for r in ip_json(ns, "-6", "route", "show") if r["dst"] == "default")
    assert default6["gateway"] == "fe80::1" and default6["dev"] == "eth0"
    assert sysctl_in(ns, "net.ipv4.ip_unprivileged_port_start") == "0"
    assert sysctl_in(ns, "net.ipv4.ping_group_range").split() == ["0", "2147483647"]

    # host side, in the test's host namespace -- and not in the machine's own
    host = spec.host_ifname
    assert addrs(host_netns, host) >= {"100.72.0.1/32", "fe80::1/64"}
    host_link = ip_json(host_netns, "link", "show", "dev", host)[0]
    assert "UP" in host_link["flags"]
    r4 = ip_json(host_netns, "-4", "route", "show", "100.72.0.11/32")[0]
    assert (r4["dev"], r4["scope"], r4["prefsrc"]) == (host, "link", "100.72.0.1")
    r6 = ip_json(host_netns, "-6", "route", "show", "fd00:72:0:1::/64")[0]
    assert r6["dev"] == host
    in_root = subprocess.run(["ip", "link", "show", host], check=False, capture_output=True)
    assert in_root.returncode != 0
    # the host's own sysctl is untouched: the sysctls went into the tenant's namespace
    assert sysctl_in(host_netns, "net.ipv4.ip_unprivileged_port_start") == "1024"

    # the worker thread is back home; the main thread never moved
    assert await on_worker(adapter, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == (
        os.stat(host_netns).st_ino
    )
    main_thread_ns = os.stat("/proc/thread-self/ns/net").st_ino
    assert main_thread_ns not in (os.stat(host_netns).st_ino, result.inode)


async def test_traffic_both_families(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    await adapter.ensure(spec)
    assert ping(host_netns, "100.72.0.11")
    assert ping(host_netns, "fd00:72:0:1::2")
    # and from inside out, through the default routes
    assert ping(spec.netns_path, "100.72.0.1")
    assert ping(spec.netns_path, "fe80::1%eth0")


async def test_second_ensure_changes_nothing(adapter: NetnsAdapter, spec: NetworkSpec) -> None:
    first = await adapter.ensure(spec)
    second = await adapter.ensure(spec)
    assert first.actions
    assert second.actions == ()
    assert second.adopted_existing
    assert second.inode == first.inode


async def test_mtu(adapter: NetnsAdapter, run_dir: str, link_prefix: str, host_netns: str) -> None:
    spec = make_spec(run_dir, link_prefix, 2, mtu=1400)
    await adapter.ensure(spec)
    assert ip_json(host_netns, "link", "show", "dev", spec.host_ifname)[0]["mtu"] == 1400
    assert ip_json(spec.netns_path, "link", "show", "dev", "eth0")[0]["mtu"] == 1400
    run_in(spec.netns_path, "ip", "link", "set", "eth0", "mtu", "1500")
    assert (await adapter.ensure(spec)).actions == (f"set mtu 1400 on eth0 ({spec.netns_path})",)
    assert (await adapter.ensure(spec)).actions == ()


# ----------------------------------------------------------------------------------
# repairs


async def test_repairs_deleted_veth(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    first = await adapter.ensure(spec)
    run_in(host_netns, "ip", "link", "del", spec.host_ifname)
    result = await adapter.ensure(spec)
    assert result.inode == first.inode and result.adopted_existing
    assert any(a.startswith("created veth") for a in result.actions)
    assert (await adapter.ensure(spec)).actions == ()
    assert ping(host_netns, "100.72.0.11")
    assert ping(host_netns, "fd00:72:0:1::2")


async def test_repairs_addresses_routes_and_link_state(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    await adapter.ensure(spec)
    ns = spec.netns_path
    run_in(ns, "ip", "addr", "del", "100.72.0.11/32", "dev", "eth0")
    run_in(ns, "ip", "addr", "add", "10.99.0.1/32", "dev", "eth0")  # a wrong one
    run_in(ns, "ip", "-6", "route", "del", "default")
    run_in(host_netns, "ip", "route", "del", "100.72.0.11/32")
    run_in(host_netns, "ip", "-6", "addr", "del", "fe80::1/64", "dev", spec.host_ifname)
    result = await adapter.ensure(spec)
    assert sorted(result.actions) == sorted(
        [
            f"deleted 10.99.0.1/32 from eth0 ({ns})",
            f"added 100.72.0.11/32 to eth0 ({ns})",
            # removing a link's last IPv4 address makes the kernel flush its IPv4 routes
            f"added route 100.72.0.1/32 dev eth0 ({ns})",
            f"added route 0.0.0.0/0 via 100.72.0.1 dev eth0 ({ns})",
            f"added route ::/0 via fe80::1 dev eth0 ({ns})",
            f"added fe80::1/64 to {spec.host_ifname} (host)",
            f"added route 100.72.0.11/32 src 100.72.0.1 dev {spec.host_ifname} (host)",
        ]
    )
    assert (await adapter.ensure(spec)).actions == ()

    # a wrong default route is replaced, not duplicated
    run_in(ns, "ip", "route", "replace", "default", "via", "100.72.0.99", "dev", "eth0", "onlink")
    result = await adapter.ensure(spec)
    assert any(a.startswith("deleted a wrong route to 0.0.0.0/0") for a in result.actions)
    assert [r["gateway"] for r in ip_json(ns, "-4", "route", "show", "default")] == ["100.72.0.1"]

    # links set down (which also flushes their IPv6 addresses)
    run_in(ns, "ip", "link", "set", "eth0", "down")
    run_in(ns, "ip", "link", "set", "lo", "down")
    run_in(host_netns, "ip", "link", "set", spec.host_ifname, "down")
    result = await adapter.ensure(spec)
    assert f"set eth0 up ({ns})" in result.actions
    assert f"set lo up ({ns})" in result.actions
    assert f"set {spec.host_ifname} up (host)" in result.actions
    assert (await adapter.ensure(spec)).actions == ()
    assert ping(host_netns, "100.72.0.11")
    assert ping(host_netns, "fd00:72:0:1::2")


async def test_repairs_renamed_peer_and_sysctl(adapter: NetnsAdapter, spec: NetworkSpec) -> None:
    await adapter.ensure(spec)
    ns = spec.netns_path
    run_in(ns, "ip", "link", "set", "eth0", "down")
    run_in(ns, "ip", "link", "set", "eth0", "name", "renamed0")
    run_in(ns, "sh", "-c", "echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start")
    result = await adapter.ensure(spec)
    assert f"renamed renamed0 to eth0 in {ns}" in result.actions
    assert f"set net.ipv4.ip_unprivileged_port_start=0 in {ns}" in result.actions
    assert links(ns) == ["eth0", "lo"]
    assert (await adapter.ensure(spec)).actions == ()


async def test_stale_file_gets_a_fresh_namespace(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    first = await adapter.ensure(spec)
    linux.umount2(spec.netns_path, linux.MNT_DETACH)  # e.g. /run survived, mounts did not
    assert os.path.exists(spec.netns_path)
    assert adapter.namespace_inode(spec.netns_path) is None
    result = await adapter.ensure(spec)
    assert not result.adopted_existing
    assert result.inode != first.inode
    assert f"found stale namespace file {spec.netns_path}" in result.actions
    assert len(mounts_at(spec.netns_path)) == 1
    assert (await adapter.ensure(spec)).actions == ()
    assert ping(host_netns, "100.72.0.11")


async def test_new_namespace_replaces_a_host_link_with_its_name(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    """A link already holding the host end's name (here a veth whose peer is in the
    host) when a new namespace is made is deleted, and the pair made."""
    peer = "sq" + spec.host_ifname
    run_in(host_netns, "ip", "link", "add", spec.host_ifname, "type", "veth", "peer", "name", peer)
    result = await adapter.ensure(spec)
    assert not result.adopted_existing
    assert f"deleted {spec.host_ifname}: its peer was not in {spec.netns_path}" in result.actions
    host_link = ip_json(host_netns, "-d", "link", "show", "dev", spec.host_ifname)[0]
    assert host_link["linkinfo"]["info_kind"] == "veth"
    assert links(spec.netns_path) == ["eth0", "lo"]
    assert peer not in [link["ifname"] for link in ip_json(host_netns, "link", "show")]
    assert (await adapter.ensure(spec)).actions == ()
    assert ping(host_netns, "100.72.0.11")


async def test_recreated_namespace_while_old_one_is_pinned(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    """The old namespace stays alive (an fd pins it), so the host end of the veth still
    exists, its peer in the wrong namespace: ensure must replace the pair."""
    await adapter.ensure(spec)
    pin = os.open(spec.netns_path, os.O_RDONLY)
    try:
        linux.umount2(spec.netns_path, linux.MNT_DETACH)
        result = await adapter.ensure(spec)
        assert (
            f"deleted {spec.host_ifname}: its peer was not in {spec.netns_path}" in result.actions
        )
        assert any(a.startswith("created veth") for a in result.actions)
        assert (await adapter.ensure(spec)).actions == ()
        assert ping(host_netns, "100.72.0.11")
    finally:
        os.close(pin)


async def test_adopts_a_namespace_made_by_someone_else(
    adapter: NetnsAdapter, spec: NetworkSpec, run_dir: str
) -> None:
    path = spec.netns_path
    with open(path, "w"):
        pass
    # unshare(1) without --mount: the bind mount lands in our mount namespace
    subprocess.run(["unshare", "--net", "mount", "--bind", "/proc/self/ns/net", path], check=True)
    inode = os.stat(path).st_ino
    with pytest.raises(NetnsError) as info:
        await adapter.ensure(spec, adopt=False)
    assert info.value.step == "exists"
    result = await adapter.ensure(spec)
    assert result.adopted_existing and result.inode == inode
    assert not any(a.startswith("created namespace") for a in result.actions)


# ----------------------------------------------------------------------------------
# the mount protocol


async def test_run_dir_is_a_shared_mount_point_and_mounts_do_not_stack(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str
) -> None:
    specs = [make_spec(run_dir, link_prefix, n) for n in (1, 2)]
    for s in specs:
        await adapter.ensure(s)
    run_mounts = mounts_at(run_dir)
    assert len(run_mounts) == 1
    assert any(field.startswith("shared:") for field in run_mounts[0][6:])
    for s in specs:
        ns_mounts = mounts_at(s.netns_path)
        assert len(ns_mounts) == 1, ns_mounts
        assert ns_mounts[0][8] == "nsfs"
        # shared too, the second as well, for which the run dir was only kept shared
        # (not walked recursively again): born under a shared mount
        assert any(f.startswith("shared:") for f in ns_mounts[0][6 : ns_mounts[0].index("-")])
    # no copies of the namespace files anywhere else (e.g. the run dir's parent)
    for s in specs:
        inode = f"net:[{os.stat(s.netns_path).st_ino}]"
        assert [m[4] for m in mountinfo() if m[3] == inode] == [s.netns_path]
    # a second adapter (a daemon restart) neither stacks the run dir nor the files
    second = NetnsAdapter(
        run_dir=run_dir, link_prefix=link_prefix, host_netns_path=adapter.host_netns_path
    )
    await second.start()
    try:
        await second.ensure(make_spec(run_dir, link_prefix, 3))
        assert (await second.ensure(specs[0])).actions == ()
    finally:
        await second.close()
    assert len(mounts_at(run_dir)) == 1


async def test_remove_leaves_nothing(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    await adapter.ensure(spec)
    actions = await adapter.remove(spec)
    assert actions == (
        f"deleted {spec.host_ifname}",
        f"unmounted {spec.netns_path}",
        f"removed {spec.netns_path}",
    )
    assert not os.path.exists(spec.netns_path)
    assert mounts_at(spec.netns_path) == []
    assert spec.host_ifname not in links(host_netns)
    assert ip_json(host_netns, "-4", "route", "show", "100.72.0.11/32") == []
    assert await adapter.remove(spec) == ()
    assert await adapter.remove(NetworkRef(spec.netns_path)) == ()


# ----------------------------------------------------------------------------------
# concurrency


async def test_concurrent_ensures_of_different_specs(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str, host_netns: str
) -> None:
    specs = [make_spec(run_dir, link_prefix, n) for n in range(1, 21)]
    results = await asyncio.gather(*(adapter.ensure(s) for s in specs))
    assert len({r.inode for r in results}) == 20
    assert all(not r.adopted_existing for r in results)
    assert sorted(await adapter.list_prefixed_links()) == sorted(s.host_ifname for s in specs)
    for s, r in zip(specs, results, strict=True):
        assert [m[3] for m in mounts_at(s.netns_path)] == [f"net:[{r.inode}]"]
        assert links(s.netns_path) == ["eth0", "lo"]
    assert len(mounts_at(run_dir)) == 1
    again = await asyncio.gather(*(adapter.ensure(s) for s in specs))
    assert all(r.actions == () for r in again)
    assert ping(host_netns, str(specs[-1].ipv4_address))


async def test_concurrent_ensures_of_the_same_spec(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str
) -> None:
    results = await asyncio.gather(*(adapter.ensure(spec) for _ in range(10)))
    assert len({r.inode for r in results}) == 1
    assert sum(1 for r in results if not r.adopted_existing) == 1
    assert sum(1 for r in results if r.actions) == 1
    assert len(mounts_at(spec.netns_path)) == 1
    assert [name for name in links(host_netns) if name != "lo"] == [spec.host_ifname]
    assert links(spec.netns_path) == ["eth0", "lo"]


# ----------------------------------------------------------------------------------
# ensure_many: a batch's new namespaces made ahead on the worker's maker thread


def maker_threads(adapter: NetnsAdapter) -> list[int]:
    """Native ids of the namespace maker's threads (looking inside on purpose)."""
    pool = adapter._worker.maker._pool
    return [t.native_id for t in pool._threads if t.native_id is not None] if pool else []


async def test_a_batch_makes_its_new_namespaces_ahead(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str, host_netns: str
) -> None:
    specs = [make_spec(run_dir, link_prefix, n) for n in range(1, 9)]
    await adapter.ensure(specs[2])  # present: adopted, not made again
    with open(specs[5].netns_path, "w", encoding="utf-8") as f:
        f.write("not nsd's")  # in the way: that tenant fails, the batch goes on
    fds_before = len(os.listdir("/proc/self/fd"))
    results = await adapter.ensure_many(specs)

    failed = results[5]
    assert isinstance(failed, NetnsError) and failed.step == FOREIGN, failed
    assert results[2] == EnsureResult(
        inode=os.stat(specs[2].netns_path).st_ino, adopted_existing=True, actions=()
    )
    made = [(s, r) for i, (s, r) in enumerate(zip(specs, results, strict=True)) if i not in (2, 5)]
    for s, r in made:
        assert isinstance(r, EnsureResult)
        assert not r.adopted_existing
        assert r.actions[0] == f"created namespace {s.netns_path}", r.actions
        assert [m[3] for m in mounts_at(s.netns_path)] == [f"net:[{r.inode}]"]
        assert links(s.netns_path) == ["eth0", "lo"]
        assert addrs(s.netns_path, "eth0") >= {f"{s.ipv4_address}/32", f"{s.ipv6_address}/64"}
        assert sysctl_in(s.netns_path, "net.ipv4.ip_unprivileged_port_start") == "0"
    assert len({r.inode for _, r in made if isinstance(r, EnsureResult)}) == len(made) == 6
    assert all(ping(host_netns, str(s.ipv4_address)) for s, _ in made[:: len(made) - 1])
    assert len(mounts_at(run_dir)) == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every namespace fd closed
    # they were made on the maker's thread, which went home after each
    threads = maker_threads(adapter)
    assert len(threads) == 1
    home = os.stat(host_netns).st_ino
    assert os.stat(f"/proc/self/task/{threads[0]}/ns/net").st_ino == home
    assert await adapter.ensure_many(specs[:5]) == [
        EnsureResult(inode=r.inode, adopted_existing=True, actions=())
        for r in results[:5]
        if isinstance(r, EnsureResult)
    ]


async def test_ensures_waiting_for_the_worker_are_served_together(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str
) -> None:
    specs = [make_spec(run_dir, link_prefix, n) for n in range(1, 7)]
    with open(specs[3].netns_path, "w", encoding="utf-8") as f:
        f.write("not nsd's")
    busy = asyncio.ensure_future(on_worker(adapter, lambda: time.sleep(0.3)))
    await asyncio.sleep(0.05)  # the worker is in it: the ensures below queue up
    calls = [asyncio.ensure_future(adapter.ensure(s)) for s in specs]
    await asyncio.sleep(0)
    calls[1].cancel()  # its caller gives up before the worker is free
    await busy
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert not os.path.exists(specs[1].netns_path)  # a cancelled call is not built
    failed = outcomes[3]
    assert isinstance(failed, NetnsError) and failed.step == FOREIGN  # for that caller only
    built: dict[int, EnsureResult] = {}
    for i in (0, 2, 4, 5):
        result = outcomes[i]
        assert isinstance(result, EnsureResult), result
        assert not result.adopted_existing
        assert result.inode == os.stat(specs[i].netns_path).st_ino  # each caller its own
        assert links(specs[i].netns_path) == ["eth0", "lo"]
        built[i] = result
    # served by one job, whose new namespaces the maker made ahead
    assert len(maker_threads(adapter)) == 1
    assert [await adapter.ensure(specs[i]) for i in (0, 2)] == [
        EnsureResult(inode=built[i].inode, adopted_existing=True, actions=()) for i in (0, 2)
    ]


async def test_a_batch_that_ends_early_closes_what_was_made_ahead(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str
) -> None:
    paths = [make_spec(run_dir, link_prefix, n).netns_path for n in range(1, 6)]
    fds_before = len(os.listdir("/proc/self/fd"))

    def take_one_then_stop() -> int:
        worker = adapter._worker
        with worker.files.batch():
            ahead = worker.maker.make([(p, True) for p in paths])
            try:
                made = ahead.take(paths[0])
                assert made is not None
                fd, adopted, actions = made
                os.close(fd)
                assert not adopted and actions[-1] == f"created namespace {paths[0]}"
                return os.stat(paths[0]).st_ino
            finally:
                ahead.finish()  # the other four: made or never begun

    inode = await on_worker(adapter, take_one_then_stop)
    assert adapter.namespace_inode(paths[0]) == inode
    assert len(os.listdir("/proc/self/fd")) == fds_before
    for path in paths[1:]:
        # made whole or not begun: never a file without its namespace
        assert adapter.namespace_inode(path) is not None or not os.path.exists(path)


# ----------------------------------------------------------------------------------
# host queries


async def test_list_prefixed_links_only_lists_nsd_names(
    adapter: NetnsAdapter, link_prefix: str, host_netns: str, spec: NetworkSpec
) -> None:
    await adapter.ensure(spec)
    for name, peer in (
        (f"{link_prefix}X", "pa"),
        (f"{link_prefix}01", "pb"),
        ("other0", "pc"),
        (f"{link_prefix}7", "pd"),
        (f"{link_prefix}0", "pe"),
    ):
        run_in(host_netns, "ip", "link", "add", name, "type", "veth", "peer", "name", peer)
    assert await adapter.list_prefixed_links() == sorted(
        [f"{link_prefix}0", f"{link_prefix}7", spec.host_ifname]
    )
    for bad in (f"{link_prefix}01", f"{link_prefix}X", "other0", "lo", f"{link_prefix}"):
        with pytest.raises(NetnsError) as info:
            await adapter.delete_link(bad)
        assert info.value.step == "validate"
    await adapter.delete_link(f"{link_prefix}7")
    await adapter.delete_link(f"{link_prefix}7")  # missing is fine
    names = links(host_netns)
    assert f"{link_prefix}7" not in names
    assert {f"{link_prefix}01", f"{link_prefix}X", "other0"} <= set(names)


async def test_host_routes(adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str) -> None:
    await adapter.ensure(spec)
    run_in(host_netns, "ip", "route", "add", "blackhole", "198.51.100.0/24")
    run_in(host_netns, "ip", "-6", "route", "add", "blackhole", "2001:db8:5::/48")
    run_in(host_netns, "ip", "route", "add", "blackhole", "default")
    routes = {str(r) for r in await adapter.host_routes()}
    assert {"198.51.100.0/24", "2001:db8:5::/48"} <= routes
    assert "0.0.0.0/0" not in routes
    assert "100.72.0.11/32" not in routes  # through the tenant's link: ours
    assert str(spec.ipv6_prefix) not in routes


# ----------------------------------------------------------------------------------
# validation: refused before anything is touched


@pytest.mark.parametrize(
    ("override", "step"),
    [
        ({"netns_path": "/tmp/elsewhere"}, "validate"),
        ({"netns_path": "RUN/../escape"}, "validate"),
        ({"host_ifname": "eth0"}, "validate"),
        ({"host_ifname": "PREFIX01"}, "validate"),
        ({"peer_ifname": "a/b"}, "validate"),
        ({"peer_ifname": "x" * 16}, "validate"),
        ({"sysctls": (("kernel.pid_max", "1"),)}, "validate"),
        ({"sysctls": (("net.ipv4/../../x", "1"),)}, "validate"),
        ({"sysctls": (("net..ipv4", "1"),)}, "validate"),
        ({"sysctls": (("net.ipv4.ip_forward", "1\n2"),)}, "validate"),
        ({"ipv6_gateway": IPv6Address("2001:db8::1")}, "validate"),
        ({"ipv6_address": IPv6Address("fd00:99::2")}, "validate"),
        ({"mtu": 20}, "validate"),
    ],
)
async def test_validation(
    adapter: NetnsAdapter,
    run_dir: str,
    link_prefix: str,
    override: dict[str, Any],
    step: str,
) -> None:
    fixed = {
        k: (v.replace("RUN", run_dir).replace("PREFIX", link_prefix) if isinstance(v, str) else v)
        for k, v in override.items()
    }
    with pytest.raises(NetnsError) as info:
        await adapter.ensure(make_spec(run_dir, link_prefix, 1, **fixed))
    assert info.value.step == step
    assert os.listdir(run_dir) == []


async def test_unknown_sysctl_fails_with_errno(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str
) -> None:
    spec = make_spec(run_dir, link_prefix, 1, sysctls=(("net.ipv4.no_such_knob", "1"),))
    with pytest.raises(NetnsError) as info:
        await adapter.ensure(spec)
    assert info.value.step == "sysctl"
    assert info.value.errno == 2


def port_start_specs(run_dir: str, link_prefix: str, count: int) -> list[NetworkSpec]:
    """Specs whose sysctl value differs per tenant: a value seen in the wrong
    namespace shows."""
    return [
        make_spec(
            run_dir,
            link_prefix,
            n,
            sysctls=(("net.ipv4.ip_unprivileged_port_start", str(100 + n)),),
        )
        for n in range(1, count + 1)
    ]


async def test_sysctls_go_through_a_renewed_procfs_of_the_workers_own(
    adapter: NetnsAdapter,
    run_dir: str,
    link_prefix: str,
    host_netns: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nsd/net/sysctl_files.py: the worker opens sysctls through a procfs instance of
    its own, mounted nowhere and replaced after every ``renew_after`` namespaces; each
    namespace still gets (and is checked against) its own value."""
    mounted: list[int] = []
    real = linux.detached_mount

    def counted(fstype: str) -> int:
        fd = real(fstype)
        mounted.append(fd)
        return fd

    monkeypatch.setattr(linux, "detached_mount", counted)
    files = adapter._worker.sysctl_files  # looking inside on purpose
    files.renew_after = 2
    before = procfs_mounts()
    specs = port_start_specs(run_dir, link_prefix, 5)
    for s in specs:
        result = await adapter.ensure(s)
        value = s.sysctls[0][1]
        assert f"set net.ipv4.ip_unprivileged_port_start={value} in {s.netns_path}" in (
            result.actions
        )
    # namespaces 1-2, 3-4 and 5, one instance each
    assert len(mounted) == 3
    assert files.own_procfs
    for s in specs:
        assert sysctl_in(s.netns_path, "net.ipv4.ip_unprivileged_port_start") == s.sysctls[0][1]
    assert sysctl_in(host_netns, "net.ipv4.ip_unprivileged_port_start") == "1024"
    # a restart's check reads through it and finds nothing to change
    for s in specs:
        assert (await adapter.ensure(s)).actions == ()
    # the instance of namespace 5 also serves the check of 1; then 2-3 and 4-5
    assert len(mounted) == 5
    # in no mount table: not the test's, not the worker's (the same mount namespace)
    assert procfs_mounts() == before


async def test_sysctls_fall_back_to_proc_without_the_mount_api(
    adapter: NetnsAdapter,
    run_dir: str,
    link_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where fsopen() is refused (a seccomp filter without @mount), the sysctls are
    opened through /proc: slower at many namespaces, the same result."""
    calls: list[str] = []

    def refused(fstype: str) -> int:
        calls.append(fstype)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(linux, "detached_mount", refused)
    specs = port_start_specs(run_dir, link_prefix, 3)
    with caplog.at_level("INFO", logger="nsd.net.sysctl_files"):
        for s in specs:
            await adapter.ensure(s)
    assert calls == ["proc"]  # asked once, then /proc for good
    assert not adapter._worker.sysctl_files.own_procfs
    assert "sysctls are opened through /proc" in caplog.text
    for s in specs:
        assert sysctl_in(s.netns_path, "net.ipv4.ip_unprivileged_port_start") == s.sysctls[0][1]


# ----------------------------------------------------------------------------------
# resources: no forks, no fd leaks


async def test_no_forks_and_no_fd_leak(
    adapter: NetnsAdapter, run_dir: str, link_prefix: str
) -> None:
    specs = [make_spec(run_dir, link_prefix, n) for n in range(1, 11)]
    await adapter.ensure(specs[0])
    await adapter.remove(specs[0])
    fds_before = len(os.listdir("/proc/self/fd"))
    events: list[str] = []
    watching = True

    def hook(event: str, _args: tuple[Any, ...]) -> None:
        if watching and event in ("os.fork", "os.posix_spawn", "subprocess.Popen", "os.exec"):
            events.append(event)

    sys.addaudithook(hook)
    try:
        for _ in range(3):
            for s in specs:
                await adapter.ensure(s)
                await adapter.ensure(s)
            for s in specs:
                await adapter.remove(s)
    finally:
        watching = False
    assert events == []
    assert len(os.listdir("/proc/self/fd")) == fds_before

    # Creating and removing never made a pyroute2 socket (whose 0.9.7 leaves the ACK of
    # every link("get") in a catch-all queue): all of it went through nsd's own sockets.
    assert adapter._worker._ipr is None


# ----------------------------------------------------------------------------------
# processes inside a namespace


async def test_processes_found_and_stopped(adapter: NetnsAdapter, spec: NetworkSpec) -> None:
    result = await adapter.ensure(spec)
    polite = subprocess.Popen(["nsenter", f"--net={spec.netns_path}", "sleep", "1000"])
    stubborn = subprocess.Popen(
        ["nsenter", f"--net={spec.netns_path}", "sh", "-c", "trap '' TERM; exec sleep 1000"]
    )
    outsider = subprocess.Popen(["sleep", "1000"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = processes_in_namespace(result.inode)
            # both in the namespace, and both already `sleep`: the stubborn one has
            # set its trap (the shell execs sleep only after it), or under load TERM
            # can reach the shell first and end it
            if found == sorted([polite.pid, stubborn.pid]) and all(
                comm(p) == "sleep" for p in found
            ):
                break
            await asyncio.sleep(0.02)
        assert found == sorted([polite.pid, stubborn.pid])
        assert [comm(p) for p in found] == ["sleep", "sleep"]
        started = time.monotonic()
        stopped = await stop_processes(
            [*found, outsider.pid], term_timeout=0.5, kill_timeout=5, netns_inode=result.inode
        )
        assert time.monotonic() - started < 4
        assert stopped.terminated == (polite.pid,)
        assert stopped.killed == (stubborn.pid,)
        assert stopped.skipped == (outsider.pid,)  # not in that namespace: left alone
        assert stopped.survivors == ()
        assert polite.wait(5) == -signal.SIGTERM
        assert stubborn.wait(5) == -signal.SIGKILL
        assert outsider.poll() is None
        assert processes_in_namespace(result.inode) == []
    finally:
        for p in (polite, stubborn, outsider):
            p.kill()
            p.wait()


async def test_stop_processes_of_vanished_pids() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    stopped = await stop_processes([p.pid], term_timeout=0.1)
    assert stopped.skipped == (p.pid,)
    with pytest.raises(ValueError, match="refusing"):
        await stop_processes([os.getpid()])


# ----------------------------------------------------------------------------------
# failure handling


async def test_failed_bind_mount_is_undone(
    adapter: NetnsAdapter, spec: NetworkSpec, host_netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mount = linux.mount

    def failing_mount(source: str | None, target: str, *args: Any) -> None:
        if target == spec.netns_path:
            raise OSError(28, "No space left on device", target)
        real_mount(source, target, *args)

    monkeypatch.setattr(linux, "mount", failing_mount)
    with pytest.raises(NetnsError) as info:
        await adapter.ensure(spec)
    assert (info.value.step, info.value.errno) == ("mount", 28)
    assert not os.path.exists(spec.netns_path)  # the file this call made is gone
    # and the worker went back home after unshare()
    assert await on_worker(adapter, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == (
        os.stat(host_netns).st_ino
    )
    monkeypatch.setattr(linux, "mount", real_mount)
    assert not (await adapter.ensure(spec)).adopted_existing


async def test_a_job_off_the_worker_thread_is_refused(adapter: NetnsAdapter) -> None:
    """Only the worker thread may switch namespaces: a job run from anywhere else (here
    the event loop's thread) is refused before it runs (an explicit check, not an
    assert that ``python -O`` would remove)."""
    ran: list[bool] = []
    with pytest.raises(WrongThread):
        adapter._worker.run(lambda: ran.append(True))  # looking inside on purpose
    assert ran == []
    assert await on_worker(adapter, lambda: "fine") == "fine"


def test_worker_that_cannot_return_home_ends_the_process(
    host_netns: str, run_dir: str, link_prefix: str
) -> None:
    """If setns() back to the host fails, no thread may go on in a tenant's namespace:
    the process exits with status 70."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from nsd.net import linux
        from nsd.net.netns import NetnsAdapter
        from tests.integration.test_netns import make_spec

        async def main():
            a = NetnsAdapter({run_dir!r}, {link_prefix!r}, host_netns_path={host_netns!r})
            await a.start()
            real = linux.setns
            def setns(fd, nstype=0):
                if fd == a._worker.host_fd:
                    raise OSError(1, "Operation not permitted")
                real(fd, nstype)
            linux.setns = setns
            await a.ensure(make_spec({run_dir!r}, {link_prefix!r}, 1))
            print("still running")

        asyncio.run(main())
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [PY, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 70, proc.stderr
    assert "still running" not in proc.stdout
    assert "cannot return the netns worker to the host namespace" in proc.stderr


@pytest.mark.parametrize("mount_id_known", [True, False])
async def test_run_dir_shared_recursively_only_while_its_mount_is_new(
    adapter: NetnsAdapter,
    run_dir: str,
    link_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    mount_id_known: bool,
) -> None:
    """The run dir is shared recursively (walking every namespace mounted below) the
    first time; later only its own mount is kept shared, so a namespace mount made
    private meanwhile stays private. Without a mount id from procfs every new namespace
    shares it recursively, as before, and that mount is shared again."""

    def shared(path: str) -> bool:
        (m,) = mounts_at(path)
        return any(f.startswith("shared:") for f in m[6 : m.index("-")])

    if not mount_id_known:

        def no_mount_id(fd: int) -> int:
            raise OSError(errno.ENOTSUP, "no mnt_id")

        monkeypatch.setattr(linux, "mount_id", no_mount_id)
    first, second = (make_spec(run_dir, link_prefix, n) for n in (1, 2))
    await adapter.ensure(first)
    assert shared(first.netns_path)
    linux.mount("", first.netns_path, None, linux.MS_PRIVATE)
    assert not shared(first.netns_path)
    assert not (await adapter.ensure(second)).adopted_existing
    assert shared(second.netns_path)
    assert shared(first.netns_path) is not mount_id_known


async def test_run_dir_inside_a_shared_mount_gets_its_own_peer_group(
    run_dir: str, link_prefix: str, host_netns: str
) -> None:
    """The Debian bug 949235 setting: the run dir's parent is a shared mount (as / is
    under systemd). The run dir must leave the parent's peer group, or every namespace
    mount propagates back into the parent and mounts multiply."""
    parent = os.path.join(run_dir, "shared")
    os.mkdir(parent)
    linux.mount("tmpfs", parent, "tmpfs", 0, "size=1m")
    linux.mount("", parent, None, linux.MS_SHARED)
    netns_dir = os.path.join(parent, "netns")  # does not exist yet: ensure makes it
    a = NetnsAdapter(run_dir=netns_dir, link_prefix=link_prefix, host_netns_path=host_netns)
    await a.start()
    try:
        specs = [make_spec(netns_dir, link_prefix, n) for n in (1, 2, 3)]
        for s in specs:
            await a.ensure(s)
        assert oct(os.stat(netns_dir).st_mode & 0o777) == "0o755"

        def groups(path: str) -> set[str]:
            (m,) = mounts_at(path)
            return {f for f in m[6 : m.index("-")] if f.startswith(("shared:", "master:"))}

        parent_groups, dir_groups = groups(parent), groups(netns_dir)
        assert any(g.startswith("shared:") for g in dir_groups)
        assert not parent_groups & dir_groups
        for s in specs:
            inode = f"net:[{os.stat(s.netns_path).st_ino}]"
            assert [m[4] for m in mountinfo() if m[3] == inode] == [s.netns_path]
        assert len(mounts_at(netns_dir)) == 1
    finally:
        await a.close()
