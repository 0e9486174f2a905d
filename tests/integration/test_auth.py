"""Authorization comes from the kernel (SO_PEERCRED, SO_PEERGROUPS), never the message."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.harness import CALL_SCRIPT as _CALL
from tests.harness import PY, ROOT, Daemon, TestUsers, daemon_env, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, users"),
]

T = "io.nsd.Tenant."
DENIED = "org.varlink.service.PermissionDenied"


def call_as(d: Daemon, user: str, method: str, **params: object) -> dict[str, object]:
    ids = (
        ["--reuid=65534", "--regid=65534", "--clear-groups"]
        if user == "nobody"
        else [f"--reuid={user}", f"--regid={user}", "--init-groups"]
    )
    res = run("setpriv", *ids, PY, "-c", _CALL, d.socket, method, json.dumps(params), cwd=ROOT)
    result: dict[str, object] = json.loads(res.stdout)
    return result


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers, dict[str, str]]]:
    admins = f"nsdta{os.getpid()}"
    run("groupadd", admins)
    try:
        with daemon_env(extra="") as (d, users):
            # The admin group is configured by name; the daemon resolves it at start.
            # These tests read the audit lines of many refusals by the same UIDs: a
            # burst that the rate limit (tests/unit/test_auditlog.py) never reaches.
            d.config.write_text(
                d.config.read_text().replace(
                    "[daemon]\n",
                    f'[daemon]\nadmin_group = "{admins}"\naudit_refusal_burst = 1000\n',
                    1,
                )
            )
            d.start()
            who = {
                "alice": users.add("a"),
                "bob": users.add("b"),
                "eve": users.add("e"),
                "admin": users.add("adm", groups=(admins,)),
            }
            for role in ("alice", "bob"):
                d.call(T + "Create", name=who[role])
            yield d, users, who
            for role in ("alice", "bob"):
                d.call(T + "Remove", name=who[role], force=True)
            assert d.stop() == 0
    finally:
        run("groupdel", admins, check=False)


def test_tenant_may_get_itself_only(env: tuple[Daemon, TestUsers, dict[str, str]]) -> None:
    d, _, who = env
    me = call_as(d, who["alice"], T + "Get", name=who["alice"])
    assert me["ok"]["tenant"]["name"] == who["alice"]  # type: ignore[index]
    assert call_as(d, who["alice"], T + "Get", name=who["bob"]) == {"error": DENIED}
    # Unknown names get the same answer, so tenants cannot probe who exists.
    assert call_as(d, who["alice"], T + "Get", name="nosuchuserhere") == {"error": DENIED}


@pytest.mark.parametrize("method", ["Enter", "Remove", "Create", "Ensure", "List"])
def test_tenant_cannot_act_on_others_or_admin(
    env: tuple[Daemon, TestUsers, dict[str, str]], method: str
) -> None:
    d, _, who = env
    params = {} if method == "List" else {"name": who["bob"]}
    assert call_as(d, who["alice"], T + method, **params) == {"error": DENIED}
    if method != "List":
        # not even on itself: entering and removing are the operator's business
        assert call_as(d, who["alice"], T + method, name=who["alice"]) == {"error": DENIED}


@pytest.mark.parametrize("method", ["Get", "Enter", "Remove", "List"])
def test_non_tenant_is_denied(env: tuple[Daemon, TestUsers, dict[str, str]], method: str) -> None:
    d, _, who = env
    params = {} if method == "List" else {"name": who["alice"]}
    assert call_as(d, who["eve"], T + method, **params) == {"error": DENIED}
    assert call_as(d, "nobody", T + method, **params) == {"error": DENIED}


def test_admin_group_and_root_may_do_all(env: tuple[Daemon, TestUsers, dict[str, str]]) -> None:
    d, _, who = env
    listed = call_as(d, who["admin"], T + "List")
    assert {t["name"] for t in listed["ok"]["tenants"]} == {who["alice"], who["bob"]}  # type: ignore[index]
    assert "ok" in call_as(d, who["admin"], T + "Enter", name=who["bob"])
    assert "ok" in call_as(d, who["admin"], "io.nsd.Daemon.Status")
    assert d.call(T + "Get", name=who["bob"])["tenant"]["name"] == who["bob"]


def test_denials_and_mutations_are_audited(env: tuple[Daemon, TestUsers, dict[str, str]]) -> None:
    d, _, who = env
    call_as(d, who["alice"], T + "Remove", name=who["bob"])
    log = d.log_text()
    uid = int(run("id", "-u", who["alice"]).stdout)
    assert (
        f"uid={uid}" in log
        and "method=io.nsd.Tenant.Remove" in log
        and "result=PermissionDenied" in log
    )
    assert "method=io.nsd.Tenant.Create" in log and "result=ok" in log


def test_audit_lines_cannot_be_forged(env: tuple[Daemon, TestUsers, dict[str, str]]) -> None:
    d, _, who = env
    forged = "x\nINFO nsd.audit: uid=0 pid=1 method=io.nsd.Tenant.Remove tenant=bob result=ok"
    assert call_as(d, who["alice"], T + "Get", name=forged) == {"error": DENIED}
    lines = d.log_text().splitlines()
    assert not [line for line in lines if line.startswith("INFO nsd.audit: uid=0 pid=1")]
    assert any("tenant='x\\nINFO nsd.audit" in line for line in lines)


def test_watch_of_another_tenant_is_denied_and_audited(
    env: tuple[Daemon, TestUsers, dict[str, str]],
) -> None:
    d, _, who = env
    assert call_as(d, who["alice"], T + "Watch", name=who["bob"]) == {"error": DENIED}
    assert "method=io.nsd.Tenant.Watch" in d.log_text()


#: what a tenant may call about itself, and only about itself (docs/api.md, "Who may do
#: what" in docs/operator-guide.md), with the parameters each needs besides the name
SELF_SERVICE: dict[str, dict[str, object]] = {
    "Get": {},
    "Watch": {},
    "GetLimits": {},
    "GetNetwork": {},
    "GetUsage": {},
    "Run": {"command": ["/bin/true"]},
}


@pytest.mark.parametrize("method", sorted(SELF_SERVICE))
def test_tenant_may_call_these_about_itself_only(
    env: tuple[Daemon, TestUsers, dict[str, str]], method: str
) -> None:
    d, _, who = env
    extra = SELF_SERVICE[method]
    # Allowed: answered, or refused for another reason (Run needs systemd as PID 1,
    # GetUsage a first sample), never PermissionDenied.
    mine = call_as(d, who["alice"], T + method, name=who["alice"], **extra)
    assert mine.get("error") != DENIED, mine
    assert call_as(d, who["alice"], T + method, name=who["bob"], **extra) == {"error": DENIED}


def test_streams_map_errors_like_calls(env: tuple[Daemon, TestUsers, dict[str, str]]) -> None:
    # Watch and GetUsage with "more" go through the same error mapping as plain calls.
    d, _, who = env
    unknown = f"nsdtx{os.getpid()}"
    assert call_as(d, "root", T + "Watch", name=unknown) == {"error": T + "NoSuchTenant"}
    assert call_as(d, "root", T + "GetUsage", name=unknown, _stream=True) == {
        "error": T + "NoSuchTenant"
    }
    assert call_as(d, who["alice"], T + "GetUsage", name=who["bob"], _stream=True) == {
        "error": DENIED
    }
