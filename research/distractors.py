"""Distractor tokens: does KEM's top-k keep out tokens that carry nothing useful, where softmax lets them in?

    python -m research distractors               # after the ablation (it evaluates its checkpoints)

What the paper claims [paper]: softmax leaks attention onto irrelevant tokens, more as the tokens
grow; top-k selection stops it (the simulation in leak.py shows the mechanism on one query).

How it is tested here [ours]: tokens that carry nothing useful are appended to the exchange's input,
with k held at the count resolved from the real tokens (so a fractional k does not grow with them):
- kind "other": the task tokens of another image of the batch (real features, irrelevant content);
  kind "gaussian": noise with the real tokens' spread, the easy-to-spot kind, for comparison.
- Test time: the ablation's clean-trained none / cross / kem models evaluated with 0.5, 1, 2, 4
  distractors per real token; Δm against the same checkpoint's clean evaluation (0 = unaffected),
  and the exchanges compared paired by seed.
- Trained with distractors: none / cross / kem trained with one distractor per real token; Δm
  against the single-task baselines, paired with the clean-trained run of the same seed.
- A linear probe's AUC (real vs distractor token at the exchange's input, held-out val images) says
  how easy the distractors are to tell apart: "token" sees a token alone, "context" also its product
  with the image's mean real token (a similarity an attention layer can compute).

Writes research/results/distractors.json/.md/.png from the distractor and ablation records alone (`report`).

Letters: B batch, N real tokens (all tasks), M distractor tokens, D width.

Notes:
- Distractors are appended by forward hooks on the exchange module (`Distractors`), in train.py
  processes started through the hidden command `python -m research _distract`, whose model hook
  (train.Hooks) attaches them to the built network. "none" trained with distractors is the hooks' control: nothing can reach the
  tokens, so it must match its clean run (up to thread nondeterminism).
- The probes run in this process, once per model and kind (cached), after the run is recorded.
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
import train
from kem_mtl import resolve_topk
from research import ablation, runner
from research import stats
from research.stats import ci, paired, t_interval

KINDS = ("other", "gaussian")       # distractor kinds, see Distractors


# --- the hooks: distractor tokens at the exchange's input -----------------------------------------

class Distractors:
    """Forward hooks that append M = round(ratio N) distractor tokens to an exchange's (B, N, D) input
    and drop them from its output, so the network around the exchange is unchanged.

    kind="other": tokens of other images of the batch (image b takes images b-1, b-2, ... mod B, never
    itself; M tokens drawn without replacement from their N each): real features, irrelevant content.
    A batch of one image takes the tokens of the previous batch's last image (the first such batch
    gets none). kind="gaussian": N(0, std of the real tokens), the easy-to-spot kind, for comparison.
    fix_k: while distractors are present, the exchange's `topk` is the count resolved from the N real
    tokens, restored after the call, so a fractional k does not grow with the distractors.
    Distractors are detached (inputs, not paths for gradients) and drawn from the hooks' own seeded
    generator, so the training RNG stream is untouched. capture=True keeps the last input and its
    distractor mask in `captured` (for the probe). The exchange modules are permutation-equivariant,
    so where the distractors go does not matter. Notes: if the exchange raises mid-call, `topk`
    stays at the fixed count (the same k for that N).
    """

    def __init__(self, exchange, ratio, kind="other", *, fix_k=True, seed=0, capture=False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not ratio >= 0:
            raise ValueError(f"ratio must be >= 0 distractors per real token, got {ratio!r}")
        self.ratio, self.kind, self.fix_k, self.capture = ratio, kind, fix_k, capture
        self.generator = torch.Generator().manual_seed(seed)
        self.previous = None                     # (1, N, D): the last image's tokens, for a batch of one
        self.captured = None                     # (tokens (B, N + M, D), is_distractor (N + M,))
        self._N, self._saved_topk = None, None
        self.handles = [exchange.register_forward_pre_hook(self._append), exchange.register_forward_hook(self._drop)]

    def remove(self):
        for h in self.handles:
            h.remove()

    def make(self, F_, M):
        """(B, M, D) distractors for the real tokens F_ (B, N, D), or None when there is nothing to draw from."""
        B, N, D = F_.shape
        if self.kind == "gaussian":
            return torch.randn(B, M, D, generator=self.generator).to(F_) * F_.detach().std()
        if B > 1:
            copies = math.ceil(M / N)
            shifts = [1 + j % (B - 1) for j in range(copies)]                   # never 0: never the image itself
            pool = torch.cat([F_.detach().roll(s, dims=0) for s in shifts], dim=1)   # (B, copies N, D)
        elif self.previous is not None and self.previous.shape[-1] == D:
            pool = self.previous.to(F_)                                         # (1, N', D)
        else:
            return None
        P = pool.shape[1]
        index = (torch.randperm(P, generator=self.generator)[:M] if M <= P
                 else torch.randint(P, (M,), generator=self.generator))
        return pool[:, index.to(F_.device)]                                    # (B, M, D)

    def _append(self, module, args):
        F_ = args[0]
        B, N, D = F_.shape
        self._N = N
        M = round(self.ratio * N)
        extra = self.make(F_, M) if M > 0 else None
        self.previous = F_.detach()[-1:].clone()
        if extra is None:
            if self.capture:
                self.captured = (F_.detach(), torch.zeros(N, dtype=torch.bool))
            return None
        if self.fix_k and hasattr(module, "topk"):
            self._saved_topk = module.topk
            module.topk = resolve_topk(module.topk, N)
        X = torch.cat([F_, extra], dim=1)                                      # (B, N + M, D)
        if self.capture:
            self.captured = (X.detach(), torch.arange(N + extra.shape[1]) >= N)
        return (X, *args[1:])

    def _drop(self, module, args, out):
        if self._saved_topk is not None:
            module.topk, self._saved_topk = self._saved_topk, None
        if isinstance(out, tuple):                                             # (out, attention) when asked
            return (out[0][:, :self._N], *out[1:])
        return out[:, :self._N]


# --- the hidden command: a train.py process whose model carries the hooks -------------------------

def train_with_distractors(argv):
    """`python -m research _distract --kind K --ratio R -- <train.py flags>`: train.py with distractor tokens."""
    own, rest = runner.split_extra(argv)
    p = argparse.ArgumentParser(prog="python -m research _distract")
    p.add_argument("--kind", choices=KINDS, default="other")
    p.add_argument("--ratio", type=float, required=True, help="distractor tokens per real token")
    args = p.parse_args(own)

    return train.cli(rest, train.Hooks(model=WithDistractors(args.ratio, args.kind)))


@dataclasses.dataclass
class WithDistractors:
    """train.Hooks.model: Distractors on the built network's exchange (they live on in its hooks)."""
    ratio: float
    kind: str

    def __call__(self, model, cfg):
        Distractors(model.exchange, self.ratio, self.kind)
        return model


