"""The paper's three claims, tested on a laptop CPU with numbers anyone can regenerate.

    python experiments.py ablation        # single-task baselines, none / cross / kem / sKEM x 3 seeds -> Δm table
    python experiments.py leak            # the softmax leak: attention mass on irrelevant tokens vs N
    python experiments.py noise           # distractor tokens: how much do the real tasks suffer?
    python experiments.py <name> --help   # the knobs of each

Every experiment writes JSON and Markdown (and a PNG where there is a curve) into results/, and
can be re-run: the ablation and noise runs are ordinary `train.py` runs under runs/, and a run that
already finished (results.json exists) is not trained again.

The claims [PAPER] and how each is tested here [OURS]:
1. KEM beats cross-attention and no exchange in multi-task performance (Δm against single-task
   baselines), and its ETF variant sKEM helps further: `ablation`, on SyntheticRooms.
2. Softmax lets every irrelevant token leak into the output, more so as tokens grow; top-k cuts the
   leak: `leak` (the bound and a simulation) and `noise` (random distractor tokens appended to the
   exchange's input, at growing ratios, for models trained without and with them).
3. KEM's cost is linear in the tokens, cross-attention's quadratic: `python bench.py exchange` and
   `python bench.py step` (bench.py).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import metrics

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SYNTHETIC_TASKS = ("semseg", "depth", "normals", "edge", "sal", "parts")
UNITS = {"semseg": "mIoU", "parts": "mIoU", "depth": "RMSE m", "normals": "mean °", "sal": "maxF", "edge": "odsF"}


def run_once(command, out_dir, flags, log):
    """`python <command> <flags>` into out_dir, unless it already finished; returns its result JSON.

    The result is out_dir/results.json, or out_dir/eval_ckpt.json for an --eval-only run. A run
    with a checkpoint but no result was interrupted and is resumed exactly; a folder without a
    checkpoint stopped before its first save and starts again.
    """
    out = Path(out_dir)
    eval_only = "--eval-only" in flags
    result = out / ("eval_ckpt.json" if eval_only else "results.json")
    if result.exists():
        log(f"  {out}: done before, reusing")
        return json.loads(result.read_text())
    cmd = [sys.executable, *command, *flags]
    if eval_only:
        out.mkdir(parents=True, exist_ok=True)
        cmd += ["--out-dir", str(out)]
    elif (out / "ckpt.pt").exists():                    # an interrupted run: continue it exactly
        cmd += ["--resume", str(out)]
    else:
        if out.exists():                                 # stopped before its first checkpoint
            log(f"  {out}: no checkpoint, starting it again")
            shutil.rmtree(out)
        cmd += ["--out-dir", str(out)]
    log(f"  {' '.join(cmd[1:])}")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    log(f"    {time.time() - start:.0f} s")
    return json.loads(result.read_text())


def train_run(out_dir, flags, log):
    """One train.py run into out_dir (skipped if it already finished); returns its results.json."""
    return run_once([str(ROOT / "train.py")], out_dir, flags, log)


def slot_query_cosine(ckpt_path):
    """Mean pairwise cosine of KEM's L effective retrieve queries (R W_qr) W_kr^T (what each slot
    compares the tokens with, see KEM.forward); near 1 means the slots all select the same tokens.
    None when the run has no KEM."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
    if "exchange.R" not in state:
        return None
    q = (state["exchange.R"] @ state["exchange.W_qr.weight"].T) @ state["exchange.W_kr.weight"]   # (L, D)
    q = torch.nn.functional.normalize(q, dim=-1)
    L = q.shape[0]
    return float(((q @ q.T).sum() - L) / (L * (L - 1)))


def mean_std(values):
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _pm(mean, std, digits):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --- 1. the ablation ------------------------------------------------------------------------

ABLATION = {  # name -> train.py flags (all tasks); the single-task baselines are added per task
    "none": ["--exchange", "none"],
    "cross": ["--exchange", "cross"],
    "kem": ["--exchange", "kem"],
    "kem+etf features": ["--exchange", "kem", "--etf", "features"],
    "kem+etf slots": ["--exchange", "kem", "--etf", "slots"],
    "kem+etf both": ["--exchange", "kem", "--etf", "both"],
}


