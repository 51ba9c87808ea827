"""Across-seed statistics: the median and a distribution-free interval for it.

A capacity search returns an integer per seed, far from normal and often tied, so the interval is the
order-statistic one for the median (the binomial sign-test interval): [x_(j), x_(n+1-j)] with the largest
j whose coverage 1 - 2 P(Binom(n, 1/2) < j) is still >= the level asked. It needs no distribution, and
its exact coverage is returned: 5 seeds give [min, max] at 93.8%, 6 or more reach 95%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


@dataclass(frozen=True)
class MedianCI:
    median: float
    ci_low: float
    ci_high: float
    coverage: float  # the interval's exact coverage (can fall short of the level with few seeds)
    n: int

    def row(self, nd: int = 1) -> dict:
        return {"median": round(self.median, nd), "ci_low": round(self.ci_low, nd), "ci_high": round(self.ci_high, nd),
                "ci_coverage": round(self.coverage, 3), "seeds": self.n}


def median_ci(values, level: float = 0.95) -> MedianCI:
    x = np.sort(np.asarray(list(values), dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    j = 1  # 1-based order statistic; j = 1 is the widest interval, [min, max]
    while j + 1 <= n // 2 and 1 - 2 * binom.cdf(j, n, 0.5) >= level:  # coverage of [x_(j+1), x_(n-j)]
        j += 1
    coverage = 1 - 2 * binom.cdf(j - 1, n, 0.5)
    return MedianCI(float(np.median(x)), float(x[j - 1]), float(x[n - j]), float(coverage), n)
