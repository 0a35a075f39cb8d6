"""Run length: are the ablation's 1,500 steps enough, and does kem − none move when the runs are longer?

    python experiments.py length                    # kem and none at 3,000 and 6,000 steps, 5 seeds

Why [ours]: the ablation's runs are the default run's 1,500 steps, where the val metrics are still
rising, so a difference between rows could be one of speed rather than of where they end up. This
experiment trains kem and none for 3,000 and 6,000 steps (the ablation's five seeds, each run with
its own warm-up and schedule decaying to zero at its last step, so a longer run is not a
continuation of a shorter one) and reports, beside the ablation's 1,500-step runs of the same rows
and seeds:
- per run: the final val metrics, Δm against the ablation's single-task means (one reference for
  every length, so the differences between rows are comparable), and how much each headline still
  moved over the last 40% of the run (ablation.levelled_off);
- per length: the kem − none difference paired by seed (Δm and each task's headline), and how that
  difference changed against the shortest length, paired by seed.

Writes results/length.json/.md/.png from the length and ablation records alone (`report`).

Notes:
- --max-iters is accepted (a common option) but not used here: --lengths sets the steps.
"""
import json
from pathlib import Path

import numpy as np

import metrics
from studies import ablation, runner
from studies.runner import headline, label
from studies.stats import ci, paired, verdict

LENGTH_ROWS = ("kem", "none")               # the difference is kem − none


# --- the experiment: options and plan -------------------------------------------------------------

def main(argv):
    """`python experiments.py length [options] [-- train.py flags]`."""
    p = runner.parser("length", "The ablation's rows trained longer (each with its own schedule, "
                                "which ends at its last step): do the metrics level off, and does the "
                                "difference between rows move with the length?")
    p.set_defaults(eval_interval=500)
    p.add_argument("--lengths", type=int, nargs="+", default=[3000, 6000], help="steps per run, besides the ablation's")
    p.add_argument("--rows", nargs="+", default=list(LENGTH_ROWS), choices=list(ablation.MULTI_TASK_ROWS))
    return runner.run(p, argv, plan, lambda args, command: report(args.results, args.tasks, args.rows, command))


def plan(args, extra, ctx):
    """One phase: each row at each length for each seed (the ablation's runs are the shortest length)."""
    rows = ablation.row_flags(args.tasks)
    return [[runner.Run("length", f"{row} {n} steps", s, runner.train_flags(rows[row], s, n, args.eval_interval, extra),
                        group=row, steps=n)
             for s in args.seeds for n in sorted(args.lengths) for row in args.rows]]


# --- the report: per run, per length, the paired difference ---------------------------------------

