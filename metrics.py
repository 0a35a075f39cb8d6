"""Evaluation metrics for multi-task dense prediction, and the multi-task gain Δm.

The paper (Zhang et al., arXiv 2410.03778) reports NYUD-v2 and PASCAL-Context results with the
field's per-task metrics and Δm. This file computes all of them in Python, including the edge
F-measure that peer code bases get from MATLAB (SEISM / BSDS). Every metric is a streaming meter:

    meter = SegMeter(num_classes=40)
    for batch in loader:
        meter.update(logits.argmax(1), batch["semseg"])     # tensors on any device
    print(meter.compute())      # {"mIoU": 0.41, "pixel_acc": 0.68, "iou_per_class": [...]}

Counts are pooled over every valid pixel of the split (no per-image averages, except that the edge
oisF picks a threshold per image by definition). A meter's whole state is `meter.states()`, a few
float64/int64 CPU tensors that add up: the meters of two disjoint halves of the data, summed
(`merge_`, or `sync_meters` = all_reduce under torch.distributed), are the meter of all of it.
No meter keeps predictions, so memory stays bounded.

    task     meter                  keys (headline first)                              units
    semseg   SegMeter(40 or 21)     mIoU, pixel_acc, iou_per_class                     fraction
    parts    SegMeter(7)            mIoU, pixel_acc, iou_per_class                     fraction
    depth    DepthMeter()           rmse, log_rmse, abs_rel, sq_rel                    metres / ratio
    normals  NormalsMeter()         mean, median, rmse, within_11.25 / 22.5 / 30       degrees / %
    sal      SaliencyMeter()        maxF, precision, recall, threshold                 fraction
    edge     EdgeMeter(max_dist)    odsF, oisF, precision, recall, ods_threshold       fraction

Formulas (T thresholds):
- IoU_c = TP_c / (TP_c + FP_c + FN_c) from the confusion matrix; mIoU = mean over classes present.
- Depth, valid where target > 0: RMSE = sqrt(mean (p - g)^2), log RMSE = sqrt(mean (ln p - ln g)^2),
  abs rel = mean |p - g| / g, sq rel = mean (p - g)^2 / g.
- Normals, valid where the target is non-zero: θ = 2 atan2(|p̂ - ĝ|, |p̂ + ĝ|) between unit vectors
  (accurate near 0° and 180°, where arccos of a dot product loses digits).
- Saliency: F_β = (1 + β²) P R / (β² P + R), β² = 0.3, at thresholds 0.05, 0.10, ..., 0.95.
- Edges (SEISM/BSDS protocol): per threshold t, binarise prob ≥ t, thin the prediction to one pixel,
  match predicted to ground-truth edge pixels one to one within max_dist · (image diagonal), pool the
  counts; P = matched / predicted, R = matched / ground truth, F = 2PR / (P + R); odsF = max_t F(t)
  (one threshold for the dataset); oisF = F of the counts pooled at each image's own best threshold.
- Δm = (1/T) Σ_t s_t (M_mt,t - M_st,t) / M_st,t × 100 over the tasks' headline metrics (HEADLINE),
  s_t = +1 if higher is better. Higher Δm is better.

How exact edges are computed, fast enough for 654 NYUD images × 99 thresholds:
1. Thinning: the two-subiteration parallel algorithm that MATLAB's bwmorph(..., 'thin', Inf) cites
   (Lam, Lee & Suen, "Thinning methodologies - a comprehensive survey", IEEE TPAMI 14(9), 1992,
   p. 879), run to convergence. All thresholds are thinned at once: bit b of an unsigned int per
   pixel is the binary map of threshold b and the deletion rule is bitwise logic, so one numpy pass
   serves 8 to 64 thresholds. Only pixels next to a deletion of the previous two passes are examined
   again, so the work follows the moving boundary, not the image area.
2. Matching: predicted (rows) and ground-truth pixels (columns) within the radius form a bipartite
   graph, built once per image over every pixel that is an edge at some threshold (pixels with no
   ground truth in range are counted, never matched). Per threshold, a maximum-cardinality matching
   comes from a greedy start and Hopcroft-Karp style phases (vectorised breadth-first layers, then
   vertex-disjoint shortest augmenting paths), warm-started from the previous threshold. A matching
   with no augmenting path is maximum (Berge), so the count is exact whatever the start. Thresholds
   whose binary map equals the previous one are skipped. scipy's maximum_bipartite_matching gives
   the same counts, but its depth-first search can take exponential time on layered graphs (scipy
   issue #26147): 0.01 to 3.4 s per threshold on our 480×640 test maps. The tests compare ours with
   brute force and with scipy's maximum_flow.
3. EdgeMeter(processes=N) scores images in N worker processes; the counts are identical.
Measured with `python -m research.bench edges` on this project's 2-core machine (otherwise idle): 0.42 s per
480×640 image with 2 processes on network-like synthetic maps, i.e. under 5 minutes for the 654 NYUD
val images (0.81 s per image on one process). The time grows with the area the low thresholds keep:
clean maps took 0.17 s, maps whose background sits at 0.05 to 0.12 took 0.67 to 0.88 s.

Notes:
- A class with TP + FP + FN = 0 over the whole split (in neither prediction nor target) gets IoU NaN
  in iou_per_class and is left out of mIoU; a class only predicted, or only in the target, counts 0.
- The edge counts follow the benchmark's structure, not its code: BSDS' correspondPixels solves a
  min-cost assignment with outlier costs, we solve maximum cardinality, which agrees with it almost
  exactly. The ground truth is used as given (the benchmark thins only predictions).
  The BSDS scripts also interpolate P and R between neighbouring thresholds when searching the best
  F; we report the plain maximum. Our neighbour orientation for the thinning (x3 = the pixel above)
  is not verified against MATLAB; a mirrored convention can move a skeleton by a pixel in places.
- Label 255 (padding) is removed from prediction and ground truth; the edge radius uses the diagonal
  of the bounding box of non-ignored pixels, i.e. of the image before padding.
- Probabilities must be in [0, 1]: apply the sigmoid once (a known peer bug applies it twice).
- The approximate edge mode (exact=False) is for monitoring only: no thinning and no one-to-one
  matching (a predicted pixel counts if any ground-truth pixel is within the radius, and vice versa).
  It overstates odsF (0.99 against an exact 0.87 on the benchmark maps); its keys end in "_approx".
"""
import collections
import math
import multiprocessing

