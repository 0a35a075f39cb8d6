"""sKEM where the paper motivates it: imbalanced training data. Is KEM hurt more than its ETF variants,
and does the ETF keep the knowledge selection steadier while the network trains?

    python -m research imbalance                 # kem and its three ETF variants x 5 seeds, 1,500 steps each

What the paper claims [paper]: sKEM is motivated by KEM's sensitivity to imbalanced data distributions;
the ETF projection "stabilises the knowledge-selection process". The ablation tests the ETF variants on
the default, roughly balanced SyntheticRooms only.

How it is tested here [ours]:
- An imbalanced training split (`RareClasses`). In every training scene, each object of a rare class
  (ball, cylinder) is kept with probability `keep` (0.1) and otherwise re-drawn as a box standing in
  the same footprint: the circle the scene sampler reserved for it, so the box overlaps nothing, rests
  on the floor inside the room, and every label (classes, depth, normals, edges, saliency, parts) is
  rendered from the changed scene as usual. The draws come from a stream of their own
  (SyntheticRooms' `edit_scene`), so the rest of the scene and the sensor noise are unchanged; the
  val split is the default one, scene for scene. The rare classes' pixel share in training drops by
  about the factor `keep`: on the 2,000 training scenes at 96 x 128, ball 3.83% -> 0.40% and cylinder
  6.53% -> 0.61% of the pixels (x 0.098 together), box 12.7% -> 26.3% (each record holds the shares).
- Rows (`ROWS`): the ablation's kem, kem+etf features, kem+etf slots, kem+etf both, with the same
  train.py flags and seeds as the ablation's runs; only the training split differs. The runs go
  through the hidden command `python -m research _imbalance`: train.py with a dataset hook (train.Hooks)
  that builds the train split with the rule as SyntheticRooms' edit_scene.
- Measures: tail-class IoU (mean IoU over the rare classes, from semseg's iou_per_class) and Δm against
  the ablation's single-task means (trained on the default split: one reference for both splits).
- The selection's stability (`SelectionTracker`): at every evaluation (every 250 steps) the training
  process runs the model on the first `--stability-images` val images (the same images every time) and
  keeps each slot's top-k token index set per image (runs/.../selection_sets/, not committed). The record
  gets, between consecutive evaluations, the Jaccard overlap |S ∩ S'| / |S ∪ S'| of each slot's set,
  averaged over images (per slot) and over slots; 1 = the selection did not move. Chance, for two
  independent random k-sets: p / (2 − p), p = k / N.
- Comparisons, all in the family "imbalance", each paired by seed (stats.paired): per row, imbalanced
  − default split (tail IoU, Δm); per ETF variant, variant − kem on the imbalanced split (tail IoU, Δm,
  stability) and the variant's drop − kem's drop (imbalanced − default; the paper's "sensitivity").

Writes research/results/imbalance.json/.md/.png from the imbalance and ablation records alone (`report`).

Letters: B batch, I fixed val images, N tokens (all tasks), L slots, k selected tokens per slot.

Notes:
- The replacement boxes are as wide as the footprint allows (half sizes R cos φ, R sin φ, φ in
  [π/8, 3π/8]), so they are often smaller than the sampler's own boxes: the box class gains some
  small boxes as well as pixels.
- A slot's set is its k largest retrieve weights (A_r.topk); where weights underflow to exactly 0 the
  order among those ties is torch's, not the scores'. The sets are measured in eval mode, in fp32,
  under no_grad and a forked RNG: training is unchanged (a test compares the losses of a tiny run).
- Stability is only measured on the imbalanced split here; the ablation's default-split runs do not
  record it (`--keep 1` gives the default split with the same measurement).
- A row's tail-class IoU and stability (bounded in [0, 1]) get logit t-intervals (stats.bounded_interval),
  its Δm a plain t-interval; comparisons are paired t-tests, Holm-adjusted within the family.
"""
import argparse
import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

