"""The runner every experiment shares: train.py child processes, the records they leave, the common skeleton.

An experiment that trains (ablation, distractors, length) is a *plan*: a list of `Run`s, each one
train.py process (or an --eval-only one) with its flags and seed. `run()` is the skeleton they share:

    options  ->  plan of runs  ->  --dry-run: print it and its rough time
                                   --tables-only: run nothing
                                   otherwise: run what is not recorded yet, --jobs at a time
             ->  the experiment's report: tables and figures from the records alone

Records [ours]. Every finished run leaves one small JSON file, research/results/runs/<experiment>/<config>/
seed<k>.json (`make_record`): its script and flags, every task's full metric dict, speed, wall time,
the eval history (for learning curves), the commit it was made from, and whatever the run's `after`
hook adds (the ablation's selection diagnostics, the distractors' probe). Checkpoints stay under
runs/ (not committed). A run whose record exists is never run again (`is_done`), so a later session
on a fresh machine continues where the last one stopped; a record made with other flags is an error,
not a silent reuse. With --commit each record is committed as it lands (only that file).

Letters: B batch, N tokens, D width.

Notes:
- The child train.py processes run with --procs 1 and OMP_NUM_THREADS=1; --jobs of them run side
  by side. Work done in this process (selection diagnostics, probes) runs on one thread.
- An interrupted run resumes from its last checkpoint (`--resume`), so it ends exactly as an
  uninterrupted one would; a run stopped before its first checkpoint starts afresh.
- The --dry-run time is a rough guess: the median wall time of the row's recorded runs, else a prior
  per training step (`PRIOR_S_PER_STEP`). Records with a "note" shared the machine with other work
  and are left out of the median.
- --commit adds records with `git add --force`, so an ignore rule matching runs/ anywhere cannot
  stop a record from being committed.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import json
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "research" / "results"          # tables here, records under RESULTS / "runs"
RUNS = ROOT / "runs"                # train.py run folders (checkpoints), not committed
SYNTHETIC_TASKS = tuple(synthetic.TASKS)
SEEDS = [0, 1, 2, 3, 4]
EVAL_INTERVAL = 250                 # evaluations per run give the learning curve

# Prior seconds per training step of one run on one thread beside another, for the --dry-run estimate
# until records exist: kem measured (296 s / 1,500 steps on the 2-core machine, nothing else running);
# the others scaled from research/bench.py step's one-process ratios (none ~ kem, cross ~1.9x, one task ~0.5x).
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


def read_log_by_iter(path):
    """A JSON-lines log's records, one per "iter", in order; the last line of an iteration wins (a resumed run
    writes the iterations after its checkpoint again). [] when there is no log."""
    if not Path(path).exists():
        return []
    by_iter = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        by_iter[rec["iter"]] = rec
    return [by_iter[i] for i in sorted(by_iter)]


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


def announce_commits(runs, ctx, repo=ROOT):
    """--commit, before the first run: say which records will be committed, and stop (SystemExit) if any of
    those files has uncommitted changes, which a record's commit would sweep in or overwrite."""
    paths = [run.record_path(ctx.results) for run in runs if not run.needs_checkpoint]
    status = subprocess.run(["git", "status", "--porcelain", "--", *map(str, paths)], cwd=repo,
                            capture_output=True, text=True).stdout if paths else ""
    dirty = [line[3:] for line in status.splitlines() if not line.startswith("??")]
    if dirty:
        raise SystemExit(f"--commit would commit records that have uncommitted changes: {', '.join(dirty[:5])}"
                         f"{' ...' if len(dirty) > 5 else ''}. Commit or restore them first, or run without --commit")
    folders = sorted({str(Path(p).parent.parent.relative_to(repo)) for p in paths}) if paths else []
    print(f"--commit: each new record is committed as it lands (git commit -- <record>), under "
          f"{', '.join(folders) or 'no folder (nothing to record)'}", flush=True)