import numpy as np
import torch
from scipy import ndimage


# ----------------------------------------------------------------------------- shared plumbing

def _cpu(x, name, dtype):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach().to("cpu", dtype)


def _check_4d(pred, target, channels, who):
    """pred and target (B, channels, H, W) with the same B, H, W."""
    for name, x in (("pred", pred), ("target", target)):
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{who}.update: {name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if target.shape[0] != pred.shape[0] or target.shape[2:] != pred.shape[2:]:
        raise ValueError(f"{who}.update: target shape {tuple(target.shape)} does not match pred shape "
                         f"{tuple(pred.shape)} (batch and spatial sizes must agree)")


def _check_prob(prob, who):
    if prob.numel() == 0:
        return
    lo, hi = float(prob.min()), float(prob.max())
    if not (0.0 <= lo and hi <= 1.0):           # also catches NaN
        raise ValueError(f"{who}.update: prob must be probabilities in [0, 1] (apply the sigmoid once), "
                         f"got min {lo:.4g}, max {hi:.4g}")


def _check_binary_target(target, who):
    bad = ~((target == 0) | (target == 1) | (target == 255))
    if bad.any():
        raise ValueError(f"{who}.update: target values must be 0, 1 or 255 (ignore), got "
                         f"{sorted(set(target[bad].flatten().tolist()))[:5]}")


def _safe_div(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


class _Meter:
    """The state is a list of CPU tensors that add up over disjoint data (see the module docstring)."""

    def _layout(self):                          # [(shape, dtype), ...], one per state tensor
        raise NotImplementedError

    def reset(self):
        self._state = [torch.zeros(shape, dtype=dtype) for shape, dtype in self._layout()]

    def states(self):
        """The tensors that are the whole state; summing them across meters merges the data."""
        return self._state

    def _config(self):                          # what must agree for two states to add up
        return ()

    def merge_(self, other):
        """Add another meter's counts to this one (in place); returns self."""
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"{type(self).__name__}.merge_ needs a meter of the same type and configuration "
                             f"{self._config()}, got {type(other).__name__} {getattr(other, '_config', tuple)()}")
        for a, b in zip(self.states(), other.states()):
            a += b
        return self

    def _require_data(self, n):
        if n == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any valid pixel was seen")


def sync_meters(meters):
    """Sum every meter's state over all processes in place (no-op unless torch.distributed is set up).

    States live on the CPU, which gloo reduces directly. NCCL reduces only GPU tensors, so with the
    nccl backend each state is copied to the current GPU, reduced, and copied back.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return meters
    on_gpu = dist.get_backend() == "nccl"
    for meter in meters:
        for t in meter.states():
            if on_gpu:
                g = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(g)
                t.copy_(g.cpu())
            else:
                dist.all_reduce(t)
    return meters


# ----------------------------------------------------------------------------- segmentation

class SegMeter(_Meter):
    """Confusion matrix → IoU per class, mIoU and pixel accuracy (semseg and human parts).

    update(pred_labels (B, H, W) int, target (B, H, W) int); target == ignore_index is skipped.
    A class absent from both prediction and target over the whole split has IoU NaN in
    iou_per_class and is excluded from mIoU (the usual choice).
    """

    def __init__(self, num_classes, ignore_index=255):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def _layout(self):
        return [((self.num_classes, self.num_classes), torch.int64)]     # rows target, cols pred

    def _config(self):
        return (self.num_classes, self.ignore_index)

    def update(self, pred, target):
        pred, target = _cpu(pred, "pred", torch.int64), _cpu(target, "target", torch.int64)
        if pred.dim() != 3 or pred.shape != target.shape:
            raise ValueError(f"SegMeter.update: pred and target must both be (B, H, W) labels, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)} (pass logits.argmax(1), not logits)")
        C = self.num_classes
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid]                                   # (N,) each
        for name, x in (("target", t), ("pred", p)):
            if x.numel() and (x.min() < 0 or x.max() >= C):
                extra = f" or {self.ignore_index} (ignore)" if name == "target" else ""
                raise ValueError(f"SegMeter.update: {name} labels must be in [0, {C - 1}]{extra}, "
                                 f"got range [{int(x.min())}, {int(x.max())}] among the other values")
        self._state[0] += torch.bincount(t * C + p, minlength=C * C).view(C, C)

    def compute(self):
        cm = self._state[0].double()
        self._require_data(int(cm.sum()))
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return {"mIoU": float(iou.nanmean()), "pixel_acc": float(tp.sum() / cm.sum()),
                "iou_per_class": iou.tolist()}


# ----------------------------------------------------------------------------- depth

class DepthMeter(_Meter):
    """Depth errors in metres, pooled over pixels with target > 0.

    update(pred (B, 1, H, W), target (B, 1, H, W)). Predictions are clamped to min_depth before the
    natural log of log_rmse (a zero or negative prediction has no log); the other errors use them as is.
    """

    def __init__(self, min_depth=1e-3):
        if not min_depth > 0:
            raise ValueError(f"min_depth must be > 0 (it clamps predictions before the log), got {min_depth!r}")
        self.min_depth = float(min_depth)
        self.reset()

    def _layout(self):
        return [((1,), torch.int64), ((4,), torch.float64)]     # count; Σ err², Σ log err², Σ abs rel, Σ sq rel

    def _config(self):
        return (self.min_depth,)

    def update(self, pred, target):
        pred, target = _cpu(pred, "pred", torch.float64), _cpu(target, "target", torch.float64)
        _check_4d(pred, target, 1, "DepthMeter")
        valid = (target > 0) & torch.isfinite(target)
        p, g = pred[valid], target[valid]                                   # (N,) each
        if not torch.isfinite(p).all():
            raise ValueError("DepthMeter.update: pred has NaN or inf at valid pixels")
        err = p - g
        log_err = torch.log(p.clamp(min=self.min_depth)) - torch.log(g)
        self._state[0] += p.numel()
        self._state[1] += torch.stack([(err ** 2).sum(), (log_err ** 2).sum(),
                                       (err.abs() / g).sum(), (err ** 2 / g).sum()])

    def compute(self):
        n = int(self._state[0])
        self._require_data(n)
        sq, log_sq, abs_rel, sq_rel = (self._state[1] / n).tolist()
        return {"rmse": math.sqrt(sq), "log_rmse": math.sqrt(log_sq), "abs_rel": abs_rel, "sq_rel": sq_rel}


# ----------------------------------------------------------------------------- surface normals

class NormalsMeter(_Meter):
    """Angular error of surface normals in degrees, pooled over pixels whose target is non-zero.

    update(pred (B, 3, H, W) of any length, target (B, 3, H, W)). Both are normalised; a zero
    prediction is 90° from everything. The median comes from a histogram of NUM_BINS bins over
    [0°, 180°] (bin width 0.01°): it is exact to within half a bin (0.005°); the other keys are exact.
    """
    NUM_BINS = 18000
    WITHIN = (11.25, 22.5, 30.0)

    def __init__(self):
        self.reset()

    def _layout(self):
        return [((1,), torch.int64), ((2,), torch.float64), ((3,), torch.int64), ((self.NUM_BINS,), torch.int64)]

    def update(self, pred, target):
        pred, target = _cpu(pred, "pred", torch.float64), _cpu(target, "target", torch.float64)
        _check_4d(pred, target, 3, "NormalsMeter")
        p = pred.permute(0, 2, 3, 1).reshape(-1, 3)                          # (B·H·W, 3)
        g = target.permute(0, 2, 3, 1).reshape(-1, 3)
        valid = g.abs().sum(1) > 0
        p, g = p[valid], g[valid]                                           # (N, 3)
        if not torch.isfinite(p).all():
            raise ValueError("NormalsMeter.update: pred has NaN or inf at valid pixels")
        p = p / p.norm(dim=1, keepdim=True).clamp(min=1e-12)
        g = g / g.norm(dim=1, keepdim=True)
        theta = torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))    # (N,) in [0, 180]
        bins = (theta * (self.NUM_BINS / 180.0)).long().clamp(max=self.NUM_BINS - 1)
        self._state[0] += theta.numel()
        self._state[1] += torch.stack([theta.sum(), (theta ** 2).sum()])
        self._state[2] += torch.stack([(theta < w).sum() for w in self.WITHIN])
        self._state[3] += torch.bincount(bins, minlength=self.NUM_BINS)

    def compute(self):
        n = int(self._state[0])
        self._require_data(n)
        s, s2 = self._state[1].tolist()
        # bins of the two middle order statistics (the same one when n is odd), as np.median averages
        lo, hi = torch.searchsorted(self._state[3].cumsum(0), torch.tensor([(n + 1) // 2, n // 2 + 1])).tolist()
        out = {"mean": s / n, "median": (lo + hi + 1) / 2 * 180.0 / self.NUM_BINS, "rmse": math.sqrt(s2 / n)}
        for w, c in zip(self.WITHIN, self._state[2].tolist()):
            out[f"within_{w:g}"] = 100.0 * c / n
        return out


# ----------------------------------------------------------------------------- saliency

class SaliencyMeter(_Meter):
    """maxF (β² = 0.3) over thresholds 0.05, 0.10, ..., 0.95, with counts pooled over the split.

    update(prob (B, 1, H, W) in [0, 1], target (B, 1, H, W) in {0, 1, 255}); a pixel is positive
    where prob ≥ t (as the edge benchmark binarises). Returns maxF and the precision, recall and
    threshold where it is reached.
    """
    BETA2 = 0.3

    def __init__(self):
        self.thresholds = np.arange(1, 20) / 20             # k / 20 exactly rounded: ties are well defined
        self.reset()

    def _layout(self):
        return [((2, len(self.thresholds)), torch.int64), ((2,), torch.int64)]   # [TP, predicted]; positives, pixels

    def update(self, prob, target):
        prob, target = _cpu(prob, "prob", torch.float64), _cpu(target, "target", torch.int64)
        _check_4d(prob, target, 1, "SaliencyMeter")
        _check_prob(prob, "SaliencyMeter")
        _check_binary_target(target, "SaliencyMeter")
        valid = target != 255
        p, g = prob[valid].numpy(), target[valid].numpy() == 1              # (N,) each
        T = len(self.thresholds)
        level = np.searchsorted(self.thresholds, p, side="right")           # number of thresholds ≤ p
        at_least = lambda h: np.cumsum(h[::-1])[::-1][1:]                   # (T,): #{level > t}
        self._state[0] += torch.from_numpy(np.stack([at_least(np.bincount(level[g], minlength=T + 1)),
                                                     at_least(np.bincount(level, minlength=T + 1))]))
        self._state[1] += torch.tensor([int(g.sum()), g.size])

    def compute(self):
        tp, pred = self._state[0].numpy()
        pos, pixels = self._state[1].tolist()
        self._require_data(pixels)
        P, R = _safe_div(tp, pred), _safe_div(tp, pos)
        F = _safe_div((1 + self.BETA2) * P * R, self.BETA2 * P + R)
        i = int(np.argmax(F))
        return {"maxF": float(F[i]), "precision": float(P[i]), "recall": float(R[i]),
                "threshold": float(self.thresholds[i])}


# ----------------------------------------------------------------------------- edges: thinning

# x1..x8 of the thinning rule, counter-clockwise from east; rows grow downwards, so "north" is row - 1.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _deletable(c, x, first):
    """Bits of c that the thinning deletes in this subiteration; x = [x1..x8], one bit per threshold.

    Conditions (Lam, Lee & Suen 1992, p. 879), all bitwise:
      G1: exactly one b_i = 1, b_i = ¬x_{2i-1} ∧ (x_2i ∨ x_{2i+1})  (one 8-connected run of neighbours)
      G2: 2 ≤ min(n1, n2) ≤ 3, n1 = Σ_k x_{2k-1} ∨ x_2k, n2 = Σ_k x_2k ∨ x_{2k+1}  (x9 = x1)
      G3: (x2 ∨ x3 ∨ ¬x8) ∧ x1 = 0 in the first subiteration, (x6 ∨ x7 ∨ ¬x4) ∧ x5 = 0 in the second.
    """
    x1, x2, x3, x4, x5, x6, x7, x8 = x
    b1, b2, b3, b4 = ~x1 & (x2 | x3), ~x3 & (x4 | x5), ~x5 & (x6 | x7), ~x7 & (x8 | x1)
    at_least_two = lambda a, b, c_, d: (a & b) | (c_ & d) | ((a | b) & (c_ | d))
    g1 = (b1 ^ b2 ^ b3 ^ b4) & ~at_least_two(b1, b2, b3, b4)          # exactly one (odd and < 2)
    a = (x1 | x2, x3 | x4, x5 | x6, x7 | x8)                             # terms of n1
    e = (x2 | x3, x4 | x5, x6 | x7, x8 | x1)                             # terms of n2
    g2 = at_least_two(*a) & at_least_two(*e) & ~(a[0] & a[1] & a[2] & a[3] & e[0] & e[1] & e[2] & e[3])
    g3 = ~((x2 | x3 | ~x8) & x1) if first else ~((x6 | x7 | ~x4) & x5)
    return c & g1 & g2 & g3


def _thin_word(P, width):
    """Thin every bit plane of P in place: flat (H+2)·(W+2) unsigned ints, zero border, until stable."""
    Wp = width + 2
    # neighbour o of pixel i is P[i + o] = P[Wp + 1 + o:][i - Wp - 1]: shifted views, no index arithmetic
    views = [P[Wp + 1 + dy * Wp + dx:] for dy, dx in _NEIGHBOURS]
    near_now, near_prev = np.zeros(P.size, bool), np.zeros(P.size, bool)
    flags = [near_now[Wp + 1 + dy * Wp + dx:] for dy, dx in _NEIGHBOURS], \
            [near_prev[Wp + 1 + dy * Wp + dx:] for dy, dx in _NEIGHBOURS]
    nz = np.flatnonzero(P)
    inner = P[nz + 1] & P[nz - 1] & P[nz + Wp] & P[nz - Wp]
    cand = nz[(P[nz] & ~inner) != 0]                 # pixels with a 4-neighbour off: only they can go
    near_prev[cand] = True                           # not yet examined by the second subiteration
    first, which = True, 0
    while cand.size:
        c, i = P.take(cand), cand - (Wp + 1)
        dele = _deletable(c, [v.take(i) for v in views], first)
        hit = dele != 0
        gone = cand[hit]
        P[gone] = c[hit] & ~dele[hit]                # parallel: all decisions used the old state
        # a pixel's verdict can only change if a neighbour changed since this subiteration type last ran
        j = gone - (Wp + 1)
        for f in flags[which]:
            f[j] = True
        cand = np.flatnonzero(near_now | near_prev)
        near_prev, near_now, which = near_now, near_prev, 1 - which
        near_now[cand] = False
        cand = cand[P.take(cand) != 0]
        first = not first
    return P


def _bit_planes(levels, T):
    """levels (H, W) = number of thresholds ≤ prob → [(first threshold, padded flat words)], bit b = t0 + b.

    The lowest thresholds have the largest foreground and keep the thinning busy longest, so they get
    the narrowest words (8, 8, 16, 32, then 64 thresholds per word): cheaper bitwise logic per pixel.
    """
    H, W = levels.shape
    out, t0 = [], 0
    for size in [8, 8, 16, 32] + [64] * (T // 64 + 1):
        n = np.clip(levels - t0, 0, min(size, T - t0)).astype(np.uint64)
        low_bits = (np.uint64(1) << np.minimum(n, np.uint64(63))) - np.uint64(1)    # 1 << 64 would overflow
        word = np.zeros((H + 2, W + 2), f"u{size // 8}")
        word[1:-1, 1:-1] = np.where(n == 64, ~np.uint64(0), low_bits)
        out.append((t0, word.reshape(-1)))
        t0 += size
        if t0 >= T:
            return out


def thin(mask):
    """Thin a binary (H, W) image to one-pixel-wide lines (the algorithm of the module docstring)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"thin expects a 2-D binary image, got shape {mask.shape}")
    ((_, word),) = _bit_planes(mask.astype(np.int64), 1)
    return _thin_word(word, mask.shape[1]).reshape(mask.shape[0] + 2, -1)[1:-1, 1:-1] != 0