import metrics
import synthetic
import train
import train_support
from kem_mtl import resolve_topk
from research import ablation, runner
from research.stats import COLUMNS, RULE, bounded_interval, ci, family, family_note, paired, t_interval
from research.stats import row as table_row

ROWS = ("kem", "kem+etf features", "kem+etf slots", "kem+etf both")    # the ablation's rows, kem first
RARE = ("ball", "cylinder")          # the rare classes by default: the free-standing ones a box can replace
KEEP = 0.1                           # the probability a rare object is kept in a training scene
STABILITY_IMAGES = 32                # fixed val images on which the selection is followed
SETS_DIR = "selection_sets"          # in a run's folder: one (I, L, k) index array per evaluation
FAMILY = "imbalance"                 # the comparisons' family (for a multiplicity correction)


# --- the imbalanced split -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RareClasses:
    """The imbalance rule, an `edit_scene` for SyntheticRooms: each object of a class in `classes` is kept
    with probability `keep`, else replaced by a box standing in its footprint.

    classes: names from synthetic.CLASS_NAMES among the free-standing ones a box can replace (ball,
    cylinder). keep: in [0, 1]; 1 changes nothing. Whether object j is kept depends on the j-th draw
    alone, so the fates of the objects are independent of each other.
    """
    classes: tuple = RARE
    keep: float = KEEP

    def __post_init__(self):
        allowed = ("ball", "cylinder")
        if isinstance(self.classes, str) or not self.classes or any(c not in allowed for c in self.classes):
            raise ValueError(f"classes must be a non-empty tuple of names from {allowed} (a box replaces them), "
                             f"got {self.classes!r}")
        if not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"keep must be a probability in [0, 1], got {self.keep!r}; try 0.1")
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def ids(self):
        return tuple(synthetic.CLASS_NAMES.index(c) for c in self.classes)

    def __call__(self, scene, rng):
        objects = scene["objects"]
        fate = rng.random(len(objects))                                  # one draw per object, in order
        scene["objects"] = [box_in_footprint(o, rng) if o["cls"] in self.ids and fate[j] >= self.keep else o
                            for j, o in enumerate(objects)]
        return scene


def footprint(obj):
    """(centre (x, y), radius) of the floor circle the scene sampler reserved for an object."""
    if obj["type"] == "sphere":
        return obj["c"][:2], obj["r"]
    if obj["type"] == "cyl":
        lying = abs(obj["a"][2]) < 0.5
        centre = obj["b"] + obj["a"] * obj["h"] / 2
        return centre[:2], math.hypot(obj["h"] / 2, obj["r"]) if lying else obj["r"]
    return obj["c"][:2], math.hypot(obj["half"][0], obj["half"][1])


def box_in_footprint(obj, rng):
    """A box on the floor inside obj's footprint circle (its corners on the circle), yaw and height drawn
    as the scene sampler draws a box's; a box texture (synthetic's own material sampler)."""
    (x, y), R = footprint(obj)
    u = rng.random(3)
    phi = math.pi / 8 + math.pi / 4 * u[0]
    half = np.array([R * math.cos(phi), R * math.sin(phi), 0.12 + 0.6 * u[1]])
    return {"type": "box", "cls": synthetic.BOX, "c": np.array([x, y, half[2]]), "half": half,
            "yaw": math.pi * u[2], "mat": synthetic._material(rng, synthetic.BOX)}


@dataclasses.dataclass
class ImbalancedTrain:
    """train.Hooks.dataset: the "train" split's scenes edited by `rule`; "val" is untouched."""
    rule: object

    def __call__(self, split, cfg, build):
        return build(edit_scene=self.rule) if split == "train" else build()


def class_shares(split, num_samples, size, seed, edit_scene=None):
    """Each class's share of the pixels of a SyntheticRooms split (rendered here): a list over CLASS_NAMES."""
    ds = synthetic.SyntheticRooms(split, num_samples, size=size, seed=seed, tasks=["semseg"], edit_scene=edit_scene)
    counts = np.zeros(len(synthetic.CLASS_NAMES))
    for i in range(len(ds)):
        counts += np.bincount(ds.render(i)["semseg"].ravel(), minlength=len(counts))
    return (counts / counts.sum()).tolist()


