"""/metrics is private: root and the configured scraper account are served; tenants and
other local users get a 403 at accept and cannot hold the endpoint's connections.

A real daemon in a test-made host namespace, with its network policy on and off (the
check is the kernel's owner of the client socket, asked over sock_diag: no nftables).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import PY, Daemon, TestUsers, daemon_env, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, users"),
]

PORT = 9917
HOLD = 64  # connections a hostile user tries to hold: twice the endpoint's cap

SCRAPE = """
import json, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10)
    print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"""

# Opens N connections and keeps them; reports how many the server closed on its own.
HOLDER = """
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
closed = 0
for c in conns:
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    closed += data.startswith(b"HTTP/1.1 403")
print(closed, flush=True)
sys.stdin.read()  # hold every socket (closed by the server or not) until told to stop
"""


def as_uid(uid: int | None, *cmd: str) -> list[str]:
    if uid is None:
        return list(cmd)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]


def scrape(d: Daemon, uid: int | None) -> tuple[int, str]:
    out = subprocess.run(
        ["nsenter", f"--net={d.host}", *as_uid(uid, PY, "-I", "-c", SCRAPE, str(PORT))],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    res = json.loads(out)
    return res["status"], res["body"]


@dataclass
class Env:
    d: Daemon
    tenant: int
    scraper: int
    policy: str


@pytest.fixture(scope="module", params=["policy-on", "policy-off"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    users = TestUsers()
    scraper = users.add("s")
    network = "" if request.param == "policy-on" else "[network]\nenabled = false\n"
    extra = (
        f'[metrics]\nlisten = "127.0.0.1:{PORT}"\ninterval = 1.0\nscrapers = ["{scraper}"]\n'
        + network
    )
    try:
        with daemon_env(extra=extra) as (d, tusers):
            d.start()
            tenant = tusers.add()
            d.call("io.nsd.Tenant.Create", name=tenant)
            yield Env(d, uid_of(tenant), uid_of(scraper), request.param)
            d.call("io.nsd.Tenant.Remove", name=tenant, force=True)
            assert d.stop() == 0, d.log_text()
    finally:
        users.cleanup()


def test_root_is_served(env: Env) -> None:
    status, body = scrape(env.d, None)
    assert status == 200 and "nsd_build_info" in body


def test_scraper_account_is_served(env: Env) -> None:
    status, body = scrape(env.d, env.scraper)
    assert status == 200 and "nsd_tenants " in body


@pytest.mark.parametrize("who", ["tenant", "nobody"])
def test_other_local_users_get_nothing(env: Env, who: str) -> None:
    uid = env.tenant if who == "tenant" else 65534
    status, body = scrape(env.d, uid)
    assert status == 403
    assert body == f"forbidden: uid {uid} may not read metrics (root and metrics.scrapers only)\n"
    assert "nsd_" not in body


def test_a_tenant_cannot_hold_the_endpoints_connections(env: Env) -> None:
    holder = subprocess.Popen(
        ["nsenter", f"--net={env.d.host}",
         *as_uid(env.tenant, PY, "-I", "-c", HOLDER, str(HOLD), str(PORT))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        # Every one of them was answered 403 and closed by nsd at accept ...
        assert holder.stdout.readline().strip() == str(HOLD)
        # ... so while the tenant still holds its ends, root and the scraper are served.
        assert scrape(env.d, None)[0] == 200
        assert scrape(env.d, env.scraper)[0] == 200
    finally:
        holder.kill()
        holder.wait()
