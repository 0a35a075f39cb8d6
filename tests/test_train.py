"""train.py end to end on the CPU, through the command line, with tiny synthetic runs.

Pinned down: a run learns (the loss falls) and writes every output, all parseable and in range;
an interrupted run resumed from its checkpoint logs exactly the losses of an uninterrupted one;
--eval-only reproduces the final metrics from the checkpoint; two gloo processes reach the
parameters one process reaches with the same global batch; bf16 autocast runs on the CPU; the real
NYUD loader path works on a packaging-B tree written by export_nyud_layout; a non-finite loss stops
the run naming the task and leaves the last checkpoint intact; every bad input gives its message
and a non-zero exit code without a traceback.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import datasets
import train
from synthetic import SyntheticRooms

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "24",
        "--val-samples", "4", "--workers", "0", "--batch-size", "2", "--log-interval", "2", "--procs", "1"]
DEFAULT_PROCS = [a for a in TINY if a not in ("--procs", "1")]    # --procs auto: 2 processes on a 2-core CPU


def run(args, check=True, timeout=300, **kwargs):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_metrics(a, b, rel):
    """Nested dicts / lists of numbers equal to a relative tolerance (None = NaN written as null)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_metrics(a[k], b[k], rel)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_metrics(x, y, rel)
    elif a is None or b is None or isinstance(a, str):
        assert a == b
    else:
        assert a == pytest.approx(b, rel=rel, abs=1e-12)


