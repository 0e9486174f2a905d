"""Order statistics for benchmark samples (no numpy: the bench installs nothing)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of already sorted samples, linear interpolation."""
    if not sorted_xs:
        return math.nan
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    k = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo))


def summarize(xs: Sequence[float]) -> dict[str, Any]:
    """n, median, p10/p90, quartiles, p99, mean, min, max of ``xs``."""
    s = sorted(xs)
    return {
        "n": len(s),
        "median": percentile(s, 50),
        "p10": percentile(s, 10),
        "p90": percentile(s, 90),
        "q1": percentile(s, 25),
        "q3": percentile(s, 75),
        "p99": percentile(s, 99),
        "mean": sum(s) / len(s) if s else math.nan,
        "min": float(s[0]) if s else math.nan,
        "max": float(s[-1]) if s else math.nan,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
