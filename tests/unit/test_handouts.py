"""A namespace descriptor counts as on its way until its process can be seen with it.

Real descriptors and a real AF_UNIX socket pair: nsd's own copy open, then the
message carrying it unread in the socket, then read.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess

from nsd.core.handouts import Handouts
from nsd.varlink.connection import _send_queue

UID = 1001


def send_with_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"{}\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def test_held_then_unread_then_landed() -> None:
    h = Handouts()
    ours, peer = socket.socketpair()
    queued = False  # as the API layer tracks it: the server took the reply

    def unread() -> int:
        return _send_queue(ours) if queued else 1

    with ours, peer:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        handout = h.add(UID, unread, os.getpid())
        assert h.in_flight(UID) == 1  # nsd holds it (Enter is running)
        send_with_fd(ours, fd)
        os.close(fd)  # what the server does once sendmsg() took it
        queued = True
        assert not handout.landed() and h.in_flight(UID) == 1  # in the socket, unread
        _, ancdata, _, _ = peer.recvmsg(16, socket.CMSG_SPACE(4))
        for _, _, raw in ancdata:
            for received in array.array("i", raw):
                os.close(received)
        assert handout.landed() and h.in_flight(UID) == 0


def test_unobservable_reply_lands_when_its_peer_exits() -> None:
    """nsd closed the connection with the reply unread: only the peer's exit tells."""
    h = Handouts()
    child = subprocess.Popen(["sleep", "60"])
    try:
        h.add(UID, lambda: None, child.pid)
        assert h.in_flight(UID) == 1
    finally:
        child.kill()
        child.wait()
    assert h.in_flight(UID) == 0


def test_a_descriptor_closed_unsent_is_forgotten() -> None:
    h = Handouts()
    handout = h.add(UID, lambda: 1, None)
    h.discard(handout)
    assert h.in_flight(UID) == 0
