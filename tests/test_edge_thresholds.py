"""metrics.EdgeMeter at its thresholds: the grid, the binarisation prob >= t, and the reported ODS
threshold, against a brute-force implementation written out here.

Pinned down:
- the grid of n thresholds is k / (n + 1), k = 1..n (99 -> 0.01, ..., 0.99);
- a pixel is an edge at threshold t when prob >= t: hand-built maps with probabilities exactly on
  grid values, where prob > t would give another odsF and another ODS threshold (exact and
  approximate modes);
- odsF, oisF, precision, recall and the ODS threshold equal a brute force that, for every
  threshold of the grid written out here, binarises, thins (metrics.thin, itself pinned against a
  pixel loop in test_metrics.py), matches one to one within the radius with scipy's maximum
  bipartite matching, pools the counts over images and takes the best F (ties: the lowest
  threshold), on maps whose probabilities often sit exactly on a threshold; the radius is
  max_dist times the image's diagonal (MAX_DIST is chosen so that the diagonal's radius reaches the
  diagonal neighbours and the longest side's would not);
- oisF takes, for an image whose F ties at several thresholds, the lowest of them (MATLAB's max, as
  the BSDS scripts use it): a hand-built pair of images where the lowest and the highest differ.
"""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from metrics import EdgeMeter, thin


def score(probs, gts, max_dist, thresholds=99, exact=True):
    meter = EdgeMeter(max_dist, thresholds=thresholds, exact=exact)
    for p, g in zip(probs, gts):
        meter.update(torch.as_tensor(p, dtype=torch.float64)[None, None], torch.as_tensor(g)[None, None])
    return meter.compute()


# ---------------------------------------------------------------------------------------------- the grid

@pytest.mark.parametrize("n", [1, 3, 9, 99])
def test_the_grid_of_n_thresholds_is_k_over_n_plus_1(n):
    want = [k / (n + 1) for k in range(1, n + 1)]
    got = EdgeMeter(0.01, thresholds=n).thresholds
    assert np.allclose(got, want, rtol=0, atol=1e-15), f"grid {list(got)}, expected {want}"


def test_the_default_grid_is_the_99_percent_steps():
    got = EdgeMeter(0.01).thresholds
    assert len(got) == 99 and np.allclose(got, np.arange(1, 100) / 100, rtol=0, atol=1e-15), got


# ---------------------------------------------------------------------------------------------- prob >= t

def line_case():
    """A 16 x 16 image: a ground-truth line predicted at exactly 0.75 (the top of the grid 1/4, 1/2,
    3/4) and four isolated false edges at 0.6, far from it."""
    gt = np.zeros((16, 16), np.uint8)
    gt[3:13, 4] = 1
    prob = np.zeros((16, 16))
    prob[3:13, 4] = 0.75
    for y, x in ((2, 12), (6, 14), (10, 11), (14, 13)):
        prob[y, x] = 0.6
    return prob, gt


@pytest.mark.parametrize("exact", [True, False])
def test_a_probability_equal_to_a_threshold_is_an_edge_at_that_threshold(exact):
    prob, gt = line_case()
    max_dist = 1.5 / math.hypot(16, 16)                                 # 1.5 pixels: the false edges are out of range
    r = score([prob], [gt], max_dist, thresholds=3, exact=exact)
    suffix = "" if exact else "_approx"
    # At t = 0.75 exactly the line is an edge (0.75 >= 0.75) and nothing else: a perfect score there.
    # (With prob > t the line would first appear at t = 0.5, together with the four false edges.)
    assert r["odsF" + suffix] == 1.0, r
    assert r["ods_threshold" + suffix] == 0.75, r
    assert r["precision" + suffix] == 1.0 and r["recall" + suffix] == 1.0, r


def test_hand_computed_scores_with_pixels_exactly_at_thresholds():
    prob, gt = line_case()
    prob[prob == 0.6] = 0.5                                             # the false edges exactly at t = 1/2
    prob[8, 4] = 0.5                                                    # and one line pixel
    r = score([prob], [gt], 1.5 / math.hypot(16, 16), thresholds=3)
    # t = 3/4: 9 of 10 line pixels, no false edge: F = 2 * 9 / (9 + 10) = 18/19.
    # t = 1/2: the whole line and the 4 false edges: F = 2 * 10 / (14 + 10) = 5/6 < 18/19.
    # (With prob > t, t = 1/2 would score 18/19 and be reported instead, and t = 3/4 would score 0.)
    assert math.isclose(r["odsF"], 18 / 19, rel_tol=1e-12) and r["ods_threshold"] == 0.75, r


# ---------------------------------------------------------------------------------------------- brute force