# ----------------------------------------------------------------------------- edges: matching

def _gather(indptr, indices, rows):
    """All (row, column) entries of the given CSR rows, grouped by row."""
    start = indptr[rows]
    cnt = indptr[rows + 1] - start
    ends = np.cumsum(cnt)
    pos = np.arange(ends[-1] if cnt.size else 0) + np.repeat(start - (ends - cnt), cnt)
    return np.repeat(rows, cnt), indices[pos]


def _one_per(keys, scratch):
    """Mask keeping exactly one entry per distinct key (whichever write lands last)."""
    i = np.arange(keys.size)
    scratch[keys] = i
    return scratch[keys] == i


class _Matcher:
    """Maximum-cardinality matching of predicted (p, CSR rows) to ground-truth (g) pixels.

    solve(active) matches only the active rows, starting from the matching left by the previous call.
    """

    def __init__(self, indptr, indices, n_gt):
        n = indptr.size - 1
        self.indptr, self.indices = indptr, indices
        self.mate_p, self.mate_g = np.full(n, -1), np.full(n_gt, -1)
        self.own_p, self.own_g = np.zeros(n, np.int64), np.zeros(n_gt, np.int64)     # scratch for _one_per
        self.used_p, self.seen_g, self.head_g = np.zeros(n, bool), np.zeros(n_gt, bool), np.zeros(n_gt, bool)

    def solve(self, active):
        mp, mg = self.mate_p, self.mate_g
        gone = np.flatnonzero(~active & (mp >= 0))
        mg[mp[gone]], mp[gone] = -1, -1
        self._greedy(np.flatnonzero(active & (mp < 0)))
        roots = np.flatnonzero(active & (mp < 0))
        while roots.size and self._phase(roots):     # augmenting never unmatches a pixel: roots only shrink
            roots = roots[mp[roots] < 0]
        return int(np.count_nonzero(mp[active] >= 0))

    def _greedy(self, free):
        """Each free p takes a free g in range that the fewest free p want (the nearest such g); clashes
        retry. Serving the scarcest g first, like the Karp-Sipser degree rule, leaves fewer augmentations."""
        mp, mg = self.mate_p, self.mate_g
        while free.size:
            p, g = _gather(self.indptr, self.indices, free)
            ok = mg[g] < 0
            p, g = p[ok], g[ok]
            if not p.size:
                return
            new = np.r_[True, p[1:] != p[:-1]]                  # first entry of each p's row
            demand = np.bincount(g, minlength=mg.size)[g]       # free p wanting each entry's g
            scarcest = np.minimum.reduceat(demand, np.flatnonzero(new))[np.cumsum(new) - 1]
            pick = np.flatnonzero(demand == scarcest)
            pick = pick[np.r_[True, p[pick][1:] != p[pick][:-1]]]    # rows are sorted by distance
            p, g = p[pick], g[pick]
            win = _one_per(g, self.own_g)
            mp[p[win]], mg[g[win]] = g[win], p[win]
            free = p[~win]

    def _phase(self, roots):
        """One phase: BFS layers from the free rows to the nearest free g, then disjoint paths back."""
        mp, mg, seen = self.mate_p, self.mate_g, self.seen_g
        layers, front, found = [], roots, None
        while front.size:                            # alternate: p -(unmatched)- g -(matched)- mate(g)
            p, g = _gather(self.indptr, self.indices, front)
            keep = ~seen[g]
            p, g = p[keep], g[keep]
            layers.append((p, g))                    # every edge into this layer, for the way back
            g = g[_one_per(g, self.own_g)]
            seen[g] = True
            if (mg[g] < 0).any():
                found = g[mg[g] < 0]
                break
            front = mg[g]
        for _, g in layers:
            seen[g] = False
        if found is None:
            return 0                                 # no augmenting path from any root: maximum
        chosen, heads = [], found                    # backwards: each head g picks an unused parent p
        for p, g in reversed(layers):
            self.head_g[heads] = True
            sel = self.head_g[g]
            cp, cg = self._pair_up(p[sel], g[sel])
            self.head_g[heads] = False
            chosen.append((cp, cg))
            heads = mp[cp]                           # the g each chosen p was reached through
        for cp, _ in chosen:
            self.used_p[cp] = False
        done, on_path = [], self.head_g              # keep paths that reach a root; flip them
        for k, (cp, cg) in enumerate(reversed(chosen)):
            if k:
                ok = on_path[mp[cp]]
                cp, cg = cp[ok], cg[ok]
            on_path[cg] = True
            done.append((cp, cg))
        for _, cg in done:
            on_path[cg] = False
        for cp, cg in done:
            mp[cp], mg[cg] = cg, cp
        if not done[-1][0].size:
            raise RuntimeError("edge matching found a free target but no path to it (internal error)")
        return done[-1][0].size

    def _pair_up(self, p, g):
        """Greedy one-to-one choice among candidate (parent p, head g) edges, a few rounds."""
        out_p, out_g = [], []
        while p.size:
            w = _one_per(g, self.own_g)
            p1, g1 = p[w], g[w]
            w = _one_per(p1, self.own_p)
            p1, g1 = p1[w], g1[w]
            self.used_p[p1], self.head_g[g1] = True, False
            out_p.append(p1)
            out_g.append(g1)
            keep = self.head_g[g] & ~self.used_p[p]
            p, g = p[keep], g[keep]
        return (np.concatenate(out_p), np.concatenate(out_g)) if out_p else (p, g)