def report(results, tasks, rows=LENGTH_ROWS, command="python experiments.py length"):
    """results/length.json/.md/.png: final metrics against run length, from the length records and the
    ablation's records of the same rows and seeds (their length is the ablation's)."""
    results = Path(results)
    ablation_recs = runner.load_records(results, "ablation")
    runs = {}                                                      # (row, seed) -> {steps: record}
    for (config, seed), rec in runner.load_records(results, "length").items():
        runs.setdefault((config.rsplit(" ", 2)[0], seed), {})[rec["iteration"]] = rec
    if not runs:
        raise SystemExit(f"no length records under {results / 'runs' / 'length'}; run `{command}` first")
    for (row, seed) in list(runs):
        if (row, seed) in ablation_recs:
            rec = ablation_recs[row, seed]
            runs[row, seed][rec["iteration"]] = rec
    baselines = ablation.baseline_metrics(ablation_recs, tasks)         # a common reference for every length
    table, out = [], []
    lines = ["| row | seed | steps | " + " | ".join(label(t) for t in tasks) + " | Δm % (vs the ablation's single-task) |"
             " still improving over the last 40% of steps |", "|---|---:|---:|" + "---:|" * (len(tasks) + 1) + "---|"]
    for (row, seed) in sorted(runs, key=lambda k: (k[1], rows.index(k[0]) if k[0] in rows else 99)):
        for steps in sorted(runs[row, seed]):
            rec = runs[row, seed][steps]
            dm = metrics.delta_m(rec["metrics"], baselines) if all(t in baselines for t in rec["metrics"]) else None
            lev = ablation.levelled_off([rec], tasks, window=round(0.4 * steps))
            improving = ", ".join(f"{t} {v['mean_change_pct']:+.1f}%" for t, v in lev.items())
            out.append({"row": row, "seed": seed, "steps": steps, "delta_m": dm, "levelling": lev,
                        "headline": {t: headline(t, rec["metrics"][t]) for t in rec["metrics"]},
                        "history": rec["history"]})
            lines.append(f"| {row} | {seed} | {steps} | " + " | ".join(f"{out[-1]['headline'][t]:.4f}" for t in tasks)
                         + f" | {'—' if dm is None else f'{dm:+.2f}'} | {improving} |")
    diffs = ["| seed | steps | Δm difference " + " − ".join(rows[:2]) + " |", "|---:|---:|---:|"]
    dm_of = {(o["row"], o["seed"], o["steps"]): o["delta_m"] for o in out}
    for seed, steps in sorted({(o["seed"], o["steps"]) for o in out}) if len(rows) >= 2 else []:
        a, b = dm_of.get((rows[0], seed, steps)), dm_of.get((rows[1], seed, steps))
        if a is not None and b is not None:
            table.append({"seed": seed, "steps": steps, "a": rows[0], "b": rows[1], "difference": a - b})
            diffs.append(f"| {seed} | {steps} | {a - b:+.2f} |")
    summary = summary_by_length(out, tasks, rows)
    (results / "length.json").write_text(json.dumps({"command": command, "runs": out, "differences": table,
                                                     "paired": summary}, indent=1))
    (results / "length.md").write_text(
        "Run length: the same rows trained for more steps, each run with its own warm-up and polynomial decay to "
        "zero at its last step (so a longer run is not a continuation of a shorter one). Final val metrics; Δm "
        "against the ablation's single-task means (a common reference for every length, so the differences "
        "between rows are comparable); 'still improving': the headline's relative change between the evaluation "
        "nearest 60% of the run and the last one (positive = better). Regenerate: "
        f"`{command}`\n\n" + "\n".join(lines) + "\n\n" + "\n".join(diffs) + "\n\n" + summary["markdown"] + "\n")
    plot_length(out, tasks, results / "length.png")
    print("\n".join(lines) + "\n\n" + "\n".join(diffs) + "\n\n" + summary["markdown"])
    return {"runs": out, "differences": table, "paired": summary}