def brute_counts(prob, gt, max_dist, grid):
    """(matched, predicted, ground truth) per threshold of `grid`: binarise prob >= t, thin, and
    match one to one within max_dist * diagonal by scipy's maximum bipartite matching."""
    radius = max_dist * math.hypot(*gt.shape)
    G = np.argwhere(gt == 1)
    out = []
    for t in grid:
        P = np.argwhere(thin(prob >= t))
        matched = 0
        if len(P) and len(G):
            near = ((P[:, None, :] - G[None, :, :]) ** 2).sum(-1) <= radius ** 2     # (|P|, |G|)
            match = maximum_bipartite_matching(csr_matrix(near.astype(np.int8)), perm_type="column")
            matched = int((match >= 0).sum())
        out.append((matched, len(P), len(G)))
    return np.array(out, np.int64)                                      # (T, 3)


def f_measure(m, p, g):
    P = m / p if p else 0.0
    R = m / g if g else 0.0
    return 2 * P * R / (P + R) if P + R else 0.0, P, R


def brute_meter(probs, gts, max_dist, n):
    grid = [k / (n + 1) for k in range(1, n + 1)]
    per_image = [brute_counts(p, g, max_dist, grid) for p, g in zip(probs, gts)]
    pooled = sum(per_image)
    F = [f_measure(*c) for c in pooled]
    best = max(range(n), key=lambda i: (F[i][0], -i))                   # the best F; ties: the lowest t
    ois = sum(c[max(range(n), key=lambda i: (f_measure(*c[i])[0], -i))] for c in per_image)
    return {"odsF": F[best][0], "oisF": f_measure(*ois)[0], "precision": F[best][1], "recall": F[best][2],
            "ods_threshold": grid[best]}


H, W = 14, 18
MAX_DIST = 0.066     # radius 1.51 px from the diagonal (diagonal neighbours in range), 1.19 from the longest side


def random_case(seed, n, H=H, W=W):
    """Line drawings, a shifted and blurred copy as the prediction, values snapped to the grid for half
    of the pixels (so that prob == t happens often)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((H, W), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, H), rng.integers(0, W)
        dy, dx = rng.normal(size=2)
        for s in range(12):
            gt[int(np.clip(y + s * dy, 0, H - 1)), int(np.clip(x + s * dx, 0, W - 1))] = 1
    shifted = np.roll(gt, rng.integers(-1, 2), axis=int(rng.integers(0, 2))).astype(float)
    prob = np.clip(ndimage.gaussian_filter(shifted, 0.8) * 2.5 + 0.3 * rng.random((H, W)), 0, 1)
    snap = rng.random((H, W)) < 0.5
    grid_values = np.arange(0, n + 2) / (n + 1)
    prob[snap] = grid_values[np.rint(prob[snap] * (n + 1)).astype(int)]
    return prob, gt


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [4, 9])
def test_the_meter_equals_the_brute_force_over_the_grid(seed, n):
    cases = [random_case(seed * 10 + i, n) for i in range(3)]
    probs, gts = [c[0] for c in cases], [c[1] for c in cases]
    got = score(probs, gts, MAX_DIST, thresholds=n)
    want = brute_meter(probs, gts, MAX_DIST, n)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-15), f"{key}: meter {got[key]}, brute force {value}"


def test_the_brute_force_cases_do_depend_on_the_threshold():
    """The comparison above means something only if F varies over the grid and the best threshold is
    neither end of it in some case (else an index off by one, or a wrong grid, could hide)."""
    inside = 0
    for seed in range(6):
        cases = [random_case(seed * 10 + i, 9) for i in range(3)]
        r = brute_meter([c[0] for c in cases], [c[1] for c in cases], MAX_DIST, 9)
        inside += 0.1 < r["ods_threshold"] < 0.9
    assert inside >= 3, inside


def test_ois_takes_the_lowest_of_an_images_tied_thresholds():
    """Image A: two ground-truth pixels; one predicted at 3/4, the other and two false edges at 1/2.
    At t = 3/4 (m, p, g) = (1, 1, 2), at t = 1/4 and 1/2 (2, 4, 2): F = 2/3 at every threshold, a
    tie. Image B: a line of 10 pixels predicted perfectly. Pooled at A's lowest threshold:
    (12, 14, 12), oisF = 24/26; at its highest: (11, 11, 12), oisF = 22/23."""
    a_gt, a_prob = np.zeros((16, 16), np.uint8), np.zeros((16, 16))
    a_gt[3, 3] = a_gt[12, 12] = 1
    a_prob[3, 3] = 0.75
    a_prob[12, 12] = a_prob[3, 12] = a_prob[12, 3] = 0.5
    b_gt = np.zeros((16, 16), np.uint8)
    b_gt[3:13, 4] = 1
    b_prob = b_gt.astype(float)
    r = score([a_prob, b_prob], [a_gt, b_gt], 1.5 / math.hypot(16, 16), thresholds=3)
    assert math.isclose(r["oisF"], 24 / 26, rel_tol=1e-12), r