# ----------------------------------------------------------------------------- edges: one image

def edge_thresholds(thresholds):
    """99 → 0.01, 0.02, ..., 0.99 (SEISM/BSDS: n evenly spaced in (0, 1)); or a validated sequence."""
    if isinstance(thresholds, (int, np.integer)) and not isinstance(thresholds, bool):
        if thresholds < 1:
            raise ValueError(f"thresholds must be ≥ 1 (or a sequence in (0, 1]), got {thresholds}")
        return np.arange(1, thresholds + 1) / (thresholds + 1)        # k / (n + 1), each exactly rounded
    t = np.asarray(thresholds, np.float64)
    if t.ndim != 1 or t.size == 0 or not (t[0] > 0 and t[-1] <= 1 and np.all(np.diff(t) > 0)):
        raise ValueError(f"thresholds must be an int or an increasing sequence in (0, 1], got {thresholds!r}")
    return t


def edge_counts(prob, target, max_dist, thresholds=99, exact=True):
    """Edge counts for one image: (4, T) int64, rows [matched pred, pred, matched GT, GT] per threshold.

    prob (H, W) in [0, 1]; target (H, W) in {0, 1, 255}. Pixels with target 255 are dropped from both
    maps and the image is cropped to the bounding box of the rest, whose diagonal sets the radius.
    """
    t = edge_thresholds(thresholds)
    T = len(t)
    prob, target = np.asarray(prob, np.float64), np.asarray(target)
    if prob.ndim != 2 or prob.shape != target.shape:
        raise ValueError(f"edge_counts expects prob and target of the same (H, W) shape, got {prob.shape} and {target.shape}")
    if not np.isin(target, (0, 1, 255)).all():
        raise ValueError(f"edge_counts: target values must be 0, 1 or 255, got {np.setdiff1d(target, (0, 1, 255))[:5]}")
    keep = target != 255
    if not keep.any():
        return np.zeros((4, T), np.int64)
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    levels = np.where(keep[box], np.searchsorted(t, prob[box], side="right"), 0)    # (h, w): thresholds ≤ p
    gt = target[box] == 1
    radius = max_dist * math.hypot(*gt.shape)
    return (_exact_counts if exact else _approx_counts)(levels, gt, radius, T)


