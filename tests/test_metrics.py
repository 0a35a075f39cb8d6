"""What metrics.py promises, checked against oracles written out plainly here.

- Each meter equals a Python-loop oracle on random inputs (hypothesis), and its extreme cases:
  perfect predictions give mIoU 1, RMSE 0, angle 0, maxF 1, odsF 1.
- Ignore pixels change nothing; pooling over batches equals one big batch; the summed states of two
  meters that saw two halves of the data equal the meter of all of it (what DDP relies on).
- Edges: the thinning equals a pixel-by-pixel loop over the Lam-Lee-Suen conditions, is one pixel wide
  and keeps connectivity on simple shapes; the exact counts equal thinning + a brute-force maximum
  matching (linear_sum_assignment) on tiny images and a max-flow matching over 99 thresholds on small
  ones; an edge shifted by one pixel inside the tolerance scores 1 and beyond it 0; two predicted pixels
  near one ground-truth pixel match once; padding with 255 changes nothing; worker processes give
  identical counts.
- Δm has the right sign and value on hand-computed cases; every documented error is raised, and says
  what was wrong.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

import metrics
from metrics import (HEADLINE, DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegMeter, delta_m,
                     edge_counts, sync_meters, thin)

seeds = st.integers(0, 2**32 - 1)


def assert_states_equal(a, b):
    """Counts exactly; float sums up to summation order."""
    for x, y in zip(a.states(), b.states()):
        same = torch.equal(x, y) if not x.is_floating_point() else torch.allclose(x, y, rtol=1e-12, atol=1e-12)
        assert same, f"states differ:\n{x}\n{y}"


def assert_results_close(a, b, tol=1e-9):
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for k in a:
        x, y = np.asarray(a[k], float), np.asarray(b[k], float)
        assert np.allclose(x, y, rtol=tol, atol=tol, equal_nan=True), f"{k}: {x} vs {y}"


# ----------------------------------------------------------------------------- random inputs per meter

def seg_batch(seed, B, H, W, C):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, C, (B, H, W), generator=g)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.2] = 255
    return pred, target


def depth_batch(seed, B, H, W):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 5
    target[torch.rand(B, 1, H, W, generator=g) < 0.3] = 0                # invalid
    pred = target + torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    return pred, target


def normals_batch(seed, B, H, W):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)
    target = target / target.norm(dim=1, keepdim=True)
    target[:, :, torch.rand(H, W, generator=g) < 0.3] = 0              # invalid
    pred = (target + 0.7 * torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)) * 3.0
    return pred, target


def binary_batch(seed, B, H, W):
    g = torch.Generator().manual_seed(seed)
    prob = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    target = (torch.rand(B, 1, H, W, generator=g) < 0.4).long()
    target[torch.rand(B, 1, H, W, generator=g) < 0.15] = 255
    return prob, target


def make(kind):
    return {"seg": lambda: SegMeter(5), "depth": DepthMeter, "normals": NormalsMeter,
            "sal": SaliencyMeter, "edge": lambda: EdgeMeter(0.1, thresholds=9),
            "edge_approx": lambda: EdgeMeter(0.1, thresholds=9, exact=False)}[kind]()


def batch(kind, seed, B, H, W):
    if kind == "seg":
        return seg_batch(seed, B, H, W, 5)
    if kind == "depth":
        return depth_batch(seed, B, H, W)
    if kind == "normals":
        return normals_batch(seed, B, H, W)
    return binary_batch(seed, B, H, W)


KINDS = ["seg", "depth", "normals", "sal", "edge", "edge_approx"]


# ----------------------------------------------------------------------------- properties shared by all meters

@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None, max_examples=15)
@given(seed=seeds, B=st.integers(2, 4), H=st.integers(3, 9), W=st.integers(3, 9), cut=st.integers(1, 3))
def test_pooling_over_batches_equals_one_big_batch(kind, seed, B, H, W, cut):
    cut = min(cut, B - 1)
    pred, target = batch(kind, seed, B, H, W)
    whole, parts = make(kind), make(kind)
    whole.update(pred, target)
    parts.update(pred[:cut], target[:cut])
    parts.update(pred[cut:], target[cut:])
    assert_states_equal(whole, parts)


@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None, max_examples=15)
@given(seed=seeds, B=st.integers(2, 4), H=st.integers(3, 9), W=st.integers(3, 9))
def test_summed_states_of_two_halves_equal_the_meter_of_all(kind, seed, B, H, W):
    pred, target = batch(kind, seed, B, H, W)
    whole, a, b, summed = make(kind), make(kind), make(kind), make(kind)
    whole.update(pred, target)
    a.update(pred[: B // 2], target[: B // 2])
    b.update(pred[B // 2:], target[B // 2:])
    for s, x, y in zip(summed.states(), a.states(), b.states()):    # what all_reduce does
        s += x + y
    assert_states_equal(whole, summed)
    assert_states_equal(whole, a.merge_(b))
    assert_results_close(whole.compute(), summed.compute())


@pytest.mark.parametrize("kind", KINDS)
def test_reset_and_no_data_error(kind):
    meter = make(kind)
    meter.update(*batch(kind, 0, 2, 6, 6))
    meter.reset()
    assert all(int(t.abs().sum()) == 0 for t in meter.states())
    with pytest.raises(ValueError, match="before any"):
        meter.compute()


def test_sync_meters_is_a_no_op_without_distributed_and_sums_with_gloo(tmp_path):
    import torch.distributed as dist
    meter = SegMeter(5)
    meter.update(*seg_batch(1, 2, 5, 5, 5))
    before = [t.clone() for t in meter.states()]
    sync_meters([meter])
    assert all(torch.equal(x, y) for x, y in zip(before, meter.states()))
    if dist.is_initialized():
        pytest.skip("a process group is already running in this session")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sync_meters([meter])                         # one process: the sum is the state itself
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(x, y) for x, y in zip(before, meter.states()))


def test_merge_rejects_other_types_and_configurations():
    with pytest.raises(ValueError, match="same type"):
        SegMeter(5).merge_(DepthMeter())
    with pytest.raises(ValueError, match=r"configuration \(5, 255\), got SegMeter \(5, 0\)"):
        SegMeter(5).merge_(SegMeter(5, ignore_index=0))
    with pytest.raises(ValueError, match="same type"):
        EdgeMeter(0.011).merge_(EdgeMeter(0.0075))


# ----------------------------------------------------------------------------- segmentation

def seg_oracle(pred, target, C, ignore=255):
    cm = [[0] * C for _ in range(C)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != ignore:
            cm[t][p] += 1
    ious = []
    for c in range(C):
        tp = cm[c][c]
        union = sum(cm[c]) + sum(cm[r][c] for r in range(C)) - tp
        ious.append(tp / union if union else float("nan"))
    present = [x for x in ious if not math.isnan(x)]
    total = sum(map(sum, cm))
    return {"mIoU": sum(present) / len(present), "pixel_acc": sum(cm[c][c] for c in range(C)) / total,
            "iou_per_class": ious}


@settings(deadline=None, max_examples=40)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 8), W=st.integers(1, 8), C=st.integers(1, 6))
def test_seg_meter_equals_loop_oracle(seed, B, H, W, C):
    pred, target = seg_batch(seed, B, H, W, C)
    target[0, 0, 0] = pred[0, 0, 0]                   # at least one valid pixel
    meter = SegMeter(C)
    meter.update(pred, target)
    assert_results_close(meter.compute(), seg_oracle(pred, target, C))


def test_seg_absent_classes_are_nan_and_excluded_predicted_only_classes_count_as_zero():
    target = torch.tensor([[[0, 0, 1, 1]]])
    meter = SegMeter(4)
    meter.update(torch.tensor([[[0, 0, 1, 1]]]), target)
    r = meter.compute()
    assert r["mIoU"] == 1.0 and r["pixel_acc"] == 1.0, r
    assert math.isnan(r["iou_per_class"][2]) and math.isnan(r["iou_per_class"][3]), r
    meter.update(torch.tensor([[[2, 0, 1, 1]]]), target)          # class 2 predicted, never in target
    r = meter.compute()
    assert r["iou_per_class"][2] == 0.0 and math.isnan(r["iou_per_class"][3]), r
    assert r["mIoU"] == pytest.approx((3 / 4 + 1 + 0) / 3), r


@settings(deadline=None, max_examples=20)
@given(seed=seeds)
def test_seg_ignore_pixels_change_nothing(seed):
    pred, target = seg_batch(seed, 2, 6, 7, 5)
    other = pred.clone()
    other[target == 255] = (other[target == 255] + 1) % 5
    a, b = SegMeter(5), SegMeter(5)
    a.update(pred, target)
    b.update(other, target)
    assert_states_equal(a, b)


def test_seg_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_classes"):
        SegMeter(0)
    meter = SegMeter(3)
    with pytest.raises(ValueError, match="argmax"):
        meter.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pred labels must be in \[0, 2\], got range \[3, 3\]"):
        meter.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target labels .* got range \[0, 7\]"):
        meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(ValueError, match="torch.Tensor"):
        meter.update(np.zeros((1, 2, 2)), torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------- depth

def depth_oracle(pred, target, min_depth=1e-3):
    n = sq = log_sq = abs_rel = sq_rel = 0.0
    for p, g in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if g > 0:
            n += 1
            sq += (p - g) ** 2
            log_sq += (math.log(max(p, min_depth)) - math.log(g)) ** 2
            abs_rel += abs(p - g) / g
            sq_rel += (p - g) ** 2 / g
    return {"rmse": math.sqrt(sq / n), "log_rmse": math.sqrt(log_sq / n), "abs_rel": abs_rel / n, "sq_rel": sq_rel / n}


@settings(deadline=None, max_examples=40)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7))
def test_depth_meter_equals_loop_oracle(seed, B, H, W):
    pred, target = depth_batch(seed, B, H, W)
    target[0, 0, 0, 0] = 1.5                           # at least one valid pixel
    meter = DepthMeter()
    meter.update(pred, target)
    assert_results_close(meter.compute(), depth_oracle(pred, target))


def test_depth_perfect_prediction_is_zero_and_invalid_pixels_change_nothing():
    pred, target = depth_batch(3, 2, 8, 8)
    meter = DepthMeter()
    meter.update(torch.where(target > 0, target, torch.full_like(target, 99.0)), target)
    assert all(v == 0 for v in meter.compute().values()), meter.compute()
    a, b = DepthMeter(), DepthMeter()
    a.update(pred, target)
    b.update(torch.where(target > 0, pred, torch.full_like(pred, -7.0)), target)
    assert_states_equal(a, b)


def test_depth_log_clamps_non_positive_predictions():
    meter = DepthMeter(min_depth=0.01)
    meter.update(torch.tensor([[[[0.0, -1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]))
    assert meter.compute()["log_rmse"] == pytest.approx(abs(math.log(0.01))), meter.compute()


def test_depth_errors_name_the_problem():
    with pytest.raises(ValueError, match="min_depth"):
        DepthMeter(min_depth=0)
    with pytest.raises(ValueError, match=r"pred must have shape \(B, 1, H, W\), got \(2, 3, 4, 4\)"):
        DepthMeter().update(torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        DepthMeter().update(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        DepthMeter().update(torch.full((1, 1, 2, 2), float("nan")), torch.ones(1, 1, 2, 2))


# ----------------------------------------------------------------------------- normals

def normals_oracle(pred, target):
    angles = []
    B, _, H, W = target.shape
    for b in range(B):
        for y in range(H):
            for x in range(W):
                g = target[b, :, y, x].tolist()
                if any(g):
                    p = pred[b, :, y, x].tolist()
                    dot = sum(u * v for u, v in zip(p, g)) / math.sqrt(sum(u * u for u in p) * sum(v * v for v in g))
                    angles.append(math.degrees(math.acos(max(-1.0, min(1.0, dot)))))
    n = len(angles)
    out = {"mean": sum(angles) / n, "median": float(np.median(angles)), "rmse": math.sqrt(sum(a * a for a in angles) / n)}
    for w in (11.25, 22.5, 30.0):
        out[f"within_{w:g}"] = 100.0 * sum(a < w for a in angles) / n
    return out


@settings(deadline=None, max_examples=30)
@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 6), W=st.integers(1, 6))
def test_normals_meter_equals_loop_oracle(seed, B, H, W):
    pred, target = normals_batch(seed, B, H, W)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)     # at least one valid pixel
    meter = NormalsMeter()
    meter.update(pred, target)
    got, want = meter.compute(), normals_oracle(pred, target)
    assert abs(got.pop("median") - want.pop("median")) <= 0.005 + 1e-9, (meter.compute()["median"], want)
    assert_results_close(got, want, tol=1e-7)


def test_normals_perfect_prediction_is_zero_degrees_at_any_length():
    _, target = normals_batch(5, 2, 6, 6)
    meter = NormalsMeter()
    meter.update(target * 4.2, target)
    r = meter.compute()
    assert r["mean"] < 1e-6 and r["rmse"] < 1e-6 and r["median"] <= 0.005 and r["within_11.25"] == 100.0, r


def test_normals_opposite_and_zero_predictions():
    g = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    meter = NormalsMeter()
    meter.update(-g, g)
    assert meter.compute()["mean"] == pytest.approx(180.0), meter.compute()
    meter = NormalsMeter()
    meter.update(torch.zeros(1, 3, 1, 1), g)
    assert meter.compute()["mean"] == pytest.approx(90.0), meter.compute()


def test_normals_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"pred must have shape \(B, 3, H, W\)"):
        NormalsMeter().update(torch.zeros(1, 1, 2, 2), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"target must have shape \(B, 3, H, W\), got \(1, 1, 2, 2\)"):
        NormalsMeter().update(torch.zeros(1, 3, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        NormalsMeter().update(torch.full((1, 3, 2, 2), float("inf")), torch.ones(1, 3, 2, 2))


# ----------------------------------------------------------------------------- saliency

def saliency_oracle(prob, target, beta2=0.3):
    pairs = [(p, t) for p, t in zip(prob.flatten().tolist(), target.flatten().tolist()) if t != 255]
    best = None
    for i in range(1, 20):
        thr = i / 20
        tp = sum(1 for p, t in pairs if p >= thr and t == 1)
        pp = sum(1 for p, t in pairs if p >= thr)
        pos = sum(1 for p, t in pairs if t == 1)
        P = tp / pp if pp else 0.0
        R = tp / pos if pos else 0.0
        F = (1 + beta2) * P * R / (beta2 * P + R) if P + R else 0.0
        if best is None or F > best["maxF"]:
            best = {"maxF": F, "precision": P, "recall": R, "threshold": thr}
    return best


@settings(deadline=None, max_examples=40)
@given(seed=seeds, B=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7))
def test_saliency_meter_equals_loop_oracle(seed, B, H, W):
    prob, target = binary_batch(seed, B, H, W)
    prob = (prob * 20).round() / 20                      # values on the thresholds: ties must agree too
    target[0, 0, 0, 0] = 1
    meter = SaliencyMeter()
    meter.update(prob, target)
    assert_results_close(meter.compute(), saliency_oracle(prob, target))


def test_saliency_perfect_prediction_and_ignore():
    prob, target = binary_batch(2, 2, 8, 8)
    perfect = (target == 1).double()
    meter = SaliencyMeter()
    meter.update(perfect, target)
    assert meter.compute()["maxF"] == 1.0, meter.compute()
    other = SaliencyMeter()
    other.update(torch.where(target == 255, 1 - perfect, perfect), target)
    assert_states_equal(meter, other)


def test_saliency_without_positives_or_predictions_is_zero_not_an_error():
    meter = SaliencyMeter()
    meter.update(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3))
    assert meter.compute()["maxF"] == 0.0, meter.compute()


def test_saliency_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"sigmoid once.*max 3"):
        SaliencyMeter().update(torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"0, 1 or 255.*\[2\]"):
        SaliencyMeter().update(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2))


# ----------------------------------------------------------------------------- edges: thinning

OFFSETS = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]   # x1..x8: E, NE, N, ... SE


def thin_oracle(image):
    """The two-subiteration thinning written pixel by pixel from its conditions G1, G2, G3 / G3'."""
    img = np.array(image, bool)
    H, W = img.shape
    while True:
        deleted_any = False
        for sub in (1, 2):
            doomed = []
            for y in range(H):
                for x in range(W):
                    if not img[y, x]:
                        continue
                    v = [int(0 <= y + dy < H and 0 <= x + dx < W and img[y + dy, x + dx]) for dy, dx in OFFSETS]
                    X = lambda i: v[(i - 1) % 8]                     # X(9) = X(1)
                    xh = sum(1 for i in (1, 2, 3, 4) if X(2 * i - 1) == 0 and (X(2 * i) or X(2 * i + 1)))
                    n1 = sum(1 for k in (1, 2, 3, 4) if X(2 * k - 1) or X(2 * k))
                    n2 = sum(1 for k in (1, 2, 3, 4) if X(2 * k) or X(2 * k + 1))
                    if sub == 1:
                        g3 = not ((X(2) or X(3) or not X(8)) and X(1))
                    else:
                        g3 = not ((X(6) or X(7) or not X(4)) and X(5))
                    if xh == 1 and 2 <= min(n1, n2) <= 3 and g3:
                        doomed.append((y, x))
            for y, x in doomed:
                img[y, x] = False
            deleted_any |= bool(doomed)
        if not deleted_any:
            return img