_SHARES, _SHARES_LOCK = {}, threading.Lock()


def split_summary(cfg, rule):
    """The rule and the measured class shares of the default and the imbalanced training split (cached)."""
    key = (cfg["train_samples"], tuple(cfg["train_size"]), cfg["data_seed"], rule)
    with _SHARES_LOCK:
        if key not in _SHARES:
            _SHARES[key] = {name: class_shares("train", *key[:3], edit_scene=r)
                            for name, r in (("default", None), ("imbalanced", rule))}
    return {"rare_classes": list(rule.classes), "keep": rule.keep, "train_class_share": _SHARES[key]}


# --- the selection's stability, measured inside the training process ----------------------------

@torch.no_grad()
def selected_sets(model, images):
    """(each slot's top-k token indices on `images` (I, 3, H, W): (I, L, k) int64, sorted; N), None without KEM."""
    model = getattr(model, "_orig_mod", model)                         # torch.compile's wrapper
    exchange = model.exchange
    if not hasattr(exchange, "num_slots"):
        return None
    captured = {}
    handle = exchange.register_forward_pre_hook(lambda m, args: captured.update(F=args[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):                        # nothing here draws; this makes sure
            model(images)
            _, att = exchange.forward(captured["F"], return_attention=True)
    finally:
        handle.remove()
        model.train(was_training)
    A_r = att["retrieve"]                                             # (I, L, N)
    k = resolve_topk(exchange.topk, A_r.shape[-1])
    return A_r.topk(k, dim=-1).indices.sort(-1).values, A_r.shape[-1]  # (I, L, k), N


def set_jaccard(a, b, N):
    """|a ∩ b| / |a ∪ b| of index sets a, b (..., k) over N tokens, per leading index: (...)."""
    A = torch.zeros(*a.shape[:-1], N, dtype=torch.bool).scatter_(-1, torch.as_tensor(a, dtype=torch.int64), True)
    B = torch.zeros(*b.shape[:-1], N, dtype=torch.bool).scatter_(-1, torch.as_tensor(b, dtype=torch.int64), True)
    return (A & B).sum(-1) / (A | B).sum(-1).clamp(min=1)


class SelectionTracker:
    """At each evaluation, the slots' top-k sets on the first `num_images` val images, saved as
    <out_dir>/selection_sets/iter_<it>.npy (int16 (I, L, k)); N and k in meta.json beside them."""

    def __init__(self, num_images=STABILITY_IMAGES):
        self.num_images, self.images = num_images, None

    def __call__(self, model, cfg, procs, it, record):
        """train.Hooks.evaluated: measure after every evaluation, in the first process."""
        if procs.master:
            self.measure(model, cfg, it)

    def measure(self, model, cfg, it):
        if self.images is None:                                        # the default val split's first images
            data = train_support.build_data({**cfg, "val_samples": min(self.num_images, cfg["val_samples"])}, "val")
            self.images = torch.stack([data[i]["image"] for i in range(len(data))])   # (I, 3, H, W)
        device = next(model.parameters()).device
        selected = selected_sets(model, self.images.to(device))
        if selected is None:
            return
        sets, N = selected
        folder = Path(cfg["out_dir"]) / SETS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"iter_{it:06d}.npy", sets.cpu().numpy().astype(np.int16 if N < 2**15 else np.int32))
        (folder / "meta.json").write_text(json.dumps({"N": N, "k": sets.shape[-1], "images": sets.shape[0]}))


def stability(run_dir):
    """The record's "stability" from a run's saved sets: per consecutive pair of evaluations and against the
    last one, the Jaccard of each slot's set averaged over images (per slot) and over slots; None without sets."""
    folder = Path(run_dir) / SETS_DIR
    files = sorted(folder.glob("iter_*.npy"))
    if not files:
        return None
    meta = json.loads((folder / "meta.json").read_text())
    iters = [int(f.stem.split("_")[1]) for f in files]
    sets = [np.load(f) for f in files]                                # each (I, L, k)
    N, k = meta["N"], sets[0].shape[-1]

    def overlap(a, b):
        per_slot = set_jaccard(a, b, N).to(torch.float64).mean(0)       # (L,): mean over images
        return {"jaccard": float(per_slot.mean()), "per_slot": [round(float(v), 4) for v in per_slot]}

    p = k / N
    return {"images": sets[0].shape[0], "L": sets[0].shape[1], "k": k, "N": N, "chance": p / (2 - p), "iters": iters,
            "consecutive": [{"from": i0, "to": i1, **overlap(a, b)}
                            for i0, i1, a, b in zip(iters, iters[1:], sets, sets[1:])],
            "to_final": [{"from": i0, **overlap(a, sets[-1])} for i0, a in zip(iters[:-1], sets[:-1])]}


# --- the hidden command: a train.py process on the imbalanced split, the selection followed -------

def imbalance_script(rule, images=STABILITY_IMAGES):
    """The script part of a run: `python -m research _imbalance ... --` before the train.py flags."""
    return ("research", "_imbalance", "--rare", ",".join(rule.classes), "--keep", f"{rule.keep:g}",
            "--stability-images", str(images), "--")


def parse_rule(argv):
    p = argparse.ArgumentParser(prog="python -m research _imbalance")
    p.add_argument("--rare", default=",".join(RARE), help="comma list of the rare classes")
    p.add_argument("--keep", type=float, default=KEEP, help="probability that a rare object is kept")
    p.add_argument("--stability-images", type=int, default=STABILITY_IMAGES)
    args = p.parse_args(argv)
    try:
        return RareClasses(tuple(c.strip() for c in args.rare.split(",") if c.strip()), args.keep), args.stability_images
    except ValueError as error:
        p.error(str(error))


def train_imbalanced(argv):
    """`python -m research _imbalance --rare ball,cylinder --keep 0.1 -- <train.py flags>`: train.py on the
    imbalanced training split, the slots' top-k sets saved at every evaluation. Returns train.py's exit code."""
    own, rest = runner.split_extra(argv)
    rule, images = parse_rule(own)
    return train.cli(rest, train.Hooks(dataset=ImbalancedTrain(rule), evaluated=SelectionTracker(images)))


# --- the experiment: options and plan -------------------------------------------------------------

def main(argv):
    """`python -m research imbalance [options] [-- train.py flags]`."""
    p = runner.parser("imbalance", "KEM and its ETF variants trained on an imbalanced split of SyntheticRooms "
                                   "(rare classes kept with probability --keep): tail-class IoU, Δm and the "
                                   "selection's stability, against the ablation's runs on the default split.")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--rare", nargs="+", default=list(RARE), choices=["ball", "cylinder"], help="the rare classes")
    p.add_argument("--keep", type=float, default=KEEP, help="probability that an object of a rare class is kept")
    p.add_argument("--stability-images", type=int, default=STABILITY_IMAGES,
                   help="fixed val images on which each slot's top-k set is followed over training")
    return runner.run(p, argv, plan, lambda args, command: report(args.results, args.tasks, command))


def plan(args, extra, ctx):
    """One phase: each row for each seed, with the ablation's flags of that row and seed."""
    try:
        rule = RareClasses(tuple(args.rare), args.keep)
    except ValueError as error:
        raise SystemExit(f"--rare / --keep: {error}") from None
    rows = ablation.row_flags(args.tasks)
    return [[runner.Run("imbalance", row, s, runner.train_flags(rows[row], s, args.max_iters, args.eval_interval, extra),
                        prefix=imbalance_script(rule, args.stability_images), after=imbalance_after(rule),
                        group="kem", steps=args.max_iters)
             for s in args.seeds for row in args.rows]]


def imbalance_after(rule):
    """after-hook of a run: the ablation's selection diagnostics (final model, val set), the stability over
    training, and the split (the rule and both training splits' class shares)."""
    def after(run, run_dir, ctx):
        cfg = json.loads((run_dir / "results.json").read_text())["config"]
        return {**ablation.selection_after(run, run_dir, ctx), "stability": stability(run_dir),
                "split": split_summary(cfg, rule)}
    return after


# --- the report: tail-class IoU, Δm and stability, paired by seed --------------------------------

def tail_iou(rec, rare_ids):
    """Mean semseg IoU over the rare classes of a record (None if semseg or a class's IoU is missing)."""
    ious = rec["metrics"].get("semseg", {}).get("iou_per_class")
    values = [ious[c] for c in rare_ids] if ious else [None]
    return None if any(v is None for v in values) else float(np.mean(values))


def per_seed_measures(imb, default, baselines, rare_ids):
    """{(row, split): {measure: {seed: value}}} for split "imbalanced" and "default" (the ablation's record
    of the same row and seed, used only when its train.py flags are the same), and the unpaired (row, seed)s."""
    out, unpaired = {}, []
    for (row, seed), rec in sorted(imb.items()):
        pair = default.get((row, seed))
        if pair is not None and (pair["flags"] != rec["flags"] or pair.get("script") != ["train.py"]):
            unpaired.append({"row": row, "seed": seed, "why": "the ablation's record has other flags"})
            pair = None
        for split, r in (("imbalanced", rec), ("default", pair)):
            if r is None:
                continue
            m = out.setdefault((row, split), {"tail_iou": {}, "delta_m": {}, "stability": {}})
            m["tail_iou"][seed] = tail_iou(r, rare_ids)
            for c in rare_ids:                                        # each rare class's IoU, for the table
                m.setdefault(f"iou {synthetic.CLASS_NAMES[c]}", {})[seed] = tail_iou(r, [c])
            if all(t in baselines for t in r["metrics"]):
                m["delta_m"][seed] = metrics.delta_m(r["metrics"], baselines)
            if r.get("stability") and r["stability"]["consecutive"]:
                m["stability"][seed] = float(np.mean([c["jaccard"] for c in r["stability"]["consecutive"]]))
    for m in out.values():
        for name in m:
            m[name] = {s: v for s, v in m[name].items() if v is not None}
    return out, unpaired


MEASURES = {"tail_iou": "tail-class IoU", "delta_m": "Δm %", "stability": "selection stability (Jaccard)"}


def comparisons(by):
    """The family "imbalance": per row imbalanced − default; per ETF variant, variant − kem on the imbalanced
    split, and the variant's drop − kem's drop (imbalanced − default)."""
    def get(row, split, measure):
        return by.get((row, split), {}).get(measure, {})

    def drop(row, measure):
        a, b = get(row, "imbalanced", measure), get(row, "default", measure)
        return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}

    out = []
    rows = [r for r in ROWS if (r, "imbalanced") in by]
    for row in rows:
        for m in ("tail_iou", "delta_m"):
            out.append({"a": f"{row} (imbalanced)", "b": f"{row} (default)", "measure": m,
                        "tests": "what the imbalanced split costs",
                        **paired(get(row, "imbalanced", m), get(row, "default", m))})
    for row in rows[1:] if rows and rows[0] == "kem" else []:
        for m in ("tail_iou", "delta_m", "stability"):
            out.append({"a": f"{row} (imbalanced)", "b": "kem (imbalanced)", "measure": m,
                        "tests": "ETF variant vs KEM on the imbalanced split (the ETF stabilises the selection "
                                 "[paper])" if m == "stability" else
                                 "ETF variant vs KEM on the imbalanced split (sKEM is for imbalanced data [paper])",
                        **paired(get(row, "imbalanced", m), get("kem", "imbalanced", m))})
        for m in ("tail_iou", "delta_m"):
            out.append({"a": f"{row}'s drop", "b": "kem's drop", "measure": m,
                        "tests": "what the imbalance costs, ETF variant vs KEM (KEM is sensitive to imbalance [paper])",
                        **paired(drop(row, m), drop("kem", m))})
    return family(FAMILY, [c for c in out if c["n"]])                 # pairs with no seeds are left out


