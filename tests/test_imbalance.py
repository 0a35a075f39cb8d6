"""research/imbalance.py: the imbalanced training split, the selection's stability, the report.

Pinned down:
- the rule: rare objects are kept with probability `keep` (counted over many scenes, within four
  binomial standard deviations), the rare classes' pixel share drops by about that factor (rendered
  on a small sample), keep = 1 renders the default scene bit for bit and keep = 0 leaves no rare
  pixel; a replacement box stands inside its object's footprint and nothing else in the scene moves;
- validity: synthetic's own label tests (edges, saliency, parts, normals against depth) hold on
  imbalanced scenes, run through test_synthetic's test bodies;
- the dataset hook of the `_imbalance` process gives an imbalanced train split and a val split
  byte-identical to the default one;
- stability: the set Jaccard against Python sets; following the selection does not change training
  (a tiny run through `_imbalance --keep 1` has exactly the losses and metrics of plain train.py);
- the plan uses the ablation's flags, so the report pairs each run with the ablation's run of the
  same row and seed; the report's numbers on hand-made records (tail IoU, Δm, drops, family).
"""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics
import synthetic
import test_synthetic
import train
import train_support
from research import ablation, imbalance, runner
from synthetic import SyntheticRooms

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "2", "--workers", "0"]
BALL, CYLINDER = synthetic.BALL, synthetic.CYLINDER


# --- the rule ------------------------------------------------------------------------------------

def test_rare_objects_are_kept_with_probability_keep():
    """Over 600 training scenes (scene descriptions only: no rendering), rare objects kept / before ≈ keep."""
    before = SyntheticRooms("train", 600, size=(8, 8))
    after = SyntheticRooms("train", 600, size=(8, 8), edit_scene=imbalance.RareClasses(keep=0.1))
    n = kept = boxes_added = 0
    for i in range(len(before)):
        a, b = before.scene(i)["objects"], after.scene(i)["objects"]
        assert len(a) == len(b)
        n += sum(o["cls"] in (BALL, CYLINDER) for o in a)
        kept += sum(o["cls"] in (BALL, CYLINDER) for o in b)
        boxes_added += sum(o["cls"] == synthetic.BOX for o in b) - sum(o["cls"] == synthetic.BOX for o in a)
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(kept - 0.1 * n) < 4 * sd, f"kept {kept} of {n} rare objects, expected {0.1 * n:.0f} ± {4 * sd:.0f}"
    assert boxes_added == n - kept, "every rare object not kept became a box"


def test_rare_pixel_share_drops_by_about_keep():
    """150 training scenes at 48 x 64: (rare share, imbalanced) / (rare share, default) near keep = 0.25."""
    keep = 0.25
    default = SyntheticRooms("train", 150, size=(48, 64), tasks=["semseg"])
    imbalanced = SyntheticRooms("train", 150, size=(48, 64), tasks=["semseg"], edit_scene=imbalance.RareClasses(keep=keep))
    share = []
    for ds in (default, imbalanced):
        counts = sum(np.bincount(ds.render(i)["semseg"].ravel(), minlength=len(synthetic.CLASS_NAMES))
                     for i in range(len(ds)))
        share.append(counts[[BALL, CYLINDER]].sum() / counts.sum())
    ratio = share[1] / share[0]
    assert keep / 1.6 < ratio < keep * 1.4, f"rare share {share[0]:.4f} -> {share[1]:.4f}: ratio {ratio:.3f}, keep {keep}"


def test_keep_one_is_the_default_scene_and_keep_zero_leaves_no_rare_pixel():
    for i in range(6):
        plain = SyntheticRooms("train", 6, size=(24, 32)).render(i)
        same = SyntheticRooms("train", 6, size=(24, 32), edit_scene=imbalance.RareClasses(keep=1.0)).render(i)
        for key in ("image", "semseg", "depth", "normals", "edge", "sal", "parts"):
            assert np.array_equal(plain[key], same[key]), f"scene {i}: {key} differs with keep = 1"
        none = SyntheticRooms("train", 6, size=(24, 32), edit_scene=imbalance.RareClasses(keep=0.0)).render(i)
        assert not np.isin(none["semseg"], [BALL, CYLINDER]).any()