@settings(deadline=None, max_examples=60)
@given(seed=seeds, H=st.integers(1, 12), W=st.integers(1, 12), fill=st.floats(0.2, 0.95))
@example(seed=0, H=1, W=1, fill=0.9)
def test_thin_equals_pixel_loop_oracle(seed, H, W, fill):
    rng = np.random.default_rng(seed)
    img = ndimage.binary_dilation(rng.random((H, W)) < fill * 0.5) | (rng.random((H, W)) < 0.1)
    got, want = thin(img), thin_oracle(img)
    assert np.array_equal(got, want), f"input\n{img.astype(int)}\ngot\n{got.astype(int)}\nwant\n{want.astype(int)}"


def shapes():
    yy, xx = np.mgrid[0:30, 0:40]
    disc = (yy - 15) ** 2 + (xx - 20) ** 2 <= 12 ** 2
    ring = disc & ((yy - 15) ** 2 + (xx - 20) ** 2 > 5 ** 2)
    rect = np.zeros((30, 40), bool)
    rect[5:25, 3:37] = True
    bar = np.zeros((30, 40), bool)
    bar[12:17, :] = True
    cross = bar | (np.abs(xx - 20) <= 2)
    diag = np.abs(yy - xx * 0.7) <= 2.5
    two = np.zeros((30, 40), bool)
    two[2:10, 2:10] = True
    two[15:28, 20:38] = True
    return {"disc": disc, "ring": ring, "rect": rect, "bar": bar, "cross": cross, "diag": diag, "two": two}


