"""``nsctl top`` and ``nsctl audit``: tables from GetUsage and Audit replies.

Pure functions of the reply dictionaries (no daemon, no host access), so the
CLI stays a thin caller and the formatting is tested on its own. Imports
nothing heavy: nsctl starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

TOP_HEADER = ("USER", "UID", "MEMORY", "WSET", "LIMIT", "%LIMIT", "SWAP", "TASKS",
              "HELPERS", "HELPER-RSS", "OOM-KILLS", "ESCAPED")  # fmt: skip
AUDIT_HEADER = ("PID", "USER", "UID", "RUNS-AS", "WHY", "WHERE", "COMMAND")

_REASONS = {
    "helper": "helper",
    "outsideSlice": "outside slice",
    "outsideNamespace": "outside namespace",
    "outsideSliceAndNamespace": "outside slice+namespace",
    "sessionOutsideNamespace": "login outside namespace",
}
REASON_HELP = {
    "helper": "launches or babysits the tenant's work (sd-pam, su, sudo, ...)",
    "outsideSlice": "in the tenant's namespace but not its slice: not limited or counted with "
    "it. A unit's main process: give the unit Slice= (a template with X-NSD-Tenant=yes, "
    "docs/systemd.md); anything else: start it through nsd-exec without --no-scope "
    "(docs/nsd-exec.md), or end it",
    "outsideNamespace": "in the tenant's slice but another network namespace: restart it "
    "through nsd-exec, or give its unit NetworkNamespacePath= (docs/systemd.md)",
    "outsideSliceAndNamespace": "neither in the tenant's slice nor in its namespace: run it "
    "through nsd-exec, or as a unit of a template with X-NSD-Tenant=yes (docs/systemd.md)",
    "sessionOutsideNamespace": "a login (ssh, cron, su) in another network namespace: add "
    "pam_nsd to that service's PAM stack (docs/logins.md), or end the session if nsd was "
    "down when it began",
}


def human_bytes(n: int | None) -> str:
    """1024-based, one decimal below 10: 512M, 1.5G, 12K; "-" when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def percent_of_limit(u: Mapping[str, Any]) -> float | None:
    current, limit = u.get("memoryCurrentBytes"), u.get("memoryMaxBytes")
    if current is None or not limit:
        return None
    return 100.0 * float(current) / float(limit)


def _key(value: float | None) -> tuple[int, float]:
    # Unknown values sort last whatever the direction.
    return (1, 0.0) if value is None else (0, -value)


SORTS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "memory": lambda u: (_key(u.get("memoryCurrentBytes")), u["name"]),
    "wset": lambda u: (_key(u.get("memoryWorkingSetBytes")), u["name"]),
    "limit": lambda u: (_key(percent_of_limit(u)), u["name"]),
    "helpers": lambda u: (_key(u.get("helperRssBytes")), u["name"]),
    "oom": lambda u: (_key(u.get("oomKills")), u["name"]),
    "escaped": lambda u: (_key(u.get("escapedProcesses")), u["name"]),
    "name": lambda u: u["name"],
    "uid": lambda u: u["uid"],
}


def top_rows(usage: Sequence[Mapping[str, Any]], sort: str = "memory") -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for u in sorted(usage, key=SORTS[sort]):
        pct = percent_of_limit(u)
        rows.append((
            u["name"], str(u["uid"]),
            human_bytes(u.get("memoryCurrentBytes")),
            human_bytes(u.get("memoryWorkingSetBytes")),
            human_bytes(u.get("memoryMaxBytes")) if u.get("memoryMaxBytes") else "-",
            f"{pct:.0f}%" if pct is not None else "-",
            human_bytes(u.get("memorySwapBytes")),
            _count(u.get("tasks")),
            _count(u.get("helperProcesses")),
            human_bytes(u.get("helperRssBytes")),
            _count(u.get("oomKills")),
            _count(u.get("escapedProcesses")),
        ))  # fmt: skip
    return rows


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)).rstrip()
             for r in (header, *rows)]  # fmt: skip
    return "\n".join(lines)


def format_top(reply: Mapping[str, Any], sort: str = "memory") -> str:
    usage = reply["tenants"]
    when = datetime.fromtimestamp(reply["sampledUSec"] / 1e6).strftime("%H:%M:%S")
    total = sum(u.get("memoryCurrentBytes") or 0 for u in usage)
    helpers = sum(u.get("helperRssBytes") or 0 for u in usage)
    head = (f"sampled {when}: {len(usage)} tenant(s), memory {human_bytes(total)}, "
            f"helpers {human_bytes(helpers)} RSS")  # fmt: skip
    return head + "\n\n" + table(TOP_HEADER, top_rows(usage, sort))


def _where(p: Mapping[str, Any]) -> str:
    cgroup = p.get("cgroup") or "?"
    inode = p.get("namespaceInode")
    return f"{cgroup} netns:{inode}" if inode is not None else cgroup


def audit_rows(processes: Sequence[Mapping[str, Any]], width: int = 60) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for p in processes:
        why = _REASONS.get(p["reason"], p["reason"])
        if p["reason"] == "helper":
            why += f" rss={human_bytes(p.get('rssBytes'))}"
            if p.get("pssBytes") is not None:
                why += f" pss={human_bytes(p['pssBytes'])}"
        command = p["command"] if len(p["command"]) <= width else p["command"][: width - 1] + "…"
        rows.append((str(p["pid"]), p["tenant"], str(p["uid"]), str(p["processUid"]), why,
                     _where(p), command))  # fmt: skip
    return rows


def format_audit(reply: Mapping[str, Any]) -> str:
    processes = reply["processes"]
    if not processes:
        out = "no flagged processes"
    else:
        out = table(AUDIT_HEADER, audit_rows(processes))
        reasons = sorted({p["reason"] for p in processes})
        out += "\n\n" + "\n".join(f"{_REASONS[r]}: {REASON_HELP[r]}" for r in reasons)
    if reply.get("omitted"):
        out += f"\n({reply['omitted']} more not kept by the daemon)"
    return out