def ablation(argv):
    p = argparse.ArgumentParser(prog="experiments.py ablation", description="Δm table on SyntheticRooms.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-iters", type=int, default=1000, help="steps per run (the default demo run uses 1,500)")
    p.add_argument("--runs", default="runs/ablation", help="where the train.py runs go")
    p.add_argument("--out", default=str(RESULTS / "ablation"), help="writes <out>.json and <out>.md")
    args = p.parse_args(argv)
    common = ["--max-iters", str(args.max_iters), "--eval-interval", str(args.max_iters), "--log-interval", "100"]
    log = lambda m: print(m, flush=True)  # noqa: E731

    runs = {}                                                   # (config, seed) -> results.json
    for seed in args.seeds:
        for task in SYNTHETIC_TASKS:
            log(f"single-task {task}, seed {seed}")
            runs[f"single-task {task}", seed] = train_run(f"{args.runs}/st-{task}/seed{seed}",
                                                          [*common, "--seed", str(seed), "--tasks", task], log)
        for name, flags in ABLATION.items():
            log(f"{name}, seed {seed}")
            runs[name, seed] = train_run(f"{args.runs}/{name.replace(' ', '-').replace('+', '-')}/seed{seed}",
                                         [*common, "--seed", str(seed), *flags], log)

    # Baselines: each task's single-task headline metrics, averaged over seeds.
    baselines = {t: {k: mean_std([runs[f"single-task {t}", s]["metrics"][t][k] for s in args.seeds])[0]
                     for k in (metrics.HEADLINE[t][0],)} for t in SYNTHETIC_TASKS}
    rows = []
    for name in [f"single-task {t}" for t in SYNTHETIC_TASKS] + list(ABLATION):
        res = [runs[name, s] for s in args.seeds]
        tasks = list(res[0]["metrics"])
        # Speed: the median over seeds, because a run that shared the 2 cores with other work slows
        # down many-fold (oversubscribed threads), and one such run would swamp a mean.
        row = {"config": name, "seeds": args.seeds, "parameters": res[0]["parameters"],
               "images_per_s": float(np.median([r["train_images_per_s"] for r in res])),
               "wall_time_s": float(np.median([r["wall_time_s"] for r in res])), "metrics": {}}
        cosines = [slot_query_cosine(Path(r["config"]["out_dir"]) / "ckpt.pt") for r in res]
        if cosines[0] is not None:
            row["slot_query_cosine"] = mean_std(cosines)
        for t in tasks:
            row["metrics"][t] = mean_std([r["metrics"][t][metrics.HEADLINE[t][0]] for r in res])
        if len(tasks) > 1:
            row["delta_m"] = mean_std([metrics.delta_m(r["metrics"], baselines) for r in res])
        rows.append(row)

    header = ("| configuration | " + " | ".join(f"{t} {UNITS[t]}" for t in SYNTHETIC_TASKS)
              + " | Δm % | slot query cosine | parameters | train img/s | wall s |")
    lines = [header, "|" + "---|" * (len(SYNTHETIC_TASKS) + 6)]
    for row in rows:
        cells = []
        for t in SYNTHETIC_TASKS:
            cells.append(_pm(*row["metrics"][t], 3) if t in row["metrics"] else "")
        dm = _pm(*row["delta_m"], 2) if "delta_m" in row else "(baseline)"
        cos = _pm(*row["slot_query_cosine"], 3) if "slot_query_cosine" in row else ""
        lines.append(f"| {row['config']} | " + " | ".join(cells) + f" | {dm} | {cos} | {row['parameters'] / 1e6:.2f} M | "
                     f"{row['images_per_s']:.1f} | {row['wall_time_s']:.0f} |")
    table = "\n".join(lines)
    meta = {"command": "python experiments.py ablation " + " ".join(argv), "max_iters": args.max_iters,
            "seeds": args.seeds, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({**meta, "baselines": baselines, "rows": rows}, indent=1))
    Path(f"{args.out}.md").write_text(
        f"Ablation on SyntheticRooms, {args.max_iters} steps of batch 8, seeds {args.seeds}: headline metric per "
        f"task and Δm (%, against the single-task rows) as mean ± std over seeds; slot query cosine = mean pairwise "
        f"cosine of KEM's effective retrieve queries (1 = all slots alike); images/s and wall time are medians over "
        f"seeds. Regenerate: `{meta['command'].strip()}`\n\n{table}\n")
    print(table)
    return rows


# --- 2a. the softmax leak -------------------------------------------------------------------