@pytest.mark.parametrize("name", sorted(shapes()))
def test_thin_is_one_pixel_wide_idempotent_and_keeps_connectivity(name):
    img = shapes()[name]
    out = thin(img)
    eight = np.ones((3, 3), int)
    assert out.sum() > 0 and (out <= img).all()
    blocks = out[:-1, :-1] & out[1:, :-1] & out[:-1, 1:] & out[1:, 1:]
    assert not blocks.any(), f"{name}: 2x2 blocks at {np.argwhere(blocks).tolist()}"
    assert np.array_equal(thin(out), out), f"{name}: thinning the result changed it"
    assert ndimage.label(out, eight)[1] == ndimage.label(img, eight)[1], f"{name}: components changed"
    holes = lambda m: ndimage.label(~np.pad(m, 1))[1] - 1          # 4-connected background pieces inside
    assert holes(out) == holes(img), f"{name}: holes {holes(img)} -> {holes(out)}"


def test_thin_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        thin(np.zeros((2, 3, 4)))


# ----------------------------------------------------------------------------- edges: exact counts

def edge_oracle(prob, gt, max_dist, thresholds):
    """Per threshold: binarise, thin (pixel-loop oracle), brute-force maximum matching within the radius."""
    radius = max_dist * math.hypot(*gt.shape)
    G = np.argwhere(gt)
    out = np.zeros((4, len(thresholds)), np.int64)
    for i, t in enumerate(thresholds):
        Pp = np.argwhere(thin_oracle(prob >= t))
        allowed = [[(p[0] - g[0]) ** 2 + (p[1] - g[1]) ** 2 <= radius ** 2 for g in G] for p in Pp]
        matched = 0
        if len(Pp) and len(G):
            cost = -np.array(allowed, float)                         # each allowed pair is worth 1
            r, c = linear_sum_assignment(cost)
            matched = int(-cost[r, c].sum())
        out[:, i] = (matched, len(Pp), matched, len(G))
    return out


