"""Small statistics shared across stages."""

from __future__ import annotations

import bisect
import math


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: always an observed value, so a p95 latency is one someone really saw."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class RunningPercentile:
    """`percentile` of a sample that keeps growing, read after every addition: kept sorted as it grows, so a
    read is O(1) where re-sorting the whole sample at each read would make a long canary quadratic."""

    def __init__(self):
        self._sorted: list[float] = []

    def add(self, value: float) -> None:
        bisect.insort(self._sorted, value)

    def __call__(self, q: float) -> float | None:
        if not self._sorted:
            return None
        return self._sorted[max(1, math.ceil(q / 100 * len(self._sorted))) - 1]
