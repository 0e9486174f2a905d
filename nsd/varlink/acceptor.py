"""Accepting connections: the listening socket, each peer's kernel credentials and
class, and admission (:mod:`.policy`). A connection over a cap is sent
``<errors>.ConnectionLimitReached`` with the reason and closed, so the client can
say why instead of guessing that the daemon is down; an admitted one is handed to
the server (``on_admitted``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from .peer import Peer, peer_of
from .policy import Admission, PeerClass
from .protocol import VarlinkError
from .requests import refuse

_ACCEPT_BATCH = 32  # accept() calls per wake-up, so a connect storm cannot starve calls
_ACCEPT_RETRY = 0.1  # seconds to pause accepting after EMFILE and friends
_REFUSAL_LOG_INTERVAL = 1.0


class Acceptor:
    def __init__(
        self,
        admission: Admission,
        classify: Callable[[Peer], PeerClass] | None,
        uid_limit_exempt: frozenset[int],
        log: logging.Logger,
        *,
        errors: str,
        closes: dict[str, int],
        on_admitted: Callable[[socket.socket, Peer, PeerClass], None],
    ) -> None:
        self._admission = admission
        self._classify = classify or self._default_class
        self._exempt = uid_limit_exempt
        self._log = log
        self._errors = errors
        self._closes = closes
        self._on_admitted = on_admitted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._accepting = False
        self._closing = False
        self._last_refusal_log = 0.0

    def listen(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._loop = loop
        sock.setblocking(False)
        self._listener = sock
        self._resume()

    def close(self) -> None:
        self._closing = True
        self._pause()
        if self._listener is not None:
            self._listener.close()

    def _default_class(self, peer: Peer) -> PeerClass:
        return PeerClass.PRIVILEGED if peer.uid in self._exempt else PeerClass.TENANT

    def peer_class(self, peer: Peer) -> PeerClass:
        try:
            return self._classify(peer)
        except Exception:
            # Fail towards the smallest allowance, never towards privilege.
            self._log.exception("varlink: classifying uid %d failed", peer.uid)
            return PeerClass.OTHER

    def _resume(self) -> None:
        if self._listener is not None and not self._accepting and not self._closing:
            self._running_loop().add_reader(self._listener.fileno(), self._on_acceptable)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._listener is not None:
            self._running_loop().remove_reader(self._listener.fileno())
            self._accepting = False

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the varlink server is not serving")
        return self._loop

    def _on_acceptable(self) -> None:
        listener, loop = self._listener, self._running_loop()
        if listener is None:
            raise RuntimeError("the varlink server accepts without a listening socket")
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                # Out of descriptors or memory: the listener stays readable, so
                # back off instead of spinning; pending clients wait in the backlog.
                self._log.warning("varlink: accept failed: %s; pausing %.1f s", e, _ACCEPT_RETRY)
                self._pause()
                loop.call_later(_ACCEPT_RETRY, self._resume)
                return
            self.admit(sock, loop)

    def admit(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``sock`` (accepted, or one end of a socketpair) or refuse it with a reason."""
        self._loop = self._loop or loop
        try:
            sock.setblocking(False)
            peer = peer_of(sock)
        except OSError as e:
            self._log.debug("varlink: dropping connection without credentials: %s", e)
            sock.close()
            return
        cls = self.peer_class(peer)
        refusal = self._admission.admit(peer, cls)
        if refusal is not None:
            self._closes["refused"] = self._closes.get("refused", 0) + 1
            self._log_refusal(peer, refusal)
            refuse(
                sock, VarlinkError(f"{self._errors}.ConnectionLimitReached", {"reason": refusal})
            )
            return
        self._on_admitted(sock, peer, cls)

    def _log_refusal(self, peer: Peer, refusal: str) -> None:
        # Info once per interval, debug otherwise: a client hammering the cap
        # must not flood the journal.
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            level = logging.INFO
        self._log.log(
            level, "varlink: refusing connection of uid %d pid %d: %s", peer.uid, peer.pid, refusal
        )
