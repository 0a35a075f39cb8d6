"""The imbalance experiment (research/imbalance.py): what these tests pin down.

- the rule: only semseg changes. Through the dataset hook, a training sample's image and its depth,
  normals, edge, saliency and parts labels are the default split's bit for bit (the same seeded
  augmentation); its semseg differs only on rare-class pixels, which become 255; whole regions are
  ignored or kept; keep = 1 is the split train.py builds (the same object), keep = 0 leaves no rare
  label; the share of regions kept is near keep; val is untouched;
- the rare-class measure: average precision and AUROC against brute force (every threshold, every
  pair), ties included; `rare_scores` on a model with known logits ignores 255 pixels;
- stability: the set Jaccard against Python sets; the observers do not change training (a tiny run
  through `_imbalance --keep 1` has exactly the losses and metrics of plain train.py);
- the plan: each row's ablation flags plus --data-seed = --seed, both splits, the pilot in its own
  folder; the report on hand-made records (the primary drop − drop, the secondaries' family, the
  costs); the pairs for 80% power against the textbook value.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic
import train
import train_support
from research import ablation, imbalance, runner

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "2", "--workers", "0"]
BALL, CYLINDER = synthetic.BALL, synthetic.CYLINDER


# --- the rule: rare regions' semseg labels ignored, nothing else changed ---------------------------

def _splits(n=12, tasks=None):
    args = ["--train-samples", str(n), "--val-samples", "4", "--image-size", "48x64"]
    if tasks:
        args += ["--tasks", tasks]
    cfg = train.resolve_config(*train.parse_args(args))
    cfg["out_dir"] = None
    plain = train_support.build_all_data(cfg)
    return cfg, plain


def test_only_semseg_changes_and_only_on_rare_pixels(tmp_path):
    """The same seeded augmentation on the default and the imbalanced train split (SeededSamples, as train.py
    draws them): every key but semseg is identical; semseg is 255 or unchanged on rare pixels, unchanged elsewhere."""
    cfg, plain = _splits()
    cfg["out_dir"] = str(tmp_path)
    data = imbalance.RareLabelsTrain(imbalance.RareLabels(keep=0.3))("train", cfg, lambda: plain["train"])
    assert isinstance(data, imbalance.IgnoredRare)
    a, b = train_support.SeededSamples(plain["train"], 3), train_support.SeededSamples(data, 3)
    ignored = 0
    for position in range(len(data)):
        x, y = a[position, position], b[position, position]
        assert set(x) == set(y)
        for key in x:
            if key not in ("semseg", "meta"):
                assert torch.equal(x[key], y[key]), f"sample {position}: {key} differs"
        differ = x["semseg"] != y["semseg"]
        assert (y["semseg"][differ] == 255).all() and torch.isin(x["semseg"][differ], torch.tensor([BALL, CYLINDER])).all()
        ignored += int(differ.sum())
    assert ignored > 0
    summary = json.loads((tmp_path / imbalance.SPLIT_FILE).read_text())
    assert summary["keep"] == 0.3 and summary["labelled_pixels"]["default"][BALL] > summary["labelled_pixels"]["imbalanced"][BALL]


def test_whole_regions_are_ignored_and_keep_zero_and_one():
    base = synthetic.SyntheticRooms("train", 10, size=(48, 64), tasks=["semseg", "depth"])
    for keep in (0.0, 0.5, 1.0):
        data = imbalance.IgnoredRare(base, imbalance.RareLabels(keep=keep))
        for i in range(len(base)):
            semseg, mask = base[i]["semseg"].numpy(), data.mask(i)
            assert np.isin(semseg[mask], [BALL, CYLINDER]).all()
            for c in (BALL, CYLINDER):
                regions, n = imbalance.ndimage.label(semseg == c)
                for r in range(1, n + 1):
                    assert len(set(mask[regions == r].tolist())) == 1, f"image {i}: a region half ignored"
            if keep == 0.0:
                assert not np.isin(data[i]["semseg"].numpy(), [BALL, CYLINDER]).any()
            if keep == 1.0:
                assert not mask.any() and torch.equal(data[i]["semseg"], base[i]["semseg"])


def test_regions_are_kept_with_probability_keep_and_fates_depend_on_the_data_seed_only():
    base = synthetic.SyntheticRooms("train", 150, size=(24, 32), tasks=["semseg"])
    data = imbalance.IgnoredRare(base, imbalance.RareLabels(keep=0.25))
    n, kept = data.summary["rare_regions"]["all"], data.summary["rare_regions"]["kept"]
    sd = (n * 0.25 * 0.75) ** 0.5
    assert n > 200 and abs(kept - 0.25 * n) < 4 * sd, f"kept {kept} of {n} regions, expected {0.25 * n:.0f} ± {4 * sd:.0f}"
    again = imbalance.IgnoredRare(base, imbalance.RareLabels(keep=0.25))
    assert all(np.array_equal(a, b) for a, b in zip(data.masks, again.masks))


def test_the_hook_leaves_val_and_keep_one_alone():
    cfg, plain = _splits()
    built = object()
    hook = imbalance.RareLabelsTrain(imbalance.RareLabels(keep=1.0))
    assert hook("train", cfg, lambda: built) is built
    assert imbalance.RareLabelsTrain(imbalance.RareLabels(keep=0.0))("val", cfg, lambda: built) is built
    with_hook = train_support.build_all_data(cfg, hooks=train.Hooks(dataset=hook))
    assert isinstance(with_hook["train"], synthetic.SyntheticRooms)
    for i in range(4):
        assert torch.equal(with_hook["val"][i]["semseg"], plain["val"][i]["semseg"])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="classes must be"):
        imbalance.RareLabels(("sofa",))
    with pytest.raises(ValueError, match="keep must be a probability in"):
        imbalance.RareLabels(keep=1.5)
    with pytest.raises(ValueError, match="needs a SyntheticRooms split with semseg"):
        imbalance.IgnoredRare(synthetic.SyntheticRooms("train", 2, tasks=["depth"]), imbalance.RareLabels())


# --- the rare-class measure ---------------------------------------------------------------------------

def brute_ap(scores, labels):
    """Every distinct score as a threshold, highest first: Σ (R_t − R_prev) P_t."""
    P, ap, prev = sum(labels), 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        above = [y for s, y in zip(scores, labels) if s >= t]
        recall = sum(above) / P
        ap += (recall - prev) * sum(above) / len(above)
        prev = recall
    return ap


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(12))
def test_ap_and_auroc_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    levels = [3, 10, 1000][seed % 3]                                   # many ties, some, almost none
    scores = (rng.integers(0, levels, n) / levels).astype(np.float32)
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[0], labels[-1] = True, False                                # both sides present
    assert imbalance.average_precision(scores, labels) == pytest.approx(brute_ap(scores.tolist(), labels.tolist()), abs=1e-12)
    assert imbalance.auroc(scores, labels) == pytest.approx(brute_auroc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_ap_and_auroc_edge_cases():
    assert imbalance.average_precision([0.1, 0.2], [False, False]) is None and imbalance.auroc([0.3], [True]) is None
    assert imbalance.average_precision([0.9, 0.1, 0.5], [True, False, True]) == 1.0        # positives ranked first
    assert imbalance.auroc([0.9, 0.1, 0.5], [True, False, True]) == 1.0
    assert imbalance.average_precision([0.5] * 4, [True, False, False, False]) == 0.25     # one tie: the prevalence
    assert imbalance.auroc([0.5] * 4, [True, False, False, False]) == 0.5


class FixedLogits(torch.nn.Module):
    """A "model" whose semseg logits are the batch's first image channels spread over the classes."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, _, H, W = x.shape
        logits = torch.stack([x[:, c % 3] * (c + 1) for c in range(len(synthetic.CLASS_NAMES))], 1)   # (B, C, H, W)
        return {"semseg": logits + self.w}