def test_a_replacement_box_stands_in_the_footprint_and_nothing_else_moves():
    rule = imbalance.RareClasses(keep=0.0)
    replaced = 0
    for i in range(40):
        a = SyntheticRooms("train", 40, size=(8, 8)).scene(i)
        b = SyntheticRooms("train", 40, size=(8, 8), edit_scene=rule).scene(i)
        for key in a:
            if key != "objects":
                assert repr(a[key]) == repr(b[key]), f"scene {i}: {key} changed"
        for old, new in zip(a["objects"], b["objects"]):
            if old["cls"] not in (BALL, CYLINDER):
                assert new is old or repr(new) == repr(old)
                continue
            replaced += 1
            (x, y), R = imbalance.footprint(old)
            corners = np.array([[sx * new["half"][0], sy * new["half"][1]] for sx in (-1, 1) for sy in (-1, 1)])
            c, s = math.cos(new["yaw"]), math.sin(new["yaw"])
            world = corners @ np.array([[c, s], [-s, c]]) + [x, y]
            assert new["cls"] == synthetic.BOX and new["c"][2] == new["half"][2], "a box on the floor"
            assert np.hypot(*(world - [x, y]).T).max() <= R + 1e-9, "inside the footprint"
    assert replaced > 20


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="classes must be"):
        imbalance.RareClasses(("box",))
    with pytest.raises(ValueError, match="keep must be a probability in"):
        imbalance.RareClasses(keep=1.5)
    with pytest.raises(ValueError, match="edit_scene must be callable"):
        SyntheticRooms("train", 2, edit_scene=0.1)


@pytest.mark.parametrize("index", [0, 1, 13])           # scenes with 4, 7 and 5 balls and cylinders
def test_synthetics_label_invariants_hold_on_imbalanced_scenes(monkeypatch, index):
    """test_synthetic's own test bodies (edges, saliency, parts, normals vs depth) on scenes with every rare
    object replaced by a box."""
    def render(split, seed, i, size):
        return SyntheticRooms(split, i + 1, size=size, seed=seed, edit_scene=imbalance.RareClasses(keep=0.0)).render(i)

    monkeypatch.setattr(test_synthetic, "render", render)
    assert sum(o["cls"] in (BALL, CYLINDER) for o in SyntheticRooms("train", 20).scene(index)["objects"]) >= 4
    test_synthetic.test_every_semantic_boundary_is_an_edge_and_edges_are_thin.hypothesis.inner_test(
        "train", 0, index, (40, 56))
    test_synthetic.test_normals_agree_with_depth_and_face_the_camera.hypothesis.inner_test("train", 0, index, (48, 64))
    a = render("train", 0, index, (48, 64))
    person = a["semseg"] == synthetic.PERSON
    if person.any():
        assert (a["parts"][person] >= 1).all() and (a["parts"][~person] == 0).all()
    else:
        assert (a["parts"] == synthetic.IGNORE).all()


def test_the_dataset_hook_gives_an_imbalanced_train_split_and_the_default_val():
    rule = imbalance.RareClasses(keep=0.0)
    cfg = train.resolve_config(*train.parse_args(["--train-samples", "6", "--val-samples", "6", "--image-size", "24x32"]))
    plain = train_support.build_all_data(cfg)
    patched = train_support.build_all_data(cfg, hooks=train.Hooks(dataset=imbalance.ImbalancedTrain(rule)))
    assert patched["train"].edit_scene == rule and patched["val"].edit_scene is None
    for i in range(6):
        a, b = plain["val"][i], patched["val"][i]
        for key in a:
            if key != "meta":
                assert torch.equal(a[key], b[key]), f"val {i}: {key} differs"
    assert any(not torch.equal(plain["train"][i]["semseg"], patched["train"][i]["semseg"]) for i in range(6))


# --- the selection's stability ---------------------------------------------------------------------