def commit_record(path, message, repo=ROOT, attempts=8):
    """`git add` one record and commit only it; retry while another git process holds the index lock.

    `git commit -- <path>` commits that path alone, whatever else is staged.
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
    results: Path = RESULTS         # tables here, records under results / "runs"
    runs: Path = RUNS               # train.py run folders
    jobs: int = 2                   # runs side by side
    commit: bool = False            # git commit each record as it lands
    log: object = print             # progress lines
    launch: object = launch         # (cmd, log_path) -> None; tests pass a stand-in
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)   # one git commit at a time


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
    if rec["flags"] != run.flags or script_of(rec) != run.script:
        raise RuntimeError(f"{path} was made with other flags:\n  recorded {rec.get('script')} {rec['flags']}\n"
                           f"  planned  {run.script} {run.flags}\nDelete it to run again, or write to another "
                           f"--results folder")
    return True


def script_of(record):
    """A record's script; records made before the lab moved into research/ (2026-12-05) name the same hidden
    commands by their old entry point, experiments.py."""
    script = list(record.get("script") or [])
    return ["research", *script[1:]] if script[:1] == ["experiments.py"] else script


def command(script):
    """The command line of a run's script: train.py by its path, the lab's hidden commands as `-m research`."""
    if script[0] == "research":
        return [sys.executable, "-m", "research", *script[1:]]
    return [sys.executable, str(ROOT / script[0]), *script[1:]]


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
    cmd = [*command(run.script), *run.flags]
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


# --- the skeleton: options, plan, dry-run / tables-only / execute, report ----------------------

def train_flags(row_flags, seed, max_iters, eval_interval, extra):
    """A row's train.py flags for one seed and length: what a record stores and compares."""
    return [*row_flags, "--seed", str(seed), "--max-iters", str(max_iters), "--eval-interval", str(eval_interval),
            "--log-interval", "50", "--procs", "1", *extra]


def split_extra(argv):
    """argv before "--" are ours; after it, train.py flags added to every run (e.g. tiny sizes)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parser(name, description):
    """The argument parser of `python -m research <name>` with the options every experiment that trains takes;
    the experiment adds its own after them."""
    p = argparse.ArgumentParser(prog=f"python -m research {name}", description=description)
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
    return p


def parse_tasks(text):
    """--tasks "depth,sal" -> ["depth", "sal"], every name a SyntheticRooms task."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown or not tasks:
        raise SystemExit(f"--tasks: unknown task(s) {unknown or '(none)'}; choose from {', '.join(SYNTHETIC_TASKS)}")
    return tasks


def run(p, argv, plan, report):
    """The skeleton of an experiment that trains, from `parser(...)` with its own options added.

    plan(args, extra, ctx) -> the runs as a list of phases, each phase executed after the one before
    it (the distractors need the clean checkpoints before they evaluate them); args.tasks arrives as a
    list and args.max_iters resolved from the preset; extra are the train.py flags after "--".
    report(args, command) -> the tables, built from the records alone. Returns the report, or with
    --dry-run the plan's estimated seconds.
    """
    own, extra = split_extra(argv)
    args = p.parse_args(own)
    args.tasks = parse_tasks(args.tasks)
    if args.max_iters is None:
        args.max_iters = train.PRESETS["synthetic"]["max_iters"]
    ctx = Context(results=args.results, runs=args.runs, jobs=args.jobs, commit=args.commit)
    phases = plan(args, extra, ctx)
    if args.dry_run:
        return print_plan([r for phase in phases for r in phase], ctx)
    if not args.tables_only:
        if ctx.commit:
            announce_commits([r for phase in phases for r in phase], ctx)
        for phase in phases:
            execute(phase, ctx)
    return report(args, f"{p.prog} {' '.join(argv)}".strip())


# --- trained models, for the diagnostics this process runs on them ----------------------------

def load_trained(ckpt_path):
    """(model in eval mode, its config with pretrained off) from a train.py checkpoint: train.load_trained."""
    model, cfg, _ = train.load_trained(ckpt_path)
    return model, {**cfg, "pretrained": False}


def val_images(cfg, max_images=None):
    """The val set's images, batch by batch as train.py evaluates them: (B, 3, H, W) each."""
    data = train_support.build_data(cfg, "val")
    if max_images is not None:
        data = torch.utils.data.Subset(data, range(min(max_images, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg["batch_size"], collate_fn=train_support.collate)
    for batch in loader:
        yield batch["image"]