def report(results, tasks, command="python -m research imbalance"):
    """research/results/imbalance.json/.md/.png from the imbalance records and the ablation's records alone."""
    results = Path(results)
    imb = runner.load_records(results, "imbalance")
    if not imb:
        raise SystemExit(f"no imbalance records under {results / 'runs' / 'imbalance'}; run `{command}` first")
    default = runner.load_records(results, "ablation")
    split = next(r["split"] for r in imb.values())
    rare_ids = [synthetic.CLASS_NAMES.index(c) for c in split["rare_classes"]]
    baselines = ablation.baseline_metrics(default, tasks)
    by, unpaired = per_seed_measures(imb, default, baselines, rare_ids)
    comps = comparisons(by)

    share = split["train_class_share"]
    split_lines = ["| class | default train share % | imbalanced train share % | ratio |", "|---|---:|---:|---:|"]
    for c, name in enumerate(synthetic.CLASS_NAMES):
        a, b = share["default"][c], share["imbalanced"][c]
        split_lines.append(f"| {name}{' (rare)' if c in rare_ids else ''} | {100 * a:.2f} | {100 * b:.2f} | "
                           f"{b / a if a else float('nan'):.3f} |")
    rows, row_lines = [], ["| row | seeds | tail-class IoU, imbalanced | default | Δm %, imbalanced | default | "
                           "selection stability (Jaccard), per seed | mean [95% CI] | IoU per rare class, imbalanced "
                           "(default), mean over seeds |", "|---|---:|---|---|---|---|---|---|---|"]
    for row in [r for r in ROWS if (r, "imbalanced") in by]:
        m, d = by[row, "imbalanced"], by.get((row, "default"), {})
        interval = {"delta_m": t_interval}            # IoU and Jaccard lie in [0, 1]: logit intervals
        stat = {(name, sp): interval.get(name, bounded_interval)(list(src.get(name, {}).values())) for name in MEASURES
                for sp, src in (("imbalanced", m), ("default", d))}
        stab = m["stability"]
        rows.append({"row": row, "seeds": sorted(m["tail_iou"]),
                     "per_seed": {sp: src for sp, src in (("imbalanced", m), ("default", d))},
                     **{f"{name} {sp}": stat[name, sp] for name, sp in stat}})
        row_lines.append(f"| {row} | {len(m['tail_iou'])} | {ci(stat['tail_iou', 'imbalanced'], 3, '')} | "
                         f"{ci(stat['tail_iou', 'default'], 3, '')} | {ci(stat['delta_m', 'imbalanced'])} | "
                         f"{ci(stat['delta_m', 'default'])} | " + ", ".join(f"{stab[s]:.3f}" for s in sorted(stab))
                         + f" | {ci(stat['stability', 'imbalanced'], 3, '')} | " + ", ".join(
                             f"{name} {_mean(m.get(f'iou {name}'))} ({_mean(d.get(f'iou {name}'))})"
                             for name in split["rare_classes"]) + " |")
    comp_lines = [COLUMNS, RULE] + [table_row(c, f"{c['tests']}: {c['a']} − {c['b']} ({MEASURES[c['measure']]})",
                                        2 if c["measure"] == "delta_m" else 3) for c in comps]
    comp_lines += ["", family_note(FAMILY, comps)]
    curve, curve_lines = stability_curve(imb)
    meta = {"command": command, "tasks": tasks, "family": FAMILY, "split": split, "unpaired": unpaired,
            "seeds": sorted({s for _, s in imb})}
    (results / "imbalance.json").write_text(json.dumps({**meta, "rows": rows, "comparisons": comps,
                                                        "stability_curve": curve}, indent=1))
    text = (f"sKEM on imbalanced data: the ablation's kem and ETF rows trained on a SyntheticRooms training split in "
            f"which {' and '.join(split['rare_classes'])} objects are kept with probability {split['keep']:g} and "
            f"otherwise replaced by a box in the same footprint (val unchanged). Tail-class IoU: mean semseg IoU over "
            f"those classes; Δm against the ablation's single-task means; 'default': the ablation's run of the same "
            f"row and seed. Selection stability: Jaccard overlap of each slot's top-k set on the same "
            f"{next(iter(curve.values()))['images'] if curve else '—'} val images between consecutive evaluations, "
            f"mean over slots, images and evaluations. Means with 95% t-intervals over seeds; comparisons paired by "
            f"seed, family '{FAMILY}', Holm-adjusted together. Regenerate: `{command}`\n\n"
            "Training split, class shares of the pixels (measured on every training scene):\n\n" + "\n".join(split_lines)
            + "\n\nRows:\n\n" + "\n".join(row_lines) + "\n\nComparisons:\n\n" + "\n".join(comp_lines)
            + "\n\nSelection stability over training (mean over seeds [95% CI]; chance = independent random k-sets):\n\n"
            + "\n".join(curve_lines) + "\n"
            + ("".join(f"\nNot paired: {u['row']} seed {u['seed']} ({u['why']})." for u in unpaired) + "\n" if unpaired else ""))
    (results / "imbalance.md").write_text(text)
    if curve:
        plot_stability(curve, results / "imbalance.png")
    print(text)
    return {"rows": rows, "comparisons": comps, "stability_curve": curve, "unpaired": unpaired}


