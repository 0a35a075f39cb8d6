"""The ablation: does KEM help multi-task learning, does sKEM help further, does the ETF stabilise the selection?

    python -m research ablation                 # 6 single-task baselines + 11 multi-task rows x 5 seeds
    python -m research ablation --rows none kem  # some rows only (the baselines always run)

What the paper claims [paper]: KEM beats cross-attention and no exchange (Δm against single-task
baselines), sKEM (the ETF variant) helps further, and the ETF stabilises which tokens the slots select.

How it is tested here [ours], on SyntheticRooms at the default run's 1,500 steps:
- Single-task baselines: the same network for one task with no exchange. A row's Δm
  interval is over seeds, each seed's Δm against the single-task runs of *its own* seed, so the
  interval carries the baselines' seed noise too (`delta_m_own_seed`). Comparisons between rows take
  Δm against the mean over seeds of the baselines, a common scale on which the baselines cancel
  except as each task's weight (`delta_m_by_seed`).
- Multi-task rows (`MULTI_TASK_ROWS`): none / cross / kem / kem post (SGW's top-k after softmax) /
  the k sweep k = N/64, N/16, N (k = N is "slots without selection", the control that separates the
  top-k from the slots; k = N/4 is the kem row) / sKEM features, slots, both / and "normalise only"
  (tokens L2-normalised, no ETF frame: the control for "features").
- `COMPARISONS`: the pairs of rows whose Δm are compared paired by seed, one family ("ablation Δm",
  Holm-corrected together by stats.family). kem − none is also the primary comparison, on its own
  scale and with more seeds and lengths, in research/primary.py.
- Selection diagnostics: after each KEM run, this process measures on the val set which tokens the
  slots select (`selection_diagnostics`): the mean pairwise Jaccard overlap of the slots' top-k sets,
  and each slot's share of selected tokens per task. `SELECTION_COMPARISONS` pairs rows with the
  same k only (the overlap of random k-sets, and so what a Jaccard means, depends on k / N); one family
  ("selection"). The rows' overlaps and shares lie in [0, 1]: their intervals are logit t-intervals
  (stats.bounded_interval), with the per-seed overlaps beside them.
- The learning curve of one row (--curve-row, kem) and how much each metric still moved over the
  last 500 steps (`levelled_off`): the runs are short, and the `length` experiment trains longer.

Writes research/results/ablation.json/.md (rows), comparisons.json/.md, learning_curve.png and
selection.json/.md/.png, from the records alone (`report`, `selection_report`).

Letters: B batch, T tasks, N tokens (all tasks), L slots, k selected tokens per slot.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

import metrics
from kem_mtl import resolve_topk
from research import runner
from research.runner import headline, label
from research import stats
from research.stats import bounded_interval, ci, paired, t_interval


def kem(topk="0.25", mode="mask", etf="none"):
    """KEM flags; topk is a train.py --topk string (a float string is a fraction of N, "1.0" = N)."""
    return ["--exchange", "kem", "--topk", topk, "--topk-mode", mode, "--etf", etf]


MULTI_TASK_ROWS = {  # row -> train.py flags; every row trains all --tasks together
    "none": ["--exchange", "none"],
    "cross": ["--exchange", "cross"],
    "kem": kem(),
    "kem post": kem(mode="post"),
    "kem k=N/64": kem(topk="0.015625"),
    "kem k=N/16": kem(topk="0.0625"),
    "kem k=N": kem(topk="1.0"),
    "kem+etf features": kem(etf="features"),
    "kem+normalize": kem(etf="normalize"),
    "kem+etf slots": kem(etf="slots"),
    "kem+etf both": kem(etf="both"),
}

# (row a, row b, what Δm_a - Δm_b, paired by seed, tests). The labels are printed in the tables as they
# stand, marks included.
COMPARISONS = [
    ("kem", "none", "KEM vs no exchange [paper: KEM helps multi-task learning]"),
    ("kem", "cross", "KEM vs cross-attention [paper: KEM beats cross-attention]"),
    ("cross", "none", "cross-attention vs no exchange"),
    ("kem+etf features", "kem", "sKEM (ETF features) vs KEM [paper: sKEM helps further]"),
    ("kem+etf slots", "kem", "sKEM (ETF slots) vs KEM"),
    ("kem+etf both", "kem", "sKEM (both) vs KEM"),
    ("kem+etf features", "kem+normalize", "ETF frame vs L2 normalisation alone (the control for 'features')"),
    ("kem+normalize", "kem", "L2 normalisation alone vs KEM"),
    ("kem post", "kem", "top-k after softmax (SGW's, 'post') vs masking before it ('mask')"),
    ("kem k=N/64", "kem", "k = N/64 vs the default k = N/4"),
    ("kem k=N/16", "kem", "k = N/16 vs the default k = N/4"),
    ("kem k=N", "kem", "k = N (slots, no selection) vs k = N/4"),
]
# Selection diagnostics compared paired by seed, only between rows with the same k (the overlap of random
# k-sets, and so what a Jaccard means, depends on k / N).
SELECTION_COMPARISONS = [
    ("kem+etf slots", "kem", "ETF slots vs learned slots [paper: the ETF stabilises the selection]"),
    ("kem+etf both", "kem", "ETF features and slots vs KEM"),
    ("kem+etf features", "kem", "ETF features vs KEM"),
    ("kem+etf features", "kem+normalize", "ETF frame vs L2 normalisation alone"),
    ("kem+normalize", "kem", "L2 normalisation alone vs KEM"),
    ("kem post", "kem", "top-k after softmax vs masking before it"),
]
SELECTION_MEASURES = {"jaccard": "slot overlap (Jaccard)", "max_task_share": "largest task share"}


def row_flags(tasks, single_task_kem=False):
    """Row name -> train.py flags: single-task baselines (no exchange), optional single-task + KEM, multi-task."""
    rows = {f"single-task {t}": ["--tasks", t, "--exchange", "none"] for t in tasks}
    if single_task_kem:
        rows.update({f"single-task+kem {t}": ["--tasks", t, *kem()] for t in tasks})
    rows.update({name: ["--tasks", ",".join(tasks), *flags] for name, flags in MULTI_TASK_ROWS.items()})
    return rows


def _group(flags):
    exchange = flags[flags.index("--exchange") + 1]
    return "single-task" if "," not in flags[flags.index("--tasks") + 1] and exchange == "none" else exchange


def training_run(name, flags, seed, max_iters, eval_interval, extra):
    """The ablation's run of one row and seed (the distractors reuse its clean-trained checkpoints)."""
    is_kem = "kem" in flags
    return runner.Run("ablation", name, seed, runner.train_flags(flags, seed, max_iters, eval_interval, extra),
                      after=selection_after if is_kem else None, group=_group(flags), steps=max_iters)


