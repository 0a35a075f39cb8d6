"""A mutation check: would the tests notice if the code were subtly wrong?

    python research/mutate.py                         # every mutation: prints which ones SURVIVE
    python research/mutate.py --list                  # the mutations, by name, with what each breaks
    python research/mutate.py --check                 # only check that every mutation's text is still there
    python research/mutate.py warmup-off-by-one edge-prob-greater      # a subset, by name
    python research/mutate.py clip-before-unscale --tests tests/test_train_step.py   # do these tests notice?

Each mutation is a small, plausible bug: an exact piece of source text, what replaces it, and the
tests that should notice. They are applied one at a time to a copy of the working tree in a
temporary folder (the repository itself is never touched), and the named tests run with pytest in
that copy. A mutation is KILLED when some test fails (or times out) and SURVIVES when they all pass:
a survivor is a behaviour no test pins down. Before any mutation, the same tests run on the
unchanged copy and must pass.

Mutations find their place by exact text, not by line number, so code that moves still matches;
text that is gone (or no longer unique) stops the check before anything runs ("mutation X: text not
found in FILE"): update the list when the code changes. This is a developer's tool, not part of the
test suite: it runs the named tests once per mutation (a few minutes for the whole list on a 2-core
CPU; run it under `nice`). Exit code 1 when a mutation survives.
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLUE, STEP, EDGES, FRAME = ("tests/test_glue.py", "tests/test_train_step.py", "tests/test_edge_thresholds.py",
                            "tests/test_etf_frame.py")
KEM_EQUATIONS = "tests/test_kem.py::test_kem_matches_the_equations"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str                 # short, unique: what the bug is
    file: str                 # path from the repository's root
    old: str                  # exact text, found exactly once in the file
    new: str                  # what replaces it
    tests: tuple              # pytest arguments (files or node ids) that should fail
    note: str = ""            # the bug in words, for --list


M = Mutation
MUTATIONS = [
    # -- kem_mtl.py: the network's glue (issue 29's cases first)
    M("glue-no-task-embedding", "kem_mtl.py", ".flatten(2).transpose(1, 2) + self.task_embedding[i]",
      ".flatten(2).transpose(1, 2)", (GLUE,), "the per-task embedding is not added to the tokens"),
    M("glue-task-order-mixed", "kem_mtl.py", "F = torch.cat(tokens, dim=1)", "F = torch.cat(tokens[::-1], dim=1)",
      (GLUE,), "tokens concatenated in one task order, split back in another"),
    M("glue-no-transpose-back", "kem_mtl.py", "x_t = F_t.transpose(1, 2).reshape(B, -1, h, w)",
      "x_t = F_t.reshape(B, -1, h, w)", (GLUE,), "tokens back to a map without the transpose"),
    M("glue-token-map-after-exchange", "kem_mtl.py", "F = self.exchange(self.token_map(F))",
      "F = self.token_map(self.exchange(F))", (GLUE,), "the ETF / normalise map applied after the exchange"),
    M("normalize-over-tokens", "kem_mtl.py", "return self.l2_normalize(x)", "return self.l2_normalize(x, dim=-2)",
      (GLUE,), "the normalise control normalises over the token axis"),
    M("glue-one-embedding-for-all", "kem_mtl.py", "+ self.task_embedding[i]", "+ self.task_embedding[0]",
      (GLUE,), "every task gets the first task's embedding"),
    M("glue-h-w-swapped", "kem_mtl.py", "x_t = F_t.transpose(1, 2).reshape(B, -1, h, w)",
      "x_t = F_t.transpose(1, 2).reshape(B, -1, w, h)", (GLUE,), "the map comes back w x h"),
    M("glue-crop-bottom-right", "kem_mtl.py", "outputs[t] = y[:, :, :H, :W]", "outputs[t] = y[:, :, -H:, -W:]",
      (GLUE,), "the padded output is cropped from the wrong corner"),
    # -- kem_mtl.py: KEM itself (pinned by test_kem.py's oracles; here to show the tool sees them)
    M("kem-no-residual", "kem_mtl.py", "out = F + F_hat", "out = F_hat", (KEM_EQUATIONS,),
      "Broadcast replaces the tokens instead of adding to them"),
    M("kem-write-softmax-over-tokens", "kem_mtl.py", "A_w = (F @ K_w.transpose(1, 2)).softmax(dim=-1)",
      "A_w = (F @ K_w.transpose(1, 2)).softmax(dim=1)", (KEM_EQUATIONS,), "Write normalises over tokens, not slots"),
    M("topk-keeps-the-rest", "kem_mtl.py", 'scores.masked_fill(~keep, float("-inf"))',
      'scores.masked_fill(keep, float("-inf"))', ("tests/test_kem.py::test_topk_softmax_keeps_exactly_the_k_largest",),
      "the top-k mask keeps the wrong tokens"),
    # -- train.py: the losses
    M("edge-loss-counts-ignored", "train.py", "(0.95 * y + 0.05 * (1 - y)), target != 255)",
      "(0.95 * y + 0.05 * (1 - y)), target >= 0)", (STEP,), "the edge loss counts 255 pixels as negatives"),
    M("edge-loss-weights-swapped", "train.py", "bce * (0.95 * y + 0.05 * (1 - y))", "bce * (0.05 * y + 0.95 * (1 - y))",
      (STEP,), "positives weigh 0.05, negatives 0.95"),
    M("depth-zero-counted", "train.py", "(pred - target).abs(), target > 0)", "(pred - target).abs(), target >= 0)",
      (STEP,), "depth 0 (missing) counted as valid"),
    M("normals-zero-counted", "train.py", "target.abs().sum(1, keepdim=True) > 0)",
      "target.abs().sum(1, keepdim=True) >= 0)", (STEP,), "zero normals counted as valid"),
    M("normals-not-normalised", "train.py", "unit = l2_normalize(pred, dim=1)", "unit = pred", (STEP,),
      "L1 on the raw prediction instead of the unit normal"),
    M("loss-mean-over-all-pixels", "train.py", "/ valid.flatten(1).sum(1).clamp(min=1)", "/ valid[0].numel()",
      (STEP,), "each image's loss divided by all its pixels, ignored ones included"),
    M("edge-task-weight", "train.py", '"edge":    Task(50.0,', '"edge":    Task(5.0,', (STEP,),
      "the edge loss weight 50 becomes 5 (a protocol constant)"),
    # -- train.py: the schedule and the step
    M("poly-power-on-progress", "train.py",
      "return max(0.0, 1 - (it - warmup) / max(1, max_iters - warmup)) ** power",
      "return 1 - max(0.0, (it - warmup) / max(1, max_iters - warmup)) ** power", (STEP,),
      "the decay's power applied to the progress instead of to 1 - progress"),
    M("warmup-off-by-one", "train.py", "return (it + 1) / warmup", "return it / warmup", (STEP,),
      "warm-up starts at learning rate 0"),
    M("scheduler-per-micro-batch", "train.py", "scaler.scale(loss).backward()",
      "scaler.scale(loss).backward(); scheduler.step()", (STEP,), "the schedule advances once per micro-batch too"),
    M("clip-never-applied", "train.py", 'if cfg["grad_clip"] > 0:', 'if cfg["grad_clip"] < 0:', (STEP,),
      "gradient clipping never applied"),
    M("clip-before-unscale", "train.py",
      'scaler.unscale_(optimizer)\n        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])',
      'torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])\n        scaler.unscale_(optimizer)',
      (STEP,), "gradients clipped while still multiplied by the loss scale"),
    M("accum-not-divided", "train.py", 'loss = sum(TASKS[t].weight * losses[t] for t in losses) / cfg["accum"]',
      "loss = sum(TASKS[t].weight * losses[t] for t in losses)", (STEP,),
      "with --accum, the accumulated loss not divided by the number of micro-batches"),
    M("task-weights-ignored", "train.py", "sum(TASKS[t].weight * losses[t] for t in losses)",
      "sum(losses[t] for t in losses)", (STEP,), "the step sums the task losses unweighted"),
    M("running-loss-not-divided", "train.py", 'running[t] += losses[t].detach() / cfg["accum"]',
      "running[t] += losses[t].detach()", (STEP,), "logged losses grow with --accum"),
    M("no-zero-grad", "train.py", "optimizer.zero_grad(set_to_none=not procs.distributed)", "pass", (STEP,),
      "gradients carried over from one step to the next"),
    # -- metrics.py: the edge metric
    M("edge-prob-greater", "metrics.py", 'np.searchsorted(t, prob[box], side="right")',
      'np.searchsorted(t, prob[box], side="left")', (EDGES,), "edges binarised with prob > t instead of prob >= t"),
    M("ods-threshold-off-by-one", "metrics.py", '"ods_threshold": float(self.thresholds[i])',
      '"ods_threshold": float(self.thresholds[i - 1])', (EDGES,), "the reported ODS threshold one index off"),
    M("threshold-grid-k-over-n", "metrics.py", "np.arange(1, thresholds + 1) / (thresholds + 1)",
      "np.arange(1, thresholds + 1) / thresholds", (EDGES,), "the threshold grid k/n instead of k/(n+1)"),
    M("ois-ties-highest", "metrics.py", "self._state[1] += counts[:, int(np.argmax(F))]",
      "self._state[1] += counts[:, len(F) - 1 - int(np.argmax(F[::-1]))]", (EDGES,),
      "oisF breaks an image's ties at the highest threshold"),
    M("precision-recall-swapped", "metrics.py", "P, R = _safe_div(c[0], c[1]), _safe_div(c[2], c[3])",
      "R, P = _safe_div(c[0], c[1]), _safe_div(c[2], c[3])", (EDGES,), "edge precision and recall swapped"),
    M("edge-radius-longest-side", "metrics.py", "radius = max_dist * math.hypot(*gt.shape)",
      "radius = max_dist * max(gt.shape)", (EDGES,), "the match radius from the longest side, not the diagonal"),
    # -- etf.py
    M("etf-no-sign-fix", "etf.py", "W = W * torch.sign(torch.diagonal(R))", "W = W", (FRAME,),
      "QR's sign ambiguity left as LAPACK returns it: the frame is not uniformly random"),
    M("etf-fixed-rotation", "etf.py", "gaussian = torch.randn(d, K - 1, generator=generator, dtype=torch.float64)",
      "gaussian = torch.eye(d, K - 1, dtype=torch.float64)", (FRAME,), "every seed gives the same frame"),
    M("etf-projection-unnormalised", "etf.py", "return l2_normalize(x) @ self.E", "return x @ self.E",
      (GLUE,), "ETF features skip the normalisation"),
    M("l2-normalize-ignores-dim", "etf.py", "x / x.square().sum(dim, keepdim=True)", "x / x.square().sum(-1, keepdim=True)",
      (STEP, GLUE), "the shared L2 normalisation always normalises the last axis (normals are normalised over dim 1)"),
]


def locate(mutation, root):
    """The mutated text of the mutation's file in `root`; SystemExit if its text is gone or not unique."""
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        problem = "text not found" if count == 0 else f"text found {count} times (make it unique)"
        raise SystemExit(f"mutation {mutation.name}: {problem} in {mutation.file}:\n    {mutation.old!r}")
    return text.replace(mutation.old, mutation.new)


