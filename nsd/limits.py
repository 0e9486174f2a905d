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

from nsd.errors import InvalidLimit

INFINITY = "infinity"
# ASCII only: re's [0-9] is ASCII, but re.IGNORECASE would let U+212A KELVIN SIGN
# match "K", and str.isdigit() accepts every script's digits.
_SIZE = re.compile(r"(?P<n>[0-9]{1,20})(?:\.(?P<frac>[0-9]{1,9}))?(?P<unit>[KMGTEkmgte]?)")
_COUNT = re.compile(r"([0-9]{1,20})")
_PERCENT = re.compile(r"([0-9]{1,20})%")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "E": 1 << 60}
UINT64_MAX = 2**64 - 1
#: systemd writes UINT64_MAX for "infinity"; every finite size must stay below it.
MAX_SIZE = UINT64_MAX - 1
MAX_WEIGHT = 10000
#: the kernel refuses a larger pids.max (PID_MAX_LIMIT on 64-bit), and systemd only
#: logs that; so a larger TasksMax would look set and not be.
MAX_TASKS = 4194304
#: 10,000 CPUs; CPUQuotaPerSecUSec (percent * 10,000 us) stays far inside uint64.
MAX_QUOTA_PERCENT = 1000000
_MAX_TEXT = 64  # longer values are refused before any parsing


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
    """Bytes, or None for infinity (systemd's syntax: 512M, 1.5G, 4096, infinity).

    Exact integer arithmetic (no float): ``1.5G`` is 1610612736 and a 20-digit
    number cannot overflow anything. Raises ValueError with the rule broken.
    """
    text = text.strip(" \t")
    if text.lower() == INFINITY:
        return None
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(
            "expected bytes (ASCII digits, at most 20, with up to 9 after a '.') and an "
            "optional K, M, G, T or E suffix, or infinity"
        )
    unit = _UNITS[m["unit"].upper()]
    frac: str = m["frac"] or ""
    value: int = int(m["n"]) * unit + int(frac or "0") * unit // 10 ** len(frac)
    if value > MAX_SIZE:
        raise ValueError(f"too large (at most {MAX_SIZE} bytes; infinity for no limit)")
    return value


def _bounded(text: str, pattern: re.Pattern[str], low: int, high: int, rule: str) -> int:
    m = pattern.fullmatch(text)
    if m is None or not low <= int(m[1]) <= high:
        raise ValueError(rule)
    return int(m[1])


def canonical(field: str, raw: str | int) -> str:
    """Validate one value; return its canonical text. Raises InvalidLimit naming the rule."""
    text = str(raw).strip(" \t")
    try:
        if field not in FIELDS:
            raise InvalidLimit(field, text, f"unknown limit (known: {', '.join(FIELDS)})")
        if not text.isascii():
            bad = next(c for c in text if not c.isascii())
            raise ValueError(
                f"only ASCII digits and unit letters are allowed, not U+{ord(bad):04X} ({bad!r})"
            )
        if len(text) > _MAX_TEXT:
            raise ValueError(f"longer than {_MAX_TEXT} characters")
        if field in _SIZES:
            size = parse_size(text)
            return INFINITY if size is None else str(size)
        if field in _WEIGHTS:
            rule = f"a weight is a whole number from 1 to {MAX_WEIGHT}"
            return str(_bounded(text, _COUNT, 1, MAX_WEIGHT, rule))
        if text.lower() == INFINITY:
            return INFINITY
        if field == "cpu_quota":
            rule = (f'a quota is a whole percentage of one CPU from 1% to {MAX_QUOTA_PERCENT}%, '
                    'e.g. "150%", or infinity')  # fmt: skip
            return f"{_bounded(text, _PERCENT, 1, MAX_QUOTA_PERCENT, rule)}%"
        rule = f"a number of tasks from 1 to {MAX_TASKS} (the kernel's limit), or infinity"
        return str(_bounded(text, _COUNT, 1, MAX_TASKS, rule))
    except ValueError as e:
        raise InvalidLimit(field, text, str(e)) from None


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
    """Keyword arguments for nsd.systemd.units.limit_properties (numbers; inf for no limit)."""
    out: dict[str, int | float | None] = {}
    for field, value in limits.items().items():
        if field == "cpu_quota":
            out["cpu_quota_percent"] = float("inf") if value == INFINITY else float(value[:-1])
        elif value == INFINITY:
            out[field] = UINT64_MAX
        else:
            out[field] = int(value)
    return out