# --- the experiment: options and plan ----------------------------------------------------------

def main(argv):
    """`python -m research ablation [options] [-- train.py flags]`."""
    p = runner.parser("ablation", "Δm of every row against single-task baselines, paired comparisons, "
                                  "learning curve and slot selection, on SyntheticRooms.")
    p.add_argument("--rows", nargs="+", help=f"multi-task rows to run (default all: {', '.join(MULTI_TASK_ROWS)}); "
                                             f"the single-task baselines always run")
    p.add_argument("--single-task-kem", action="store_true",
                   help="also the 'single-task + KEM' rows (information, not the Δm reference)")
    p.add_argument("--curve-row", default="kem", help="the row whose eval histories make the learning curve")
    return runner.run(p, argv, plan, lambda args, command: report(args.results, args.tasks, args.curve_row, command))


def plan(args, extra, ctx):
    """One phase: every row for every seed, seed by seed so that pairs complete early."""
    rows = row_flags(args.tasks, args.single_task_kem)
    if args.rows:
        by_slug = {runner.slug(n): n for n in MULTI_TASK_ROWS}
        unknown = [r for r in args.rows if r not in MULTI_TASK_ROWS and r not in by_slug]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(MULTI_TASK_ROWS)}")
        keep = {by_slug.get(r, r) for r in args.rows}
        rows = {n: f for n, f in rows.items() if n.startswith("single-task") or n in keep}
    return [[training_run(name, flags, seed, args.max_iters, args.eval_interval, extra)
             for seed in args.seeds for name, flags in rows.items()]]


