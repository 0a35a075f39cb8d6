"""The statistics every experiment's tables use: t-intervals, paired comparisons, and families of them with Holm's correction.

A row of an experiment is run with several seeds. Its value (Δm, a headline metric, a selection
measure) is summarised as the mean over seeds and the two-sided 95% t-interval of that mean,

    mean ± t_{0.975, n-1} · s / sqrt(n),      s the standard deviation over the n seeds (ddof = 1).

A quantity bounded to [0, 1] (a Jaccard overlap, a task share) gets its interval on the logit scale,
mapped back (`bounded_interval`), so it cannot leave [0, 1].

Two rows are compared paired by seed (`paired`): per seed the difference a − b. Comparisons come in
named *families* (the ablation's Δm comparisons, the selection measures, the distractors, the primary
comparison), and `family` gives every member of a family

    its mean and unadjusted 95% t-interval,
    p       the two-sided paired t-test, t = mean / (s / sqrt(n)) on n − 1 degrees of freedom,
    p_holm  Holm's step-down adjustment over the family's m members: sorted p_(1) <= ... <= p_(m),
            p_holm_(i) = max_{j <= i} min(1, (m − j + 1) p_(j)),
    signs   how many seeds share the mean's sign ("5/5 negative"),
    verdict "real" where p_holm < 0.05, "suggestive" where only the unadjusted test holds (p < 0.05,
            which is the same as the unadjusted interval excluding 0), else "within noise".

Holm controls the chance of calling anything in the family real when nothing is (the family-wise
error rate) at 5%, under any dependence between the members; it is uniformly more powerful than
Bonferroni. "Within noise" is not "no difference": the interval says how large a difference the seeds
leave possible.

Notes:
- The seeds are treated as independent pairs. What a seed varies is recorded in each run's flags:
  the training seed (initial weights, data order, augmentation), and, where a run sets --data-seed,
  the scenes of the train and val splits. Runs without --data-seed all use data_seed 0, so their
  intervals cover the noise of training seeds only, on one fixed dataset.
- With five seeds a t-test has 4 degrees of freedom: t_{0.975, 4} = 2.776, so an interval is wide and a
  single odd seed moves it a lot; the per-seed values are printed beside every comparison.
"""
import math

import numpy as np

ALPHA = 0.05


def t_interval(values, level=0.95):
    """Mean and the two-sided t-interval of the mean: mean ± t_{(1+level)/2, n-1} s / sqrt(n).

    Returns {"n", "mean", "ci95": [lo, hi] (None for n < 2), "excludes_zero": the interval excludes 0}.
    """
    from scipy import stats

    x = np.asarray(values, float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "excludes_zero": False}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "ci95": None, "excludes_zero": False}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


def bounded_interval(values, level=0.95, eps=1e-6):
    """A t_interval for values in [0, 1]: the mean over seeds, and the t-interval of the mean *logit*
    mapped back through the logistic function, so it lies inside (0, 1).

    The interval is the one of the logit-scale mean (a typical value, not exactly the arithmetic mean);
    values at 0 or 1 are clipped to [eps, 1 − eps]; values that are all equal give [v, v].
    """
    x = np.asarray(values, float)
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"bounded_interval needs values in [0, 1], got {x.tolist()}")
    out = t_interval(x, level)
    out["scale"] = "logit"
    if out["ci95"] is None:
        return out
    if np.ptp(x) == 0:
        out["ci95"] = [float(x[0])] * 2
        return out
    z = np.log(np.clip(x, eps, 1 - eps)) - np.log1p(-np.clip(x, eps, 1 - eps))      # logit
    lo, hi = t_interval(z, level)["ci95"]
    out["ci95"] = [float(1 / (1 + math.exp(-lo))), float(1 / (1 + math.exp(-hi)))]
    return out