@settings(deadline=None, max_examples=40)
@given(seed=seeds, H=st.integers(2, 9), W=st.integers(2, 9), max_dist=st.floats(0.02, 0.35))
@example(seed=1, H=2, W=2, max_dist=0.02)
def test_exact_edge_counts_equal_thinning_plus_brute_force_matching(seed, H, W, max_dist):
    rng = np.random.default_rng(seed)
    prob = ndimage.uniform_filter(rng.random((H, W)), 2) ** 2
    gt = rng.random((H, W)) < 0.3
    thresholds = [0.05, 0.2, 0.35, 0.5, 0.65]
    got = edge_counts(prob, gt.astype(np.uint8), max_dist, thresholds)
    want = edge_oracle(prob, gt, max_dist, thresholds)
    assert np.array_equal(got, want), f"got\n{got}\nwant\n{want}"


def flow_matching(P, G, radius):
    """Maximum matching size through a unit-capacity max flow: source → P → G → sink."""
    if not len(P) or not len(G):
        return 0
    d2 = ((P[:, None, :] - G[None, :, :]) ** 2).sum(-1)
    pi, gi = np.nonzero(d2 <= radius ** 2)
    nP, nG = len(P), len(G)
    sink = nP + nG + 1
    rows = np.r_[np.zeros(nP, int), 1 + pi, 1 + nP + np.arange(nG)]
    cols = np.r_[1 + np.arange(nP), 1 + nP + gi, np.full(nG, sink)]
    graph = csr_matrix((np.ones(rows.size, np.int32), (rows, cols)), shape=(sink + 1, sink + 1))
    return maximum_flow(graph, 0, sink).flow_value


