"""The softmax leak: how much attention one query gives to irrelevant tokens, at the k values the model uses.

    python -m research leak                      # about a minute; writes research/results/leak.json, .md, .png

What the paper claims [paper]: softmax never gives an exact zero, so every irrelevant token leaks a
little into every output, more as the tokens grow; top-k selection stops it.

How it is tested here [ours]: a simulation, no training. One query scores `relevant` tokens at
gap + noise · z and every other token at noise · z (z standard normal). For each token count N, the
mass on the irrelevant tokens under top-k softmax ("mask" variant of kem_mtl.topk_softmax) at the
fractions the model's k takes (k = N/64, N/16, N/4, and N, which is plain softmax) and at a fixed
k = 16, beside the slots' coverage L k / N (how many times over the L slots together can take in
every token). The table marks the default run's N = T h w, counted on the model itself.

Our reconstruction of the paper's argument, with noiseless scores (|S| relevant tokens, |N| the rest):

    leaked mass = |N| e^0 / (|S| e^gap + |N| e^0)

Notes:
- Where k < `relevant` the top-k also leaves relevant tokens out; the table shows the leak only.
- The scores are a model of a query, not measured from a trained network.
"""
import argparse
import json
import math
from pathlib import Path

import torch

import train
from kem_mtl import resolve_topk, topk_softmax
from research import runner

LEAK_KS = {"N/64": 1 / 64, "N/16": 1 / 16, "N/4": 0.25, "N": 1.0, "16": 16}   # label -> topk as the model takes it


def softmax_leak(token_counts, *, relevant=16, gap=3.0, noise=1.0, k=None, trials=200, seed=0):
    """Attention mass that one query gives to irrelevant tokens, plain softmax vs top-k softmax.

    A query scores `relevant` tokens at gap + noise * z and every other token at noise * z (z standard
    normal, drawn from a seeded generator, the same draws for every k). For each token count N: the
    mean mass on the irrelevant tokens under softmax and under top-k softmax ("mask" variant of
    kem_mtl.topk_softmax; k an int count, a float fraction of N resolved as the model does, or None
    for k = `relevant`), and the bound of our reconstruction of the paper's argument with noiseless
    scores: |N| e^0 / (|S| e^gap + |N| e^0). Returns {"tokens", "k_resolved", "bound", "softmax", "topk", ...}.
    """
    k = relevant if k is None else k
    g = torch.Generator().manual_seed(seed)
    out = {"tokens": [], "k_resolved": [], "bound": [], "softmax": [], "topk": [], "relevant": relevant, "gap": gap,
           "noise": noise, "k": k, "trials": trials}
    for n in token_counts:
        scores = noise * torch.randn(trials, n, generator=g, dtype=torch.float64)
        scores[:, :relevant] += gap                                  # tokens 0..relevant-1 are the relevant ones
        irrelevant = n - relevant
        kn = resolve_topk(k, n)
        out["tokens"].append(n)
        out["k_resolved"].append(kn)
        out["bound"].append(irrelevant / (relevant * math.exp(gap) + irrelevant))
        out["softmax"].append(float(scores.softmax(-1)[:, relevant:].sum(-1).mean()))
        out["topk"].append(float(topk_softmax(scores, kn)[:, relevant:].sum(-1).mean()))
    return out


@torch.no_grad()
def default_token_count():
    """N = T h w at the exchange of the default `python train.py` run, counted on one blank image."""
    cfg = train.resolve_config(*train.parse_args([]))
    model = train.build_model(cfg).eval()
    seen = {}
    model.exchange.register_forward_pre_hook(lambda m, args: seen.update(N=args[0].shape[1]))
    model(torch.zeros(1, 3, *cfg["train_size"]))
    return seen["N"]


def main(argv):
    """`python -m research leak [options]`: the table, the curves and the figure."""
    p = argparse.ArgumentParser(prog="python -m research leak",
                                description="Softmax vs top-k at the model's k values: mass on irrelevant tokens.")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384], help="N for the table")
    p.add_argument("--relevant", type=int, default=16, help="relevant tokens |S|")
    p.add_argument("--gap", type=float, default=3.0, help="how much higher relevant tokens score")
    p.add_argument("--noise", type=float, default=1.0, help="std of the score noise")
    p.add_argument("--num-slots", type=int, default=16, help="L, for the coverage L k / N")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--results", type=Path, default=runner.RESULTS, help="writes leak.json, .md and .png here")
    args = p.parse_args(argv)
    model_n = default_token_count()
    table_n = sorted(set(args.tokens) | {model_n})
    curve_n = sorted(set(table_n) | {2 ** e for e in range(8, 15)})
    sims = {name: softmax_leak(curve_n, relevant=args.relevant, gap=args.gap, noise=args.noise, k=k,
                               trials=args.trials) for name, k in LEAK_KS.items()}
    rows = []
    for n in table_n:
        i = curve_n.index(n)
        for name in LEAK_KS:
            s = sims[name]
            rows.append({"N": n, "k": name, "k_resolved": s["k_resolved"][i],
                         "coverage": args.num_slots * s["k_resolved"][i] / n, "softmax": s["softmax"][i],
                         "topk": s["topk"][i], "bound": s["bound"][i]})
    lines = ["| tokens N | " + " | ".join(f"k = {name}" + (" (softmax)" if name == "N" else "") for name in LEAK_KS) + " |",
             "|---:|" + "---:|" * len(LEAK_KS)]
    for n in table_n:
        cells = [f"{r['topk']:.3f} (k {r['k_resolved']:,}, {r['coverage']:.2g}×)" for r in rows if r["N"] == n]
        lines.append(f"| {n:,}" + (" (default run)" if n == model_n else "") + " | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = {"command": "python -m research leak " + " ".join(argv), "relevant": args.relevant, "gap": args.gap,
           "noise": args.noise, "trials": args.trials, "num_slots": args.num_slots, "model_tokens": model_n,
           "rows": rows, "curves": sims}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "leak.json").write_text(json.dumps(out, indent=1))
    (args.results / "leak.md").write_text(
        f"Attention mass on irrelevant tokens for one query: {args.relevant} relevant tokens scoring {args.gap:g} "
        f"higher, score noise {args.noise:g}, mean of {args.trials} queries; top-k is the 'mask' variant with k "
        f"resolved from N as the model does (fractions round up); k = N is plain softmax. Each cell: the leaked "
        f"mass (k as a count, coverage L k / N with L = {args.num_slots}: how many times over the slots together "
        f"can take in every token; above 1 they can let everything through somewhere)."
        f" Where k < {args.relevant} the top-k also leaves relevant tokens out. N = {model_n:,} is the default "
        f"run's (T h w). Regenerate: "
        f"`{out['command'].strip()}`\n\n{table}\n")
    plot_leak(sims, args.results / "leak.png", model_n)
    print(table)
    return out


def plot_leak(sims, path, model_n=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    first = next(iter(sims.values()))
    ax.plot(first["tokens"], first["bound"], "k--", lw=1, label="bound, noiseless scores (our reconstruction)")
    for i, (name, s) in enumerate(sims.items()):
        ax.plot(s["tokens"], s["topk"], "o-", ms=3, color=f"C{i}",
                label="softmax (k = N)" if name == "N" else f"top-k, k = {name}")
    if model_n:
        ax.axvline(model_n, color="grey", lw=0.5)
        ax.text(model_n, 0.02, " default run", fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("attention mass on irrelevant tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{first['relevant']} relevant tokens, score gap {first['gap']:g}, noise {first['noise']:g}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
