"""The /metrics access policy (nsd.observe.access) on real loopback sockets."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator

import pytest

from nsd import config
from nsd.observe.access import MetricsAccess, socket_owner


@pytest.fixture
def accepted() -> Iterator[socket.socket]:
    """The server side of a loopback TCP connection this process made."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        with client, conn:
            yield conn


def test_the_kernel_names_the_owner_of_a_local_client(accepted: socket.socket) -> None:
    assert socket_owner(accepted.getsockname(), accepted.getpeername()) == os.geteuid()


def test_an_ipv4_client_of_a_dual_stack_listener() -> None:
    srv = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with srv, socket.create_connection(("127.0.0.1", srv.getsockname()[1])):
        conn, peer = srv.accept()
        with conn:
            assert peer[0] == "::ffff:127.0.0.1"
            assert socket_owner(conn.getsockname()[:2], peer[:2]) == os.geteuid()


def test_no_such_socket_here_is_none() -> None:
    assert socket_owner(("127.0.0.1", 1), ("127.0.0.1", 2)) is None


def _owner_is(uid: int | None) -> MetricsAccess:
    return MetricsAccess(("root",), False, owner=lambda _l, _r: uid)


def test_root_and_scrapers_only(accepted: socket.socket) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    assert _owner_is(0).refusal(accepted) is None
    scraper = MetricsAccess(("nobody",), False, owner=lambda _l, _r: nobody)
    assert scraper.refusal(accepted) is None
    assert _owner_is(nobody).refusal(accepted) == (
        f"uid {nobody} may not read metrics (root and metrics.scrapers only)"
    )


def test_remote_peers_only_when_allowed(accepted: socket.socket) -> None:
    assert _owner_is(None).refusal(accepted) == "not a local connection (metrics.allow_remote)"
    # A peer the kernel does not know is remote (the kernel's answer for it is faked;
    # its self-check of a real loopback connection is not).
    peer = accepted.getpeername()[:2]
    remote = MetricsAccess(
        (), True, owner=lambda here, there: None if there == peer else socket_owner(here, there)
    )
    assert remote.refusal(accepted) is None


def test_a_kernel_that_never_names_owners_lets_no_remote_peer_in(
    accepted: socket.socket,
) -> None:
    # Without inet_diag the kernel says "no such socket" for local peers too.
    blind = MetricsAccess((), True, owner=lambda _l, _r: None)
    assert blind.refusal(accepted) == "the connecting user could not be determined"


def test_an_unanswered_lookup_fails_closed(accepted: socket.socket) -> None:
    def broken(_l: object, _r: object) -> int | None:
        raise OSError(95, "Operation not supported")

    assert MetricsAccess((), True, owner=broken).refusal(accepted) == (
        "the connecting user could not be determined"
    )


def test_scrapers_config() -> None:
    assert config.from_mapping({}).metrics.scrapers == ("prometheus",)
    cfg = config.from_mapping({"metrics": {"scrapers": ["prom", "vmagent"], "allow_remote": True}})
    assert cfg.metrics.scrapers == ("prom", "vmagent") and cfg.metrics.allow_remote
    with pytest.raises(config.ConfigError, match=r"metrics\.scrapers"):
        config.from_mapping({"metrics": {"scrapers": ["no/slash"]}})
    with pytest.raises(config.ConfigError, match=r"metrics\.scrapers"):
        config.from_mapping({"metrics": {"scrapers": "prometheus"}})