@settings(deadline=None, max_examples=6)
@given(seed=seeds)
def test_exact_edge_counts_over_99_thresholds_equal_max_flow_on_line_drawings(seed):
    # larger images than brute force allows: long augmenting paths and warm starts across thresholds
    rng = np.random.default_rng(seed)
    H, W = 36, 48
    gt = np.zeros((H, W), bool)
    for _ in range(6):
        y, x = rng.integers(0, H), rng.integers(0, W)
        dy, dx = rng.normal(size=2)
        for s in range(40):
            gt[int(np.clip(y + s * dy, 0, H - 1)), int(np.clip(x + s * dx, 0, W - 1))] = True
    shifted = np.roll(gt, rng.integers(-2, 3), axis=int(rng.integers(0, 2)))
    prob = np.clip(ndimage.gaussian_filter(shifted.astype(float), 1.2) * 3 + 0.2 * rng.random((H, W)), 0, 1)
    max_dist = 0.05
    got = edge_counts(prob, gt.astype(np.uint8), max_dist, 99)
    G = np.argwhere(gt)
    for i, t in enumerate(metrics.edge_thresholds(99)):
        skeleton = thin(prob >= t)
        want = flow_matching(np.argwhere(skeleton), G, max_dist * math.hypot(H, W))
        assert (got[0, i], got[1, i]) == (want, skeleton.sum()), f"threshold {t:.2f}: {got[:2, i]} vs {want, skeleton.sum()}"