def summary_by_length(out, tasks, rows):
    """Per length, over the seeds that have both rows: the paired Δm difference rows[0] − rows[1] and each
    task's paired headline difference (signed so that positive = rows[0] better), with 95% t-intervals;
    and per (row, length) the seeds' mean 'still improving' change."""
    by = {(o["row"], o["seed"], o["steps"]): o for o in out}
    a_row, b_row = (list(rows) + [None])[:2]                   # one row alone: no pairs, the table stays empty
    lines = [f"Paired by seed, {a_row} − {b_row}, mean [95% t-interval]; per task positive = {a_row} better:", "",
             "| steps | seeds | Δm difference | " + " | ".join(label(t) for t in tasks) + " |",
             "|---:|---:|---:|" + "---:|" * len(tasks)]
    per_length = []
    for steps in sorted({o["steps"] for o in out}):
        pairs = [(by[a_row, s, steps], by[b_row, s, steps]) for s in sorted({o["seed"] for o in out})
                 if (a_row, s, steps) in by and (b_row, s, steps) in by]
        if not pairs:
            continue
        seeds = [a["seed"] for a, _ in pairs]
        dm = paired({a["seed"]: a["delta_m"] for a, _ in pairs if a["delta_m"] is not None},
                    {b["seed"]: b["delta_m"] for _, b in pairs if b["delta_m"] is not None})
        task_stats = {t: paired({a["seed"]: metrics.HEADLINE[t][1] * a["headline"][t] for a, _ in pairs},
                                {b["seed"]: metrics.HEADLINE[t][1] * b["headline"][t] for _, b in pairs})
                      for t in tasks}
        per_length.append({"steps": steps, "seeds": seeds, "delta_m": dm, "tasks": task_stats})
        lines.append(f"| {steps} | {len(seeds)} | {ci(dm)} ({verdict(dm)}) | "
                     + " | ".join(ci(task_stats[t], digits=3) for t in tasks) + " |")
    if len(per_length) > 1:                                    # does the difference move with the length?
        first = per_length[0]
        lines += ["", f"Change of the Δm difference against {first['steps']} steps, paired by seed:", "",
                  "| steps | seeds | change |", "|---:|---:|---:|"]
        for p in per_length[1:]:
            p["change_from_shortest"] = paired(dict(zip(p["delta_m"]["seeds"], p["delta_m"]["differences"])),
                                               dict(zip(first["delta_m"]["seeds"], first["delta_m"]["differences"])))
            change = p["change_from_shortest"]
            lines.append(f"| {p['steps']} | {change['n']} | {ci(change)} ({verdict(change)}) |")
    lines += ["", "Still improving (mean over seeds of the headline's relative change over the last 40% of the run, "
              "positive = better):", "", "| row | steps | seeds | " + " | ".join(label(t) for t in tasks) + " |",
              "|---|---:|---:|" + "---:|" * len(tasks)]
    improving = []
    for row, steps in sorted({(o["row"], o["steps"]) for o in out}, key=lambda k: (k[1], str(k[0]))):
        lev = {t: [o["levelling"][t]["mean_change_pct"] for o in out
                   if (o["row"], o["steps"]) == (row, steps) and t in o["levelling"]] for t in tasks}
        n = max(len(v) for v in lev.values())
        improving.append({"row": row, "steps": steps, "seeds": n,
                          "mean_change_pct": {t: float(np.mean(v)) for t, v in lev.items() if v}})
        lines.append(f"| {row} | {steps} | {n} | " + " | ".join(
            f"{np.mean(lev[t]):+.1f}%" if lev[t] else "—" for t in tasks) + " |")
    return {"per_length": per_length, "still_improving": improving, "markdown": "\n".join(lines)}


def plot_length(runs, tasks, path):
    """Per task: the val curve of each (row, length), mean over its seeds with their range shaded; coloured by
    row, one line style per length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = ablation.task_grid(plt, tasks)
    row_names = list(dict.fromkeys(r["row"] for r in runs))
    lengths = sorted({r["steps"] for r in runs})
    styles = dict(zip(lengths, [":", "--", "-", "-."]))
    groups = {}
    for r in runs:
        groups.setdefault((r["row"], r["steps"]), []).append(r)
    for ax, t in zip(axes.flat, tasks):
        for (row, steps), group in groups.items():
            curves = [dict((h["iter"], h["headline"][t]) for h in r["history"]
                           if h["headline"].get(t) is not None and not (t == "edge" and h.get("exact_edges")))
                      for r in group]
            iters = sorted(set.intersection(*(set(c) for c in curves)))
            if not iters:
                continue
            values = np.array([[c[i] for i in iters] for c in curves])
            color = f"C{row_names.index(row)}"
            ax.plot(iters, values.mean(0), styles.get(steps, "-"), marker="o", ms=2, lw=1, color=color,
                    label=f"{row}, {steps} steps ({len(group)} seed{'s' if len(group) > 1 else ''})")
            if len(group) > 1:
                ax.fill_between(iters, values.min(0), values.max(0), color=color, alpha=0.12, lw=0)
        ax.set_title(label(t) + (" (approx.)" if t == "edge" else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("val headline metrics during training, by run length (mean over seeds, range shaded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