def _disk(radius):
    R = int(math.floor(radius))
    d = [(dy * dy + dx * dx, dy, dx) for dy in range(-R, R + 1) for dx in range(-R, R + 1)
         if dy * dy + dx * dx <= radius * radius]
    return R, [(dy, dx) for _, dy, dx in sorted(d)]              # nearest offsets first


def _exact_counts(levels, gt, radius, T):
    h, w = levels.shape
    counts = np.zeros((4, T), np.int64)
    counts[3] = int(gt.sum())
    words = [_thin_word(word, w) for _, word in _bit_planes(levels, T)]
    # U: pixels on the thinned map of some threshold, and which thresholds (bits in threshold order)
    on = np.flatnonzero(np.logical_or.reduce([word != 0 for word in words]))
    bits = np.concatenate([np.unpackbits(word[on].astype("<" + word.dtype.str[1:]).view(np.uint8).reshape(
        on.size, word.itemsize), axis=1, bitorder="little") for word in words], axis=1)[:, :T].astype(bool)
    counts[1] = bits.sum(0)                                      # (T,) predicted (thinned) pixels
    gy, gx = np.nonzero(gt)
    if on.size == 0 or gy.size == 0:
        return counts
    uy, ux = np.divmod(on, w + 2)                                # padded → cropped coordinates (+1)
    # bipartite graph: for every offset of the disk, which U pixel sits there relative to each GT pixel
    R, disk = _disk(radius)
    Wq = w + 2 * R
    uid = np.full((h + 2 * R) * Wq, -1)
    uid[(uy - 1 + R) * Wq + ux - 1 + R] = np.arange(on.size)
    gbase = (gy + R) * Wq + gx + R
    pairs = []
    for dy, dx in disk:
        u = uid.take(gbase + dy * Wq + dx)
        hit = u >= 0
        pairs.append((u[hit], np.flatnonzero(hit)))
    deg = np.zeros(on.size, np.int64)
    for u, _ in pairs:
        deg[u] += 1                                              # one entry per U pixel per offset
    row = np.cumsum(deg > 0) - 1                                 # drop pixels with no GT in range: never matched
    active = np.ascontiguousarray(bits[deg > 0].T)               # (T, rows)
    indptr = np.r_[0, np.cumsum(deg[deg > 0])]
    indices, fill = np.empty(indptr[-1], np.int64), indptr[:-1].copy()
    for u, g in pairs:                                           # rows end up sorted by distance
        indices[fill[row[u]]] = g
        fill[row[u]] += 1
    matcher = _Matcher(indptr, indices, gy.size)
    changes = np.bincount(levels.ravel(), minlength=T + 1)      # pixels whose map flips at each threshold
    for i in range(T):
        if i and changes[i] == 0:
            counts[0, i] = counts[0, i - 1]                      # same binary map as threshold i - 1
        else:
            counts[0, i] = matcher.solve(active[i])
    counts[2] = counts[0]                                        # one-to-one: matched pred = matched GT
    return counts


