"""The primary comparison's plumbing (research/primary.py) and train.py's --data-seed, on tiny sizes.

Pinned down: --data-seed reaches the run's config, changes the scenes of both splits (and only through
the flag: --seed does not), and a run cannot be resumed with another one; the gradient log records
the norms of KEM's selection and value matrices at the steps it should, and a hooked run computes
exactly what an unhooked one does (the same losses and metrics, to the bit); the relative scale r is
Δm with none as the reference; and, end to end, a tiny `primary` experiment trains a pair with its own
data seed, records the gradients with the kem run, and reports the family beside the ablation's pair.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metrics
import train
import train_support
from research import primary, runner

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "2", "--workers", "0"]
TRAIN = [*TINY, "--tasks", "depth,sal", "--procs", "1", "--log-interval", "1", "--eval-interval", "3", "--max-iters", "6"]


def config(argv):
    args, given = train.parse_args(argv)
    return train.resolve_config(args, given)


def test_data_seed_chooses_the_scenes_and_the_seed_does_not():
    """Default 0; --data-seed 5 gives other train and val scenes; --seed alone leaves them."""
    base, other, reseeded = config(TINY), config([*TINY, "--data-seed", "5"]), config([*TINY, "--seed", "5"])
    assert (base["data_seed"], other["data_seed"], reseeded["data_seed"]) == (0, 5, 0)
    def image_of(cfg, split):                            # the scene itself, without the train split's augmentation
        data = train_support.build_data(cfg, split)
        data.transform = None
        return data[0]["image"]

    for split in ("train", "val"):
        image = lambda cfg, split=split: image_of(cfg, split)    # noqa: E731
        assert torch.equal(image(base), image(reseeded)), f"--seed changed the {split} scenes"
        assert not torch.equal(image(base), image(other)), f"--data-seed did not change the {split} scenes"


def test_a_run_cannot_be_resumed_with_another_data_seed(tmp_path):
    out = tmp_path / "run"
    assert train.cli([*TRAIN, "--max-iters", "3", "--data-seed", "2", "--out-dir", str(out)]) in (None, 0)
    assert json.loads((out / "config.json").read_text())["data_seed"] == 2
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(out), "--data-seed", "3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "data_seed: checkpoint 2, now 3" in proc.stderr, proc.stderr


def test_the_relative_scale_is_delta_m_against_none():
    """Two tasks, kem 10% better on depth (lower rmse) and 5% worse on sal: r = (10 − 5) / 2 = 2.5."""
    kem = {"depth": {"rmse": 0.9}, "sal": {"maxF": 0.76}}
    none = {"depth": {"rmse": 1.0}, "sal": {"maxF": 0.8}}
    assert primary.relative_difference(kem, none) == pytest.approx(2.5)
    assert primary.relative_difference(kem, none) == metrics.delta_m(kem, none)


def _run(prefix, out):
    proc = subprocess.run([sys.executable, *prefix, *TRAIN, "--out-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    return [(r["iter"], r["losses"]) for r in losses], json.loads((out / "results.json").read_text())["metrics"]


def test_the_gradient_log_records_and_changes_nothing(tmp_path):
    """6 steps, logged every 2 (and the first): steps 1, 2, 4, 6, each with every KEM matrix; the hooked run's
    losses and metrics equal the plain run's exactly."""
    plain = _run([str(ROOT / "train.py")], tmp_path / "plain")
    hooked = _run(["-m", "research", "_gradients", "--every", "2", "--"], tmp_path / "hooked")
    assert hooked == plain, "the hook changed the computation"
    points = primary.read_gradient_log(tmp_path / "hooked" / primary.GRADIENT_LOG)
    assert [p["iter"] for p in points] == [1, 2, 4, 6]
    for p in points:
        assert set(p["grad"]) == {*primary.SELECTION, *primary.VALUES}
        assert all(v > 0 for v in p["grad"].values()) and p["grad_total"] > 0
    assert all(v == 0 for v in points[0]["moved"].values()), "measured from the first step's weights"
    assert all(v > 0 for v in points[-1]["moved"].values())
    assert primary.group_norm(points[0], ["W_qr", "W_kr"]) == pytest.approx(
        (points[0]["grad"]["W_qr"] ** 2 + points[0]["grad"]["W_kr"] ** 2) ** 0.5)


def test_a_tiny_primary_experiment_pairs_its_own_data_with_the_ablations(tmp_path):
    """kem and none with --seed 5 --data-seed 5 (2 steps), beside an ablation pair of seed 0: two members of the
    family "primary", the new one's data rule checked, the kem record carrying selection and gradients; a dry
    run after it has nothing left to run."""
    from research import ablation

    results, runs = tmp_path / "results", tmp_path / "runs"
    common = ["--tasks", "depth,sal", "--max-iters", "2", "--eval-interval", "1", "--results", str(results),
              "--runs", str(runs)]
    ablation.main(["--rows", "none", "kem", "--seeds", "0", *common, "--", *TINY])
    out = primary.main(["--seeds", "5", "--every", "1", *common, "--", *TINY])
    recs = runner.load_records(results, "primary")
    assert set(recs) == {("kem", 5), ("none", 5)}
    for rec in recs.values():
        assert rec["train_config"]["data_seed"] == 5 and rec["train_config"]["seed"] == 5
    kem = recs["kem", 5]
    assert kem["script"][:2] == ["research", "_gradients"] and kem["selection"]["k"] > 0
    assert [p["iter"] for p in kem["gradients"]["points"]] == [1, 2]
    members = {m["data"]: m for m in out["family"]}
    assert set(members) == {"0", "= seed"} and all(m["family"] == "primary" for m in out["family"])
    assert members["= seed"]["seeds"] == [5] and members["= seed"]["differences"][0] == pytest.approx(
        primary.relative_difference(kem["metrics"], recs["none", 5]["metrics"]))
    assert "training seed and data" in (results / "primary.md").read_text()
    assert out["gradients"]["runs"][5]["ratio"], "the gradient ratio per logged step"
    assert primary.main(["--seeds", "5", "--every", "1", "--dry-run", *common, "--", *TINY]) == 0