def line_image(H=20, W=20, col=10):
    img = np.zeros((H, W), np.uint8)
    img[3:17, col] = 1
    return img


@pytest.mark.parametrize("shift, radius, expected", [(0, 1.5, 1.0), (1, 1.5, 1.0), (1, 0.9, 0.0), (3, 2.5, 0.0)])
def test_shifted_edge_scores_one_inside_the_tolerance_and_zero_beyond(shift, radius, expected):
    gt = line_image()
    prob = line_image(col=10 + shift).astype(float)
    meter = EdgeMeter(radius / math.hypot(20, 20))
    meter.update(torch.from_numpy(prob)[None, None], torch.from_numpy(gt)[None, None])
    r = meter.compute()
    assert r["odsF"] == expected and r["oisF"] == expected, r


def test_two_predicted_pixels_near_one_ground_truth_pixel_match_once():
    gt = np.zeros((9, 9), np.uint8)
    gt[4, 4] = 1
    prob = np.zeros((9, 9))
    prob[4, 2] = prob[4, 6] = 1.0                            # both within 2.5 pixels of the GT pixel
    counts = edge_counts(prob, gt, 2.5 / math.hypot(9, 9), [0.5])
    assert counts[:, 0].tolist() == [1, 2, 1, 1], counts
    approx = edge_counts(prob, gt, 2.5 / math.hypot(9, 9), [0.5], exact=False)
    assert approx[:, 0].tolist() == [2, 2, 1, 1], approx      # the approximation has no one-to-one


