"""Per-tenant resource limits: parsing, validation and merging, in systemd's terms.

Values are written the way systemd's unit files write them, so operators need
to learn nothing new: sizes in bytes with K/M/G/T suffixes (base 1024) or
``infinity``; weights 1-10000; a CPU quota in percent of one CPU (``150%``);
TasksMax a number or ``infinity``. The canonical form (what the API returns
and the store keeps) is bytes as a decimal string, ``infinity``, or ``150%``.

A tenant's effective limits are the configured defaults overlaid with its own
overrides; a field that is unset in both is left to systemd's default.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import InvalidLimit

INFINITY = "infinity"
_SIZE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTE]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "E": 1 << 60}
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """Canonical values; None means "not set here"."""

    memory_min: str | None = None
    memory_low: str | None = None
    memory_high: str | None = None
    memory_max: str | None = None
    memory_swap_max: str | None = None
    cpu_weight: str | None = None
    cpu_quota: str | None = None
    tasks_max: str | None = None
    io_weight: str | None = None

    def items(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def overlay(self, other: Limits) -> Limits:
        """``self`` with every field that ``other`` sets replaced by ``other``'s."""
        return Limits(**{**self.items(), **other.items()})


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Limits))
_SIZES = {"memory_min", "memory_low", "memory_high", "memory_max", "memory_swap_max"}
_WEIGHTS = {"cpu_weight", "io_weight"}


def parse_size(text: str) -> int | None:
    """Bytes, or None for infinity (systemd's syntax: 512M, 1.5G, 4096, infinity)."""
    text = text.strip()
    if text.lower() == INFINITY:
        return None
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError("expected bytes with an optional K, M, G or T suffix, or infinity")
    number = float(m["n"]) if "." in m["n"] else int(m["n"])
    value = int(number * _UNITS[m["unit"].upper()])
    if value >= UINT64_MAX:
        raise ValueError("too large")
    return value


def canonical(field: str, raw: str | int) -> str:
    """Validate one value; return its canonical text. Raises InvalidLimit."""
    text = str(raw).strip()
    try:
        if field in _SIZES:
            size = parse_size(text)
            return INFINITY if size is None else str(size)
        if field in _WEIGHTS:
            if not text.isdigit() or not 1 <= int(text) <= 10000:
                raise ValueError("a weight is a whole number from 1 to 10000")
            return str(int(text))
        if field == "cpu_quota":
            if text.lower() == INFINITY:
                return INFINITY
            m = re.fullmatch(r"([0-9]+)%", text)
            if m is None or int(m[1]) == 0:
                raise ValueError('a quota is a positive percentage of one CPU, e.g. "150%"')
            return f"{int(m[1])}%"
        if field == "tasks_max":
            if text.lower() == INFINITY:
                return INFINITY
            if not text.isdigit() or int(text) == 0:
                raise ValueError("a positive number of tasks, or infinity")
            return str(int(text))
    except ValueError as e:
        raise InvalidLimit(field, text, str(e)) from None
    raise InvalidLimit(field, text, f"unknown limit (known: {', '.join(FIELDS)})")


def from_mapping(values: Mapping[str, str | int]) -> Limits:
    """Limits from {python_field_name: raw value}; every value validated."""
    out = {}
    for field, raw in values.items():
        if field not in FIELDS:
            raise InvalidLimit(field, str(raw), f"unknown limit (known: {', '.join(FIELDS)})")
        out[field] = canonical(field, raw)
    return Limits(**out)


def check_consistent(limits: Limits) -> None:
    """Relations systemd would accept but that make no sense (min <= low <= high <= max)."""
    order = ("memory_min", "memory_low", "memory_high", "memory_max")
    values = [(f, getattr(limits, f)) for f in order if getattr(limits, f) is not None]
    for (fa, a), (fb, b) in itertools.pairwise(values):
        if a != INFINITY and (b == INFINITY or int(a) <= int(b)):
            continue
        raise InvalidLimit(fb, b, f"must not be below {fa} ({a})")


def to_systemd(limits: Limits) -> dict[str, int | float | None]:
    """Keyword arguments for nsd.systemd.limit_properties (numbers; inf for no limit)."""
    out: dict[str, int | float | None] = {}
    for field, value in limits.items().items():
        if field == "cpu_quota":
            out["cpu_quota_percent"] = float("inf") if value == INFINITY else float(value[:-1])
        elif value == INFINITY:
            out[field] = UINT64_MAX
        else:
            out[field] = int(value)
    return out
