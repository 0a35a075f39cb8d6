"""The paper's claims, tested on a 2-core CPU: runs that leave committed records, tables built from them.

    python experiments.py ablation              # single-task baselines + 11 multi-task rows x 5 seeds -> Δm,
                                                # paired comparisons, learning curve, slot selection
    python experiments.py leak                  # the softmax leak at the model's own k values (a simulation)
    python experiments.py distractors           # distractor tokens, k fixed from the real tokens, probe AUC
    python experiments.py length                # kem and none trained 2x and 4x longer, 5 seeds: do the metrics
                                                # level off, does kem − none move with the length?
    python experiments.py <name> --dry-run      # the plan: runs, how many are recorded, rough time
    python experiments.py <name> --tables-only  # rebuild the tables from the records alone
    python experiments.py <name> --help         # the knobs of each

How long, on 2 cores with --jobs 2 (two one-thread runs side by side): a kem run of 1,500 steps took
296-420 s on the project's 2-core machine (its speed drifts), and the ablation's 85 runs took 11.6
run-hours, about 6 h of the machine; the distractors take about 1.5-2 h after it, length 5.4
run-hours (about 2.8 h; 20 runs of 10-21 min), leak about a minute. --dry-run re-estimates from the
records' own wall times (records marked with a "note" shared the machine with other work).

Records [OURS]. Every finished run leaves one small JSON file, results/runs/<experiment>/<config>/
seed<k>.json: its flags, every task's full metric dict, speed, wall time, the eval history (for
learning curves) and, for KEM runs, the selection diagnostics. Checkpoints stay under runs/ (not
committed). A run whose record exists is never run again, so a later session on a fresh machine
continues where the last one stopped; with --commit each record is committed as it lands (only that
file). Every table is computed from the records alone: Δm against the mean of the single-task runs,
and paired comparisons (per-seed differences, their mean, a 95% t-interval). A difference is called
"real" only when its interval excludes zero.

What the paper claims [PAPER] and how it is tested here [OURS]:
1. KEM beats cross-attention and no exchange (Δm against single-task baselines), and sKEM (the ETF
   variant) helps further. `ablation`: the single-task baselines are the same network for one task
   with no exchange (REFERENCE §5); multi-task rows none / cross / kem / kem post (SGW's top-k after
   softmax) / the k sweep k = N/64, N/16, N (k = N is "slots without selection", the control that
   separates the top-k from the slots; k = N/4 is the kem row) / sKEM features, slots, both / and
   "normalise only" (tokens L2-normalised, no ETF frame: the control for "features").
2. Softmax leaks mass onto irrelevant tokens, more as the tokens grow; top-k selection stops it.
   `leak` simulates one query at the k values the model uses, beside the slots' coverage L k / N
   (how many times over the L slots together can take in every token). `distractors` adds tokens
   that carry nothing useful to the exchange's input, with k held at the real tokens' k: the task
   tokens of another image of the batch (real features, irrelevant content) and, for comparison,
   Gaussian noise; a linear probe's AUC (real vs distractor) says how easy they are to tell apart.
3. sKEM stabilises the slots' selection. `ablation` measures which tokens the slots select on the
   val set (mean pairwise Jaccard overlap of their top-k sets; each slot's share of tokens per task).
4. KEM's cost is linear in the tokens, cross-attention's quadratic: bench.py, not here.
Run length [OURS]: the ablation's runs are the default run's 1,500 steps, where the val metrics are
still rising. `length` trains kem and none for 3,000 and 6,000 steps (the ablation's five seeds, each
run with its own schedule) to show whether they level off and whether the kem − none difference,
paired by seed, moves with the length.

Letters: B batch, T tasks, N tokens (all tasks), M distractor tokens, L slots, D width, k selected.

Notes:
- The child train.py processes run with --procs 1 and OMP_NUM_THREADS=1; --jobs of them run side
  by side. Selection diagnostics and probes run in this process, one thread each.
- Distractors are appended by forward hooks on the exchange module (`Distractors`), in train.py
  processes started through the hidden command `_distract`, which patches train.MultiTaskNet.
  "none" trained with distractors is the hooks' control: nothing can reach the tokens, so it must
  match its clean run (up to thread nondeterminism).
- Pairing by seed: two rows with the same seed see the same data order and val set; their initial
  weights differ wherever the networks differ. The t-interval treats the seeds as independent pairs.
- .gitignore's `runs/` also matches results/runs/, so --commit adds records with `git add --force`.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import metrics
import synthetic
import train
import train_support
from kem_mtl import resolve_topk, topk_softmax

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"          # tables here, records under RESULTS / "runs"
RUNS = ROOT / "runs"                # train.py run folders (checkpoints), not committed
SYNTHETIC_TASKS = tuple(synthetic.TASKS)
SEEDS = [0, 1, 2, 3, 4]
EVAL_INTERVAL = 250                 # evaluations per run give the learning curve
KINDS = ("other", "gaussian")       # distractor kinds, see Distractors

# Prior seconds per training step of one run on one thread beside another, for the --dry-run estimate
# until records exist: kem measured (296 s / 1,500 steps on the 2-core machine, nothing else running);
# the others scaled from bench.py step's one-process ratios (none ~ kem, cross ~1.9x, one task ~0.5x).
# Replaced by the records' own wall times as soon as there are some.
PRIOR_S_PER_STEP = {"single-task": 0.10, "none": 0.19, "cross": 0.37, "kem": 0.20}
PRIOR_EVAL_S = 40                   # one --eval-only run on the 200 val images (a guess)


def label(task):
    """Column label of a task's headline metric, e.g. "depth rmse"."""
    return f"{task} {metrics.HEADLINE[task][0]}"


