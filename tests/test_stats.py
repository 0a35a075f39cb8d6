"""research/stats.py: the numbers every verdict in research/results/ and research/EVIDENCE.md rests on.

Pinned down against hand-computed values and scipy's own tests: the paired t-test's p, Holm's
adjusted p on a textbook example (including its monotonicity step), the seed-sign counts, the
verdicts of a family ("real" only where the Holm-adjusted p < 0.05, "suggestive" where only the
unadjusted test holds), and the logit interval of a bounded quantity (inside [0, 1], by hand).
"""
import math

import pytest
from scipy import stats as sps

from research import stats


def test_t_test_p_matches_scipy_and_a_hand_value():
    """a − b = 1, 2, 2, 3: t = 2 / (sqrt(2/3) / 2) = 4.899 on 3 df, p = 0.01628 (tables: 0.0163)."""
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]
    p = stats.t_test_p([x - y for x, y in zip(a, b)])
    assert p == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert p == pytest.approx(2 * sps.t.sf(2 / (math.sqrt(2 / 3) / 2), 3), rel=1e-12)
    assert p == pytest.approx(0.01628, abs=5e-5)
    kem_none = [-0.99, -1.44, -2.83, -0.47, -0.94]            # the ablation's kem − none, Δm per seed
    assert stats.t_test_p(kem_none) == pytest.approx(sps.ttest_1samp(kem_none, 0).pvalue, rel=1e-12)
    assert stats.t_test_p([0.0, 0.0, 0.0]) == 1.0, "nothing differs"
    assert stats.t_test_p([0.5, 0.5]) == 0.0, "a constant shift has no spread"
    assert stats.t_test_p([1.0]) is None


def test_holm_on_the_textbook_example():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    0.04 x 1 = 0.04 -> 0.06 (never below the step before): adjusted 0.03, 0.06, 0.06, 0.02 in the given order."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]), "capped at 1"
    assert stats.holm([0.02, None, 0.01]) == [pytest.approx(0.02), None, pytest.approx(0.02)], "None: not a member"


def test_seed_signs_count_the_seeds_that_share_the_means_sign():
    assert stats.seed_signs([-0.99, -1.44, -2.83, -0.47, -0.94]) == "5/5 negative"
    assert stats.seed_signs([-1.32, -1.07, -2.29, 0.57, -1.86]) == "4/5 negative"
    assert stats.seed_signs([0.3, 0.2, -0.1]) == "2/3 positive"
    assert stats.seed_signs([0.0, 0.0]) == "all 0"


def test_a_family_is_corrected_together_and_worded_by_its_adjusted_p():
    """Three members: a clear effect (p < 0.001), kem − none's Δm (p = 0.0299, Holm 2 x 0.0299 = 0.060:
    suggestive), a null (within noise); a one-seed member has no p and does not count in m."""
    members = [{"name": "clear", "differences": [-1.0, -1.1, -0.9, -1.05, -0.95]},
               {"name": "kem-none", "differences": [-0.99, -1.44, -2.83, -0.47, -0.94]},
               {"name": "null", "differences": [0.5, -0.4, 0.1, -0.3, 0.2]},
               {"name": "one seed", "differences": [2.0]}]
    out = stats.family("test", members)
    by = {c["name"]: c for c in out}
    assert out is members and all(c["family"] == "test" and c["m"] == 3 for c in out)
    p = [sps.ttest_1samp(c["differences"], 0).pvalue for c in members[:3]]
    assert [by[n]["p"] for n in ("clear", "kem-none", "null")] == pytest.approx(p, rel=1e-12)
    assert by["kem-none"]["p"] == pytest.approx(0.0299, abs=1e-4)
    assert by["kem-none"]["p_holm"] == pytest.approx(2 * by["kem-none"]["p"]), "second smallest of 3: x 2"
    assert by["clear"]["p_holm"] == pytest.approx(3 * by["clear"]["p"])
    assert [by[n]["verdict"] for n in ("clear", "kem-none", "null", "one seed")] == \
        ["real", "suggestive", "within noise", "one seed"]
    assert by["kem-none"]["excludes_zero"] and by["kem-none"]["signs"] == "5/5 negative"
    assert by["kem-none"]["ci95"] == pytest.approx([-2.456, -0.211], abs=1e-3), "the unadjusted interval"
    assert "| test | kem − none |" in stats.row(by["kem-none"], "kem − none")
    assert [stats.fmt_p(p) for p in (0.0004, 0.0501, 0.03, None)] == ["<0.001", "0.0501", "0.030", "—"]


def test_bounded_interval_stays_inside_zero_one():
    """Logits -1, 0, 1: mean 0, s = 1, half width t(0.975, 2) / sqrt(3) = 2.4842 -> [σ(-2.4842), σ(2.4842)]
    = [0.0770, 0.9230]; KEM's bimodal overlaps, whose plain t-interval reaches past 1, stay inside."""
    sigma = [1 / (1 + math.exp(1)), 0.5, 1 / (1 + math.exp(-1))]
    out = stats.bounded_interval(sigma)
    half = sps.t.ppf(0.975, 2) / math.sqrt(3)
    assert out["ci95"] == pytest.approx([1 / (1 + math.exp(half)), 1 / (1 + math.exp(-half))], rel=1e-9)
    assert out["ci95"] == pytest.approx([0.0770, 0.9230], abs=1e-4)
    assert out["mean"] == pytest.approx(0.5)
    kem_post = [0.66, 0.25, 0.98, 0.87, 0.97]
    assert stats.t_interval(kem_post)["ci95"][1] > 1, "the plain interval leaves [0, 1]"
    lo, hi = stats.bounded_interval(kem_post)["ci95"]
    assert 0 < lo < hi < 1
    assert stats.bounded_interval([1.0, 1.0, 1.0])["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.bounded_interval([0.5, 1.2])
