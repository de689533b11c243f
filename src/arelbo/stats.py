"""Statistics for comparing policies over training seeds: paired differences with Student-t intervals.

Two policies trained with the same seed share the data order, the initialisation and the noise stream, so their
difference on that seed removes the part of the seed-to-seed spread they have in common. For n seeds with
differences d_1..d_n (mean m, sample standard deviation s, ddof 1) the 100(1 - alpha)% interval for the mean
difference is m +- t_{1 - alpha/2, n - 1} s / sqrt(n). A claim "A is better than B" is made only when that
interval excludes zero; otherwise the difference is *within the spread* of the seeds.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["t_quantile", "t_interval", "paired_differences", "verdict", "BETTER", "WORSE", "WITHIN"]

BETTER, WORSE, WITHIN = "better", "worse", "within the spread"


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy.stats.t.ppf)."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    return float(t.ppf(p, df))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std (ddof 1), n and the two-sided ``confidence`` t-interval of the mean of the finite values
    (``lo``/``hi`` None with fewer than two values: no spread to judge by)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    out = {"mean": None, "std": None, "n": n, "lo": None, "hi": None, "confidence": confidence}
    if n == 0:
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n < 2:
        return out
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    out.update(std=std, lo=mean - half, hi=mean + half)
    return out


def verdict(lo: float | None, hi: float | None, lower_is_better: bool | None = True) -> str:
    """What an interval of (A - B) says about A: ``better``/``worse`` when it excludes zero (by the metric's
    direction), ``within the spread`` when it contains zero or cannot be formed. With no direction
    (``lower_is_better=None``) the words are ``higher``/``lower``."""
    if lo is None or hi is None or lo <= 0.0 <= hi:
        return WITHIN
    below = hi < 0.0
    if lower_is_better is None:
        return "lower" if below else "higher"
    return BETTER if below == lower_is_better else WORSE


def paired_differences(a: dict[int, float | None], b: dict[int, float | None], confidence: float = 0.95,
                       lower_is_better: bool | None = True) -> dict:
    """A - B over the seeds both have a finite value for (``{seed: value}`` each): every difference, its
    t-interval and the verdict about A."""
    seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    res = t_interval(diffs, confidence)
    res.update(seeds=seeds, differences=diffs, verdict=verdict(res["lo"], res["hi"], lower_is_better))
    return res


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