def _approx_counts(levels, gt, radius, T):
    at_least = lambda x: np.cumsum(np.bincount(x, minlength=T + 1)[::-1])[::-1][1:]   # (T,) #{x > t}
    counts = np.zeros((4, T), np.int64)
    counts[1], counts[3] = at_least(levels.ravel()), int(gt.sum())
    if not gt.any():
        return counts
    near = ndimage.distance_transform_edt(~gt) <= radius       # a prediction here has a GT pixel in range
    counts[0] = at_least(levels[near])
    R, disk = _disk(radius)
    padded = np.pad(levels, R)
    gy, gx = np.nonzero(gt)
    best = np.zeros(gy.size, levels.dtype)                       # strongest prediction within range of each GT
    for dy, dx in disk:
        np.maximum(best, padded[gy + R + dy, gx + R + dx], out=best)
    counts[2] = at_least(best)
    return counts


# ----------------------------------------------------------------------------- edges: the meter

class EdgeMeter(_Meter):
    """Edge detection F-measures (odsF, oisF) by the SEISM/BSDS protocol, without MATLAB.

    EdgeMeter(max_dist, thresholds=99, exact=True, processes=1); max_dist is a fraction of the image
    diagonal (0.011 for NYUD, 0.0075 for PASCAL). update(prob (B, 1, H, W) in [0, 1], target
    (B, 1, H, W) in {0, 1, 255}). exact=False is the fast approximate mode: keys end in "_approx".
    processes > 1 scores exact-mode images in worker processes (spawned once, reused) while the caller
    goes on; the counts are identical. Call close() to stop them early.
    """

    def __init__(self, max_dist, thresholds=99, exact=True, processes=1):
        if not (isinstance(max_dist, (int, float)) and 0 < max_dist < 1):
            raise ValueError(f"max_dist is a fraction of the image diagonal in (0, 1), e.g. 0.011 for NYUD, "
                             f"got {max_dist!r}")
        if not (isinstance(processes, int) and processes >= 1):
            raise ValueError(f"processes must be an int ≥ 1, got {processes!r}")
        self.max_dist, self.exact, self.processes = float(max_dist), bool(exact), processes
        self.thresholds = edge_thresholds(thresholds)
        self._pool, self._pending = None, collections.deque()
        self.reset()

    def _layout(self):
        T = len(self.thresholds)
        return [((4, T), torch.int64), ((4,), torch.int64), ((1,), torch.int64)]   # per threshold; OIS; images

    def _config(self):
        return (self.max_dist, tuple(self.thresholds), self.exact)

    def reset(self):
        self._drain()
        super().reset()

    def update(self, prob, target):
        prob, target = _cpu(prob, "prob", torch.float64), _cpu(target, "target", torch.int64)
        _check_4d(prob, target, 1, "EdgeMeter")
        _check_prob(prob, "EdgeMeter")
        _check_binary_target(target, "EdgeMeter")
        args = (self.max_dist, self.thresholds, self.exact)
        for p, g in zip(prob[:, 0].numpy(), target[:, 0].numpy().astype(np.uint8)):
            if (g == 255).all():
                continue                                 # nothing to score: not an image for oisF either
            if self.processes == 1 or not self.exact:            # the approximation is cheap inline
                self._add(edge_counts(p, g, *args))
                continue
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.processes)
            self._pending.append(self._pool.apply_async(edge_counts, (p, g) + args))
            self._drain(keep=4 * self.processes)     # bounded memory: few images in flight

    def _drain(self, keep=0):
        while len(getattr(self, "_pending", ())) > keep:
            self._add(self._pending.popleft().get())

    def _add(self, counts):
        counts = torch.from_numpy(counts)
        self._state[0] += counts
        _, _, F = self._prf(counts)
        self._state[1] += counts[:, int(np.argmax(F))]           # OIS: this image's best (ties: lowest) threshold
        self._state[2] += 1

    def states(self):
        self._drain()
        return self._state

    def close(self):
        """Collect pending results and stop the worker processes."""
        self._drain()
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            try:
                self._pool.terminate()
            except Exception:                        # interpreter shutdown: the pool may be half gone
                pass

    def __getstate__(self):
        self._drain()
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_pending")}

    def __setstate__(self, state):
        self.__dict__.update(state, _pool=None, _pending=collections.deque())

    @staticmethod
    def _prf(c):
        c = np.asarray(c, np.float64)
        P, R = _safe_div(c[0], c[1]), _safe_div(c[2], c[3])
        return P, R, _safe_div(2 * P * R, P + R)

    def compute(self):
        counts, ois, n = (s.numpy() for s in self.states())
        if int(n[0]) == 0:
            raise ValueError("EdgeMeter.compute() called before any image with non-ignored pixels was seen")
        P, R, F = self._prf(counts)
        i = int(np.argmax(F))
        out = {"odsF": float(F[i]), "oisF": float(self._prf(ois)[2]), "precision": float(P[i]),
               "recall": float(R[i]), "ods_threshold": float(self.thresholds[i])}
        return out if self.exact else {k + "_approx": v for k, v in out.items()}