@settings(deadline=None, max_examples=10)
@given(seed=seeds)
def test_perfect_edge_prediction_scores_one(seed):
    rng = np.random.default_rng(seed)
    gt = thin(ndimage.binary_dilation(rng.random((30, 40)) < 0.02, iterations=3))   # one pixel wide, as given
    for exact in (True, False):
        meter = EdgeMeter(0.011, exact=exact)
        meter.update(torch.from_numpy(gt.astype(float))[None, None], torch.from_numpy(gt.astype(np.uint8))[None, None])
        r = meter.compute()
        suffix = "" if exact else "_approx"
        assert r["odsF" + suffix] == 1.0 and r["oisF" + suffix] == 1.0, r
        assert all(k.endswith("_approx") for k in r) != exact, r


@settings(deadline=None, max_examples=10)
@given(seed=seeds, pad=st.tuples(*[st.integers(0, 4)] * 4))
@example(seed=0, pad=(0, 0, 0, 0))
def test_edge_padding_with_ignore_changes_nothing(seed, pad):
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random((14, 18)), 1.0) ** 0.5
    gt = (rng.random((14, 18)) < 0.15).astype(np.uint8)
    (top, bottom, left, right) = pad
    big_prob = np.pad(prob, ((top, bottom), (left, right)), constant_values=1.0)   # confident edges in the padding
    big_gt = np.pad(gt, ((top, bottom), (left, right)), constant_values=255)
    for exact in (True, False):
        a = edge_counts(prob, gt, 0.1, 19, exact=exact)
        c = edge_counts(big_prob, big_gt, 0.1, 19, exact=exact)
        assert np.array_equal(a, c), f"exact={exact}\n{a}\n{c}"


def test_edge_counts_without_predicted_or_ground_truth_edges():
    line = line_image()
    for exact in (True, False):
        none = edge_counts(np.zeros((20, 20)), line, 0.05, 9, exact=exact)
        assert (none[[0, 1, 2]] == 0).all() and (none[3] == line.sum()).all(), none
        no_gt = edge_counts(line.astype(float), np.zeros((20, 20), np.uint8), 0.05, 9, exact=exact)
        assert (no_gt[[0, 2, 3]] == 0).all() and (no_gt[1] == line.sum()).all(), no_gt
    meter = EdgeMeter(0.05)
    meter.update(torch.zeros(1, 1, 20, 20), torch.zeros(1, 1, 20, 20))
    assert meter.compute()["odsF"] == 0.0 and meter.compute()["oisF"] == 0.0, meter.compute()


def test_edge_oisF_picks_each_image_best_threshold():
    thresholds = [0.3, 0.7]
    gt = line_image()
    first = line_image().astype(float) * 0.5                 # right edges, found only at 0.3
    first[5, 2] = 0.5                                        # plus one false positive at 0.3
    second = line_image().astype(float) * 0.9
    second[:, 2] = 0.5                                       # a false line at 0.3 only
    meter = EdgeMeter(0.05, thresholds)
    for prob in (first, second):
        meter.update(torch.from_numpy(prob)[None, None], torch.from_numpy(gt)[None, None])
    counts, ois, n = (s.numpy() for s in meter.states())
    assert n[0] == 2 and ois.tolist() == [28, 29, 28, 28], ois      # image 1 at 0.3, image 2 at 0.7
    r = meter.compute()
    assert r["oisF"] == pytest.approx(2 * (28 / 29) * 1 / (28 / 29 + 1)), r


def test_edge_worker_processes_give_identical_counts():
    prob, target = binary_batch(7, 3, 24, 30)
    prob = torch.from_numpy(ndimage.gaussian_filter(prob.numpy(), (0, 0, 1, 1)))
    one, two = EdgeMeter(0.05, 33), EdgeMeter(0.05, 33, processes=2)
    one.update(prob, target)
    two.update(prob[:1], target[:1])
    two.update(prob[1:], target[1:])
    try:
        assert_states_equal(one, two)
    finally:
        two.close()