def run_tests(root, tests, timeout):
    """(passed, the first failing test or a reason) for pytest on `tests` in `root`."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)                     # import the copy's modules, never the repository's
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    if done.returncode == 0:
        return True, ""
    failed = [line[len("FAILED "):] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return False, failed[0] if failed else (done.stdout + done.stderr).strip().splitlines()[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description="Apply one-line bugs one at a time to a copy of the code; "
                                            "print which ones the tests do not notice.")
    p.add_argument("names", nargs="*", help="mutations to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the mutations and stop")
    p.add_argument("--check", action="store_true", help="only check that every mutation's text is found, once")
    p.add_argument("--tests", nargs="+", help="pytest files or node ids to run instead of each mutation's own")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutation before it counts as killed")
    args = p.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.file:12s} {m.note}")
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {', '.join(unknown)}; python research/mutate.py --list shows them")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.check:
        missing = []
        for m in chosen:
            try:
                locate(m, ROOT)
            except SystemExit as error:
                missing.append(str(error))
        print("\n".join(missing) or f"all {len(chosen)} mutations found their text")
        return 1 if missing else 0
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".hypothesis",
                                                                  ".pytest_cache", "*.pyc"))
        mutated = {m.name: locate(m, root) for m in chosen}          # every text checked before anything runs
        tests = sorted({t for m in chosen for t in m.tests})
        ok, why = run_tests(root, tests, args.timeout)
        if not ok:
            raise SystemExit(f"the tests fail on the unchanged code ({why}); fix that first")
        survivors = []
        for m in chosen:
            path = root / m.file
            original = path.read_text()
            path.write_text(mutated[m.name])
            start = time.time()
            try:
                ok, why = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if ok else "killed  "
            print(f"{verdict} {m.name:32s} {time.time() - start:5.1f} s  {why if not ok else m.note}", flush=True)
            if ok:
                survivors.append(m)
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutations killed; "
          + (f"{len(survivors)} survived: " + ", ".join(m.name for m in survivors) if survivors else "none survived"))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