def softmax_leak(token_counts, *, relevant=16, gap=3.0, noise=1.0, k=None, trials=200, seed=0):
    """Attention mass that one query gives to irrelevant tokens, plain softmax vs top-k softmax.

    A query scores `relevant` tokens at gap + noise * z and every other token at noise * z (z standard
    normal, drawn from a seeded generator). For each token count N: the mean mass on the irrelevant
    tokens under softmax and under top-k softmax (k = `relevant` by default, the "mask" variant of
    kem_mtl.topk_softmax), and the bound of our reconstruction of the paper's argument with noiseless
    scores: |N| e^0 / (|S| e^gap + |N| e^0). Returns {"tokens", "bound", "softmax", "topk"} lists.
    """
    from kem_mtl import topk_softmax

    k = relevant if k is None else k
    g = torch.Generator().manual_seed(seed)
    out = {"tokens": [], "bound": [], "softmax": [], "topk": [], "relevant": relevant, "gap": gap,
           "noise": noise, "k": k, "trials": trials}
    for n in token_counts:
        scores = noise * torch.randn(trials, n, generator=g, dtype=torch.float64)
        scores[:, :relevant] += gap                                  # tokens 0..relevant-1 are the relevant ones
        irrelevant = n - relevant
        out["tokens"].append(n)
        out["bound"].append(irrelevant / (relevant * math.exp(gap) + irrelevant))
        out["softmax"].append(float(scores.softmax(-1)[:, relevant:].sum(-1).mean()))
        out["topk"].append(float(topk_softmax(scores, min(k, n))[:, relevant:].sum(-1).mean()))
    return out


def leak(argv):
    p = argparse.ArgumentParser(prog="experiments.py leak", description="Softmax vs top-k: mass on irrelevant tokens.")
    p.add_argument("--relevant", type=int, default=16, help="relevant tokens |S| (and k)")
    p.add_argument("--gap", type=float, default=3.0, help="how much higher relevant tokens score")
    p.add_argument("--noise", type=float, default=1.0, help="std of the score noise")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS / "leak"), help="writes <out>.json, .md and .png")
    args = p.parse_args(argv)
    counts = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    res = softmax_leak(counts, relevant=args.relevant, gap=args.gap, noise=args.noise, trials=args.trials)
    lines = ["| tokens N | bound (noiseless scores) | softmax | top-k softmax |", "|---:|---:|---:|---:|"]
    lines += [f"| {n:,} | {b:.3f} | {s:.3f} | {t:.3f} |"
              for n, b, s, t in zip(res["tokens"], res["bound"], res["softmax"], res["topk"])]
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1))
    Path(f"{args.out}.md").write_text(
        f"Attention mass on irrelevant tokens: {args.relevant} relevant tokens scoring {args.gap} higher, "
        f"score noise {args.noise}, k = {args.relevant}, mean of {args.trials} queries. "
        f"Regenerate: `python experiments.py leak`\n\n{table}\n")
    plot_leak(res, f"{args.out}.png")
    print(table)
    return res


