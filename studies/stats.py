"""The statistics every experiment's tables use: the mean over seeds with a t-interval, and paired comparisons.

A row of an experiment is run with several seeds (0-4). Its value (Δm, a headline metric, a selection
measure) is summarised as the mean over seeds and the two-sided 95% t-interval of that mean,

    mean ± t_{0.975, n-1} · s / sqrt(n),      s the standard deviation over the n seeds (ddof = 1).

Two rows are compared paired by seed: per seed the difference a − b, then the t-interval of those
differences. A difference is called "real" only when its interval excludes zero; otherwise it is
"not resolved" (which is not the same as "no difference").

Notes:
- Pairing by seed: two rows with the same seed see the same data order and val set; their initial
  weights differ wherever the networks differ. The t-interval treats the seeds as independent pairs.
- Each comparison is tested on its own at 95%: no correction for the many comparisons in a table.
"""
import math

import numpy as np


def t_interval(values, level=0.95):
    """Mean and the two-sided t-interval of the mean: mean ± t_{(1+level)/2, n-1} s / sqrt(n).

    Returns {"n", "mean", "ci95": [lo, hi] (None for n < 2), "real": the interval excludes 0}.
    """
    from scipy import stats

    x = np.asarray(values, float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "real": False}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "ci95": None, "real": False}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "ci95": [lo, hi], "real": bool(lo > 0 or hi < 0)}


def paired(a, b):
    """Paired comparison of {seed: value} dicts a and b over their common seeds: a - b per seed."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "differences": diffs, **t_interval(diffs)}


def ci(stat, digits=2, sign="+"):
    """ "mean [lo, hi]" of a t_interval result; sign="" for quantities that are not differences."""
    if stat["mean"] is None:
        return "—"
    f = f"{sign}.{digits}f"
    if stat["ci95"] is None:
        return f"{stat['mean']:{f}} (1 seed)"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{f}} [{lo:{f}}, {hi:{f}}]"


def verdict(stat):
    """The word a table prints for a t_interval or paired result."""
    return "real" if stat["real"] else "not resolved"
