"""Summary statistics for the benchmark figures: median, percentiles, spread over repeats.

Percentiles interpolate linearly between the two nearest ranks (numpy's default), so a p99
over 50 samples sits between the two largest; the sample count is always reported next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], pct: float) -> float:
    """The pct-th percentile (0..100) of `values`, linear between ranks; NaN when empty."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * pct / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """How much repeats of one measurement disagree: min, max, and the max/min ratio."""
    if not values:
        return {"n": 0}
    lo, hi = min(values), max(values)
    out: dict[str, float | int] = {"n": len(values), "min": round(lo, digits), "max": round(hi, digits)}
    if lo > 0:
        out["max_over_min"] = round(hi / lo, 3)
    return out


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """n, p50, p90, p99, min, max of one sample series (latencies in ms, say)."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(median(values), digits),
            "p90": round(percentile(values, 90), digits), "p99": round(percentile(values, 99), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def rounded(value: float, digits: int = 3) -> float | None:
    """A JSON-safe number: None for NaN or infinity."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)
