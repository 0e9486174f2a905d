"""pam_nsd against the real daemon (root): the session process joins the tenant's
namespace, leaves no descriptor behind, and each refusal ends as configured.

The module's entry point runs in a child Python (setns changes the calling
thread's namespace for good), the way libpam-python runs it inside sshd or cron;
the PAM stacks themselves are exercised in the VM tier (tests/e2e/test_80_logins.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.harness import PY, Daemon, TestUsers, daemon_env, netns_inode, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

# What the session process would be: open the session, then report where it is
# and which descriptors it holds.
CHILD = """
import json, os, sys
from nsd import pam_nsd
before = sorted(os.listdir("/proc/self/fd"))
out = pam_nsd.open_session(sys.argv[1], sys.argv[2:], "sshd")
print(json.dumps({
    "action": out.action, "severity": out.severity, "message": out.message,
    "netns": os.stat("/proc/self/ns/net").st_ino,
    "leaked": sorted(set(os.listdir("/proc/self/fd")) - set(before)),
}))
"""


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env() as (d, users):
        d.start()
        try:
            yield d, users
        finally:
            d.stop()
            users.cleanup()


def session(d: Daemon, user: str, *args: str) -> dict[str, object]:
    res = run(PY, "-c", CHILD, user, f"socket={d.socket}", "uid_min=1", *args)
    data: dict[str, object] = json.loads(res.stdout)
    return data


def test_session_joins_the_tenants_namespace(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    t = d.call("io.nsd.Tenant.Create", name=name)["tenant"]
    out = session(d, name)
    assert out["action"] == "join", out
    assert out["netns"] == t["namespaceInode"] == netns_inode(t["namespacePath"])
    assert out["leaked"] == []
    assert out["message"] == f"sshd: {name}: joined namespace {t['namespacePath']} " \
        f"(inode {t['namespaceInode']})"  # fmt: skip


def test_missing_tenant_is_created_or_not(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    out = session(d, name, "create=no")
    assert out["action"] == "skip" and out["netns"] == os.stat("/proc/self/ns/net").st_ino
    assert out["leaked"] == []
    out = session(d, name, "create=no", "nontenant=deny")
    assert out["action"] == "deny" and "is not an nsd tenant" in str(out["message"])
    out = session(d, name)  # nsd's default: Enter creates the tenant
    assert out["action"] == "join"
    t = d.call("io.nsd.Tenant.Get", name=name)["tenant"]
    assert out["netns"] == t["namespaceInode"]


def test_daemon_stopped(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    d.call("io.nsd.Tenant.Create", name=name)
    assert d.stop() == 0
    try:
        out = session(d, name)
        assert out["action"] == "skip" and out["severity"] == "warning"
        assert "(unreachable=skip)" in str(out["message"]) and out["leaked"] == []
        out = session(d, name, "unreachable=deny")
        assert out["action"] == "deny" and out["severity"] == "err"
        assert "login denied (unreachable=deny)" in str(out["message"])
        root = run(PY, "-c", CHILD, "root", f"socket={d.socket}", "unreachable=deny")
        assert json.loads(root.stdout)["action"] == "skip"  # root is never locked out
    finally:
        d.start()