def paired(a, b):
    """Paired comparison of {seed: value} dicts a and b over their common seeds: a - b per seed."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "differences": diffs, **t_interval(diffs)}


def t_test_p(differences):
    """Two-sided p of the one-sample t-test of mean 0 (the paired t-test on a − b); None for n < 2.

    All differences equal: p = 1 if they are 0 (nothing differs), else 0 (no spread, a constant shift).
    """
    from scipy import stats

    x = np.asarray(differences, float)
    n = len(x)
    if n < 2:
        return None
    s = x.std(ddof=1)
    if s == 0:
        return 1.0 if x.mean() == 0 else 0.0
    t = x.mean() / (s / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the order given (None entries are left out and stay None)."""
    index = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(index)
    out = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(index, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))     # (m − j + 1) p_(j), made monotone
        out[i] = running
    return out


def seed_signs(differences):
    """How many seeds share the mean's sign: "5/5 negative", "4/5 positive"; "all 0" when nothing differs."""
    x = np.asarray(differences, float)
    n = len(x)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    if pos == neg == 0:
        return "all 0"
    if pos == neg:
        return f"{pos}/{n} positive, {neg}/{n} negative"
    return f"{pos}/{n} positive" if pos > neg else f"{neg}/{n} negative"


def family(name, comparisons, alpha=ALPHA):
    """Every member of one family of paired comparisons, tested and corrected together.

    comparisons: a list of dicts, each with "differences" (per seed, a − b) and whatever else the
    report keeps (labels, seeds). Each dict gains, in place: "family", "m" (the family's size), "n",
    "mean", "ci95", "excludes_zero" (unadjusted), "p", "p_holm", "signs", "verdict". Returns the list.
    A member with fewer than two seeds has no p and the verdict "one seed" (it does not count in m).
    """
    for c in comparisons:
        c.update(t_interval(c["differences"]))
        c["p"] = t_test_p(c["differences"])
    adjusted = holm([c["p"] for c in comparisons])
    m = sum(p is not None for p in adjusted)
    for c, p_holm in zip(comparisons, adjusted):
        c.update(family=name, m=m, p_holm=p_holm, signs=seed_signs(c["differences"]))
        if c["p"] is None:
            c["verdict"] = "one seed"
        elif p_holm < alpha:
            c["verdict"] = "real"
        elif c["p"] < alpha:
            c["verdict"] = "suggestive"
        else:
            c["verdict"] = "within noise"
    return comparisons


def ci(stat, digits=2, sign="+"):
    """ "mean [lo, hi]" of a t_interval result; sign="" for quantities that are not differences."""
    if stat["mean"] is None:
        return "—"
    f = f"{sign}.{digits}f"
    if stat["ci95"] is None:
        return f"{stat['mean']:{f}} (1 seed)"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{f}} [{lo:{f}}, {hi:{f}}]"


def fmt_p(p):
    """A p-value for a table: three decimals (four next to 0.05), "<0.001" below that, "—" without one."""
    if p is None:
        return "—"
    if 0.0495 <= p < 0.0505:                   # "0.050" would not say on which side of 0.05 it lies
        return f"{p:.4f}"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# The columns every comparison table shares, and one row of them.
COLUMNS = "| family | comparison | per seed | mean [95% CI] | p | Holm p | seeds | verdict |"
RULE = "|---|---|---|---|---:|---:|---|---|"


def row(c, label, digits=2):
    """One comparison-table row (COLUMNS) of a member of a family."""
    per_seed = ", ".join(f"{d:+.{digits}f}" for d in c["differences"])
    return (f"| {c['family']} | {label} | {per_seed} | {ci(c, digits)} | {fmt_p(c['p'])} | {fmt_p(c['p_holm'])} | "
            f"{c['signs']} | {c['verdict']} |")


def family_note(name, comparisons):
    """The sentence under a family's table saying what was corrected over what."""
    m = comparisons[0]["m"] if comparisons else 0
    return (f"Family '{name}': {m} comparisons, Holm-adjusted together. 'real' = Holm p < {ALPHA}; 'suggestive' = "
            f"only the unadjusted test holds (p < {ALPHA}, the 95% interval excludes 0); else 'within noise'. "
            f"Seeds: how many seeds share the mean's sign.")