def test_rare_scores_are_the_softmax_ap_over_labelled_pixels():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        semseg = torch.randint(0, len(synthetic.CLASS_NAMES), (2, 5, 6), generator=g)
        semseg[0, 0] = 255
        batches.append({"image": torch.rand(2, 3, 5, 6, generator=g), "semseg": semseg})
    out = imbalance.rare_scores(FixedLogits(), batches, (BALL, CYLINDER), torch.device("cpu"))
    with torch.no_grad():
        probs = torch.cat([FixedLogits()(b["image"])["semseg"].softmax(1) for b in batches])     # (6, C, 5, 6)
    target = torch.cat([b["semseg"] for b in batches])
    valid = target != 255
    assert out["pixels"] == int(valid.sum())
    for j, c in enumerate((BALL, CYLINDER)):
        s, y = probs[:, c][valid].numpy(), (target[valid] == c).numpy()
        assert out["ap"][j] == pytest.approx(brute_ap(s.tolist(), y.tolist()))
        assert out["auroc"][j] == pytest.approx(brute_auroc(s.tolist(), y.tolist()))
        assert out["share"][j] == pytest.approx(y.mean())


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


def test_observing_does_not_change_training(tmp_path):
    """A tiny KEM run through `_imbalance --keep 1` (rare scores and sets at each evaluation) has exactly the
    losses and val metrics of the same run of plain train.py (one thread each)."""
    flags = ["--tasks", "semseg,depth", "--exchange", "kem", "--seed", "3", "--data-seed", "3", "--max-iters", "4",
             "--eval-interval", "2", "--log-interval", "1", "--procs", "1", *TINY]
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
    rare = imbalance.read_rare_log(tmp_path / "tracked")
    assert [r["iter"] for r in rare] == [2, 4] and len(rare[0]["ap"]) == 2
    assert not (tmp_path / "plain" / imbalance.SETS_DIR).exists()
    assert not (tmp_path / "tracked" / imbalance.SPLIT_FILE).exists(), "keep = 1 is the split as built"