def test_set_jaccard_against_python_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(20, generator=g)[:5] for _ in range(6)]).view(2, 3, 5)
    b = torch.stack([torch.randperm(20, generator=g)[:5] for _ in range(6)]).view(2, 3, 5)
    got = imbalance.set_jaccard(a, b, 20)
    for i in range(2):
        for j in range(3):
            sa, sb = set(a[i, j].tolist()), set(b[i, j].tolist())
            assert got[i, j].item() == pytest.approx(len(sa & sb) / len(sa | sb))
    assert torch.equal(imbalance.set_jaccard(a, a, 20), torch.ones(2, 3))


def test_stability_from_saved_sets(tmp_path):
    """Two evaluations, 1 image, 2 slots: slot 0 keeps {0, 1} (J = 1), slot 1 moves {2, 3} -> {3, 4} (J = 1/3)."""
    folder = tmp_path / imbalance.SETS_DIR
    folder.mkdir()
    np.save(folder / "iter_000010.npy", np.array([[[0, 1], [2, 3]]], np.int16))
    np.save(folder / "iter_000020.npy", np.array([[[0, 1], [3, 4]]], np.int16))
    (folder / "meta.json").write_text(json.dumps({"N": 8, "k": 2, "images": 1}))
    s = imbalance.stability(tmp_path)
    (c,) = s["consecutive"]
    assert (c["from"], c["to"]) == (10, 20) and c["per_slot"] == [1.0, pytest.approx(1 / 3, abs=1e-4)]
    assert c["jaccard"] == pytest.approx(2 / 3) and s["chance"] == pytest.approx(0.25 / 1.75)
    assert imbalance.stability(tmp_path / "nothing") is None


