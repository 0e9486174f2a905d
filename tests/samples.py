"""A well-formed io.nsd.Tenant ``Tenant`` record, for tests that stand in for the daemon
or validate replies; callers override what matters to them."""

from __future__ import annotations

from typing import Any


def tenant_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": "alice",
        "uid": 1001,
        "state": "ready",
        "namespacePath": "/run/netns/alice",
        "namespaceInode": None,
        "hostInterface": "nsd1001",
        "tenantInterface": "eth0",
        "ipv4Address": "100.64.0.2",
        "ipv4Gateway": "100.64.0.1",
        "ipv6Address": "fd00::2",
        "ipv6Prefix": "fd00::/64",
        "ipv6Gateway": "fe80::1",
        "adopted": False,
        "createdUSec": 1_700_000_000_000_000,
        "problems": [],
    }
    return record | overrides
