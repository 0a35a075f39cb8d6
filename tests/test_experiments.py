"""research/ (`python -m research`): the pieces the results stand on, on tiny sizes.

Pinned down: the paired t-interval against a hand-computed example (the families, Holm and the verdicts
are in test_stats.py); the softmax-leak simulation (noiseless scores give the bound, k = N gives softmax);
the distractor hooks (k held at the real tokens' k while distractors are present and restored after;
"other" distractors are another image's tokens, a batch of one takes the previous batch's; nothing
reaches the tokens without an exchange); the slot-selection measures on hand-made attention; the
linear probe's AUC; that a recorded run is never run again and that --commit commits the record
alone; and, end to end, a tiny ablation and tiny distractor and length experiments producing
records and tables.
"""
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from research import __main__ as experiments
import metrics
from kem_mtl import KEM, CrossTaskAttention
from research import ablation, distractors, leak, length, runner, stats

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "2", "--workers", "0"]


# --- statistics ---------------------------------------------------------------------------------

def test_paired_interval_matches_a_hand_computed_example():
    """a - b = 1, 2, 2, 3: mean 2, s = sqrt(2/3), t(0.975, 3) = 3.182446, half width = t s / 2."""
    res = stats.paired({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 9: 7.0}, {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0})
    half = 3.182446305284263 * math.sqrt(2 / 3) / 2
    assert res["seeds"] == [0, 1, 2, 3], "only the seeds both rows have are paired"
    assert res["differences"] == [1.0, 2.0, 2.0, 3.0]
    assert res["mean"] == pytest.approx(2.0)
    assert res["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-9), res
    assert res["excludes_zero"], "the interval [0.70, 3.30] excludes zero"
    spans_zero = stats.paired({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert spans_zero["ci95"][0] < 0 < spans_zero["ci95"][1] and not spans_zero["excludes_zero"]
    assert stats.t_interval([0.0, 0.0, 0.0])["excludes_zero"] is False, "no spread at zero is not a difference"
    assert stats.t_interval([1.5])["ci95"] is None


# --- the softmax leak ----------------------------------------------------------------------------

def test_leak_without_noise_equals_the_bound_and_topk_removes_it():
    """Noiseless scores: softmax's mass equals the bound, top-k (k = relevant) has none; k = N is softmax."""
    res = leak.softmax_leak([32, 256, 2048], relevant=8, gap=2.0, noise=0.0, trials=3)
    for bound, softmax, topk in zip(res["bound"], res["softmax"], res["topk"]):
        assert softmax == pytest.approx(bound, rel=1e-9)
        assert topk == 0.0
    assert res["softmax"] == sorted(res["softmax"]), "the leak grows with the number of tokens"
    full = leak.softmax_leak([64, 1024], relevant=16, k=1.0, trials=20)
    assert full["k_resolved"] == [64, 1024] and full["topk"] == full["softmax"]


def test_leak_grows_with_k_at_the_models_fractions():
    """With noisy scores, k = N/64 < N/16 < N/4 < N in leaked mass at N = 4,096."""
    leaks = [leak.softmax_leak([4096], k=k, trials=20)["topk"][0] for k in (1 / 64, 1 / 16, 0.25, 1.0)]
    assert leaks == sorted(leaks) and leaks[0] < leaks[-1], leaks


# --- distractors -----------------------------------------------------------------------------------

def test_fixed_k_hook_keeps_the_real_tokens_k_and_restores_it():
    """KEM with topk = 0.25 of N = 12 real tokens keeps k = 3 per slot with 24 distractors (not 9), then 0.25 again."""
    torch.manual_seed(0)
    module = KEM(8, 4, 0.25)
    seen = {}
    hooks = distractors.Distractors(module, 2.0, "gaussian")
    module.register_forward_pre_hook(lambda m, args: seen.update(topk=m.topk, N=args[0].shape[1]))
    out, att = module(torch.randn(2, 12, 8), return_attention=True)
    assert seen == {"topk": 3, "N": 36}
    assert out.shape == (2, 12, 8)
    assert (att["retrieve"] > 0).sum(-1).eq(3).all(), (att["retrieve"] > 0).sum(-1)
    assert module.topk == 0.25, "restored after the call"
    hooks.remove()
    floating = distractors.Distractors(module, 2.0, "gaussian", fix_k=False)
    _, att = module(torch.randn(2, 12, 8), return_attention=True)
    assert (att["retrieve"] > 0).sum(-1).eq(9).all(), "without the fix, k grows with the distractors"
    floating.remove()


def test_other_image_distractors_are_another_images_tokens():
    """Image b's distractors are tokens of images != b; a batch of one takes the previous batch's last image."""
    B, N, D = 3, 4, 2
    F_ = (100 * torch.arange(B)[:, None, None] + torch.arange(N)[None, :, None]).float().expand(B, N, D).contiguous()
    identity = nn.Identity()
    hooks = distractors.Distractors(identity, 2.0, "other", capture=True)
    assert torch.equal(identity(F_), F_)
    X, is_d = hooks.captured
    assert X.shape == (B, 3 * N, D) and is_d.sum() == 2 * N
    for b in range(B):
        owners = (X[b, is_d, 0] // 100).long()
        assert (owners != b).all(), f"image {b} got its own tokens: {X[b, is_d, 0].tolist()}"
        real = F_.view(-1, D)
        assert all((real == row).all(1).any() for row in X[b, is_d]), "distractors are real tokens"
    one = torch.full((1, N, D), 7.0)
    identity(one)
    X, is_d = hooks.captured
    assert (X[0, is_d, 0] // 100 == B - 1).all(), "a batch of one takes the previous batch's last image"


@pytest.mark.parametrize("make", [lambda: KEM(8, 4, 0.5), lambda: CrossTaskAttention(8)])
@pytest.mark.parametrize("kind", distractors.KINDS)
def test_distractors_reach_the_tokens_through_an_exchange(make, kind):
    """Both exchanges' outputs change with distractors present, and keep their shape."""
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 10, 8)
    clean = module(x)
    distractors.Distractors(module, 2.0, kind)
    noisy = module(x)
    assert noisy.shape == clean.shape
    assert not torch.allclose(noisy, clean)


def test_distractors_cannot_reach_anything_without_an_exchange():
    module = nn.Identity()
    distractors.Distractors(module, 4.0, "other")
    x = torch.randn(2, 10, 8)
    assert torch.equal(module(x), x)


def test_probe_auc_separates_what_is_separable_and_not_the_rest():
    """AUC by ranks on a hand example; a linear probe gets about 1 on shifted tokens and about 0.5 on identical ones."""
    assert distractors.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    g = torch.Generator().manual_seed(0)
    X = torch.randn(800, 8, generator=g, dtype=torch.float64)
    y = torch.arange(800) % 2 == 1
    split = torch.arange(800) < 400
    assert distractors.linear_probe_auc(X, y, split) == pytest.approx(0.5, abs=0.08)
    X[y, 0] += 4.0
    assert distractors.linear_probe_auc(X, y, split) > 0.97


# --- selection diagnostics ---------------------------------------------------------------------------

def test_jaccard_and_task_share_on_hand_made_attention():
    """3 slots, 8 tokens (2 tasks x 4): slots 0 and 1 take tokens {0, 1}, slot 2 takes {4, 5}, and then
    {1, 2} / {2, 3} / {3, 4}: Jaccard means 1/3 and (1/3 + 0 + 1/3) / 3, task shares as counted."""
    A = torch.zeros(2, 3, 8)
    for b, sets in enumerate([[(0, 1), (0, 1), (4, 5)], [(1, 2), (2, 3), (3, 4)]]):
        for slot, tokens in enumerate(sets):
            A[b, slot, list(tokens)] = torch.tensor([0.7, 0.3])
    jaccard, share, weight = ablation.selection_stats(A, num_tasks=2)
    assert jaccard.tolist() == pytest.approx([1 / 3, 2 / 9])
    assert share[0].tolist() == [[1, 0], [1, 0], [0, 1]]
    assert share[1].tolist() == [[1, 0], [1, 0], [0.5, 0.5]]
    assert weight[1, 2].tolist() == pytest.approx([0.7, 0.3]), "attention mass per task"
    with pytest.raises(ValueError, match="task blocks"):
        ablation.selection_stats(A, num_tasks=3)



def test_selection_is_compared_paired_by_seed_between_rows_of_the_same_k(tmp_path):
    """ETF slots minus learned slots, per seed, for each measure; the k sweep is not compared (other chance)."""
    def sel(jaccard, share, k=4):
        return {"selection": {"k": k, "N": 16, "share": [[0.5, 0.5]] * 2, "tasks": ["depth", "sal"], "jaccard": jaccard,
                              "jaccard_chance": 0.1, "max_task_share": share, "max_task_weight": share}}
    records = {("kem", 0): sel(0.8, 0.6), ("kem", 1): sel(0.6, 0.7), ("kem", 2): sel(0.7, 0.5),
               ("kem+etf slots", 0): sel(0.3, 0.5), ("kem+etf slots", 1): sel(0.4, 0.6),
               ("kem k=N", 0): sel(1.0, 0.5, k=16), ("none", 0): {"selection": None}}
    out = ablation.selection_report(records, tmp_path)
    assert [r["config"] for r in out["rows"]] == ["kem", "kem k=N", "kem+etf slots"]
    by_measure = {c["measure"]: c for c in out["paired"]}
    assert set(by_measure) == {"jaccard", "max_task_share"} and all(c["a"] == "kem+etf slots" for c in out["paired"])
    assert by_measure["jaccard"]["seeds"] == [0, 1]
    assert by_measure["jaccard"]["differences"] == pytest.approx([-0.5, -0.2])
    assert by_measure["max_task_share"]["differences"] == pytest.approx([-0.1, -0.1])
    assert "Paired by seed" in (tmp_path / "selection.md").read_text()

# --- the runner: records, skipping, committing ------------------------------------------------------

def _fake_launch(calls):
    """A stand-in for train.py: writes the result files a finished run leaves."""
    def launch(cmd, log_path):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"metrics": {"depth": {"rmse": 1.0}}, "iteration": 2,
                                                      "parameters": 10, "train_images_per_s": 5.0, "wall_time_s": 1.0}))
        (out / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "iter": 2, "metrics": {"depth": {"rmse": 1.0}}}) + "\n")
    return launch