# --- the probe: can a linear model tell distractors from real tokens? -----------------------------

def auc(scores, labels):
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = labels.sum(), (~labels).sum()
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def linear_probe_auc(X, y, train_mask, weight_decay=1e-3, steps=100):
    """Logistic regression (torch, L-BFGS, L2 penalty) fitted on X[train_mask]; AUC on the rest."""
    X, y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    train_mask = torch.as_tensor(train_mask, dtype=torch.bool)
    mu, sd = X[train_mask].mean(0), X[train_mask].std(0).clamp(min=1e-8)
    Z = (X - mu) / sd
    w = torch.zeros(Z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = Z[train_mask] @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train_mask]) + weight_decay * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        scores = Z[~train_mask] @ w[:-1] + w[-1]
    return auc(scores.numpy(), y[~train_mask].numpy().astype(bool))


@torch.no_grad()
def distractor_probe(ckpt_path, kind, per_image=32, max_images=None, seed=0):
    """How separable distractors of `kind` are from the real tokens at the exchange's input of a trained model.

    One distractor per real token; per val image, `per_image` real and `per_image` distractor tokens.
    Two linear probes, fitted on the first half of the images and scored (AUC) on the second half:
    "token" sees the token alone (the plain probe); "context" also sees x * m, m = the mean of that
    image's real tokens (a similarity to the image, a statistic an attention layer can compute).
    """
    model, cfg = runner.load_trained(ckpt_path)
    hooks = Distractors(model.exchange, 1.0, kind, seed=seed, capture=True)
    g = torch.Generator().manual_seed(seed)
    feats, ctx, labels, image = [], [], [], []
    count = 0
    try:
        for images in runner.val_images(cfg, max_images):
            hooks.captured = None
            model(images)
            if hooks.captured is None or not hooks.captured[1].any():
                continue
            X, is_d = hooks.captured                                   # (B, N + M, D), (N + M,)
            real, dis = is_d.logical_not().nonzero()[:, 0], is_d.nonzero()[:, 0]
            for b in range(X.shape[0]):
                m = X[b, real].mean(0)                                 # (D,) the image's mean real token
                pick = torch.cat([real[torch.randperm(len(real), generator=g)[:per_image]],
                                  dis[torch.randperm(len(dis), generator=g)[:per_image]]])
                x = X[b, pick]                                         # (2 per_image, D)
                feats.append(x), ctx.append(x * m), labels.append(is_d[pick]), image.append(torch.full((len(pick),), count))
                count += 1
    finally:
        hooks.remove()
    X, C, y, img = torch.cat(feats), torch.cat(ctx), torch.cat(labels), torch.cat(image)
    train_mask = img < count // 2
    return {"kind": kind, "images": count, "tokens_per_image": 2 * per_image,
            "auc_token": linear_probe_auc(X, y, train_mask),
            "auc_context": linear_probe_auc(torch.cat([X, C], 1), y, train_mask)}