def _mean(by_seed):
    return f"{np.mean(list(by_seed.values())):.3f}" if by_seed else "—"


def transition(stabs, a, b):
    """{seed: the Jaccard of the evaluations a -> b} from each seed's stability record."""
    return {s: c["jaccard"] for s, st in stabs.items() for c in st["consecutive"] if (c["from"], c["to"]) == (a, b)}


def stability_curve(records):
    """Per row: the Jaccard between consecutive evaluations, per transition, over seeds; and its table lines."""
    curve = {}
    for row in ROWS:
        stabs = {s: r["stability"] for (c, s), r in sorted(records.items()) if c == row and r.get("stability")}
        if not stabs:
            continue
        first = next(iter(stabs.values()))
        steps = [(c["from"], c["to"]) for c in first["consecutive"]]
        curve[row] = {"images": first["images"], "k": first["k"], "N": first["N"], "chance": first["chance"],
                      "transitions": [{"from": a, "to": b, "per_seed": transition(stabs, a, b)} for a, b in steps]}
        for t in curve[row]["transitions"]:
            t.update(t_interval(list(t["per_seed"].values())))
    steps = sorted({(t["from"], t["to"]) for c in curve.values() for t in c["transitions"]})
    lines = ["| row | k / N | chance | " + " | ".join(f"{a}→{b}" for a, b in steps) + " |",
             "|---|---:|---:|" + "---|" * len(steps)]
    for row, c in curve.items():
        cells = {(t["from"], t["to"]): ci(t, 3, "") for t in c["transitions"]}
        lines.append(f"| {row} | {c['k']} / {c['N']} | {c['chance']:.3f} | "
                     + " | ".join(cells.get(s, "—") for s in steps) + " |")
    return curve, lines


def plot_stability(curve, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (row, c) in enumerate(curve.items()):
        x = [t["to"] for t in c["transitions"]]
        for t in c["transitions"]:
            ax.plot([t["to"] + 8 * (i - 1.5)] * len(t["per_seed"]), list(t["per_seed"].values()), ".", color=f"C{i}", alpha=0.5)
        ax.plot(x, [t["mean"] for t in c["transitions"]], "o-", color=f"C{i}", label=row)
    ax.axhline(next(iter(curve.values()))["chance"], ls=":", color="grey", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step (overlap with the evaluation before)", fontsize=8)
    ax.set_ylabel("Jaccard of each slot's top-k set", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("selection stability on the imbalanced split (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
