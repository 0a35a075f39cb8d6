"""Run length: are the ablation's 1,500 steps enough, and does kem − none move when the runs are longer?

    python -m research length                    # kem and none at 3,000 and 6,000 steps, 5 seeds

Why [ours]: the ablation's runs are the default run's 1,500 steps, where the val metrics are still
rising, so a difference between rows could be one of speed rather than of where they end up. This
experiment trains kem and none for 3,000 and 6,000 steps (the ablation's five seeds, each run with
its own warm-up and schedule decaying to zero at its last step, so a longer run is not a
continuation of a shorter one) and reports, beside the ablation's 1,500-step runs of the same rows
and seeds:
- per run: the final val metrics and how much each headline still moved over the last 40% of the
  run (ablation.levelled_off);
- per length: kem against none paired by seed on the primary comparison's scale r (kem's per-task
  relative difference against none, research/primary.py), tested in the family "primary", each task's
  relative difference (descriptive), and how r changed against the shortest length (family "length").
  No Δm: it would need single-task runs of each length, and there are only the ablation's 1,500-step ones.

Writes research/results/length.json/.md/.png from the length and ablation records alone (`report`).

Notes:
- --max-iters is accepted (a common option) but not used here: --lengths sets the steps.
"""
import json
from pathlib import Path

import numpy as np

import metrics
from research import ablation, primary, runner, stats
from research.runner import headline, label
from research.stats import ci, paired

LENGTH_ROWS = ("kem", "none")               # the difference is kem − none


# --- the experiment: options and plan -------------------------------------------------------------

def main(argv):
    """`python -m research length [options] [-- train.py flags]`."""
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


