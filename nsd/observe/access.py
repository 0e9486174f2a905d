"""Who may read /metrics: root and the configured scraper accounts, nobody else.

The endpoint is TCP (Prometheus scrapes HTTP), and TCP has no SO_PEERCRED. But a
connection from this host has its client socket in the kernel's table of the same
network namespace, and the kernel records which UID created that socket (the
owner ``ss -e`` shows and nftables matches as ``meta skuid``). On accept, nsd asks
the kernel for that socket by its four-tuple over NETLINK_SOCK_DIAG: one
request, one answer, no scan of /proc/net/tcp, no nftables rule (so it works with
``network.enabled = false`` and whatever else manages the firewall).

A peer whose socket is not found is not on this host's network stack (a remote
scraper, or a tenant in its own namespace reaching a host address): refused
unless ``metrics.allow_remote``. A local connection is refused at accept, before
nsd reads a byte, so no number of tenant connections can occupy the endpoint's
connection slots.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence

from nsd import users

log = logging.getLogger("nsd.metrics")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid:
# sport, dport (big endian), src[4], dst[4] (network order), if, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires,
# rqueue, wqueue, uid, inode.
_UID_OFFSET = 4 + 48 + 12


def _packed(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address).ljust(16, b"\0")


def socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """UID that owns the TCP socket connected from ``remote`` to ``local`` on this
    host (in this network namespace), or None when no such socket is here."""
    rhost, lhost = ipaddress.ip_address(remote[0]), ipaddress.ip_address(local[0])
    # An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d: its own
    # socket is an AF_INET one.
    if isinstance(rhost, ipaddress.IPv6Address) and rhost.ipv4_mapped is not None:
        rhost = rhost.ipv4_mapped
    if isinstance(lhost, ipaddress.IPv6Address) and lhost.ipv4_mapped is not None:
        lhost = lhost.ipv4_mapped
    family = socket.AF_INET if rhost.version == 4 else socket.AF_INET6
    # The client's view: its source is the peer address, its destination us.
    src, dst = _packed(family, str(rhost)), _packed(family, str(lhost))
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        + _SOCKID.pack(remote[1], local[1], src, dst)
        + _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    )
    msg = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:  # fmt: skip
        nl.settimeout(1.0)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    length, kind, _, _, _ = _NLMSG.unpack_from(data)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, _NLMSG.size)
        if -code == errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSG.size + _UID_OFFSET + 4:
        raise OSError(errno.EPROTO, f"sock_diag: unexpected answer type {kind}")
    (uid,) = struct.unpack_from("=I", data, _NLMSG.size + _UID_OFFSET)
    return int(uid)


def kernel_names_owners(owner: Callable[[tuple[str, int], tuple[str, int]], int | None]) -> bool:
    """Whether ``owner`` finds a loopback connection this process makes itself. The
    kernel answers "no such socket" also when it has no inet_diag support, which
    must not pass for "a remote peer"."""
    try:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv, socket.create_connection(srv.getsockname(), timeout=1.0) as client:
            conn, _ = srv.accept()
            with conn:
                return owner(conn.getsockname()[:2], client.getsockname()[:2]) == os.geteuid()
    except OSError:
        return False


class MetricsAccess:
    """The policy: ``scrapers`` are account names (resolved per connection, so an
    account created after nsd started works at once); ``allow_remote`` lets in
    peers whose socket is not on this host."""

    def __init__(
        self,
        scrapers: Sequence[str] = ("prometheus",),
        allow_remote: bool = False,
        owner: Callable[[tuple[str, int], tuple[str, int]], int | None] = socket_owner,
    ) -> None:
        self.scrapers = tuple(scrapers)
        self.allow_remote = allow_remote
        self.owner = owner
        self._kernel_answers: bool | None = None  # checked once, when first needed

    def allowed_uids(self) -> set[int]:
        uids = {0}
        for name in self.scrapers:
            user = users.by_name(name)
            if user is not None:
                uids.add(user.uid)
        return uids

    def refusal(self, sock: socket.socket) -> str | None:
        """Why the connection on ``sock`` may not read metrics, or None if it may."""
        try:
            local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
            uid = self.owner(local, remote)
        except OSError as e:
            # Fail closed: without an answer from the kernel nobody is let in.
            log.warning("metrics: cannot tell who connected (%s); refused", e)
            return "the connecting user could not be determined"
        if uid is None:
            if not self.allow_remote:
                return "not a local connection (metrics.allow_remote)"
            if self._kernel_answers is None:
                self._kernel_answers = kernel_names_owners(self.owner)
                if not self._kernel_answers:
                    log.error("metrics: the kernel does not name the owners of TCP sockets "
                              "(no inet_diag?): every peer is refused")  # fmt: skip
            return None if self._kernel_answers else "the connecting user could not be determined"
        if uid in self.allowed_uids():
            return None
        return f"uid {uid} may not read metrics (root and metrics.scrapers only)"


def forbidden(reason: str) -> bytes:
    """The whole answer to a refused peer, sent without reading its request."""
    body = f"forbidden: {reason}\n".encode()
    head = (f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + body
