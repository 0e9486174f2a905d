"""Who may hold how many connections, streams and queued bytes: the admission policy.

Why it looks like this: tenants are untrusted local users, and any one of them
can open connections and send nothing, dribble bytes, or send requests and
never read the replies. Each of those pins a descriptor and memory. The policy
makes sure that no number of such peers can lock out the ones who run the host:

* Peers come in three classes (decided by the daemon from kernel credentials):
  ``PRIVILEGED`` (root and the admin group), ``TENANT`` and ``OTHER`` (any other
  local account, e.g. ``nobody`` or a service user: nsd has nothing to tell
  them, so they get a much smaller allowance).
* Unprivileged peers together may hold at most ``max_connections -
  reserved_connections``; the reserved share is for the privileged class only.
  Root is not counted at all (nsd-exec runs as root on every service start).
* Per UID: ``max_connections_per_uid`` for tenants and admins,
  ``max_connections_per_non_tenant`` for the rest, and all non-tenants together
  at most ``max_non_tenant_connections``, so system accounts cannot crowd out
  tenants either.
* Streaming calls (Watch, GetUsage with more) never end by themselves, so
  unprivileged UIDs may run at most ``max_streams_per_uid`` at once.
* Bytes queued for peers that do not read are bounded per connection and,
  for unprivileged UIDs, per UID (:class:`OutputBudget`); over either bound
  the connection is closed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .peer import Peer
    from .server import Limits


class PeerClass(enum.Enum):
    PRIVILEGED = "privileged"
    TENANT = "tenant"
    OTHER = "other"


class OutputBudget:
    """Unsent reply bytes of one UID's connections, shared by them (mutable on purpose)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit  # None: unbounded per UID (privileged peers)
        self.used = 0

    def exceeded(self) -> bool:
        return self.limit is not None and self.used > self.limit


@dataclass(slots=True)
class _UidUsage:
    connections: int
    streams: int
    budget: OutputBudget


class Admission:
    """Counts connections and streams per class and UID; decides who gets in."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._uids: dict[int, _UidUsage] = {}
        self.unprivileged = 0  # tenants' and others' connections
        self.privileged = 0  # the admin group's (root is not counted)
        self.non_tenant = 0

    def counted(self, peer: Peer) -> bool:
        return peer.uid not in self._limits.uid_limit_exempt

    def admit(self, peer: Peer, cls: PeerClass) -> str | None:
        """Records a new connection and returns None, or says why it is refused."""
        usage = self._uids.get(peer.uid)
        if self.counted(peer):
            refusal = self._refusal(peer, cls, 0 if usage is None else usage.connections)
            if refusal is not None:
                return refusal
            if cls is PeerClass.PRIVILEGED:
                self.privileged += 1
            else:
                self.unprivileged += 1
                if cls is PeerClass.OTHER:
                    self.non_tenant += 1
        if usage is None:
            lim = self._limits
            limit = None if cls is PeerClass.PRIVILEGED else lim.max_queued_output_bytes_per_uid
            self._uids[peer.uid] = _UidUsage(1, 0, OutputBudget(limit))
        else:
            usage.connections += 1
        return None

    def _refusal(self, peer: Peer, cls: PeerClass, held: int) -> str | None:
        lim = self._limits
        if self.unprivileged + self.privileged >= lim.max_connections:
            return f"the daemon holds {lim.max_connections} connections (max_connections)"
        per_uid, key = lim.max_connections_per_uid, "max_connections_per_uid"
        if cls is not PeerClass.PRIVILEGED:
            share = lim.max_connections - lim.reserved_connections
            if self.unprivileged >= share:
                return (
                    f"unprivileged peers hold {share} connections; the rest is "
                    "reserved for root and the admin group (reserved_connections)"
                )
        if cls is PeerClass.OTHER:
            if self.non_tenant >= lim.max_non_tenant_connections:
                return (
                    f"accounts that are not tenants hold {lim.max_non_tenant_connections}"
                    " connections (max_non_tenant_connections)"
                )
            per_uid, key = lim.max_connections_per_non_tenant, "max_connections_per_non_tenant"
        if held >= per_uid:
            return f"uid {peer.uid} already holds {per_uid} connections ({key})"
        return None

    def budget(self, peer: Peer) -> OutputBudget:
        return self._uids[peer.uid].budget

    def release(self, peer: Peer, cls: PeerClass) -> None:
        if self.counted(peer):
            if cls is PeerClass.PRIVILEGED:
                self.privileged -= 1
            else:
                self.unprivileged -= 1
                if cls is PeerClass.OTHER:
                    self.non_tenant -= 1
        usage = self._uids[peer.uid]
        usage.connections -= 1
        if usage.connections <= 0:
            del self._uids[peer.uid]

    def start_stream(self, peer: Peer, cls: PeerClass) -> StreamToken | None:
        """Counts a streaming call; None if the UID runs its maximum already.

        The token is what :meth:`end_stream` takes back: the connection may have
        been closed (and the UID's entry replaced) by the time the stream ends.
        """
        usage = self._uids[peer.uid]
        if cls is not PeerClass.PRIVILEGED and usage.streams >= self._limits.max_streams_per_uid:
            return None
        usage.streams += 1
        return usage

    @staticmethod
    def end_stream(token: StreamToken) -> None:
        token.streams -= 1


StreamToken = _UidUsage
