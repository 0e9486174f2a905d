"""The audit trail: one short line per mutating or refused call, flood-proof.

Why: every refused call used to log the caller's tenant name with ``repr()``,
up to a 64 KiB message, and with no bound on how often: one tenant looping a
refused call wrote 130 MB in under two seconds, enough to trip journald's
per-unit rate limit and lose the admins' real audit lines. So:

* names are truncated to :data:`NAME_CHARS` characters and escaped (``repr``:
  a newline or an escape sequence cannot forge or hide a line);
* refusals are rate-limited per UID (a token bucket: ``burst`` lines, then
  ``rate`` per second); the next line that gets through says how many were
  suppressed, and every suppressed line is counted (a metric).
  Root's lines and successful calls are never suppressed: they are the trail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

NAME_CHARS: Final = 64
# Buckets that are full again carry no information; past this many UIDs the
# full ones are dropped, so hostile UIDs cannot grow the table either.
_MAX_BUCKETS: Final = 4096


def short_name(name: object) -> str:
    """A caller-supplied name as it may appear in a log line: bounded and escaped."""
    if name is None:
        return "-"
    if not isinstance(name, str):
        return f"<{type(name).__name__}>"
    if len(name) <= NAME_CHARS:
        return repr(name)
    return f"{name[:NAME_CHARS]!r}...(+{len(name) - NAME_CHARS} chars)"


class _Bucket:
    __slots__ = ("stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0


class AuditLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int,
        rate: float,
        on_suppressed: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = float(burst)
        self._rate = rate
        self._on_suppressed = on_suppressed
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self.suppressed_total = 0

    def record(
        self, uid: int, pid: int, method: str, name: object, result: str, *, refused: bool
    ) -> None:
        suffix = ""
        if refused and uid != 0:
            bucket = self._take(uid)
            if bucket is None:
                return
            if bucket.suppressed:
                suffix = f" suppressed={bucket.suppressed}"
                bucket.suppressed = 0
        self._log.info(
            "uid=%d pid=%d method=%s tenant=%s result=%s%s",
            uid,
            pid,
            method,
            short_name(name),
            result,
            suffix,
        )

    def _take(self, uid: int) -> _Bucket | None:
        """The UID's bucket with one token taken, or None (line suppressed)."""
        now = self._clock()
        bucket = self._buckets.get(uid)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[uid] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            self.suppressed_total += 1
            if self._on_suppressed is not None:
                self._on_suppressed()
            return None
        bucket.tokens -= 1.0
        return bucket

    def _prune(self, now: float) -> None:
        for uid, b in list(self._buckets.items()):
            if not b.suppressed and b.tokens + (now - b.stamp) * self._rate >= self._burst:
                del self._buckets[uid]