# --- Δm from the records --------------------------------------------------------------------------

def baseline_metrics(records, tasks):
    """{task: mean over seeds of each numeric metric} of the single-task (no exchange) records."""
    out = {}
    for t in tasks:
        runs = [r["metrics"][t] for (c, _), r in records.items() if c == f"single-task {t}"]
        if runs:
            out[t] = {k: float(np.mean([m[k] for m in runs])) for k, v in runs[0].items()
                      if isinstance(v, (int, float)) and all(isinstance(m.get(k), (int, float)) for m in runs)}
    return out


def delta_m_by_seed(records, baselines):
    """{config: {seed: Δm}} for every non-baseline record whose tasks all have a baseline."""
    out = {}
    for (config, seed), rec in records.items():
        if config.startswith("single-task ") or not all(t in baselines for t in rec["metrics"]):
            continue
        out.setdefault(config, {})[seed] = metrics.delta_m(rec["metrics"], baselines)
    return out


def delta_m_own_seed(records, tasks):
    """{config: {seed: Δm}} with each seed's Δm against the single-task runs of its own seed (for a row's
    interval: it then holds the baselines' seed-to-seed noise too); seeds missing a baseline are left out."""
    out = {}
    for (config, seed), rec in records.items():
        if config.startswith("single-task "):
            continue
        own = {t: records[f"single-task {t}", seed]["metrics"][t] for t in tasks if (f"single-task {t}", seed) in records}
        if all(t in own for t in rec["metrics"]):
            out.setdefault(config, {})[seed] = metrics.delta_m(rec["metrics"], own)
    return out


def _row_order(names):
    canonical = list(row_flags(runner.SYNTHETIC_TASKS, single_task_kem=True))
    return sorted(names, key=lambda n: (canonical.index(n) if n in canonical else len(canonical), n))


def levelled_off(records, tasks, window=500):
    """Per task: mean over seeds of the relative change (%) of the headline over the last `window` steps.

    Compared on the same key at both ends: edges use the approximate odsF of the intermediate
    evaluations (the last evaluation has only the exact one). Signed so that positive = still improving.
    """
    out = {}
    for t in tasks:
        sign = metrics.HEADLINE[t][1]
        changes = []
        for rec in records:
            points = [(h["iter"], h["headline"].get(t)) for h in rec["history"]
                      if h["headline"].get(t) is not None and (t != "edge" or not h.get("exact_edges"))]
            if len(points) < 2:
                continue
            last_iter, last = points[-1]
            earlier = min(points[:-1], key=lambda p: abs(p[0] - (last_iter - window)))
            if earlier[1]:
                changes.append(100 * sign * (last - earlier[1]) / abs(earlier[1]))
        if changes:
            out[t] = {"mean_change_pct": float(np.mean(changes)), "window": window, "seeds": len(changes)}
    return out


# --- the report: rows, comparisons, learning curve ------------------------------------------------