def test_edge_errors_name_the_problem():
    with pytest.raises(ValueError, match="max_dist .* got 0"):
        EdgeMeter(0)
    with pytest.raises(ValueError, match="max_dist .* got 1.5"):
        EdgeMeter(1.5)
    with pytest.raises(ValueError, match="thresholds must be ≥ 1"):
        EdgeMeter(0.01, thresholds=0)
    with pytest.raises(ValueError, match="increasing sequence"):
        EdgeMeter(0.01, thresholds=[0.5, 0.2])
    with pytest.raises(ValueError, match="processes"):
        EdgeMeter(0.01, processes=0)
    meter = EdgeMeter(0.01)
    with pytest.raises(ValueError, match=r"sigmoid once.*min -2"):
        meter.update(torch.full((1, 1, 4, 4), -2.0), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"0, 1 or 255.*\[3\]"):
        meter.update(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 3))
    meter.update(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255))      # all ignored: no image counted
    with pytest.raises(ValueError, match="before any image"):
        meter.compute()
    with pytest.raises(ValueError, match=r"same \(H, W\) shape, got \(4, 4\) and \(4, 5\)"):
        edge_counts(np.zeros((4, 4)), np.zeros((4, 5)), 0.1)
    with pytest.raises(ValueError, match=r"0, 1 or 255, got \[2\]"):
        edge_counts(np.zeros((4, 4)), np.full((4, 4), 2), 0.1)


# ----------------------------------------------------------------------------- Δm

def test_delta_m_hand_computed():
    mt = {"semseg": {"mIoU": 0.50}, "depth": {"rmse": 0.50}}
    st_ = {"semseg": {"mIoU": 0.40}, "depth": {"rmse": 0.60}}
    # semseg: +(0.5 - 0.4) / 0.4 = +25 %; depth (lower is better): -(0.5 - 0.6) / 0.6 = +16.67 %
    assert delta_m(mt, st_) == pytest.approx((25.0 + 100 / 6) / 2)
    worse = {"semseg": {"mIoU": 0.30}, "depth": {"rmse": 0.66}}
    assert delta_m(worse, st_) == pytest.approx((-25.0 - 10.0) / 2)
    assert delta_m(st_, st_) == 0.0
    assert delta_m({"depth": {"log_rmse": 0.2}}, {"depth": {"log_rmse": 0.25}},
                   directions={"depth": ("log_rmse", -1)}) == pytest.approx(20.0)


def test_delta_m_covers_the_six_tasks():
    assert HEADLINE == {"semseg": ("mIoU", 1), "parts": ("mIoU", 1), "depth": ("rmse", -1),
                        "normals": ("mean", -1), "sal": ("maxF", 1), "edge": ("odsF", 1)}
    results = {t: {k: 1.1} for t, (k, _) in HEADLINE.items()}
    base = {t: {k: 1.0} for t, (k, _) in HEADLINE.items()}
    assert delta_m(results, base) == pytest.approx(10.0 * (4 - 2) / 6)


def test_delta_m_errors_name_what_is_missing():
    base = {"semseg": {"mIoU": 0.4}}
    with pytest.raises(KeyError, match=r"baselines has no task 'depth'; it has \['semseg'\]"):
        delta_m({"depth": {"rmse": 0.5}}, base)
    with pytest.raises(KeyError, match="no headline metric for task 'flow'"):
        delta_m({"flow": {"epe": 1.0}}, {"flow": {"epe": 2.0}})
    with pytest.raises(KeyError, match=r"results\['semseg'\] has no 'mIoU'; it has \['pixel_acc'\]"):
        delta_m({"semseg": {"pixel_acc": 0.5}}, base)
    with pytest.raises(KeyError, match="EdgeMeter\\(exact=True\\)"):
        delta_m({"edge": {"odsF_approx": 0.7}}, {"edge": {"odsF": 0.7}})
    with pytest.raises(ValueError, match="non-zero baseline"):
        delta_m({"semseg": {"mIoU": 0.4}}, {"semseg": {"mIoU": 0.0}})
    with pytest.raises(ValueError, match=r"\(metric_key, \+1 or -1\)"):
        delta_m(base, base, directions={"semseg": ("mIoU", 2)})
    with pytest.raises(ValueError, match="results is empty"):
        delta_m({}, base)
