"""Connections refused by the conntrack limit are faults, through the real daemon and
real traffic: a tenant holds its limit of connections to a server behind the uplink
and tries more; the kernel drops them in the host table's guard rule and counts them
in the tenant's element of the ``ctdrops`` set; nsd reads that at its next sample and
records a ``conntrack`` fault - counter, Watch event, stored record (GetFaults,
``nsctl faults``) and the journal record (nsd's log here: no journald on this host).
Another tenant keeps its own budget and has no fault."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import PY, Daemon, TestUsers, uid_of
from tests.integration.test_metrics_daemon import PORT, scrape
from tests.integration.test_network_daemon import uplinked_daemon, wait_open

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, nftables"),
]

T = "io.nsd.Tenant."
LIMIT = 3
# Holds LIMIT connections to the server, then tries sys.argv[2] more (each refused
# attempt is one dropped SYN: the timeout is shorter than TCP's first retransmission).
HOLDER = textwrap.dedent(
    f"""
    import socket, sys
    held = [socket.create_connection((sys.argv[1], 8080), timeout=2) for _ in range({LIMIT})]
    refused = 0
    for _ in range(int(sys.argv[2])):
        try:
            held.append(socket.create_connection((sys.argv[1], 8080), timeout=0.5))
        except OSError:
            refused += 1
    print(refused, flush=True)
    sys.stdin.read()  # keep the connections until the test is done
    """
)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers, str]]:
    extra = f'[metrics]\nlisten = "127.0.0.1:{PORT}"\ninterval = 1.0\n[faults]\ncoalesce = 1.0\n'
    with uplinked_daemon(network=f"conntrack_limit = {LIMIT}\n", extra=extra) as found:
        yield found


def watch_faults(d: Daemon, name: str, got: list[dict[str, Any]], seen: threading.Event) -> None:
    with d.client() as c:
        for reply in c.call_more(T + "Watch", {"name": name}):
            if reply.get("fault") is not None:
                got.append(reply["fault"])
                seen.set()
                return


def test_conntrack_drops_are_faults(env: tuple[Daemon, TestUsers, str]) -> None:
    d, users, _inet = env
    alice, bob = users.add(), users.add()
    ta = d.call(T + "Create", name=alice)["tenant"]
    tb = d.call(T + "Create", name=bob)["tenant"]
    assert wait_open(ta["namespacePath"], "10.99.0.2", 8080) == "10.99.0.1"
    events: list[dict[str, Any]] = []
    seen = threading.Event()
    watcher = threading.Thread(target=watch_faults, args=(d, alice, events, seen), daemon=True)
    watcher.start()
    time.sleep(1.5)  # a sample after the watch began: the counters' baseline is taken
    holder = subprocess.Popen(
        ["nsenter", f"--net={ta['namespacePath']}", PY, "-u", "-c", HOLDER, "10.99.0.2", "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "4"  # all four over the limit refused
        # bob has a budget of his own
        assert wait_open(tb["namespacePath"], "10.99.0.2", 8080) == "10.99.0.1"
        # The next sample (1 s) reads the counters; the record follows at once.
        assert seen.wait(15), d.log_text()[-3000:]
        fault = events[0]
        assert fault["kind"] == "conntrack" and fault["name"] == alice
        assert fault["uid"] == uid_of(alice) and fault["limit"] == LIMIT
        assert fault["value"] is None and fault["count"] >= 1
        # Every dropped packet counts (coalescing may have split them over records).
        deadline = time.monotonic() + 10
        while True:
            faults = d.call(T + "GetFaults", name=alice)["faults"]
            if sum(f["count"] for f in faults) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {f["kind"] for f in faults} == {"conntrack"}
        assert sum(f["count"] for f in faults) == 4
        assert d.call(T + "GetFaults", name=bob)["faults"] == []
        _ctype, body = scrape(d)
        series = re.search(
            rf'nsd_tenant_faults_total{{kind="conntrack",tenant="{alice}",uid="\d+"}} (\S+)',
            body.decode(),
        )
        assert series is not None and float(series[1]) == 4.0
        shown = json.loads(d.nsctl("faults", alice, "--json").stdout)["faults"]
        assert [f["kind"] for f in shown] == [f["kind"] for f in faults]
        table = d.nsctl("faults", alice).stdout.splitlines()  # TIME is two columns
        assert table[1].split()[4:7] == ["conntrack", str(faults[0]["count"]), str(LIMIT)]
        # No journald here: the journal record's text is in nsd's log instead.
        assert f"tenant {alice} (uid {uid_of(alice)}): conntrack x" in d.log_text()
    finally:
        holder.kill()
        holder.wait()