# --- plan and report --------------------------------------------------------------------------------

def _args(pilot=False):
    p = runner.parser("imbalance", "")
    args = p.parse_args(["--max-iters", "1500"])
    args.tasks, args.rows, args.rare, args.keep, args.stability_images, args.pilot, args.seeds = \
        list(imbalance.TASKS), None, list(imbalance.RARE), 0.1, 32, pilot, None
    return args


def test_the_plan_uses_the_ablations_flags_with_the_data_seed():
    (phase,) = imbalance.plan(_args(), [], None)
    assert len(phase) == 2 * 2 * len(imbalance.SEEDS)
    rows = ablation.row_flags(imbalance.TASKS)
    for run in phase:
        row, split = run.config.rsplit(", ", 1)
        assert run.flags == runner.train_flags([*rows[row], "--data-seed", str(run.seed)], run.seed, 1500, 250, [])
        assert imbalance.parse_rule(run.script[2:-1])[0].keep == (1.0 if split == "default" else 0.1)
        assert run.record_path("r") == Path("r/runs/imbalance") / runner.slug(run.config) / f"seed{run.seed}.json"
    (pilot,) = imbalance.plan(_args(pilot=True), [], None)
    assert {r.config for r in pilot} == {"kem, default", "kem, imbalanced"}
    assert {r.seed for r in pilot} == set(imbalance.PILOT_SEEDS) and pilot[0].experiment == "imbalance-pilot"


def _record(config, seed, ap, auroc, stab, keep):
    ious = [0.5] * len(synthetic.CLASS_NAMES)
    rule = imbalance.RareLabels(keep=keep)
    return {"experiment": "imbalance", "config": config, "seed": seed, "flags": [],
            "script": list(imbalance.imbalance_script(rule)),
            "metrics": {"semseg": {"mIoU": 0.5, "iou_per_class": ious}, "depth": {"rmse": 1.0}},
            "rare": [{"iter": 1500, "ap": [ap, ap], "auroc": [auroc, auroc], "share": [0.04, 0.06]}],
            "stability": {"images": 2, "L": 2, "k": 2, "N": 8, "chance": 0.1, "iters": [1, 2],
                          "consecutive": [{"from": 1, "to": 2, "jaccard": stab, "per_slot": [stab, stab]}], "to_final": []},
            "split": None, "history": []}


def test_report_tests_the_primary_alone_and_the_secondaries_together(tmp_path):
    """kem loses 0.1 AUROC on the imbalanced split, slots 0.05: the primary is +5 points; in AP kem loses 0.2,
    slots loses 0.1 − 0.01 s: +10 + s points."""
    for s in (0, 1, 2):
        recs = [_record("kem, default", s, 0.5, 0.9, 0.5, 1.0), _record("kem, imbalanced", s, 0.3, 0.8, 0.6, 0.1),
                _record("kem+etf slots, default", s, 0.5, 0.9, 0.5, 1.0),
                _record("kem+etf slots, imbalanced", s, 0.4 + 0.01 * s, 0.85, 0.5, 0.1)]
        for r in recs:
            path = tmp_path / "runs" / "imbalance" / runner.slug(r["config"]) / f"seed{s}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(r))
    out = imbalance.report(tmp_path)
    (primary,) = out["primary"]
    assert primary["differences"] == pytest.approx([5, 5, 5]) and primary["m"] == 1 and primary["measure"] == "rare_auroc"
    assert primary["family"] == imbalance.PRIMARY and primary["verdict"] == "real"
    secondary = {c["measure"]: c for c in out["secondary"]}
    assert len(out["secondary"]) == 3 and all(c["m"] == 3 for c in out["secondary"])
    assert secondary["stability"]["differences"] == pytest.approx([-0.1] * 3)       # (0 − 0) − (0.6 − 0.5)
    assert secondary["rare_ap"]["differences"] == pytest.approx([10, 11, 12])
    assert secondary["rare_auroc"]["differences"] == pytest.approx([5] * 3)          # slots − kem, imbalanced
    cost = {(c["row"], c["measure"]): c for c in out["costs"]}
    assert cost["kem", "rare_ap"]["mean"] == pytest.approx(-20) and "p" not in cost["kem", "rare_ap"]
    text = (tmp_path / "imbalance.md").read_text()
    assert "tested alone" in text and (tmp_path / "imbalance.png").exists()