def test_a_recorded_run_is_not_run_again(tmp_path):
    """First call: launches and writes the records; second call (also with runs/ gone): launches nothing;
    the time estimate of a further run of the row is its recorded median; a record with other flags is an error."""
    calls = []
    ctx = runner.Context(results=tmp_path / "results", runs=tmp_path / "runs", jobs=2,
                              launch=_fake_launch(calls), log=lambda m: None)
    plan = [runner.Run("ablation", "single-task depth", s, ["--tasks", "depth", "--seed", str(s)]) for s in (0, 1)]
    runner.execute(plan, ctx)
    assert len(calls) == 2
    rec = json.loads(plan[1].record_path(ctx.results).read_text())
    assert rec["config"] == "single-task depth" and rec["seed"] == 1 and rec["metrics"] == {"depth": {"rmse": 1.0}}
    assert rec["history"] == [{"iter": 2, "exact_edges": None, "headline": {"depth": 1.0}}]
    import shutil
    shutil.rmtree(ctx.runs)
    runner.execute(plan, ctx)
    assert len(calls) == 2, "recorded runs ran again"
    later = runner.Run("ablation", "single-task depth", 2, ["--tasks", "depth", "--seed", "2"])
    runner_s = [json.loads(r.record_path(ctx.results).read_text())["runner_wall_s"] for r in plan]
    assert runner.estimate_seconds(later, runner.load_records(ctx.results, "ablation")) == \
        (pytest.approx(sum(runner_s) / 2), "recorded"), "the estimate comes from the recorded wall times"
    changed = [runner.Run("ablation", "single-task depth", 0, ["--tasks", "depth", "--seed", "0", "--dim", "8"])]
    with pytest.raises(RuntimeError, match="other flags"):
        runner.execute(changed, ctx)


