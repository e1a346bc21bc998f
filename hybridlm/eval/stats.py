"""The ablation lab's statistics: intervals over seeds and the verdict on a claim.

A claim compares variant ``a`` with variant ``b`` on one metric. Runs of the two variants with the same
seed share the data order and the initialisation scheme, so the comparison is *paired*: the interval is
the Student-t interval of the per-seed differences a_s - b_s (n - 1 degrees of freedom), which removes
the variation that comes from the seed (an easy data order helps every variant). When the two variants
were not run on the same seeds, Welch's unpaired interval is used instead, and the table says so.

Verdicts (``d`` = mean difference, sign-adjusted so that the claim expects ``d > 0``; ``m`` = the claim's
margin, the smallest difference that matters, in metric units):

- ``>``  (a beats b): **confirmed** when the 95% interval lies above 0; **refuted** when its upper end is
  below m (whatever a's advantage is, if any, it is smaller than the smallest the claim cares about; with
  m = 0: b is significantly better).
- ``>=`` (a matches or beats b): confirmed when the 95% interval lies above -m; refuted when below -m.
- ``==`` (a and b within m): confirmed when the 90% interval lies inside (-m, m) (TOST at 5%); refuted
  when the 95% interval lies wholly outside [-m, m].
- otherwise **inconclusive**.

``stability`` reruns the verdict with each seed left out in turn and names the seeds whose removal
changes it: a verdict that flips with one seed fewer rests on that seed.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Student-t quantiles: two-sided 95% (t_0.975) and 90% (t_0.95), for 1..30 degrees of freedom, then 40,
# 60, 120 and the normal limit (linear interpolation in 1/df between those)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
_T95 = [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
        1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
        1.699, 1.697]
_TAIL = {0.975: [(40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960)],
         0.95: [(40, 1.684), (60, 1.671), (120, 1.658), (math.inf, 1.645)]}
EXPECT = {">": 1, ">=": 1, "<": -1, "<=": -1, "==": 0}


def t_quantile(df: float, p: float = 0.975) -> float:
    """Student-t quantile for ``p`` in {0.975, 0.95}; fractional df (Welch) rounded down (conservative)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    table = {0.975: _T975, 0.95: _T95}[p]
    if df <= 30:
        return table[int(df) - 1]
    points = [(30, table[-1]), *_TAIL[p]]
    for (d0, q0), (d1, q1) in zip(points, points[1:]):
        if df <= d1:
            w = (1 / d0 - 1 / df) / (1 / d0 - 1 / d1)           # 1 / inf == 0.0
            return q0 + w * (q1 - q0)
    return points[-1][1]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


@dataclass
class Interval:
    """Mean difference ``d`` of a - b with its 95% and 90% intervals; ``n`` seeds (pairs, or the smaller
    group for Welch); ``paired`` says which test made it. Bounds are nan with too few seeds."""
    d: float
    lo95: float
    hi95: float
    lo90: float
    hi90: float
    n: int
    paired: bool


def _interval(d: float, se: float, df: float, n: int, paired: bool) -> Interval:
    if df < 1 or math.isnan(se):
        nan = float("nan")
        return Interval(d, nan, nan, nan, nan, n, paired)
    q95, q90 = t_quantile(df, 0.975), t_quantile(df, 0.95)
    return Interval(d, d - q95 * se, d + q95 * se, d - q90 * se, d + q90 * se, n, paired)


def paired_interval(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Interval of mean(a - b) over the seeds both have (``a`` and ``b``: seed -> value)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        raise ValueError("no seed in common: a paired comparison needs runs of both variants with the same seeds")
    d = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return _interval(d, se, len(diffs) - 1, len(diffs), True)


def welch_interval(a: list[float], b: list[float]) -> Interval:
    """Unpaired interval of mean(a) - mean(b) with Welch's degrees of freedom."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return _interval(d, float("nan"), 0, min(len(a), len(b)), False)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(d, d, d, d, d, min(len(a), len(b)), False)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return _interval(d, se, df, min(len(a), len(b)), False)


def compare(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Paired when both variants ran on the same seeds, else Welch."""
    if set(a) == set(b):
        return paired_interval(a, b)
    return welch_interval(list(a.values()), list(b.values()))


def decide(expect: str, margin: float, iv: Interval) -> str:
    """'confirmed', 'refuted' or 'inconclusive' for ``a EXPECT b`` (see the module docstring)."""
    if math.isnan(iv.lo95):
        return "inconclusive"
    m = abs(margin)
    if EXPECT[expect] == 0:
        if -m < iv.lo90 and iv.hi90 < m:
            return "confirmed"
        return "refuted" if iv.lo95 > m or iv.hi95 < -m else "inconclusive"
    sign = EXPECT[expect]
    lo95, hi95 = (iv.lo95, iv.hi95) if sign > 0 else (-iv.hi95, -iv.lo95)      # interval of sign * (a - b)
    if expect in (">", "<"):
        if lo95 > 0:
            return "confirmed"
        return "refuted" if hi95 < m or (m == 0 and hi95 <= 0) else "inconclusive"
    if lo95 > -m:
        return "confirmed"
    return "refuted" if hi95 < -m else "inconclusive"


def stability(expect: str, margin: float, a: dict[int, float], b: dict[int, float]) -> list[int]:
    """The seeds whose removal alone changes the verdict (empty: the verdict survives one seed fewer)."""
    full = decide(expect, margin, compare(a, b))
    flips = []
    for s in sorted(set(a) | set(b)):
        a1 = {k: v for k, v in a.items() if k != s}
        b1 = {k: v for k, v in b.items() if k != s}
        if not a1 or not b1 or decide(expect, margin, compare(a1, b1)) != full:
            flips.append(s)
    return flips
