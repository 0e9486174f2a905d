"""Identity on every path: after a rename, a deletion or a reused UID, no method acts
for the recorded tenant or reports on it (TenantIdentityChanged), for the record's old
UID nor for root; only an operator's Get (which lists the change) and Remove work.

Real users (useradd/usermod/userdel) and a real daemon in a test-made host namespace.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import CALL_SCRIPT, PY, ROOT, Daemon, TestUsers, daemon_env, run, uid_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, users"),
]

T = "io.nsd.Tenant."
CHANGED = T + "TenantIdentityChanged"


# (method, extra parameters, may a tenant call it about itself)
METHODS: list[tuple[str, dict[str, Any], bool]] = [
    ("Get", {}, True),
    ("GetLimits", {}, True),
    ("GetNetwork", {}, True),
    ("GetUsage", {}, True),
    ("Watch", {}, True),
    ("Run", {"command": ["/bin/true"]}, True),
    ("SetLimits", {"limits": {"tasksMax": "500"}}, False),
    ("SetBandwidth", {"egressRate": "10mbit"}, False),
    ("Audit", {}, False),
]


def call(d: Daemon, uid: int | None, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """As root (uid None, in process: the error's parameters too) or as a bare UID
    (it may have no passwd entry any more)."""
    if uid is None:
        from nsd.varlink.client import VarlinkError

        try:
            with d.client() as c:
                if method == "Enter":
                    reply, fds = c.call_with_fds(T + method, params)
                    for fd in fds:
                        os.close(fd)
                elif method == "Watch":
                    reply = next(iter(c.call_more(T + method, params)))
                else:
                    reply = c.call(T + method, params)
        except VarlinkError as e:
            return {"error": e.name, "parameters": e.parameters}
        return {"ok": reply}
    ids = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    res = run(*ids, PY, "-c", CALL_SCRIPT, d.socket, T + method, json.dumps(params), cwd=ROOT)
    result: dict[str, Any] = json.loads(res.stdout)
    return result


@dataclass
class Changed:
    """A tenant recorded as (uid, recorded) whose user then changed as ``kind`` says."""

    kind: str
    recorded: str
    uid: int  # the record's UID: whoever holds it now calls as this
    current: str | None  # what NSS calls that UID now (None: nobody)
    name_holder: int | None  # the UID NSS gives the recorded name now (None: nobody)


UID_MIN = 700  # the tenants' UIDs of this module (see ``changed``)


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env(extra=f"[tenants]\nuid_min = {UID_MIN}\n") as (d, users):
        d.start()
        yield d, users
        assert d.stop() == 0, d.log_text()


def _taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _forget(users: TestUsers, name: str) -> None:
    run("userdel", "--remove", "--force", name)
    users.names.remove(name)


@pytest.fixture(scope="module", params=["rename", "deletion", "uid-reused", "name-reused"])
def changed(request: pytest.FixtureRequest, daemon: tuple[Daemon, TestUsers]) -> Iterator[Changed]:
    d, users = daemon
    # A UID where useradd hands none out (below its UID_MIN, above where --system ones
    # are taken from the top down): once this test frees it, an account made on the
    # machine meanwhile must not take it (and be signalled by its own cleanup while
    # this test calls as that UID).
    uid = next(u for u in range(UID_MIN + os.getpid() % 150, 900) if not _taken(u))
    name = f"{users.prefix}u{len(users.names)}"
    run("useradd", "--uid", str(uid), "--user-group", "--shell", "/bin/sh", name)
    users.names.append(name)
    d.call(T + "Create", name=name)
    kind = request.param
    current: str | None = None
    holder: int | None = None
    if kind in ("rename", "name-reused"):
        current = name + "r"
        run("usermod", "--login", current, name)
        run("groupmod", "--new-name", current, name)  # so the name is free to take again
        users.names[users.names.index(name)] = current
        if kind == "name-reused":  # a new account takes the name, with another UID
            run("useradd", "--user-group", "--shell", "/bin/sh", name)
            users.names.append(name)
            holder = uid_of(name)
    elif kind == "deletion":
        _forget(users, name)
    else:  # uid-reused: the account is deleted and its UID given to a new one
        current = name + "n"
        # The new account first (--non-unique), then the old one goes: a free UID
        # would be taken by whatever else on the machine adds a user in between.
        run("useradd", "--non-unique", "--uid", str(uid), "--no-user-group", "--gid", "users",
            "--shell", "/bin/sh", current)  # fmt: skip
        users.names.append(current)
        _forget(users, name)
    yield Changed(kind, name, uid, current, holder)
    # The operator's way out: Remove works on the recorded name.
    d.call(T + "Remove", name=name, force=True)
    assert d.db_rows(f"SELECT uid FROM tenants WHERE uid = {uid}") == []


@pytest.mark.parametrize(("method", "params", "self_service"), METHODS, ids=[m[0] for m in METHODS])
def test_method_refuses_a_changed_identity(
    daemon: tuple[Daemon, TestUsers],
    changed: Changed,
    method: str,
    params: dict[str, Any],
    self_service: bool,
) -> None:
    d, _ = daemon
    p = {"name": changed.recorded, **params}
    by_root = call(d, None, method, p)
    if method == "Get":
        # The operator sees it, with the change named, in order to resolve it.
        problems = by_root["ok"]["tenant"]["problems"]
        assert any(f"recorded as {changed.recorded}" in x for x in problems), problems
    else:
        assert by_root.get("error") == CHANGED, by_root
        assert by_root["parameters"]["uid"] == changed.uid
        assert by_root["parameters"]["recordedName"] == changed.recorded
    # The record's UID, whoever holds it now, gets nothing about the tenant.
    by_uid = call(d, changed.uid, method, p)
    if self_service:
        assert by_uid.get("error") == CHANGED, by_uid
    else:
        assert by_uid.get("error") == "org.varlink.service.PermissionDenied", by_uid
    if changed.name_holder is not None:
        # The new holder of the name is not the tenant either.
        by_name = call(d, changed.name_holder, method, p)
        assert by_name.get("error") == "org.varlink.service.PermissionDenied", by_name


@pytest.mark.parametrize("method", ["Enter", "Ensure", "Create"])
def test_namespace_is_not_handed_to_the_new_identity(
    daemon: tuple[Daemon, TestUsers], changed: Changed, method: str
) -> None:
    d, _ = daemon
    for name in (changed.current, changed.recorded):
        if name is None:
            continue
        res = call(d, None, method, {"name": name})
        if name == changed.recorded and changed.name_holder is None:
            assert res.get("error") == T + "NoSuchUser", res  # nobody has the name now
        else:
            assert res.get("error") == CHANGED, res


def test_methods_are_served_while_the_identity_holds(daemon: tuple[Daemon, TestUsers]) -> None:
    """The control: the same calls about an unchanged tenant are not refused for identity."""
    d, users = daemon
    name = users.add()
    uid = uid_of(name)
    d.call(T + "Create", name=name)
    try:
        for method, params, self_service in METHODS:
            for who in (None, uid) if self_service else (None,):
                res = call(d, who, method, {"name": name, **params})
                if method == "Run" or (method == "SetLimits" and "error" in res):
                    # No systemd as PID 1 on this host: refused for that, not identity.
                    assert res.get("error") == T + "SystemdUnavailable", res
                else:
                    assert "ok" in res, (method, who, res)
    finally:
        d.call(T + "Remove", name=name, force=True)