_PROBES, _PROBE_LOCK = {}, threading.Lock()


def probe_after(kind):
    """after-hook of a distractor run: the probe on the model it evaluated (or trained), cached per model."""
    def after(run, run_dir, ctx):
        ckpt = (run.source.run_dir(ctx.runs) if run.source is not None else run_dir) / "ckpt.pt"
        key = (str(ckpt), kind)
        with _PROBE_LOCK:
            if key not in _PROBES:
                _PROBES[key] = distractor_probe(ckpt, kind)
        return {"distractors": {"kind": kind, "ratio": _ratio(run), "fixed_k": True}, "probe": _PROBES[key]}
    return after


def _ratio(run):
    """The distractors per real token of a run started through `_distract`."""
    return float(run.script[run.script.index("--ratio") + 1])


def distract_script(kind, ratio):
    """The script part of a run with distractors: `python -m research _distract ... --` before the train.py flags."""
    return ("research", "_distract", "--kind", kind, "--ratio", f"{ratio:g}", "--")


# --- the experiment: options and plan -------------------------------------------------------------

def main(argv):
    """`python -m research distractors [options] [-- train.py flags]`."""
    p = runner.parser("distractors", "Distractor tokens in the exchange (k fixed from the real tokens): "
                                     "trained models evaluated with them, and models trained with them.")
    p.add_argument("--exchanges", nargs="+", default=["none", "cross", "kem"], choices=["none", "cross", "kem"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4],
                   help="distractor tokens per real token, at test time")
    p.add_argument("--train-ratio", type=float, default=1.0, help="distractors per real token when training with them")
    p.add_argument("--train-kind", choices=KINDS, default="other")
    p.add_argument("--train-seeds", type=int, nargs="*", help="seeds trained with distractors (default: --seeds)")
    return runner.run(p, argv, plan, lambda args, command: report(args.results, args.tasks, command))


def plan(args, extra, ctx):
    """Two phases: the clean checkpoints that are missing (trained again if runs/ is gone), then the
    evaluations with distractors and the runs trained with them."""
    train_seeds = args.seeds if args.train_seeds is None else args.train_seeds
    rows = ablation.row_flags(args.tasks)
    # The clean-trained models are the ablation's own runs (same flags, same folders, same records).
    sources = {(ex, s): dataclasses.replace(ablation.training_run(ex, rows[ex], s, args.max_iters, args.eval_interval,
                                                                  extra), needs_checkpoint=True)
               for ex in args.exchanges for s in args.seeds}
    evals = [runner.Run("distractors", f"test-time {ex} {kind} x{r:g}", s, ["--eval-only", "--procs", "1"],
                        prefix=distract_script(kind, r), source=sources[ex, s], after=probe_after(kind), group="eval")
             for s in args.seeds for ex in args.exchanges for kind in args.kinds for r in args.ratios]
    trained = [runner.Run("distractors", f"trained {ex} {args.train_kind} x{args.train_ratio:g}", s,
                          runner.train_flags(rows[ex], s, args.max_iters, args.eval_interval, extra),
                          prefix=distract_script(args.train_kind, args.train_ratio),
                          after=probe_after(args.train_kind), group=ex, steps=args.max_iters)
               for s in train_seeds for ex in args.exchanges]
    needed = list({id(e.source): e.source for e in evals if not runner.is_done(e, ctx)}.values())
    return [needed, [*evals, *trained]]


# --- the report: test time, paired exchanges, trained with distractors ----------------------------

