"""The wire format of faults (GetFaults, Watch's "fault" events): the API layer's
part of nsd.faults, camelCase as in the IDL (io.nsd.Tenant.varlink)."""

from __future__ import annotations

from typing import Any

from .errors import NsdError
from .faults import Fault

#: GetFaults returns at most this many faults per call
MAX_FAULTS = 10000


class InvalidFaultQuery(NsdError):
    name = "InvalidFaultQuery"

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"invalid {parameter}: {reason}", parameter=parameter, reason=reason)


def fault_json(f: Fault) -> dict[str, Any]:
    return {
        "id": f.id,
        "name": f.tenant,
        "uid": f.uid,
        "kind": f.kind,
        "timeUSec": f.at_us,
        "count": f.count,
        "limit": f.limit,
        "value": f.value,
        "processes": [
            {"pid": p.pid, "comm": p.comm, "rssBytes": p.rss_bytes, "cgroup": p.cgroup}
            for p in f.processes
        ],
    }


def query(params: dict[str, Any]) -> tuple[int, int]:
    """(since in µs, limit) from GetFaults' parameters, checked."""
    since = params.get("sinceUSec", 0)
    limit = params.get("limit", 1000)
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise InvalidFaultQuery("sinceUSec", "must be a non-negative integer (µs since the epoch)")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_FAULTS:
        raise InvalidFaultQuery("limit", f"must be an integer from 1 to {MAX_FAULTS}")
    return since, limit