def train_losses(path):
    return [(r["iter"], r["loss"], r["losses"]) for r in read_jsonl(path) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    proc = run([*DEFAULT_PROCS, "--max-iters", "40", "--eval-interval", "20", "--out-dir", str(out)])
    return out, proc


def test_a_tiny_run_learns_and_writes_every_output(tiny_run):
    out, proc = tiny_run
    for name in ("config.json", "metrics.jsonl", "ckpt.pt", "best.pt", "results.json",
                 "eval_000020.png", "eval_000040.png"):
        assert (out / name).is_file(), f"{name} missing; stdout:\n{proc.stdout}"
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "synthetic" and config["max_iters"] == 40 and config["dim"] == 16
    assert config["amp"] == "auto" and config["amp_resolved"] == "none" and "amp none (auto)" in proc.stdout
    losses = train_losses(out / "metrics.jsonl")
    assert [it for it, _, _ in losses] == list(range(2, 41, 2))
    first, last = losses[0][1], sum(loss for _, loss, _ in losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last three {last:.3f}"
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert set(m) == set(datasets.task_channels("synthetic"))
    assert 0 <= m["semseg"]["mIoU"] <= 1 and 0 <= m["parts"]["mIoU"] <= 1
    assert m["depth"]["rmse"] > 0 and math.isfinite(m["depth"]["rmse"])
    assert 0 <= m["normals"]["mean"] <= 180
    assert 0 <= m["edge"]["odsF"] <= 1 and 0 <= m["sal"]["maxF"] <= 1
    assert results["parameters"] > 0 and results["train_images_per_s"] > 0 and results["wall_time_s"] > 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 40 and set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["exact_edges"] for e in evals] == [False, True]
    assert "odsF_approx" in evals[0]["metrics"]["edge"] and "odsF" in evals[1]["metrics"]["edge"]
    assert "img/s" in proc.stdout and "eta" in proc.stdout


def test_eval_only_reproduces_the_final_metrics(tiny_run):
    out, _ = tiny_run
    run(["--eval-only", "--ckpt", str(out / "ckpt.pt"), "--workers", "0"])
    evaluated = json.loads((out / "eval_ckpt.json").read_text())["metrics"]
    final = json.loads((out / "results.json").read_text())["metrics"]
    assert_same_metrics(evaluated, final, rel=1e-9)


def test_resume_continues_exactly(tiny_run, tmp_path):
    """Kill a run once it has checkpointed, resume it, and compare every logged loss."""
    reference, _ = tiny_run
    out = tmp_path / "b"
    args = [sys.executable, str(ROOT / "train.py"), *DEFAULT_PROCS, "--max-iters", "40", "--eval-interval", "20",
            "--out-dir", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                  # the program and every process it started, at once
    proc.wait()
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["iteration"]
    assert stopped_at == 20, "the run must have been stopped between its two checkpoints"
    run(["--resume", str(out), "--workers", "0"])
    assert train_losses(out / "metrics.jsonl") == train_losses(reference / "metrics.jsonl")
    assert json.loads((out / "results.json").read_text())["metrics"] == \
        json.loads((reference / "results.json").read_text())["metrics"]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    common = [*TINY, "--max-iters", "4", "--eval-interval", "4", "--tasks", "semseg,depth,normals"]
    run([*common, "--batch-size", "4", "--out-dir", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "train.py")]
    proc = subprocess.run([*launcher, *common, "--batch-size", "2", "--out-dir", str(tmp_path / "two")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in one:
        if not torch.is_tensor(one[name]):              # a module's settings (KEM's _extra_state): equal
            assert two[name] == one[name], name
            continue
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=f"parameter {name}")
    assert train_losses(tmp_path / "one" / "metrics.jsonl")[-1][1] == pytest.approx(
        train_losses(tmp_path / "two" / "metrics.jsonl")[-1][1], rel=1e-4)


def test_the_optimiser_is_fused_and_takes_the_unfused_step():
    """build_optimizer picks the fused Adam(W) on the CPU; its steps match the per-tensor one up to rounding."""
    cfg = {**train.COMMON, **train.PRESETS["synthetic"]}
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    fused, _ = train.build_optimizer(a, cfg)
    plain = torch.optim.AdamW(b.parameters(), lr=fused.param_groups[0]["lr"], weight_decay=cfg["weight_decay"])
    assert fused.defaults["fused"] and isinstance(fused, torch.optim.AdamW)
    x = torch.randn(4, 5)
    for _ in range(5):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

def test_bf16_autocast_runs_on_the_cpu(tmp_path):
    run([*TINY, "--max-iters", "4", "--eval-interval", "4", "--amp", "bf16", "--out-dir", str(tmp_path / "bf16")])
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert all(math.isfinite(v) for m in results["metrics"].values() for v in m.values() if isinstance(v, float))


def test_the_real_nyud_path_on_an_exported_packaging_b_tree(tmp_path):
    source = SyntheticRooms("train", 6, size=(48, 64), seed=3, tasks=["semseg", "depth", "normals", "edge"])
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(4)), tmp_path / "NYUD_MT", "train")
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(4, 6)), tmp_path / "NYUD_MT", "val")
    out = tmp_path / "run"
    proc = run(["--dataset", "nyud", "--data-dir", str(tmp_path), "--no-download", "--backbone", "tiny",
                "--no-pretrained", "--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--workers", "0",
                "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--log-interval", "1",
                "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"semseg", "depth", "normals", "edge"}
    assert "4 train / 2 val images" in proc.stdout


def test_compile_survives_evaluation_at_another_size(tmp_path):
    """--compile with the nyud preset: training at the 32x48 crop, evaluation padded to 480x640. (A module
    compiled for the crop recompiles with symbolic sizes at evaluation, and the padding's modulo fails to
    compile; evaluation runs the module uncompiled.)"""
    source = SyntheticRooms("train", 3, size=(48, 64), seed=3, tasks=["semseg", "depth", "normals", "edge"])
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2)), tmp_path / "NYUD_MT", "train")
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2, 3)), tmp_path / "NYUD_MT", "val")
    out = tmp_path / "run"
    run(["--dataset", "nyud", "--data-dir", str(tmp_path), "--no-download", "--backbone", "tiny", "--no-pretrained",
         "--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--workers", "0", "--batch-size", "2",
         "--procs", "1", "--max-iters", "2", "--eval-interval", "1", "--compile", "--out-dir", str(out)], timeout=1200)
    evals = [r["iter"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [1, 2] and (out / "results.json").is_file()


class EvaluationFailed(Exception):
    pass


def test_a_failed_evaluation_loses_no_training_and_runs_again_on_resume(tmp_path, monkeypatch):
    """The checkpoint is written before each evaluation: an evaluation that fails leaves the steps
    before it on disk, and --resume evaluates first, then continues exactly as an unbroken run."""
    common = [*TINY, "--max-iters", "4", "--eval-interval", "2", "--tasks", "semseg,depth"]
    assert train.cli([*common, "--out-dir", str(tmp_path / "whole")]) == 0
    original = train.evaluate

    def fails_first(*args, **kwargs):
        monkeypatch.setattr(train, "evaluate", original)
        raise EvaluationFailed("the first evaluation fails")

    monkeypatch.setattr(train, "evaluate", fails_first)
    out = tmp_path / "broken"
    with pytest.raises(EvaluationFailed):
        train.cli([*common, "--out-dir", str(out)])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iteration"] == 2
    assert train.cli(["--resume", str(out), "--workers", "0"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["kind"], r["iter"]) for r in records] == [(r["kind"], r["iter"]) for r in
                                                          read_jsonl(tmp_path / "whole" / "metrics.jsonl")]
    assert train_losses(out / "metrics.jsonl") == train_losses(tmp_path / "whole" / "metrics.jsonl")
    assert json.loads((out / "results.json").read_text())["metrics"] == \
        json.loads((tmp_path / "whole" / "results.json").read_text())["metrics"]
    best, whole = (torch.load(path / "best.pt", weights_only=True) for path in (out, tmp_path / "whole"))
    assert (best["iteration"], best["best_score"]) == (whole["iteration"], whole["best_score"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = train.compute_losses

    def poisoned(outputs, batch, tasks):
        losses = original(outputs, batch, tasks)
        calls["n"] += 1
        if calls["n"] > 3:
            losses["depth"] = losses["depth"] * float("nan")
        return losses

    monkeypatch.setattr(train, "compute_losses", poisoned)
    out = tmp_path / "nan"
    code = train.cli([*TINY, "--max-iters", "8", "--eval-interval", "2", "--out-dir", str(out)])
    message = capsys.readouterr().err
    assert code != 0 and "the depth loss became nan" in message and "ckpt.pt" in message, message
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("args, message", [
    (["--tasks", "semseg,height"], "unknown task(s) height for --dataset synthetic; valid tasks are semseg"),
    (["--topk", "0"], "--topk must be a count >= 1 or a fraction in (0, 1], got 0"),
    (["--topk", "1.5"], "got 1.5"),
    (["--num-slots", "0"], "--num-slots must be >= 1, got 0"),
    (["--num-slots", "70", "--etf", "slots"],
     "--etf slots with --num-slots 70: a simplex of --num-slots 70 vectors needs --dim >= 69, got --dim 64"),
    (["--topk-mode", "post", "--procs", "3"], "--procs 3 must divide --batch-size 8"),
    (["--etf", "slots", "--exchange", "cross"], "needs --exchange kem"),
    (["--backbone", "tiny", "--pretrained"], "the tiny backbone has no pretrained weights"),
    (["--train-samples", "5", "--dataset", "nyud"], "only applies to --dataset synthetic"),
    (["--eval-only"], "--eval-only needs --ckpt"),
    (["--resume", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
])
def test_bad_input_gives_one_paragraph_and_exit_code(args, message, capsys, tmp_path):
    code = train.cli([*args, "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet' (choose from"),
    (["--backbone", "vit"], "invalid choice: 'vit' (choose from"),
    (["--max-iters", "ten"], "invalid int value: 'ten'"),
])
def test_unknown_choices_list_the_valid_ones(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.cli(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_real_data_says_what_to_do(tmp_path, capsys):
    code = train.cli(["--dataset", "nyud", "--data-dir", str(tmp_path), "--no-download", "--no-pretrained",
                      "--backbone", "tiny", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and "--dataset synthetic" in err and str(tmp_path) in err, err


def test_runs_refuse_to_mix(tiny_run, capsys, tmp_path):
    out, _ = tiny_run
    code = train.cli(["--out-dir", str(out)])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    code = train.cli(["--resume", str(out), "--exchange", "cross"])
    err = capsys.readouterr().err
    assert code == 2 and "exchange: checkpoint 'kem', now 'cross'" in err, err
    code = train.cli(["--eval-only", "--ckpt", str(out / "ckpt.pt"), "--exchange", "none"])
    assert code == 2 and "exchange: checkpoint 'kem', now 'none'" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes((out / "ckpt.pt").read_bytes()[:1000])
    code = train.cli(["--eval-only", "--ckpt", str(broken)])
    assert code == 2 and "cannot read checkpoint" in capsys.readouterr().err


def test_the_command_line_exits_without_a_traceback(tmp_path):
    proc = run(["--tasks", "nothing", "--out-dir", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "error: unknown task(s) nothing" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="our own processes inherit the patch only when forked")
def test_a_failure_in_one_of_our_own_processes_is_reported_once(tmp_path, monkeypatch, capsys):
    """--procs 2: the processes stop together and the parent prints the first error, exit code 1."""
    original = train.compute_losses

    def poisoned(outputs, batch, tasks):
        losses = original(outputs, batch, tasks)
        losses["depth"] = losses["depth"] * float("nan")
        return losses

    monkeypatch.setattr(train, "compute_losses", poisoned)
    out = tmp_path / "nan2"
    code = train.cli([a for a in TINY if a not in ("--procs", "1")] + ["--procs", "2", "--max-iters", "4",
                                                                        "--eval-interval", "2", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("error: ") == 1 and "depth" in err and "loss became nan" in err, err
    assert not (out / "ckpt.pt").exists()