def test_commit_commits_the_record_and_nothing_else(tmp_path):
    """In a scratch repository with another file staged: the commit holds the record alone, the other stays staged."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")
    record = tmp_path / "results" / "runs" / "ablation" / "kem" / "seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    runner.commit_record(record, "results: ablation kem seed 0", repo=tmp_path)
    assert git("show", "--name-only", "--format=%s", "HEAD").split() == \
        ["results:", "ablation", "kem", "seed", "0", "results/runs/ablation/kem/seed0.json"]
    assert "A  other.txt" in git("status", "--porcelain")


# --- end to end, tiny -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    """`ablation --rows none kem` on two tasks, 1 seed, 2 steps at 32x48: 2 single-task baselines + 2 rows."""
    base = tmp_path_factory.mktemp("ablation")
    argv = ["--tasks", "depth,sal", "--rows", "none", "kem", "--seeds", "0", "--max-iters", "2", "--eval-interval", "1",
            "--results", str(base / "results"), "--runs", str(base / "runs"), "--", *TINY]
    report = ablation.main(argv)
    return base, argv, report


def test_a_tiny_ablation_writes_records_and_tables(tiny_ablation, monkeypatch):
    """Records for the 4 runs (KEM's with selection diagnostics), Δm, the kem - none comparison, tables and
    figures; a rerun trains nothing."""
    base, argv, report = tiny_ablation
    results = base / "results"
    records = runner.load_records(results, "ablation")
    assert set(records) == {("single-task depth", 0), ("single-task sal", 0), ("none", 0), ("kem", 0)}
    kem = records["kem", 0]
    assert "--procs" in kem["flags"] and len(kem["history"]) == 2
    sel = kem["selection"]
    assert sel["N"] == 2 * 4 * 6 and sel["k"] == 12 and 0 <= sel["jaccard"] <= 1
    assert len(sel["share"]) == 4 and all(sum(row) == pytest.approx(1) for row in sel["share"])
    assert records["none", 0].get("selection") is None
    rows = {r["config"]: r for r in report["rows"]}
    assert rows["kem"]["per_seed"][0]["delta_m"] is not None and rows["single-task sal"]["delta_m"] is None
    (comparison,) = report["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["seeds"]) == ("kem", "none", [0])
    kem, none = rows["kem"]["per_seed"][0], rows["none"]["per_seed"][0]
    assert comparison["differences"][0] == pytest.approx(kem["delta_m_mean_baseline"] - none["delta_m_mean_baseline"])
    assert kem["delta_m"] == pytest.approx(kem["delta_m_mean_baseline"]), "one seed: its own baselines are the mean"
    assert comparison["family"] == "ablation Δm" and comparison["verdict"] == "one seed"
    for name in ("ablation.json", "ablation.md", "comparisons.json", "comparisons.md", "learning_curve.png",
                 "selection.json", "selection.md", "selection.png"):
        assert (results / name).exists(), name
    monkeypatch.setattr(runner, "perform", lambda *a: pytest.fail("a recorded run was performed again"))
    ablation.main(argv)


def test_a_tiny_distractor_experiment_evaluates_and_trains(tiny_ablation):
    """Evaluates the ablation's kem checkpoint with other-image distractors and trains one with them."""
    base, _, _ = tiny_ablation
    results = base / "results"
    out = distractors.main(["--tasks", "depth,sal", "--exchanges", "kem", "--kinds", "other", "--ratios", "1",
                                   "--seeds", "0", "--max-iters", "2", "--eval-interval", "1",
                                   "--results", str(results), "--runs", str(base / "runs"), "--", *TINY])
    recs = runner.load_records(results, "distractors")
    assert set(recs) == {("test-time kem other x1", 0), ("trained kem other x1", 0)}
    probe = recs["test-time kem other x1", 0]["probe"]
    assert 0 <= probe["auc_token"] <= 1 and probe["images"] == 4
    assert out["test_time"][0]["delta_m"]["1.0"]["by_seed"][0] is not None
    assert out["trained"][0]["paired"]["seeds"] == [0]
    assert (results / "distractors.md").exists() and (results / "distractors.png").exists()


def test_a_tiny_length_check_trains_longer_and_compares_with_the_ablations_runs(tiny_ablation):
    """kem and none at 4 steps beside the ablation's 2-step runs of the same seed; kem − none per length on the
    primary scale r (kem's relative difference against none), tested in the family "primary"."""
    base, _, _ = tiny_ablation
    results = base / "results"
    out = length.main(["--tasks", "depth,sal", "--seeds", "0", "--lengths", "4", "--eval-interval", "2",
                              "--results", str(results), "--runs", str(base / "runs"), "--", *TINY])
    assert set(runner.load_records(results, "length")) == {("kem 4 steps", 0), ("none 4 steps", 0)}
    assert sorted((r["row"], r["steps"]) for r in out["runs"]) == [("kem", 2), ("kem", 4), ("none", 2), ("none", 4)]
    runs = {(r["row"], r["steps"]): r for r in out["runs"]}
    r = {steps: metrics.delta_m(runs["kem", steps]["metrics"], runs["none", steps]["metrics"]) for steps in (2, 4)}
    assert [d["steps"] for d in out["differences"]] == [2, 4]
    for d in out["differences"]:
        assert d["difference"] == pytest.approx(r[d["steps"]])
    summary = {p["steps"]: p for p in out["paired"]["per_length"]}          # one seed: the mean is the difference
    assert sorted(summary) == [2, 4]
    for steps, p in summary.items():
        assert p["seeds"] == [0] and p["r"]["mean"] == pytest.approx(r[steps]) and p["r"]["family"] == "primary"
        kem, none = (runs[row, steps]["headline"]["depth"] for row in ("kem", "none"))
        sign = metrics.HEADLINE["depth"][1]
        assert p["tasks"]["depth"]["mean"] == pytest.approx(100 * sign * (kem - none) / none)
    change = summary[4]["change_from_shortest"]                            # (kem − none at 4) − (at 2)
    assert change["mean"] == pytest.approx(r[4] - r[2]) and change["family"] == "length"
    assert "Δm" not in (results / "length.md").read_text().split("Regenerate")[1], "no Δm at other lengths"
    assert (results / "length.md").exists() and (results / "length.png").exists()


def test_the_command_lists_the_experiments_and_each_has_help(capsys):
    proc = subprocess.run([sys.executable, "-m", "research"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "python -m research ablation" in proc.stdout
    for name in ("primary", "ablation", "leak", "distractors", "length", "imbalance"):
        with pytest.raises(SystemExit) as exit_:
            experiments.main([name, "--help"])
        assert exit_.value.code == 0 and f"python -m research {name}" in capsys.readouterr().out


def test_an_unknown_experiment_is_named_in_one_line_with_the_choices():
    proc = subprocess.run([sys.executable, "-m", "research", "noise"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert "no experiment 'noise'" in proc.stderr and "ablation, leak, distractors, length" in proc.stderr


# --- the lab changes training runs only through train.Hooks ------------------------------------------

REFERENCE_MODULES = {"train", "train_support", "support", "synthetic", "datasets", "kem_mtl", "etf", "metrics"}


def patched_names(source, filename):
    """(line, text) of every assignment to, or setattr/monkeypatch on, an attribute of a reference module."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                    and target.value.id in REFERENCE_MODULES:
                found.append((node.lineno, ast.unparse(target)))
    return found


def test_no_module_of_the_lab_replaces_a_name_of_the_reference():
    sources = sorted((ROOT / "research").glob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        assert patched_names(path.read_text(), str(path)) == [], f"{path.name} patches the reference; use train.Hooks"
    # the check itself finds what it must
    assert patched_names("import train\ntrain.build_optimizer = f\nsetattr(synthetic, 'SyntheticRooms', C)\n", "x") \
        == [(2, "train.build_optimizer"), (3, "synthetic.?")]


def test_commit_says_so_first_and_refuses_uncommitted_records(tmp_path, capsys):
    repo = tmp_path / "repo"
    results = repo / "results"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    run = runner.Run("ablation", "kem", 0, ["--seed", "0"])
    path = run.record_path(results)
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "r"], check=True)
    ctx = runner.Context(results=results, runs=tmp_path / "runs", jobs=1, commit=True)
    runner.announce_commits([run], ctx, repo=repo)
    assert "--commit: each new record is committed" in capsys.readouterr().out
    path.write_text('{"changed": 1}')
    with pytest.raises(SystemExit, match="uncommitted changes"):
        runner.announce_commits([run], ctx, repo=repo)