# ----------------------------------------------------------------------------- multi-task gain

HEADLINE = {                     # task → (headline metric key, +1 if higher is better else -1)
    "semseg": ("mIoU", +1),
    "parts": ("mIoU", +1),
    "depth": ("rmse", -1),
    "normals": ("mean", -1),
    "sal": ("maxF", +1),
    "edge": ("odsF", +1),
}


def delta_m(results, baselines, directions=None):
    """Δm in percent: mean over the tasks of `results` of s_t (M_mt,t - M_st,t) / M_st,t × 100.

    results, baselines: {task: metrics dict} (e.g. from the meters' compute()); baselines are the
    single-task models. directions: {task: (metric_key, sign)} overriding or extending HEADLINE.
    """
    table = dict(HEADLINE)
    for task, spec in (directions or {}).items():
        if not (isinstance(spec, tuple) and len(spec) == 2 and spec[1] in (1, -1)):
            raise ValueError(f"directions[{task!r}] must be (metric_key, +1 or -1), got {spec!r}")
        table[task] = spec
    if not results:
        raise ValueError("results is empty: pass {task: metrics dict} for at least one task")
    terms = []
    for task, metrics in results.items():
        if task not in table:
            raise KeyError(f"no headline metric for task {task!r}; known tasks {sorted(table)}; "
                           f"pass directions={{{task!r}: (metric_key, +1 or -1)}}")
        if task not in baselines:
            raise KeyError(f"baselines has no task {task!r}; it has {sorted(baselines)}")
        key, sign = table[task]
        for name, d in (("results", metrics), ("baselines", baselines[task])):
            if key not in d:
                hint = (" (odsF_approx is not a headline metric: evaluate edges with EdgeMeter(exact=True))"
                        if key == "odsF" and "odsF_approx" in d else "")
                raise KeyError(f"{name}[{task!r}] has no {key!r}; it has {sorted(d)}{hint}")
        mt, st = float(metrics[key]), float(baselines[task][key])
        if st == 0 or not math.isfinite(st) or not math.isfinite(mt):
            raise ValueError(f"Δm needs a finite non-zero baseline and a finite result for {task}/{key}, "
                             f"got baseline {st} and result {mt}")
        terms.append(sign * (mt - st) / st)
    return 100.0 * sum(terms) / len(terms)
