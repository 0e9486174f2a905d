"""systemd's own varlink client (varlinkctl, systemd 257) against nsd's socket."""

from __future__ import annotations

import json

import pytest

from tests.e2e.guest import SOCKET, run

pytestmark = pytest.mark.phase1


def test_varlinkctl_info_lists_the_interfaces() -> None:
    out = run("varlinkctl", "info", SOCKET).stdout
    assert "io.nsd.Tenant" in out
    assert "org.varlink.service" in out


def test_varlinkctl_introspect_returns_the_idl() -> None:
    out = run("varlinkctl", "introspect", SOCKET, "io.nsd.Tenant").stdout
    assert "interface io.nsd.Tenant" in out
    for method in ("Create(", "Ensure(", "Remove(", "Get(", "List(", "Enter("):
        assert f"method {method}" in out, method


def test_varlinkctl_call_list() -> None:
    out = run("varlinkctl", "--json=short", "call", SOCKET, "io.nsd.Tenant.List", "{}").stdout
    reply = json.loads(out)
    assert isinstance(reply["tenants"], list)


def test_varlinkctl_call_is_authorized_by_kernel_credentials() -> None:
    # List is for root and the admin group; bob's credentials come from the kernel.
    p = run(
        "runuser", "-u", "bob", "--",
        "varlinkctl", "call", SOCKET, "io.nsd.Tenant.List", "{}",
        check=False,
    )  # fmt: skip
    assert p.returncode != 0
    assert "PermissionDenied" in p.stderr + p.stdout