def test_following_the_selection_does_not_change_training(tmp_path):
    """A tiny KEM run through `_imbalance --keep 1` (the default split, sets saved at each evaluation) has
    exactly the losses and val metrics of the same run of plain train.py (one thread each)."""
    flags = ["--tasks", "semseg,depth", "--exchange", "kem", "--seed", "3", "--max-iters", "4", "--eval-interval", "2",
             "--log-interval", "1", "--procs", "1", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, script in (("plain", ["train.py"]), ("tracked", ["research", "_imbalance", "--keep", "1", "--"])):
        proc = subprocess.run(runner.command(script) + [*flags, "--out-dir", str(tmp_path / name)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("plain", "tracked")}
    pick = lambda recs, kind, key: [r[key] for r in recs if r.get("kind") == kind]
    assert pick(lines["tracked"], "train", "losses") == pick(lines["plain"], "train", "losses")
    assert len(pick(lines["plain"], "train", "losses")) == 4
    assert pick(lines["tracked"], "eval", "metrics") == pick(lines["plain"], "eval", "metrics")
    s = imbalance.stability(tmp_path / "tracked")
    assert s["iters"] == [2, 4] and s["images"] == 4 and 0 <= s["consecutive"][0]["jaccard"] <= 1
    assert not (tmp_path / "plain" / imbalance.SETS_DIR).exists()


# --- plan and report --------------------------------------------------------------------------------

def test_the_plan_uses_the_ablations_flags(capsys):
    p = runner.parser("imbalance", "")
    args = p.parse_args(["--max-iters", "1500"])
    args.tasks, args.rows, args.rare, args.keep, args.stability_images = \
        list(runner.SYNTHETIC_TASKS), list(imbalance.ROWS), ["ball", "cylinder"], 0.1, 32
    (phase,) = imbalance.plan(args, [], None)
    assert len(phase) == 20
    rows = ablation.row_flags(runner.SYNTHETIC_TASKS)
    for run in phase:
        assert run.flags == ablation.training_run(run.config, rows[run.config], run.seed, 1500, 250, []).flags
        assert run.script[:2] == ["research", "_imbalance"] and run.script[-1] == "--"
        assert run.record_path("r") == Path("r/runs/imbalance") / runner.slug(run.config) / f"seed{run.seed}.json"
    assert imbalance.parse_rule(run.script[2:-1]) == (imbalance.RareClasses(("ball", "cylinder"), 0.1), 32)


def _record(experiment, config, seed, flags, semseg, depth, script=("train.py",), **extra):
    ious = [0.5] * len(synthetic.CLASS_NAMES)
    ious[BALL], ious[CYLINDER] = semseg
    return {"experiment": experiment, "config": config, "seed": seed, "flags": flags, "script": list(script),
            "metrics": {"semseg": {"mIoU": float(np.mean(ious)), "iou_per_class": ious}, "depth": {"rmse": depth}},
            "history": [], **extra}


def test_report_pairs_by_seed_with_the_ablations_runs(tmp_path):
    """Hand-made records: kem and kem+etf slots on both splits, two seeds; seed 1 of kem+etf slots' ablation
    record has other flags and is left unpaired."""
    split = {"rare_classes": ["ball", "cylinder"], "keep": 0.1,
             "train_class_share": {"default": [0.1] * 10, "imbalanced": [0.1] * 10}}
    stab = lambda j: {"images": 2, "L": 2, "k": 2, "N": 8, "chance": 0.1, "iters": [1, 2],
                      "consecutive": [{"from": 1, "to": 2, "jaccard": j, "per_slot": [j, j]}], "to_final": []}
    recs = []
    for s in (0, 1):
        recs += [_record("ablation", f"single-task {t}", s, ["--tasks", t], (0.4, 0.4), 1.0) for t in ("semseg", "depth")]
    tail = {("kem", "ablation"): (0.4, 0.2), ("kem", "imbalance"): (0.1, 0.1),
            ("kem+etf slots", "ablation"): (0.4, 0.4), ("kem+etf slots", "imbalance"): (0.3, 0.3)}
    for (row, experiment), t in tail.items():
        for s in (0, 1):
            flags = [row, str(s)] + (["other"] if (row, experiment, s) == ("kem+etf slots", "ablation", 1) else [])
            extra = {"split": split, "stability": stab(0.5 if row == "kem" else 0.8)} if experiment == "imbalance" else {}
            script = imbalance.imbalance_script(imbalance.RareClasses()) if experiment == "imbalance" else ("train.py",)
            recs.append(_record(experiment, row, s, flags, t, 1.0 + 0.1 * s, script=script, **extra))
    for r in recs:
        path = tmp_path / "runs" / r["experiment"] / runner.slug(r["config"]) / f"seed{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    out = imbalance.report(tmp_path, ["semseg", "depth"], "test")
    assert out["unpaired"] == [{"row": "kem+etf slots", "seed": 1, "why": "the ablation's record has other flags"}]
    comps = {(c["a"], c["b"], c["measure"]): c for c in out["comparisons"]}
    assert all(c["family"] == "imbalance" for c in comps.values())
    cost = comps["kem (imbalanced)", "kem (default)", "tail_iou"]
    assert cost["seeds"] == [0, 1] and cost["differences"] == pytest.approx([-0.2, -0.2])
    # Δm: semseg mIoU moves with the tail classes, depth is the same on both splits
    baselines = {"semseg": {"mIoU": 0.48}, "depth": {"rmse": 1.0}}
    dm = lambda t, s: metrics.delta_m(_record("", "", 0, [], t, 1.0 + 0.1 * s)["metrics"], baselines)
    assert comps["kem (imbalanced)", "kem (default)", "delta_m"]["differences"] == pytest.approx(
        [dm((0.1, 0.1), s) - dm((0.4, 0.2), s) for s in (0, 1)])
    drops = comps["kem+etf slots's drop", "kem's drop", "tail_iou"]
    assert drops["seeds"] == [0] and drops["differences"] == pytest.approx([(0.3 - 0.4) - (0.1 - 0.3)])
    stable = comps["kem+etf slots (imbalanced)", "kem (imbalanced)", "stability"]
    assert stable["differences"] == pytest.approx([0.3, 0.3])
    text = (tmp_path / "imbalance.md").read_text()
    assert "Not paired: kem+etf slots seed 1" in text and "ball (rare)" in text
    assert (tmp_path / "imbalance.json").exists() and (tmp_path / "imbalance.png").exists()