def report(results, tasks, rows=LENGTH_ROWS, command="python -m research length"):
    """research/results/length.json/.md/.png: final metrics against run length, from the length records and the
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
    out = []
    lines = ["| row | seed | steps | " + " | ".join(label(t) for t in tasks) + " | still improving over the last 40% of "
             "steps |", "|---|---:|---:|" + "---:|" * len(tasks) + "---|"]
    for (row, seed) in sorted(runs, key=lambda k: (k[1], rows.index(k[0]) if k[0] in rows else 99)):
        for steps in sorted(runs[row, seed]):
            rec = runs[row, seed][steps]
            lev = ablation.levelled_off([rec], tasks, window=round(0.4 * steps))
            improving = ", ".join(f"{t} {v['mean_change_pct']:+.1f}%" for t, v in lev.items())
            out.append({"row": row, "seed": seed, "steps": steps, "levelling": lev, "metrics": rec["metrics"],
                        "headline": {t: headline(t, rec["metrics"][t]) for t in rec["metrics"]},
                        "history": rec["history"]})
            lines.append(f"| {row} | {seed} | {steps} | " + " | ".join(f"{out[-1]['headline'][t]:.4f}" for t in tasks)
                         + f" | {improving} |")
    summary = summary_by_length(out, tasks, rows, results)
    table = [{"seed": s, "steps": p["steps"], "a": rows[0], "b": rows[1], "difference": d}
             for p in summary["per_length"] for s, d in zip(p["r"]["seeds"], p["r"]["differences"])]
    (results / "length.json").write_text(json.dumps({"command": command, "runs": [{k: v for k, v in o.items()
                                                                                    if k != "metrics"} for o in out],
                                                     "differences": table, "paired": summary}, indent=1))
    (results / "length.md").write_text(
        "Run length: the same rows trained for more steps, each run with its own warm-up and polynomial decay to "
        "zero at its last step (so a longer run is not a continuation of a shorter one); data seed 0 throughout "
        "(the same scenes for every seed). Final val metrics; 'still improving': the headline's relative change "
        "between the evaluation nearest 60% of the run and the last one (positive = better). The rows are compared "
        "on the primary comparison's scale r (kem's per-task relative difference against none, %, mean over tasks; "
        "research/results/primary.md), which needs no single-task runs: there are single-task runs of 1,500 steps only, so "
        "no Δm is given at 3,000 or 6,000 steps. Regenerate: "
        f"`{command}`\n\n" + "\n".join(lines) + "\n\n" + summary["markdown"] + "\n")
    plot_length(out, tasks, results / "length.png")
    print("\n".join(lines) + "\n\n" + summary["markdown"])
    return {"runs": out, "differences": table, "paired": summary}


def summary_by_length(out, tasks, rows, results):
    """Per length, over the seeds that have both rows: r of rows[0] against rows[1] (primary.relative_difference)
    per seed, tested in the family "primary" when the rows are kem and none (else a family of their own), each
    task's relative difference (descriptive), and the change of r against the shortest length (family "length");
    and per (row, length) the seeds' mean 'still improving' change."""
    by = {(o["row"], o["seed"], o["steps"]): o for o in out}
    a_row, b_row = (list(rows) + [None])[:2]                   # one row alone: no pairs, the tables stay empty
    per_length = []
    for steps in sorted({o["steps"] for o in out}):
        seeds = [s for s in sorted({o["seed"] for o in out}) if (a_row, s, steps) in by and (b_row, s, steps) in by]
        if not seeds:
            continue
        r = [primary.relative_difference(by[a_row, s, steps]["metrics"], by[b_row, s, steps]["metrics"]) for s in seeds]
        task_stats = {t: paired(*({s: 100 * metrics.HEADLINE[t][1] * by[row, s, steps]["headline"][t]
                                   / by[b_row, s, steps]["headline"][t] for s in seeds} for row in (a_row, b_row)))
                      for t in tasks}
        per_length.append({"steps": steps, "seeds": seeds, "r": {"label": f"{steps} steps", "seeds": seeds,
                                                                  "differences": r}, "tasks": task_stats})
    if (a_row, b_row) == ("kem", "none"):                      # the primary comparison: tested in its own family
        tested = {m["steps"]: m for m in primary.primary_family(results, tasks) if m["data"] == "0"}
        for p in per_length:
            if p["steps"] in tested:                           # the same records, so the same per-seed r
                p["r"] = {**p["r"], **tested[p["steps"]]}
        untested = [p["r"] for p in per_length if "family" not in p["r"]]
        if untested:
            stats.family(f"length {a_row} − {b_row}", untested)
    else:
        stats.family(f"length {a_row} − {b_row}", [p["r"] for p in per_length])
    lines = [f"{a_row} − {b_row} on the scale r (%; positive = {a_row} better), paired by seed:", "",
             stats.COLUMNS, stats.RULE] + [stats.row(p["r"], p["r"]["label"]) for p in per_length]
    if per_length:
        name = per_length[0]["r"]["family"]
        lines += ["", stats.family_note(name, [p["r"] for p in per_length])
                  + (" The family's other members are in research/results/primary.md." if name == "primary" else ""),
                  "", "Per task (descriptive, not tested): the relative difference, %, positive = "
                  f"{a_row} better, mean and unadjusted 95% t-interval:", "",
                  "| steps | seeds | " + " | ".join(label(t) for t in tasks) + " |", "|---:|---:|" + "---:|" * len(tasks)]
        lines += [f"| {p['steps']} | {len(p['seeds'])} | " + " | ".join(ci(p["tasks"][t]) for t in tasks) + " |"
                  for p in per_length]
    if len(per_length) > 1:                                    # does the difference move with the length?
        first = per_length[0]
        changes = []
        for p in per_length[1:]:
            p["change_from_shortest"] = paired(dict(zip(p["r"]["seeds"], p["r"]["differences"])),
                                               dict(zip(first["r"]["seeds"], first["r"]["differences"])))
            p["change_from_shortest"]["label"] = f"r at {p['steps']} − r at {first['steps']} steps"
            changes.append(p["change_from_shortest"])
        stats.family("length", changes)
        lines += ["", f"Change of r against {first['steps']} steps, paired by seed:", "", stats.COLUMNS, stats.RULE]
        lines += [stats.row(c, c["label"]) for c in changes] + ["", stats.family_note("length", changes)]
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