def plot_leak(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(res["tokens"], res["bound"], "k--", label="bound, noiseless scores (our reconstruction)")
    ax.plot(res["tokens"], res["softmax"], "o-", label="softmax")
    ax.plot(res["tokens"], res["topk"], "s-", label=f"top-k softmax (k = {res['k']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("attention mass on irrelevant tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{res['relevant']} relevant tokens, score gap {res['gap']:g}, noise {res['noise']:g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- 2b. interference: distractor tokens ---------------------------------------------------

def add_distractors(exchange, ratio):
    """Make `exchange` (an nn.Module on (B, N, D) tokens) see round(ratio * N) extra random tokens.

    A forward pre-hook appends the distractors, drawn from the global torch RNG with the standard
    deviation of the real tokens, and a forward hook drops them from the output, so the network
    around the exchange is unchanged. The exchange modules are permutation-equivariant, so where the
    distractors go does not matter. With no exchange (nn.Identity) they cannot reach anything.
    """
    seen = {}

    def append(module, args):
        F_ = args[0]
        B, N, D = F_.shape
        seen["N"] = N
        M = round(ratio * N)
        if M == 0:
            return None
        noise = torch.randn(B, M, D, device=F_.device, dtype=F_.dtype) * F_.detach().std()
        return (torch.cat([F_, noise], dim=1), *args[1:])

    def drop(module, args, out):
        return out[:, :seen["N"]]

    exchange.register_forward_pre_hook(append)
    exchange.register_forward_hook(drop)


def _distract(argv):
    """`experiments.py _distract RATIO -- <train.py flags>`: train.py with distractor tokens."""
    import train
    from kem_mtl import MultiTaskNet

    ratio, rest = float(argv[0]), argv[argv.index("--") + 1:]

    class Distracted(MultiTaskNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_distractors(self.exchange, ratio)

    train.MultiTaskNet = Distracted
    return train.cli(rest)


def _run_distracted(ratio, out_dir, flags, log):
    """Like train_run, through _distract; for --eval-only the result is <out_dir>/eval_ckpt.json."""
    return run_once([str(ROOT / "experiments.py"), "_distract", str(ratio), "--"], out_dir, flags, log)


def noise(argv):
    p = argparse.ArgumentParser(prog="experiments.py noise",
                                description="Random distractor tokens in the exchange: how much do the real tasks lose?")
    p.add_argument("--ablation-runs", default="runs/ablation", help="trained models from `experiments.py ablation`")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4],
                   help="distractor tokens per real token, at test time")
    p.add_argument("--train-ratio", type=float, default=1.0, help="distractors per real token when training with them")
    p.add_argument("--train-seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the runs trained with distractors")
    p.add_argument("--max-iters", type=int, default=1000, help="as in the ablation")
    p.add_argument("--runs", default="runs/noise")
    p.add_argument("--out", default=str(RESULTS / "noise"), help="writes <out>.json, .md and .png")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    modes = {"none": "none", "cross": "cross", "kem": "kem"}   # ablation run folder per exchange

    # (i) Models trained clean, evaluated with distractors: Δm against their own clean evaluation.
    test_time = {}
    for mode, folder in modes.items():
        for seed in args.seeds:
            run_dir = Path(args.ablation_runs) / folder / f"seed{seed}"
            clean = json.loads((run_dir / "results.json").read_text())["metrics"]
            for r in args.ratios:
                log(f"{mode}, seed {seed}, {r:g} distractors per token at test time")
                noisy = _run_distracted(r, f"{args.runs}/test-time/{mode}-r{r:g}/seed{seed}",
                                        ["--eval-only", "--ckpt", str(run_dir / "ckpt.pt")], log)["metrics"]
                test_time.setdefault(mode, {}).setdefault(r, []).append(metrics.delta_m(noisy, clean))

    # (ii) Models trained and evaluated with distractors: Δm against the single-task baselines, next
    # to the same configuration trained clean (the ablation's rows).
    ablation_results = json.loads((RESULTS / "ablation.json").read_text())
    ablation_rows = {row["config"]: row for row in ablation_results["rows"]}
    baselines = ablation_results["baselines"]
    trained = {}
    common = ["--max-iters", str(args.max_iters), "--eval-interval", str(args.max_iters), "--log-interval", "100"]
    for mode in modes:
        for seed in args.train_seeds:
            log(f"{mode}, seed {seed}, trained with {args.train_ratio:g} distractors per token")
            res = _run_distracted(args.train_ratio, f"{args.runs}/trained-r{args.train_ratio:g}/{mode}/seed{seed}",
                                  [*common, "--seed", str(seed), "--exchange", mode], log)
            trained.setdefault(mode, []).append(metrics.delta_m(res["metrics"], baselines))

    lines = ["| exchange | " + " | ".join(f"{r:g} per token" for r in args.ratios)
             + f" | Δm vs single-task, trained clean | Δm vs single-task, trained with {args.train_ratio:g} per token |",
             "|---|" + "---:|" * (len(args.ratios) + 2)]
    for mode in modes:
        cells = [_pm(*mean_std(test_time[mode][r]), 2) for r in args.ratios]
        cells.append(_pm(*ablation_rows[mode]["delta_m"], 2))
        cells.append(_pm(*mean_std(trained[mode]), 2) if trained.get(mode) else "")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = {"command": "python experiments.py noise " + " ".join(argv), "ratios": args.ratios,
           "test_time_delta_m": {m: {str(r): v for r, v in d.items()} for m, d in test_time.items()},
           "train_ratio": args.train_ratio, "train_seeds": args.train_seeds, "trained_delta_m": trained}
    RESULTS.mkdir(exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))
    Path(f"{args.out}.md").write_text(
        f"Distractor tokens (random, with the real tokens' spread) appended to the exchange's input. Columns "
        f"'per token': models trained clean, Δm (%) of their evaluation with that many distractors per real token "
        f"against their own clean evaluation (0 = unaffected), mean ± std over seeds {args.seeds}. Last columns: "
        f"Δm against the single-task baselines, trained clean (ablation) and trained with distractors "
        f"(seeds {args.train_seeds}). Regenerate: `{out['command'].strip()}`\n\n{table}\n")
    plot_noise(test_time, args.ratios, f"{args.out}.png")
    print(table)
    return out


def plot_noise(test_time, ratios, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode, marker in (("none", "k^--"), ("cross", "o-"), ("kem", "s-")):
        stats = [mean_std(test_time[mode][r]) for r in ratios]
        ax.errorbar([0] + list(ratios), [0] + [m for m, _ in stats], yerr=[0] + [s for _, s in stats],
                    fmt=marker, capsize=3, label=mode)
    ax.set_xlabel("distractor tokens per real token (test time)")
    ax.set_ylabel("Δm vs clean evaluation, %")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EXPERIMENTS = {"ablation": ablation, "leak": leak, "noise": noise, "_distract": _distract}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in EXPERIMENTS:
        print(__doc__)
        return 2
    if argv[0] == "_distract":                   # a train.py process with distractors: its exit code
        return _distract(argv[1:])
    EXPERIMENTS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