def test_required_pairs_matches_the_textbook():
    """Paired t-test, two-sided 5%, 80% power: d = 1 needs 10 pairs, d = 0.5 needs 34 (G*Power / pwr.t.test)."""
    assert imbalance.required_pairs(1.0, 1.0, minimum=2) == 10
    assert imbalance.required_pairs(2.0, 1.0, minimum=2) == 34
    assert imbalance.required_pairs(1.0, 10.0) == 5                     # never fewer than five


def test_a_tiny_pilot_end_to_end(tmp_path):
    """`python -m research imbalance --pilot` on tiny runs: records with the rare scores, the stability and the
    split; the pilot's table."""
    imbalance.main(["--pilot", "--seeds", "4", "--keep", "0.5", "--max-iters", "2", "--eval-interval", "1", "--jobs", "1",
                    "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--", *TINY])
    recs = runner.load_records(tmp_path / "results", "imbalance-pilot")
    assert set(recs) == {("kem, default", 4), ("kem, imbalanced", 4)}
    imb = recs["kem, imbalanced", 4]
    assert imb["flags"][imb["flags"].index("--data-seed") + 1] == "4" and [r["iter"] for r in imb["rare"]] == [1, 2]
    assert imb["split"]["keep"] == 0.5 and recs["kem, default", 4]["split"] is None
    assert imb["stability"]["iters"] == [1, 2]
    assert (tmp_path / "results" / "imbalance_pilot.md").exists()


# --- the ETF verdicts on varying data ----------------------------------------------------------------

def test_the_etf_runs_have_the_primary_kem_flags_but_etf():
    """Each ETF row's flags are the primary experiment's kem flags with only --etf changed, seeds 5-9; the
    primary's kem runs went through `_gradients`, which changes no training (test_primary)."""
    from research import primary
    args = _args()
    args.seeds = None
    (phase,) = imbalance.etf_plan(args, [], None)
    (kem_runs,) = primary.plan(_primary_args(), [], None)
    kem = {r.seed: r.flags for r in kem_runs if r.config == "kem"}
    assert {r.seed for r in phase} == set(kem) == {5, 6, 7, 8, 9} and len(phase) == 5 * len(imbalance.ETF_ROWS)
    for run in phase:
        i = run.flags.index("--etf")
        etf = run.config.split("+")[1].replace("etf ", "")
        assert run.flags[:i + 1] + run.flags[i + 2:] == kem[run.seed][:i + 1] + kem[run.seed][i + 2:]
        assert kem[run.seed][i + 1] == "none" and run.flags[i + 1] == etf and run.script == ["train.py"]


def _primary_args():
    p = runner.parser("primary", "")
    args = p.parse_args(["--max-iters", "1500", "--seeds", "5", "6", "7", "8", "9"])
    args.tasks, args.every = list(runner.SYNTHETIC_TASKS), 50
    return args


def test_the_etf_report_pairs_with_the_primary_kem_runs(tmp_path):
    """Hand-made records: features − kem in Δm and slots − kem in overlap, paired by seed; a record whose
    other flags differ is left unpaired."""
    def write(experiment, config, seed, flags, metric, jaccard):
        rec = {"experiment": experiment, "config": config, "seed": seed, "flags": flags, "history": [],
               "metrics": {"depth": {"rmse": metric}}, "selection": {"jaccard": jaccard}}
        path = tmp_path / "runs" / experiment / runner.slug(config) / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))

    flags = lambda etf, s: ["--tasks", "depth", "--etf", etf, "--data-seed", str(s), "--seed", str(s)]
    write("ablation", "single-task depth", 0, ["--tasks", "depth"], 1.0, None)
    for s in (5, 6, 7):
        write("primary", "kem", s, flags("none", s), 1.0, 0.8)
        write("etf-data", "kem+etf features", s, flags("features", s), 1.1 + 0.01 * s, 0.5)
        write("etf-data", "kem+etf slots", s, flags("slots", s) + (["--other"] if s == 7 else []), 1.0, 0.3 + 0.01 * s)
    out = imbalance.etf_report(tmp_path)
    members = {c["row"]: c for c in out["family"]}
    assert members["kem+etf features"]["differences"] == pytest.approx([-100 * (0.1 + 0.01 * s) for s in (5, 6, 7)])
    assert members["kem+etf slots"]["seeds"] == [5, 6]
    assert members["kem+etf slots"]["differences"] == pytest.approx([-0.45, -0.44])
    assert out["unpaired"] == [{"row": "kem+etf slots", "seed": 7, "why": "no primary kem record with the same flags but --etf"}]
    assert all(c["m"] == 2 and c["family"] == imbalance.ETF_FAMILY for c in out["family"])