def headline(task, task_metrics):
    """The task's headline value; intermediate evaluations only have edges' approximate key."""
    key = metrics.HEADLINE[task][0]
    return task_metrics.get(key, task_metrics.get(f"{key}_approx"))


# --- statistics ------------------------------------------------------------------------------

def t_interval(values, level=0.95):
    """Mean and the two-sided t-interval of the mean: mean ± t_{(1+level)/2, n-1} s / sqrt(n).

    Returns {"n", "mean", "ci95": [lo, hi] (None for n < 2), "real": the interval excludes 0}.
    """
    from scipy import stats

    x = np.asarray(values, float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "real": False}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "ci95": None, "real": False}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "ci95": [lo, hi], "real": bool(lo > 0 or hi < 0)}


def paired(a, b):
    """Paired comparison of {seed: value} dicts a and b over their common seeds: a - b per seed."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "differences": diffs, **t_interval(diffs)}


def _ci(stat, digits=2, sign="+"):
    """ "mean [lo, hi]" of a t_interval result; sign="" for quantities that are not differences."""
    if stat["mean"] is None:
        return "—"
    f = f"{sign}.{digits}f"
    if stat["ci95"] is None:
        return f"{stat['mean']:{f}} (1 seed)"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{f}} [{lo:{f}}, {hi:{f}}]"


def _verdict(stat):
    return "real" if stat["real"] else "not resolved"


# --- records: one small JSON per finished run ------------------------------------------------

def slug(name):
    """A configuration's folder name: "kem k=N/64" -> "kem-k-n-64"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclasses.dataclass(eq=False)
class Run:
    """One train.py process (or an --eval-only one) and where its folder and record go."""
    experiment: str               # folder under <results>/runs and <runs>
    config: str                   # the row's name
    seed: int
    flags: list                   # train.py flags without paths; compared with an existing record's
    prefix: tuple = ("train.py",)  # the script (and its own arguments) that takes the flags
    source: "Run" = None          # --eval-only runs: the run whose checkpoint they evaluate
    after: object = None          # (run, run_dir, ctx) -> extra record fields (selection, probe)
    needs_checkpoint: bool = False  # a source: done when its folder holds the checkpoint, not when recorded
    group: str = "kem"            # for the time estimate: a PRIOR_S_PER_STEP key or "eval"
    steps: int = 0                # training steps (for the time estimate)

    def run_dir(self, runs):
        return Path(runs) / self.experiment / slug(self.config) / f"seed{self.seed}"

    def record_path(self, results):
        return Path(results) / "runs" / self.experiment / slug(self.config) / f"seed{self.seed}.json"

    @property
    def script(self):
        return list(self.prefix)


def load_records(results, experiment):
    """{(config, seed): record} of every record under <results>/runs/<experiment>."""
    out = {}
    for path in sorted((Path(results) / "runs" / experiment).glob("*/seed*.json")):
        rec = json.loads(path.read_text())
        out[rec["config"], rec["seed"]] = rec
    return out


def eval_history(metrics_jsonl):
    """[{"iter", "exact_edges", "headline": {task: value}}] from a train.py metrics.jsonl."""
    history = []
    if not Path(metrics_jsonl).exists():
        return history
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            history.append({"iter": rec["iter"], "exact_edges": rec.get("exact_edges"),
                            "headline": {t: headline(t, m) for t, m in rec["metrics"].items()}})
    return history


_CODE = {}


def code_version():
    """The commit the runs were made from, and which tracked Python files differed from it."""
    if not _CODE:
        def git(*args):
            proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
            return proc.stdout if proc.returncode == 0 else ""
        status = git("status", "--porcelain", "--untracked-files=no")      # lines "XY path"
        _CODE.update(commit=git("rev-parse", "HEAD").strip() or None,
                     modified=sorted(line[3:] for line in status.splitlines() if line.endswith(".py")))
    return dict(_CODE)


def make_record(run, run_dir, result, seconds):
    rec = {"experiment": run.experiment, "config": run.config, "seed": run.seed,
           "script": run.script, "flags": run.flags,
           "metrics": result["metrics"], "iteration": result.get("iteration", result.get("iter")),
           "parameters": result.get("parameters"), "train_images_per_s": result.get("train_images_per_s"),
           "wall_time_s": result.get("wall_time_s", result.get("seconds")), "runner_wall_s": seconds,
           "history": eval_history(run_dir / "metrics.jsonl"), "train_config": result.get("config"),
           "code": code_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    if run.source is not None:
        rec["source"] = {"experiment": run.source.experiment, "config": run.source.config, "seed": run.source.seed}
    return rec


def commit_record(path, message, repo=ROOT, attempts=8):
    """`git add` one record and commit only it; retry while another git process holds the index lock.

    --force because .gitignore's `runs/` also matches results/runs/. `git commit -- <path>` commits
    that path alone, whatever else is staged.
    """
    err = ""
    for attempt in range(attempts):
        add = subprocess.run(["git", "add", "--force", "--", str(path)], cwd=repo, capture_output=True, text=True)
        if add.returncode == 0:
            commit = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)],
                                    cwd=repo, capture_output=True, text=True)
            if commit.returncode == 0:
                return
            err = commit.stdout + commit.stderr
        else:
            err = add.stdout + add.stderr
        if "index.lock" not in err:
            raise RuntimeError(f"could not commit {path}: {err.strip()}")
        time.sleep(1 + attempt)
    raise RuntimeError(f"could not commit {path} after {attempts} attempts (index.lock held): {err.strip()}")


# --- running: train.py processes side by side -------------------------------------------------