def report(results, tasks, command="python -m research distractors"):
    """research/results/distractors.json/.md/.png from the distractor and ablation records alone."""
    results = Path(results)
    recs = runner.load_records(results, "distractors")
    ablation_recs = runner.load_records(results, "ablation")
    if not recs:
        raise SystemExit(f"no distractor records under {results / 'runs' / 'distractors'}; run `{command}` first")
    baselines = ablation.baseline_metrics(ablation_recs, tasks)
    clean_dm = ablation.delta_m_by_seed(ablation_recs, baselines)      # common scale, for the paired differences
    clean_own = ablation.delta_m_own_seed(ablation_recs, tasks)        # own seed's baselines, for a row's interval

    # (i) test time: Δm of the noisy evaluation against the same checkpoint's clean one, per seed
    test = {}                                                  # (exchange, kind, ratio) -> {seed: Δm}
    probes = {}                                                # (exchange, kind) -> [probe per seed]
    trained = {}                                               # exchange -> {seed: Δm vs single-task}
    trained_own = {}                                           # the same against the seed's own single-task runs
    trained_probe = {}
    for (config, seed), rec in recs.items():
        if config.startswith("test-time "):
            src = rec["source"]
            clean = ablation_recs.get((src["config"], src["seed"]))
            if clean is None:
                continue
            ex, kind, ratio = src["config"], rec["distractors"]["kind"], rec["distractors"]["ratio"]
            test.setdefault((ex, kind, ratio), {})[seed] = metrics.delta_m(rec["metrics"], clean["metrics"])
            probes.setdefault((ex, kind), {})[seed] = rec["probe"]      # one probe per model and kind
        elif config.startswith("trained ") and all(t in baselines for t in rec["metrics"]):
            ex = config.split()[1]
            trained.setdefault(ex, {})[seed] = metrics.delta_m(rec["metrics"], baselines)
            own = {t: ablation_recs[f"single-task {t}", seed]["metrics"][t] for t in rec["metrics"]
                   if (f"single-task {t}", seed) in ablation_recs}
            if len(own) == len(rec["metrics"]):
                trained_own.setdefault(ex, {})[seed] = metrics.delta_m(rec["metrics"], own)
            trained_probe.setdefault(ex, {})[seed] = rec["probe"]
    exchanges = [e for e in ("none", "cross", "kem") if any(k[0] == e for k in test) or e in trained]
    kinds = [k for k in KINDS if any(key[1] == k for key in test)]
    ratios = sorted({key[2] for key in test})

    def probe_cell(ps):
        if not ps:
            return "—"
        tok = np.mean([p["auc_token"] for p in ps.values()])
        ctx_ = np.mean([p["auc_context"] for p in ps.values()])
        return f"{tok:.3f} / {ctx_:.3f}"

    test_rows, lines = [], ["| exchange | distractors | " + " | ".join(f"{r:g} per token" for r in ratios)
                            + " | probe AUC token / context |", "|---|---|" + "---|" * (len(ratios) + 1)]
    for ex in exchanges:
        for kind in kinds:
            cells = {r: t_interval(list(test.get((ex, kind, r), {}).values())) for r in ratios}
            test_rows.append({"exchange": ex, "kind": kind, "delta_m": {str(r): {**c, "by_seed": test.get((ex, kind, r), {})}
                                                                         for r, c in cells.items()},
                              "probe": probes.get((ex, kind), {})})
            lines.append(f"| {ex} | {kind} | " + " | ".join(ci(cells[r]) for r in ratios)
                         + f" | {probe_cell(probes.get((ex, kind)))} |")
    # One family: the exchanges compared at test time, each exchange trained with against without distractors
    # (none is the hooks' control, shown but not tested), and the difference of two exchanges' gains.
    pairs = [{"a": a, "b": b, "kind": kind, "ratio": r, "label": f"test time, {kind} x{r:g}: {a} − {b}",
              **paired(test[a, kind, r], test[b, kind, r])}
             for a, b in (("kem", "cross"), ("kem", "none"), ("cross", "none")) for kind in kinds for r in ratios
             if (a, kind, r) in test and (b, kind, r) in test]
    train_rows = []
    for ex in exchanges:
        if ex in trained:
            c = paired(trained[ex], clean_dm.get(ex, {}))
            c["label"] = f"trained with distractors − clean: {ex}"
            train_rows.append({"exchange": ex, "clean": clean_dm.get(ex, {}), "with_distractors": trained[ex],
                               "clean_own_seed": clean_own.get(ex, {}), "with_distractors_own_seed": trained_own.get(ex, {}),
                               "paired": c, "probe": trained_probe.get(ex, {})})
    gains = {r["exchange"]: dict(zip(r["paired"]["seeds"], r["paired"]["differences"])) for r in train_rows}
    gain_pairs = [{"a": a, "b": b, "label": f"gain from training with distractors: {a}'s − {b}'s", **paired(gains[a], gains[b])}
                  for a, b in (("cross", "kem"),) if a in gains and b in gains]
    members = pairs + [r["paired"] for r in train_rows if r["exchange"] != "none"] + gain_pairs
    stats.family("distractors", members)
    for r in train_rows:
        if r["exchange"] == "none":
            r["paired"].update(family="distractors", p=None, p_holm=None, verdict="control (not tested)",
                               signs=stats.seed_signs(r["paired"]["differences"]))
    pair_lines = [stats.COLUMNS, stats.RULE] + [stats.row(c, c["label"]) for c in pairs]
    train_lines = ["| exchange | Δm trained clean | Δm trained with distractors | probe AUC token / context |",
                   "|---|---|---|---|"]
    for r in train_rows:
        train_lines.append(f"| {r['exchange']} | {ci(t_interval(list(r['clean_own_seed'].values())))} | "
                           f"{ci(t_interval(list(r['with_distractors_own_seed'].values())))} | "
                           f"{probe_cell(trained_probe.get(r['exchange']))} |")
    train_lines += ["", stats.COLUMNS, stats.RULE] + [stats.row(r["paired"], r["paired"]["label"]) for r in train_rows] \
        + [stats.row(c, c["label"]) for c in gain_pairs]
    train_name = next((c for c, _ in recs if c.startswith("trained ")), "trained")
    out = {"command": command, "test_time": test_rows, "paired": pairs, "trained": train_rows, "gains": gain_pairs,
           "trained_config": train_name}
    (results / "distractors.json").write_text(json.dumps(out, indent=1, default=str))
    (results / "distractors.md").write_text(
        "Distractor tokens appended to the exchange's input, k held at the count resolved from the real tokens. "
        "'other' = task tokens of another image of the batch (real features, irrelevant content); 'gaussian' = "
        "noise with the real tokens' spread. Test time: the ablation's clean-trained models evaluated with that "
        "many distractors per real token, Δm (%) against their own clean evaluation (0 = unaffected), mean and "
        "95% t-interval over seeds. Probe AUC: linear probes telling real from distractor tokens at the "
        "exchange's input on held-out val images (0.5 = cannot tell; 'token' sees a token alone, 'context' also "
        "its product with the image's mean real token). Every run uses data seed 0 (the same scenes): the intervals "
        f"cover training seeds only. Regenerate: `{command}`\n\n" + "\n".join(lines)
        + ("\n\nPaired by seed (test time; none is unaffected, so kem − none and cross − none are kem's and "
           "cross's cells above):\n\n" + "\n".join(pair_lines) if pairs else "")
        + f"\n\nTrained with distractors ({train_name}): Δm of the rows (mean and 95% t-interval over seeds, each "
          f"seed against its own seed's single-task runs), then, paired by seed on the common scale (the mean "
          f"single-task runs), with − clean per exchange (none: the hooks' control), and the difference of two "
          f"exchanges' gains:\n\n" + "\n".join(train_lines) + "\n\n" + stats.family_note("distractors", members)
        + "\n")
    if test:
        plot_distractors(test, exchanges, kinds, ratios, results / "distractors.png")
    print("\n".join(lines) + "\n\n" + "\n".join(pair_lines) + "\n\n" + "\n".join(train_lines))
    return out


def plot_distractors(test, exchanges, kinds, ratios, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(4.4 * len(kinds), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for i, ex in enumerate(exchanges):
            stats = [t_interval(list(test.get((ex, kind, r), {}).values())) for r in ratios]
            xs = [r for r, s in zip(ratios, stats) if s["mean"] is not None]
            ys = [s["mean"] for s in stats if s["mean"] is not None]
            err = [[s["mean"] - s["ci95"][0] if s["ci95"] else 0 for s in stats if s["mean"] is not None],
                   [s["ci95"][1] - s["mean"] if s["ci95"] else 0 for s in stats if s["mean"] is not None]]
            ax.errorbar([0] + xs, [0] + ys, yerr=[[0] + err[0], [0] + err[1]], fmt="o-", capsize=3, color=f"C{i}", label=ex)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{kind} distractors (k fixed from the real tokens)", fontsize=9)
        ax.set_xlabel("distractor tokens per real token (test time)")
    axes[0][0].set_ylabel("Δm vs clean evaluation, % (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