def report(results, tasks, curve_row="kem", command="python -m research ablation"):
    """research/results/ablation.json/.md, comparisons.json/.md, learning_curve.png, selection.* from the records alone."""
    results = Path(results)
    records = runner.load_records(results, "ablation")
    if not records:
        raise SystemExit(f"no ablation records under {results / 'runs' / 'ablation'}; run `{command}` first")
    baselines = baseline_metrics(records, tasks)
    dm = delta_m_by_seed(records, baselines)                   # common scale: comparisons between rows
    own = delta_m_own_seed(records, tasks)                     # own seed's baselines: a row's interval
    configs = _row_order({c for c, _ in records})
    rows = []
    for config in configs:
        recs = {s: r for (c, s), r in records.items() if c == config}
        seeds = sorted(recs)
        row = {"config": config, "flags": recs[seeds[0]]["flags"], "seeds": seeds,
               "per_seed": [{"seed": s, "headline": {t: headline(t, recs[s]["metrics"][t]) for t in recs[s]["metrics"]},
                             "delta_m": own.get(config, {}).get(s), "delta_m_mean_baseline": dm.get(config, {}).get(s)}
                            for s in seeds],
               "headline_mean": {t: float(np.mean([headline(t, recs[s]["metrics"][t]) for s in seeds]))
                                 for t in recs[seeds[0]]["metrics"]},
               "delta_m": t_interval(list(own[config].values())) if config in own else None,
               "parameters": recs[seeds[0]]["parameters"],
               # medians: a run that shared the cores with other work would swamp a mean
               "images_per_s": _median([recs[s].get("train_images_per_s") for s in seeds]),
               "wall_time_s": _median([recs[s].get("wall_time_s") for s in seeds])}
        rows.append(row)

    cols = [label(t) for t in tasks]
    summary = ["| configuration | seeds | Δm % [95% CI] | " + " | ".join(cols) + " | parameters | img/s | wall s |",
               "|---|---:|---|" + "---:|" * (len(tasks) + 3)]
    per_seed = ["| configuration | seed | " + " | ".join(cols) + " | Δm % (own seed's single-task) | Δm % (mean "
                "single-task) |", "|---|---:|" + "---:|" * (len(tasks) + 2)]
    for row in rows:
        cells = [f"{row['headline_mean'][t]:.4f}" if t in row["headline_mean"] else "" for t in tasks]
        dm_cell = "(baseline)" if row["config"].startswith("single-task ") and row["delta_m"] is None else (
            ci(row["delta_m"]) if row["delta_m"] else "—")
        summary.append(f"| {row['config']} | {len(row['seeds'])} | {dm_cell} | " + " | ".join(cells)
                       + f" | {(row['parameters'] or 0) / 1e6:.2f} M | {_fmt(row['images_per_s'], 1)} | "
                         f"{_fmt(row['wall_time_s'], 0)} |")
        for ps in row["per_seed"]:
            cells = [f"{ps['headline'][t]:.4f}" if t in ps["headline"] else "" for t in tasks]
            d = " | ".join("" if ps[k] is None else f"{ps[k]:+.2f}" for k in ("delta_m", "delta_m_mean_baseline"))
            per_seed.append(f"| {row['config']} | {ps['seed']} | " + " | ".join(cells) + f" | {d} |")

    comparisons = []
    for a, b, what in COMPARISONS:
        if a in dm and b in dm:
            comparisons.append({"a": a, "b": b, "tests": what, **paired(dm[a], dm[b]),
                                "per_task": {t: paired(*({s: headline(t, records[c, s]["metrics"][t])
                                                          for (c2, s) in records if c2 == c} for c in (a, b)))
                                             for t in tasks}})
    stats.family("ablation Δm", comparisons)
    comp_lines = [stats.COLUMNS, stats.RULE] + [stats.row(c, f"{c['tests']}: {c['a']} − {c['b']}") for c in comparisons]

    curve = [records[c, s] for (c, s) in sorted(records) if c == curve_row]
    levelling = levelled_off(curve, tasks) if curve else None
    meta = {"command": command, "tasks": tasks, "seeds": sorted({s for _, s in records}),
            "max_iters": _median([r.get("iteration") for r in records.values()]),
            "total_runner_hours": sum(r.get("runner_wall_s") or r.get("wall_time_s") or 0
                                      for r in records.values()) / 3600}
    (results / "ablation.json").write_text(json.dumps(
        {**meta, "baselines": baselines, "rows": rows, "curve_row": curve_row, "levelling": levelling}, indent=1))
    (results / "ablation.md").write_text(
        f"Ablation on SyntheticRooms: {meta['max_iters']:.0f} steps per run, seeds {meta['seeds']}, data seed 0 "
        f"(every run trains on the same scenes and is scored on the same val scenes: the intervals cover training "
        f"seeds only). Δm (%) per seed is against the single-task runs of the same seed (same network, one task, no "
        f"exchange), so the mean and 95% t-interval over seeds carry the baselines' noise too; the per-seed "
        f"table also gives Δm against the mean over seeds of the single-task runs, the common scale of the "
        f"comparisons (comparisons.md). Task columns are the mean over seeds of each headline metric (per-seed "
        f"values below and in research/results/runs/ablation/). img/s and wall time are medians over seeds. Regenerate: "
        f"`{command}`\n\n" + "\n".join(summary) + "\n\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    (results / "comparisons.json").write_text(json.dumps({**meta, "comparisons": comparisons}, indent=1))
    (results / "comparisons.md").write_text(
        "Paired comparisons of Δm (%, a − b per seed, both against the mean over seeds of the single-task runs; the "
        "same training seed gives both rows the same data order, and every run the same scenes, data seed 0), "
        "their mean, unadjusted 95% t-interval, paired t-test p and Holm-adjusted p over the family. kem − none is "
        "also the primary comparison, on its own scale with more seeds and lengths: research/results/primary.md. "
        f"Regenerate: `{command}`\n\n" + "\n".join(comp_lines) + "\n\n" + stats.family_note("ablation Δm", comparisons)
        + "\n")
    if curve:
        plot_learning_curve(curve, tasks, results / "learning_curve.png")
    selection_report(records, results)
    print("\n".join(summary) + "\n\n" + "\n".join(comp_lines))
    return {"rows": rows, "comparisons": comparisons}


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _fmt(value, digits):
    return "—" if value is None else f"{value:.{digits}f}"


def task_grid(plt, tasks):
    """A figure with one small panel per task, three to a row; the panels left over are switched off."""
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    return fig, axes


def plot_learning_curve(records, tasks, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = task_grid(plt, tasks)
    for ax, t in zip(axes.flat, tasks):
        for i, rec in enumerate(records):
            pts = [(h["iter"], h["headline"][t], bool(h.get("exact_edges"))) for h in rec["history"]
                   if h["headline"].get(t) is not None]
            approx = [(x, y) for x, y, exact in pts if not (t == "edge" and exact)]
            colour = f"C{i}"
            if approx:
                ax.plot(*zip(*approx), "o-", ms=3, color=colour, label=f"seed {rec['seed']}")
            if t == "edge":
                exact = [(x, y) for x, y, e in pts if e]
                if exact:
                    ax.plot(*zip(*exact), "*", ms=8, color=colour)
        ax.set_title(label(t) + (" (lines approx., ★ exact)" if t == "edge" else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"val headline metrics during training: {records[0]['config']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- selection diagnostics: which tokens do the slots take? -----------------------------------

def selection_stats(A_r, num_tasks):
    """Per image, from KEM's retrieve weights A_r (B, L, N) (a token is selected where its weight > 0):

    jaccard (B,): mean over slot pairs of |S_a ∩ S_b| / |S_a ∪ S_b| (1 = every slot takes the same tokens);
    share (B, L, T): each slot's fraction of selected tokens coming from each task (tokens are the T tasks'
    blocks of N / T, concatenated in the model's task order); weight (B, L, T): the same for attention mass.
    """
    B, L, N = A_r.shape
    if N % num_tasks:
        raise ValueError(f"N = {N} tokens do not split into {num_tasks} equal task blocks")
    S = (A_r > 0).to(torch.float64)                                    # (B, L, N): selected tokens
    size = S.sum(-1)                                                   # (B, L)
    inter = S @ S.transpose(1, 2)                                      # (B, L, L)
    union = size[:, :, None] + size[:, None, :] - inter
    pairs = ~torch.eye(L, dtype=torch.bool)
    jaccard = (inter / union.clamp(min=1))[:, pairs].mean(-1) if L > 1 else torch.full((B,), float("nan"))
    share = S.view(B, L, num_tasks, N // num_tasks).sum(-1) / size.clamp(min=1)[..., None]   # (B, L, T)
    A = A_r.to(torch.float64)
    weight = A.view(B, L, num_tasks, N // num_tasks).sum(-1) / A.sum(-1, keepdim=True).clamp(min=1e-300)
    return jaccard, share, weight


@torch.no_grad()
def selection_diagnostics(ckpt_path, max_images=None):
    """Selection of a trained KEM on the val set: {"jaccard", "jaccard_chance", "max_task_share",
    "max_task_weight", "share" (L x T), "weight" (L x T), "k", "N", "tasks"}; None without KEM.

    max_task_share: mean over images and slots of the largest task share (1 = every slot takes tokens
    of one task only, 1/T = evenly mixed). jaccard_chance: the expected overlap of independent random
    k-sets, p / (2 - p) with p = k / N.
    """
    model, cfg = runner.load_trained(ckpt_path)
    exchange = model.exchange
    if not hasattr(exchange, "num_slots"):
        return None
    T = len(model.tasks)
    stats = {"jaccard": [], "share": [], "weight": [], "N": None}

    def hook(module, args, out):
        _, att = module.forward(args[0], return_attention=True)       # forward(), not __call__: no hook loop
        j, s, w = selection_stats(att["retrieve"], T)
        stats["jaccard"].append(j), stats["share"].append(s), stats["weight"].append(w)
        stats["N"] = args[0].shape[1]

    handle = exchange.register_forward_hook(hook)
    try:
        for images in runner.val_images(cfg, max_images):
            model(images)
    finally:
        handle.remove()
    jaccard, share, weight = (torch.cat(stats[k]) for k in ("jaccard", "share", "weight"))
    N = stats["N"]
    k = resolve_topk(exchange.topk, N)
    p = k / N
    return {"jaccard": float(jaccard.mean()), "jaccard_chance": p / (2 - p),
            "max_task_share": float(share.max(-1).values.mean()), "max_task_weight": float(weight.max(-1).values.mean()),
            "share": share.mean(0).tolist(), "weight": weight.mean(0).tolist(), "k": k, "N": N,
            "tasks": list(model.tasks), "images": int(jaccard.numel())}


def selection_after(run, run_dir, ctx):
    """after-hook of a KEM run: its selection diagnostics go into its record."""
    return {"selection": selection_diagnostics(run_dir / "ckpt.pt")}


def selection_report(records, results):
    """research/results/selection.json/.md/.png from the ablation records that carry selection diagnostics."""
    by_row = {}
    for (config, seed), rec in sorted(records.items()):
        if rec.get("selection"):
            by_row.setdefault(config, {})[seed] = rec["selection"]
    if not by_row:
        return None
    rows = []
    for config in _row_order(by_row):
        sel = by_row[config]
        first = sel[min(sel)]
        rows.append({"config": config, "seeds": sorted(sel), "k": first["k"], "N": first["N"],
                     "coverage": first["k"] * len(first["share"]) / first["N"],
                     "jaccard": bounded_interval([s["jaccard"] for s in sel.values()]),
                     "jaccard_chance": first["jaccard_chance"],
                     "max_task_share": bounded_interval([s["max_task_share"] for s in sel.values()]),
                     "max_task_weight": bounded_interval([s["max_task_weight"] for s in sel.values()]),
                     "share_first_seed": first["share"], "tasks": first["tasks"],
                     "per_seed": {s: {k: v[k] for k in ("jaccard", "max_task_share", "max_task_weight")}
                                  for s, v in sel.items()}})
    lines = ["| configuration | k / N | coverage L k / N | slot overlap (Jaccard) [95% CI] | per seed | chance | "
             "largest task share [95% CI] | largest task weight [95% CI] |", "|---|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v['jaccard']:.2f}" for _, v in sorted(r["per_seed"].items()))
        lines.append(f"| {r['config']} | {r['k']} / {r['N']} | {r['coverage']:.2f} | {ci(r['jaccard'], 3, '')} | "
                     f"{per_seed} | {r['jaccard_chance']:.3f} | {ci(r['max_task_share'], 3, '')} | "
                     f"{ci(r['max_task_weight'], 3, '')} |")
    T = len(rows[0]["tasks"])
    pairs = []
    for a, b, what in SELECTION_COMPARISONS:
        if a in by_row and b in by_row:
            for m in SELECTION_MEASURES:
                pairs.append({"a": a, "b": b, "tests": what, "measure": m,
                              **paired(*({s: v[m] for s, v in by_row[c].items()} for c in (a, b)))})
    stats.family("selection", pairs)
    pair_lines = [stats.COLUMNS, stats.RULE] + [
        stats.row(c, f"{c['tests']}: {c['a']} − {c['b']}, {SELECTION_MEASURES[c['measure']]}", digits=3) for c in pairs]
    (Path(results) / "selection.json").write_text(json.dumps({"rows": rows, "paired": pairs}, indent=1))
    (Path(results) / "selection.md").write_text(
        "Which tokens KEM's slots select on the val set, per trained model: the mean over seeds and a 95% interval "
        "that stays inside [0, 1] (the t-interval of the seeds' mean logit, mapped back; it brackets the typical "
        "seed on that scale, not exactly the arithmetic mean), with each seed's overlap beside it. "
        "Slot overlap: mean pairwise Jaccard of the slots' top-k index sets per image (1 = all slots take the "
        "same tokens; 'chance' = independent random k-sets). Largest task share: mean over images and slots of "
        f"the largest fraction of a slot's selected tokens that comes from one task (1 = one task per slot, 1/T = "
        f"{1 / T:.3f} = evenly mixed); task weight: the same for attention mass (it differs when k = N). "
        "Regenerate: `python -m research ablation --tables-only`\n\n" + "\n".join(lines)
        + ("\n\nPaired by seed (a − b; rows with the same k only):\n\n" + "\n".join(pair_lines) + "\n\n"
           + stats.family_note("selection", pairs) if pairs else "")
        + "\n")
    plot_selection(rows, Path(results) / "selection.png")
    return {"rows": rows, "paired": pairs}


def plot_selection(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig = plt.figure(figsize=(max(8, 1.3 * n), 6.2))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.1, 1])
    top, bottom = outer[0].subgridspec(1, 2), outer[1].subgridspec(1, n)
    for col, (key, title) in enumerate((("jaccard", "slot overlap (Jaccard)"), ("max_task_share", "largest task share"))):
        ax = fig.add_subplot(top[0, col])
        for i, r in enumerate(rows):
            values = [v[key] for v in r["per_seed"].values()]
            ax.plot([i] * len(values), values, "o", color="C0", alpha=0.6, ms=4)
            ax.plot([i - 0.3, i + 0.3], [np.mean(values)] * 2, "k-")
            if key == "jaccard":
                ax.plot([i - 0.3, i + 0.3], [r["jaccard_chance"]] * 2, ":", color="grey")
        if key == "max_task_share":
            ax.axhline(1 / len(rows[0]["tasks"]), ls=":", color="grey")
        ax.set_xticks(range(n), [r["config"] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title(title + " (dots: seeds; dotted: chance)", fontsize=9)
    for i, r in enumerate(rows):
        ax = fig.add_subplot(bottom[0, i])
        ax.imshow(np.asarray(r["share_first_seed"]), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(r["tasks"])), r["tasks"], rotation=90, fontsize=6)
        ax.set_yticks([])
        ax.set_title(f"{r['config']}\nseed {r['seeds'][0]}", fontsize=7)
        if i == 0:
            ax.set_ylabel("slot", fontsize=7)
    fig.suptitle("KEM slot selection on the val set; bottom: each slot's share of selected tokens per task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
