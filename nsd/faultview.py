"""`nsctl faults`: the --since argument and the table (no daemon-side imports)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from nsd.topview import human_bytes, table

_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGO = re.compile(r"-?([0-9]+(?:\.[0-9]+)?)\s*(s|sec|min|m|h|d|w)(?:\s+ago)?")
HEADER = ("TIME", "USER", "UID", "KIND", "COUNT", "LIMIT", "VALUE", "TOP PROCESSES")


def parse_since(text: str, now: float | None = None) -> int:
    """``--since``: an age ("15min", "2h", "1d", "-30s", "3h ago") or a local date
    and time ("2026-12-05 04:00", ISO 8601), as microseconds since the epoch."""
    now = time.time() if now is None else now
    m = _AGO.fullmatch(text.strip())
    if m is not None:
        return int((now - float(m[1]) * _UNITS[m[2]]) * 1e6)
    try:
        return int(datetime.fromisoformat(text.strip()).timestamp() * 1e6)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: not an age (15min, 2h, 1d) or a date and time (2026-12-05 04:00)"
        ) from None


def _amount(kind: str, n: int | None) -> str:
    if n is None:
        return "max"  # no limit
    return str(n) if kind in ("pids_max", "conntrack") else human_bytes(n)


def fault_rows(faults: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for f in faults:
        when = datetime.fromtimestamp(f["timeUSec"] / 1e6).strftime("%Y-%m-%d %H:%M:%S")
        top = ", ".join(
            f"{p['comm']}[{p['pid']}] {human_bytes(p['rssBytes'])}" for p in f["processes"][:3]
        )
        value = "-" if f["value"] is None else _amount(f["kind"], f["value"])
        rows.append((when, f["name"], str(f["uid"]), f["kind"], str(f["count"]),
                     _amount(f["kind"], f["limit"]), value, top or "-"))  # fmt: skip
    return rows


def format_faults(reply: Mapping[str, Any]) -> str:
    faults = reply["faults"]
    if not faults:
        return "no faults recorded"
    return table(HEADER, fault_rows(faults))
