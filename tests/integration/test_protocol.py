"""The real daemon speaks real varlink: a third-party client, and hostile input."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import varlink  # the PyPI reference implementation: a client nobody on this project wrote

from tests.harness import Daemon, TestUsers, daemon_env, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the daemon mounts namespaces"),
]


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Daemon, TestUsers]]:
    with daemon_env() as (d, users):
        d.start()
        yield d, users
        assert d.stop() == 0


def raw(d: Daemon, payload: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        s.sendall(payload)
        if not read:
            return b""
        data = b""
        while not data.endswith(b"\0"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def still_serving(d: Daemon) -> None:
    assert "tenants" in d.call("io.nsd.Tenant.List")


def test_third_party_client(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    name = users.add()
    d.call("io.nsd.Tenant.Create", name=name)
    with varlink.Client(address=f"unix:{d.socket}") as client:
        info = client.get_interfaces()
        assert {"io.nsd.Tenant", "io.nsd.Daemon", "org.varlink.service"} <= set(info)
        with client.open("org.varlink.service") as svc:
            got = svc.GetInfo()
            assert got["vendor"] == "nsd" and "io.nsd.Tenant" in got["interfaces"]
            desc = svc.GetInterfaceDescription("io.nsd.Tenant")["description"]
            assert desc.startswith("# Per-tenant network namespaces")
        with client.open("io.nsd.Tenant") as tenant:
            listed = tenant.List()
            assert [t["name"] for t in listed["tenants"]] == [name]
            with pytest.raises(varlink.VarlinkError) as info_err:
                tenant.Get("nosuchuserhere")
            assert info_err.value.error() == "io.nsd.Tenant.NoSuchTenant"
    d.call("io.nsd.Tenant.Remove", name=name)


def _varlinkctl() -> str:
    path = os.environ.get("NSD_VARLINKCTL") or shutil.which("varlinkctl")
    if not path:
        pytest.skip("varlinkctl unavailable: scripts/test provides it via scripts/varlinkctl")
    return path


def test_varlinkctl_info_introspect_call(env: tuple[Daemon, TestUsers]) -> None:
    d, users = env
    ctl = _varlinkctl()
    name = users.add()
    d.call("io.nsd.Tenant.Create", name=name)
    info = run(ctl, "info", d.socket).stdout
    assert "io.nsd.Tenant" in info and "io.nsd.Daemon" in info
    idl = run(ctl, "introspect", d.socket, "io.nsd.Tenant").stdout
    assert "method Enter(" in idl and "error NoSuchTenant" in idl
    listed = json.loads(run(ctl, "call", "-j", d.socket, "io.nsd.Tenant.List", "{}").stdout)
    assert [t["name"] for t in listed["tenants"]] == [name]
    res = run(ctl, "call", d.socket, "io.nsd.Tenant.Get", '{"name": "nosuchuserhere"}', check=False)
    assert res.returncode != 0 and "io.nsd.Tenant.NoSuchTenant" in res.stderr
    d.call("io.nsd.Tenant.Remove", name=name)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (
            b'{"method": "io.nsd.Tenant.Nope", "parameters": {}}\0',
            "org.varlink.service.MethodNotFound",
        ),
        (b'{"method": "io.nope.X.Y", "parameters": {}}\0', "org.varlink.service.InterfaceNotFound"),
        (
            b'{"method": "io.nsd.Tenant.Get", "parameters": {"name": 5}}\0',
            "org.varlink.service.InvalidParameter",
        ),
        (
            b'{"method": "io.nsd.Tenant.Get", "parameters": {"name": "a", "x": 1}}\0',
            "org.varlink.service.InvalidParameter",
        ),
        (
            b'{"method": "io.nsd.Tenant.Get", "parameters": {}}\0',
            "org.varlink.service.InvalidParameter",
        ),
        (
            b'{"method": "io.nsd.Tenant.Remove", "parameters": {"name": "a", "force": "yes"}}\0',
            "org.varlink.service.InvalidParameter",
        ),
    ],
)
def test_bad_calls_get_standard_errors(
    env: tuple[Daemon, TestUsers], payload: bytes, error: str
) -> None:
    d, _ = env
    reply = json.loads(raw(d, payload).rstrip(b"\0"))
    assert reply["error"] == error
    still_serving(d)


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json}\0",
        b"[1, 2]\0",
        b"x" * 200_000,  # no NUL past the size cap
        b"[" * 10_000 + b"]" * 10_000 + b"\0",  # 10,000-deep nesting
        b'{"method": "io.nsd.Tenant.List", "parameters": '
        + b'{"a":' * 10_000
        + b"1"
        + b"}" * 10_001
        + b"\0",
    ],
    ids=["malformed", "not-object", "oversized", "deep-array", "deep-params"],
)
def test_hostile_input_closes_only_that_connection(
    env: tuple[Daemon, TestUsers], payload: bytes
) -> None:
    d, _ = env
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        try:
            s.sendall(payload)
            data = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        # Either closed at once, or one error reply and then closed.
        if data:
            assert b"error" in data
    still_serving(d)
    assert d.proc is not None and d.proc.poll() is None


# Every method that takes a tenant name, with the least else it needs.
_NAMED_CALLS: list[tuple[str, dict[str, object]]] = [
    ("Create", {}),
    ("Ensure", {}),
    ("Remove", {}),
    ("Get", {}),
    ("Enter", {}),
    ("Enter", {"create": False}),
    ("GetLimits", {}),
    ("SetLimits", {"limits": {}}),
    ("GetNetwork", {}),
    ("SetBandwidth", {}),
    ("Run", {"command": ["/bin/true"]}),
    ("GetUsage", {}),
    ("GetUsage", {"more": True}),
    ("Watch", {"more": True}),
    ("Audit", {}),
]


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "\udc80x"])
def test_unencodable_names_are_invalid_tenant_names(
    env: tuple[Daemon, TestUsers], name: str
) -> None:
    """Lone surrogates are valid JSON (``"\\ud800"``) but no UTF-8 can carry them to
    NSS, SQLite or a file name: every method answers InvalidTenantName."""
    d, _ = env
    for method, extra in _NAMED_CALLS:
        params = {k: v for k, v in extra.items() if k != "more"}
        message: dict[str, Any] = {
            "method": "io.nsd.Tenant." + method,
            "parameters": {"name": name, **params},
        }
        if extra.get("more"):
            message["more"] = True
        reply = json.loads(raw(d, json.dumps(message).encode() + b"\0")[:-1])
        assert reply.get("error") == "io.nsd.Tenant.InvalidTenantName", (method, reply)
    assert "Traceback" not in d.log_text()
    still_serving(d)