def launch(cmd, log_path):
    """Run one child on one thread; its output goes to log_path. Raises with the log's tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")


@dataclasses.dataclass
class Context:
    results: Path = RESULTS
    runs: Path = RUNS
    jobs: int = 2
    commit: bool = False
    log: object = print
    launch: object = launch
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def is_done(run, ctx):
    """A run is done when its record exists (a checkpoint source: when its folder holds the checkpoint).

    A record made with other flags is an error, not a silent reuse.
    """
    if run.needs_checkpoint:
        d = run.run_dir(ctx.runs)
        return (d / "results.json").exists() and (d / "ckpt.pt").exists()
    path = run.record_path(ctx.results)
    if not path.exists():
        return False
    rec = json.loads(path.read_text())
    if rec["flags"] != run.flags or rec.get("script") != run.script:
        raise RuntimeError(f"{path} was made with other flags:\n  recorded {rec.get('script')} {rec['flags']}\n"
                           f"  planned  {run.script} {run.flags}\nDelete it to run again, or write to another "
                           f"--results folder")
    return True


def perform(run, ctx):
    """Train (or resume, or evaluate) one run unless its folder already holds the result; then record it."""
    out = run.run_dir(ctx.runs)
    if run.needs_checkpoint and out.exists() and not (out / "ckpt.pt").exists():
        shutil.rmtree(out)                             # a source whose checkpoint is gone: train it again
    eval_only = run.source is not None
    result_file = out / ("eval_ckpt.json" if eval_only else "results.json")
    seconds = None
    if not result_file.exists():
        ctx.log(f"  start  {run.experiment}: {run.config}, seed {run.seed}")
        start = time.time()
        resumed = _launch_run(run, out, ctx)
        if resumed and not result_file.exists():       # its last checkpoint was the final step: start afresh
            shutil.rmtree(out)
            _launch_run(run, out, ctx)
        if not result_file.exists():
            raise RuntimeError(f"{out} holds no {result_file.name} after the run; see {out}.log")
        seconds = time.time() - start
        ctx.log(f"  done   {run.experiment}: {run.config}, seed {run.seed} ({seconds:.0f} s)")
    path = run.record_path(ctx.results)
    if path.exists():                                  # a checkpoint source trained again
        return
    rec = make_record(run, out, json.loads(result_file.read_text()), seconds)
    if run.after is not None:
        rec.update(run.after(run, out, ctx))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(train_support.strict_json(rec), indent=1, allow_nan=False))   # NaN -> null
    os.replace(tmp, path)
    if ctx.commit:
        with ctx.lock:
            commit_record(path, f"results: {run.experiment} {run.config} seed {run.seed}")


def _launch_run(run, out, ctx):
    """Start the run's process: evaluate, resume from the checkpoint, or start afresh. True if resumed."""
    cmd = [sys.executable, str(ROOT / run.script[0]), *run.script[1:], *run.flags]
    resumed = False
    if run.source is not None:
        cmd += ["--ckpt", str(run.source.run_dir(ctx.runs) / "ckpt.pt"), "--out-dir", str(out)]
    elif (out / "ckpt.pt").exists():
        cmd += ["--resume", str(out)]                  # interrupted: continue it exactly
        resumed = True
    else:
        if out.exists():                               # stopped before its first checkpoint
            shutil.rmtree(out)
        cmd += ["--out-dir", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx.launch(cmd, out.parent / f"{out.name}.log")
    return resumed


def execute(plan, ctx):
    """Perform every run of `plan` that is not done, ctx.jobs at a time; raise at the end if any failed."""
    todo = [r for r in plan if not is_done(r, ctx)]
    ctx.log(f"{len(plan) - len(todo)} of {len(plan)} runs done before; running {len(todo)} with {ctx.jobs} job(s)")
    torch.set_num_threads(1)          # this process's own work (diagnostics, probes) beside the children
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, ctx.jobs)) as pool:
        futures = {pool.submit(perform, r, ctx): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:
                r = futures[future]
                failures.append(f"{r.experiment} {r.config} seed {r.seed}: {future.exception()}")
                ctx.log(f"  FAILED {r.experiment}: {r.config}, seed {r.seed}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))


def estimate_seconds(run, records):
    """Seconds one run should take: the median of recorded runs of its row, else of its group, else the prior."""
    def median(recs):              # records with a "note" were slowed by pauses or other work: not used
        times = [r.get("runner_wall_s") or r.get("wall_time_s") for r in recs if "note" not in r]
        times = [t for t in times if t]
        return float(np.median(times)) if times else None

    same = median([r for (c, _), r in records.items() if c == run.config])
    if same:
        return same, "recorded"
    if run.group == "eval":
        return PRIOR_EVAL_S, "prior"
    return PRIOR_S_PER_STEP[run.group] * run.steps, "prior"


def print_plan(plan, ctx):
    """The --dry-run output: per row, runs recorded and to run, and the rough time of what is left."""
    rows, total = {}, 0.0
    records = {}
    for experiment in {r.experiment for r in plan}:
        records.update(load_records(ctx.results, experiment))
    for run in plan:
        done = is_done(run, ctx)
        row = rows.setdefault((run.experiment, run.config), {"runs": 0, "done": 0, "s": None, "how": ""})
        row["runs"] += 1
        row["done"] += done
        row["s"], row["how"] = estimate_seconds(run, records)
        if not done:
            total += row["s"]
    width = max(len(c) for _, c in rows) + 2
    print(f"{'experiment':<12}{'configuration':<{width}}{'recorded':>9}{'to run':>8}   s per run")
    for (experiment, config), row in rows.items():
        print(f"{experiment:<12}{config:<{width}}{row['done']:>5}/{row['runs']:<3}{row['runs'] - row['done']:>8}"
              f"   {row['s']:.0f} ({row['how']})")
    left = sum(r["runs"] - r["done"] for r in rows.values())
    print(f"{left} of {len(plan)} runs to go: about {total / max(1, ctx.jobs) / 3600:.1f} h with {ctx.jobs} job(s)")
    return total / max(1, ctx.jobs)


def train_flags(row_flags, seed, max_iters, eval_interval, extra):
    return [*row_flags, "--seed", str(seed), "--max-iters", str(max_iters), "--eval-interval", str(eval_interval),
            "--log-interval", "50", "--procs", "1", *extra]


def _split_extra(argv):
    """argv before "--" are ours; after it, train.py flags added to every run (e.g. tiny sizes)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _common_options(p):
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--max-iters", type=int, help="steps per run (default: the synthetic preset's, 1,500)")
    p.add_argument("--eval-interval", type=int, default=EVAL_INTERVAL, help="evaluate every this many steps")
    p.add_argument("--tasks", default=",".join(SYNTHETIC_TASKS), help="comma list of SyntheticRooms tasks")
    p.add_argument("--jobs", type=int, default=2, help="one-thread train.py runs side by side")
    p.add_argument("--commit", action="store_true", help="git commit each record as it lands (only that file)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time it should take; run nothing")
    p.add_argument("--tables-only", action="store_true", help="no runs: rebuild the tables from the records")
    p.add_argument("--results", type=Path, default=RESULTS, help="tables here, records under <results>/runs")
    p.add_argument("--runs", type=Path, default=RUNS, help="train.py run folders (checkpoints; not committed)")
    p.epilog = "Flags after `--` go to every train.py run, e.g. `-- --image-size 32x48` for a quick try."


def _tasks(text):
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown or not tasks:
        raise SystemExit(f"--tasks: unknown task(s) {unknown or '(none)'}; choose from {', '.join(SYNTHETIC_TASKS)}")
    return tasks


def _max_iters(value):
    if value is not None:
        return value
    return train.PRESETS["synthetic"]["max_iters"]


# --- 1. the ablation ------------------------------------------------------------------------

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

COMPARISONS = [  # (row a, row b, what Δm_a - Δm_b, paired by seed, tests)
    ("kem", "none", "KEM vs no exchange [PAPER: KEM helps multi-task learning]"),
    ("kem", "cross", "KEM vs cross-attention [PAPER: KEM beats cross-attention]"),
    ("cross", "none", "cross-attention vs no exchange"),
    ("kem+etf features", "kem", "sKEM (ETF features) vs KEM [PAPER: sKEM helps further]"),
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
    ("kem+etf slots", "kem", "ETF slots vs learned slots [PAPER: the ETF stabilises the selection]"),
    ("kem+etf both", "kem", "ETF features and slots vs KEM"),
    ("kem+etf features", "kem", "ETF features vs KEM"),
    ("kem+etf features", "kem+normalize", "ETF frame vs L2 normalisation alone"),
    ("kem+normalize", "kem", "L2 normalisation alone vs KEM"),
    ("kem post", "kem", "top-k after softmax vs masking before it"),
]
SELECTION_MEASURES = {"jaccard": "slot overlap (Jaccard)", "max_task_share": "largest task share"}


def ablation_rows(tasks, single_task_kem=False):
    """Row name -> train.py flags: single-task baselines (no exchange), optional single-task + KEM, multi-task."""
    rows = {f"single-task {t}": ["--tasks", t, "--exchange", "none"] for t in tasks}
    if single_task_kem:
        rows.update({f"single-task+kem {t}": ["--tasks", t, *kem()] for t in tasks})
    rows.update({name: ["--tasks", ",".join(tasks), *flags] for name, flags in MULTI_TASK_ROWS.items()})
    return rows


def _group(flags):
    exchange = flags[flags.index("--exchange") + 1]
    return "single-task" if "," not in flags[flags.index("--tasks") + 1] and exchange == "none" else exchange


def ablation_run(name, row_flags, seed, max_iters, eval_interval, extra):
    flags = train_flags(row_flags, seed, max_iters, eval_interval, extra)
    is_kem = "kem" in row_flags
    return Run("ablation", name, seed, flags, after=selection_after if is_kem else None,
               group=_group(row_flags), steps=max_iters)


def ablation(argv):
    own, extra = _split_extra(argv)
    p = argparse.ArgumentParser(prog="experiments.py ablation",
                                description="Δm of every row against single-task baselines, paired comparisons, "
                                            "learning curve and slot selection, on SyntheticRooms.")
    _common_options(p)
    p.add_argument("--rows", nargs="+", help=f"multi-task rows to run (default all: {', '.join(MULTI_TASK_ROWS)}); "
                                             f"the single-task baselines always run")
    p.add_argument("--single-task-kem", action="store_true",
                   help="also the 'single-task + KEM' rows (information, not the Δm reference)")
    p.add_argument("--curve-row", default="kem", help="the row whose eval histories make the learning curve")
    args = p.parse_args(own)
    tasks = _tasks(args.tasks)
    max_iters = _max_iters(args.max_iters)
    rows = ablation_rows(tasks, args.single_task_kem)
    if args.rows:
        by_slug = {slug(n): n for n in MULTI_TASK_ROWS}
        unknown = [r for r in args.rows if r not in MULTI_TASK_ROWS and r not in by_slug]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(MULTI_TASK_ROWS)}")
        keep = {by_slug.get(r, r) for r in args.rows}
        rows = {n: f for n, f in rows.items() if n.startswith("single-task") or n in keep}
    plan = [ablation_run(name, flags, seed, max_iters, args.eval_interval, extra)
            for seed in args.seeds for name, flags in rows.items()]       # seed by seed: pairs complete early
    ctx = Context(results=args.results, runs=args.runs, jobs=args.jobs, commit=args.commit)
    if args.dry_run:
        return print_plan(plan, ctx)
    if not args.tables_only:
        execute(plan, ctx)
    command = "python experiments.py ablation " + " ".join(argv)
    return ablation_report(args.results, tasks, args.curve_row, command.strip())


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


def _row_order(names):
    canonical = list(ablation_rows(SYNTHETIC_TASKS, single_task_kem=True))
    return sorted(names, key=lambda n: (canonical.index(n) if n in canonical else len(canonical), n))


def ablation_report(results, tasks, curve_row="kem", command="python experiments.py ablation"):
    """results/ablation.json/.md, comparisons.json/.md, learning_curve.png, selection.* from the records alone."""
    results = Path(results)
    records = load_records(results, "ablation")
    if not records:
        raise SystemExit(f"no ablation records under {results / 'runs' / 'ablation'}; run `{command}` first")
    baselines = baseline_metrics(records, tasks)
    dm = delta_m_by_seed(records, baselines)
    configs = _row_order({c for c, _ in records})
    rows = []
    for config in configs:
        recs = {s: r for (c, s), r in records.items() if c == config}
        seeds = sorted(recs)
        row = {"config": config, "flags": recs[seeds[0]]["flags"], "seeds": seeds,
               "per_seed": [{"seed": s, "headline": {t: headline(t, recs[s]["metrics"][t]) for t in recs[s]["metrics"]},
                             "delta_m": dm.get(config, {}).get(s)} for s in seeds],
               "headline_mean": {t: float(np.mean([headline(t, recs[s]["metrics"][t]) for s in seeds]))
                                 for t in recs[seeds[0]]["metrics"]},
               "delta_m": t_interval(list(dm[config].values())) if config in dm else None,
               "parameters": recs[seeds[0]]["parameters"],
               # medians: a run that shared the cores with other work would swamp a mean
               "images_per_s": _median([recs[s].get("train_images_per_s") for s in seeds]),
               "wall_time_s": _median([recs[s].get("wall_time_s") for s in seeds])}
        rows.append(row)

    cols = [label(t) for t in tasks]
    summary = ["| configuration | seeds | Δm % [95% CI] | " + " | ".join(cols) + " | parameters | img/s | wall s |",
               "|---|---:|---|" + "---:|" * (len(tasks) + 3)]
    per_seed = ["| configuration | seed | " + " | ".join(cols) + " | Δm % |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for row in rows:
        cells = [f"{row['headline_mean'][t]:.4f}" if t in row["headline_mean"] else "" for t in tasks]
        dm_cell = "(baseline)" if row["config"].startswith("single-task ") and row["delta_m"] is None else (
            _ci(row["delta_m"]) if row["delta_m"] else "—")
        summary.append(f"| {row['config']} | {len(row['seeds'])} | {dm_cell} | " + " | ".join(cells)
                       + f" | {(row['parameters'] or 0) / 1e6:.2f} M | {_fmt(row['images_per_s'], 1)} | "
                         f"{_fmt(row['wall_time_s'], 0)} |")
        for ps in row["per_seed"]:
            cells = [f"{ps['headline'][t]:.4f}" if t in ps["headline"] else "" for t in tasks]
            d = "" if ps["delta_m"] is None else f"{ps['delta_m']:+.2f}"
            per_seed.append(f"| {row['config']} | {ps['seed']} | " + " | ".join(cells) + f" | {d} |")

    comparisons = []
    for a, b, what in COMPARISONS:
        if a in dm and b in dm:
            comparisons.append({"a": a, "b": b, "tests": what, **paired(dm[a], dm[b]),
                                "per_task": {t: paired(*({s: headline(t, records[c, s]["metrics"][t])
                                                          for (c2, s) in records if c2 == c} for c in (a, b)))
                                             for t in tasks}})
    comp_lines = ["| comparison | Δm difference per seed | mean [95% CI] | verdict |", "|---|---|---|---|"]
    for c in comparisons:
        diffs = ", ".join(f"{d:+.2f}" for d in c["differences"])
        comp_lines.append(f"| {c['tests']}: {c['a']} − {c['b']} | {diffs} | {_ci(c)} | {_verdict(c)} |")

    curve = [records[c, s] for (c, s) in sorted(records) if c == curve_row]
    levelling = levelled_off(curve, tasks) if curve else None
    meta = {"command": command, "tasks": tasks, "seeds": sorted({s for _, s in records}),
            "max_iters": _median([r.get("iteration") for r in records.values()]),
            "total_runner_hours": sum(r.get("runner_wall_s") or r.get("wall_time_s") or 0
                                      for r in records.values()) / 3600}
    (results / "ablation.json").write_text(json.dumps(
        {**meta, "baselines": baselines, "rows": rows, "curve_row": curve_row, "levelling": levelling}, indent=1))
    (results / "ablation.md").write_text(
        f"Ablation on SyntheticRooms: {meta['max_iters']:.0f} steps per run, seeds {meta['seeds']}. Δm (%) is against "
        f"the mean over seeds of the single-task runs (same network, one task, no exchange), with the mean and "
        f"a 95% t-interval over seeds; task columns are the mean over seeds of each headline metric (per-seed "
        f"values below and in results/runs/ablation/). img/s and wall time are medians over seeds. Regenerate: "
        f"`{command}`\n\n" + "\n".join(summary) + "\n\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    (results / "comparisons.json").write_text(json.dumps({**meta, "comparisons": comparisons}, indent=1))
    (results / "comparisons.md").write_text(
        "Paired comparisons of Δm (%, a − b per seed; the same seed gives both rows the same data order), their "
        "mean and 95% t-interval. A difference is 'real' only when its interval excludes zero. Regenerate: "
        f"`{command}`\n\n" + "\n".join(comp_lines) + "\n")
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


def _task_grid(plt, tasks):
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

    fig, axes = _task_grid(plt, tasks)
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

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = {**ckpt["config"], "pretrained": False}
    model = train.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
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
        for images in _val_images(cfg, max_images):
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


def _val_images(cfg, max_images=None):

    data = train_support.build_data(cfg, "val")
    if max_images is not None:
        data = torch.utils.data.Subset(data, range(min(max_images, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg["batch_size"], collate_fn=train_support.collate)
    for batch in loader:
        yield batch["image"]


def selection_after(run, run_dir, ctx):
    return {"selection": selection_diagnostics(run_dir / "ckpt.pt")}


def selection_report(records, results):
    """results/selection.json/.md/.png from the ablation records that carry selection diagnostics."""
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
                     "jaccard": t_interval([s["jaccard"] for s in sel.values()]), "jaccard_chance": first["jaccard_chance"],
                     "max_task_share": t_interval([s["max_task_share"] for s in sel.values()]),
                     "max_task_weight": t_interval([s["max_task_weight"] for s in sel.values()]),
                     "share_first_seed": first["share"], "tasks": first["tasks"],
                     "per_seed": {s: {k: v[k] for k in ("jaccard", "max_task_share", "max_task_weight")}
                                  for s, v in sel.items()}})
    lines = ["| configuration | k / N | coverage L k / N | slot overlap (Jaccard) [95% CI] | chance | "
             "largest task share [95% CI] | largest task weight [95% CI] |", "|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['k']} / {r['N']} | {r['coverage']:.2f} | {_ci(r['jaccard'], 3, '')} | "
                     f"{r['jaccard_chance']:.3f} | {_ci(r['max_task_share'], 3, '')} | "
                     f"{_ci(r['max_task_weight'], 3, '')} |")
    T = len(rows[0]["tasks"])
    pairs = []
    for a, b, what in SELECTION_COMPARISONS:
        if a in by_row and b in by_row:
            for m in SELECTION_MEASURES:
                pairs.append({"a": a, "b": b, "tests": what, "measure": m,
                              **paired(*({s: v[m] for s, v in by_row[c].items()} for c in (a, b)))})
    pair_lines = ["| comparison | measure | difference per seed | mean [95% CI] | verdict |", "|---|---|---|---|---|"]
    for c in pairs:
        pair_lines.append(f"| {c['tests']}: {c['a']} − {c['b']} | {SELECTION_MEASURES[c['measure']]} | "
                          + ", ".join(f"{d:+.3f}" for d in c["differences"]) + f" | {_ci(c, 3)} | {_verdict(c)} |")
    (Path(results) / "selection.json").write_text(json.dumps({"rows": rows, "paired": pairs}, indent=1))
    (Path(results) / "selection.md").write_text(
        "Which tokens KEM's slots select on the val set, per trained model (mean and 95% t-interval over seeds). "
        "Slot overlap: mean pairwise Jaccard of the slots' top-k index sets per image (1 = all slots take the "
        "same tokens; 'chance' = independent random k-sets). Largest task share: mean over images and slots of "
        f"the largest fraction of a slot's selected tokens that comes from one task (1 = one task per slot, 1/T = "
        f"{1 / T:.3f} = evenly mixed); task weight: the same for attention mass (it differs when k = N). "
        "Regenerate: `python experiments.py ablation --tables-only`\n\n" + "\n".join(lines)
        + ("\n\nPaired by seed (a − b; rows with the same k only):\n\n" + "\n".join(pair_lines) if pairs else "")
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


# --- 2. the softmax leak -----------------------------------------------------------------------

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


LEAK_KS = {"N/64": 1 / 64, "N/16": 1 / 16, "N/4": 0.25, "N": 1.0, "16": 16}   # label -> topk as the model takes it


@torch.no_grad()
def default_token_count():
    """N = T h w at the exchange of the default `python train.py` run, counted on one blank image."""

    cfg = train.resolve_config(*train.parse_args([]))
    model = train.build_model(cfg).eval()
    seen = {}
    model.exchange.register_forward_pre_hook(lambda m, args: seen.update(N=args[0].shape[1]))
    model(torch.zeros(1, 3, *cfg["train_size"]))
    return seen["N"]


def leak(argv):
    p = argparse.ArgumentParser(prog="experiments.py leak",
                                description="Softmax vs top-k at the model's k values: mass on irrelevant tokens.")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384], help="N for the table")
    p.add_argument("--relevant", type=int, default=16, help="relevant tokens |S|")
    p.add_argument("--gap", type=float, default=3.0, help="how much higher relevant tokens score")
    p.add_argument("--noise", type=float, default=1.0, help="std of the score noise")
    p.add_argument("--num-slots", type=int, default=16, help="L, for the coverage L k / N")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--results", type=Path, default=RESULTS, help="writes leak.json, .md and .png here")
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
    out = {"command": "python experiments.py leak " + " ".join(argv), "relevant": args.relevant, "gap": args.gap,
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


# --- 3. distractor tokens ----------------------------------------------------------------------

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


def _distract(argv):
    """`experiments.py _distract --kind K --ratio R -- <train.py flags>`: train.py with distractor tokens."""
    own, rest = _split_extra(argv)
    p = argparse.ArgumentParser(prog="experiments.py _distract")
    p.add_argument("--kind", choices=KINDS, default="other")
    p.add_argument("--ratio", type=float, required=True, help="distractor tokens per real token")
    args = p.parse_args(own)

    class Distracted(train.MultiTaskNet):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            Distractors(self.exchange, args.ratio, args.kind)     # lives on in the hooks

    train.MultiTaskNet = Distracted               # train.build_model looks the class up at call time
    return train.cli(rest)


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
    "token" sees the token alone (the issue's probe); "context" also sees x * m, m = the mean of that
    image's real tokens (a similarity to the image, a statistic an attention layer can compute).
    """

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = {**ckpt["config"], "pretrained": False}
    model = train.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    hooks = Distractors(model.exchange, 1.0, kind, seed=seed, capture=True)
    g = torch.Generator().manual_seed(seed)
    feats, ctx, labels, image = [], [], [], []
    count = 0
    try:
        for images in _val_images(cfg, max_images):
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
    return float(run.script[run.script.index("--ratio") + 1])


def distract_script(kind, ratio):
    return ("experiments.py", "_distract", "--kind", kind, "--ratio", f"{ratio:g}", "--")


def distractors(argv):
    own, extra = _split_extra(argv)
    p = argparse.ArgumentParser(prog="experiments.py distractors",
                                description="Distractor tokens in the exchange (k fixed from the real tokens): "
                                            "trained models evaluated with them, and models trained with them.")
    _common_options(p)
    p.add_argument("--exchanges", nargs="+", default=["none", "cross", "kem"], choices=["none", "cross", "kem"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4],
                   help="distractor tokens per real token, at test time")
    p.add_argument("--train-ratio", type=float, default=1.0, help="distractors per real token when training with them")
    p.add_argument("--train-kind", choices=KINDS, default="other")
    p.add_argument("--train-seeds", type=int, nargs="*", help="seeds trained with distractors (default: --seeds)")
    args = p.parse_args(own)
    tasks = _tasks(args.tasks)
    max_iters = _max_iters(args.max_iters)
    train_seeds = args.seeds if args.train_seeds is None else args.train_seeds
    rows = ablation_rows(tasks)
    ctx = Context(results=args.results, runs=args.runs, jobs=args.jobs, commit=args.commit)
    # The clean-trained models are the ablation's own runs (same flags, same folders, same records).
    sources = {(ex, s): dataclasses.replace(ablation_run(ex, rows[ex], s, max_iters, args.eval_interval, extra),
                                            needs_checkpoint=True)
               for ex in args.exchanges for s in args.seeds}
    evals = [Run("distractors", f"test-time {ex} {kind} x{r:g}", s, ["--eval-only", "--procs", "1"],
                 prefix=distract_script(kind, r), source=sources[ex, s], after=probe_after(kind), group="eval")
             for s in args.seeds for ex in args.exchanges for kind in args.kinds for r in args.ratios]
    trained = [Run("distractors", f"trained {ex} {args.train_kind} x{args.train_ratio:g}", s,
                   train_flags(rows[ex], s, max_iters, args.eval_interval, extra),
                   prefix=distract_script(args.train_kind, args.train_ratio), after=probe_after(args.train_kind),
                   group=ex, steps=max_iters)
               for s in train_seeds for ex in args.exchanges]
    needed = list({id(e.source): e.source for e in evals if not is_done(e, ctx)}.values())
    if args.dry_run:
        return print_plan([*needed, *evals, *trained], ctx)
    if not args.tables_only:
        execute(needed, ctx)                           # clean checkpoints first (trained again if runs/ is gone)
        execute([*evals, *trained], ctx)
    command = ("python experiments.py distractors " + " ".join(argv)).strip()
    return distractor_report(args.results, tasks, command)


def distractor_report(results, tasks, command="python experiments.py distractors"):
    """results/distractors.json/.md/.png from the distractor and ablation records alone."""
    results = Path(results)
    recs = load_records(results, "distractors")
    ablation_recs = load_records(results, "ablation")
    if not recs:
        raise SystemExit(f"no distractor records under {results / 'runs' / 'distractors'}; run `{command}` first")
    baselines = baseline_metrics(ablation_recs, tasks)
    clean_dm = delta_m_by_seed(ablation_recs, baselines)

    # (i) test time: Δm of the noisy evaluation against the same checkpoint's clean one, per seed
    test = {}                                                  # (exchange, kind, ratio) -> {seed: Δm}
    probes = {}                                                # (exchange, kind) -> [probe per seed]
    trained = {}                                               # exchange -> {seed: Δm vs single-task}
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
            lines.append(f"| {ex} | {kind} | " + " | ".join(_ci(cells[r]) for r in ratios)
                         + f" | {probe_cell(probes.get((ex, kind)))} |")
    pairs, pair_lines = [], ["| comparison | distractors | per token | Δm difference per seed | mean [95% CI] | verdict |",
                             "|---|---|---:|---|---|---|"]
    for a, b in (("kem", "cross"), ("kem", "none"), ("cross", "none")):
        for kind in kinds:
            for r in ratios:
                if (a, kind, r) in test and (b, kind, r) in test:
                    c = {"a": a, "b": b, "kind": kind, "ratio": r, **paired(test[a, kind, r], test[b, kind, r])}
                    pairs.append(c)
                    pair_lines.append(f"| {a} − {b} | {kind} | {r:g} | " + ", ".join(f"{d:+.2f}" for d in c["differences"])
                                      + f" | {_ci(c)} | {_verdict(c)} |")
    train_rows, train_lines = [], ["| exchange | Δm trained clean | Δm trained with distractors | "
                                   "difference per seed | mean [95% CI] | verdict | probe AUC token / context |",
                                   "|---|---|---|---|---|---|---|"]
    for ex in exchanges:
        if ex not in trained:
            continue
        c = paired(trained[ex], clean_dm.get(ex, {}))
        train_rows.append({"exchange": ex, "clean": clean_dm.get(ex, {}), "with_distractors": trained[ex], "paired": c,
                           "probe": trained_probe.get(ex, {})})
        train_lines.append(f"| {ex} | {_ci(t_interval(list(clean_dm.get(ex, {}).values())))} | "
                           f"{_ci(t_interval(list(trained[ex].values())))} | "
                           + ", ".join(f"{d:+.2f}" for d in c["differences"])
                           + f" | {_ci(c)} | {_verdict(c)} | {probe_cell(trained_probe.get(ex))} |")
    train_name = next((c for c, _ in recs if c.startswith("trained ")), "trained")
    out = {"command": command, "test_time": test_rows, "paired": pairs, "trained": train_rows,
           "trained_config": train_name}
    (results / "distractors.json").write_text(json.dumps(out, indent=1, default=str))
    (results / "distractors.md").write_text(
        "Distractor tokens appended to the exchange's input, k held at the count resolved from the real tokens. "
        "'other' = task tokens of another image of the batch (real features, irrelevant content); 'gaussian' = "
        "noise with the real tokens' spread. Test time: the ablation's clean-trained models evaluated with that "
        "many distractors per real token, Δm (%) against their own clean evaluation (0 = unaffected), mean and "
        "95% t-interval over seeds. Probe AUC: linear probes telling real from distractor tokens at the "
        "exchange's input on held-out val images (0.5 = cannot tell; 'token' sees a token alone, 'context' also "
        "its product with the image's mean real token). A difference is 'real' only when its interval excludes "
        f"zero. Regenerate: `{command}`\n\n" + "\n".join(lines)
        + ("\n\nPaired by seed (test time):\n\n" + "\n".join(pair_lines) if pairs else "")
        + f"\n\nTrained with distractors ({train_name}): Δm against the single-task baselines, paired with the "
          f"clean-trained run of the same seed (with − clean):\n\n" + "\n".join(train_lines) + "\n")
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


# --- 4. run length: are 1,500 steps enough? ----------------------------------------------------------

LENGTH_ROWS = ("kem", "none")               # the difference is kem − none


def length(argv):
    own, extra = _split_extra(argv)
    p = argparse.ArgumentParser(prog="experiments.py length",
                                description="The ablation's rows trained longer (each with its own schedule, "
                                            "which ends at its last step): do the metrics level off, and does the "
                                            "difference between rows move with the length?")
    _common_options(p)
    p.set_defaults(eval_interval=500)
    p.add_argument("--lengths", type=int, nargs="+", default=[3000, 6000], help="steps per run, besides the ablation's")
    p.add_argument("--rows", nargs="+", default=list(LENGTH_ROWS), choices=list(MULTI_TASK_ROWS))
    args = p.parse_args(own)
    tasks = _tasks(args.tasks)
    rows = ablation_rows(tasks)
    plan = [Run("length", f"{row} {n} steps", s, train_flags(rows[row], s, n, args.eval_interval, extra),
                group=row, steps=n)
            for s in args.seeds for n in sorted(args.lengths) for row in args.rows]
    ctx = Context(results=args.results, runs=args.runs, jobs=args.jobs, commit=args.commit)
    if args.dry_run:
        return print_plan(plan, ctx)
    if not args.tables_only:
        execute(plan, ctx)
    return length_report(args.results, tasks, args.rows, ("python experiments.py length " + " ".join(argv)).strip())


def length_report(results, tasks, rows=LENGTH_ROWS, command="python experiments.py length"):
    """results/length.json/.md/.png: final metrics against run length, from the length records and the
    ablation's records of the same rows and seeds (their length is the ablation's)."""
    results = Path(results)
    ablation_recs = load_records(results, "ablation")
    runs = {}                                                      # (row, seed) -> {steps: record}
    for (config, seed), rec in load_records(results, "length").items():
        runs.setdefault((config.rsplit(" ", 2)[0], seed), {})[rec["iteration"]] = rec
    if not runs:
        raise SystemExit(f"no length records under {results / 'runs' / 'length'}; run `{command}` first")
    for (row, seed) in list(runs):
        if (row, seed) in ablation_recs:
            rec = ablation_recs[row, seed]
            runs[row, seed][rec["iteration"]] = rec
    baselines = baseline_metrics(ablation_recs, tasks)         # a common reference for every length
    table, out = [], []
    lines = ["| row | seed | steps | " + " | ".join(label(t) for t in tasks) + " | Δm % (vs the ablation's single-task) |"
             " still improving over the last 40% of steps |", "|---|---:|---:|" + "---:|" * (len(tasks) + 1) + "---|"]
    for (row, seed) in sorted(runs, key=lambda k: (k[1], rows.index(k[0]) if k[0] in rows else 99)):
        for steps in sorted(runs[row, seed]):
            rec = runs[row, seed][steps]
            dm = metrics.delta_m(rec["metrics"], baselines) if all(t in baselines for t in rec["metrics"]) else None
            lev = levelled_off([rec], tasks, window=round(0.4 * steps))
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
    summary = length_summary(out, tasks, rows)
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


def length_summary(out, tasks, rows):
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
        lines.append(f"| {steps} | {len(seeds)} | {_ci(dm)} ({_verdict(dm)}) | "
                     + " | ".join(_ci(task_stats[t], digits=3) for t in tasks) + " |")
    if len(per_length) > 1:                                    # does the difference move with the length?
        first = per_length[0]
        lines += ["", f"Change of the Δm difference against {first['steps']} steps, paired by seed:", "",
                  "| steps | seeds | change |", "|---:|---:|---:|"]
        for p in per_length[1:]:
            p["change_from_shortest"] = paired(dict(zip(p["delta_m"]["seeds"], p["delta_m"]["differences"])),
                                               dict(zip(first["delta_m"]["seeds"], first["delta_m"]["differences"])))
            change = p["change_from_shortest"]
            lines.append(f"| {p['steps']} | {change['n']} | {_ci(change)} ({_verdict(change)}) |")
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

    fig, axes = _task_grid(plt, tasks)
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


EXPERIMENTS = {"ablation": ablation, "leak": leak, "distractors": distractors, "length": length,
               "_distract": _distract}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    if argv[0] not in EXPERIMENTS:
        names = ", ".join(n for n in EXPERIMENTS if not n.startswith("_"))
        print(f"experiments.py: there is no experiment {argv[0]!r}; the experiments are {names} "
              "(`python experiments.py` describes each).", file=sys.stderr)
        return 2
    if argv[0] == "_distract":                   # a train.py process with distractors: its exit code
        return _distract(argv[1:])
    EXPERIMENTS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
