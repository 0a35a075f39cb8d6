"""Every value a user can type on train.py's command line: a clean start or one paragraph and exit code 2.

Pinned down:
- a property: for values drawn for every numeric and choice flag (negative, zero, NaN, inf, huge,
  junk), the command line's own parsing and configuration (train.cli, with the run itself replaced
  by a stub: nothing trains) either accepts the draw, printing at most some one-line warnings, or
  refuses it with exit code 2 and one paragraph in the command line's words (flags such as
  --num-slots, never argument names such as num_vectors), never a traceback; what it accepts is a
  configuration the loop can run;
- --help shows each flag's default for the preset of the --dataset on the line (synthetic without
  one), says what unusual values mean (--grad-clip 0 = no clipping) and how best.pt is chosen;
- end to end, through `python train.py` in a subprocess, every row of issue 28's table: the values
  that used to crash or pass unnoticed now give one paragraph and exit code 2 before anything starts,
  or a clean run (with one line of warning where the value is legal but almost certainly a mistake);
  a truncated JPEG in a NYUD tree stops the run before training with the file named; warnings are
  printed once per run, by one process; PyTorch's grad-stride warning is not shown.
"""
import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import datasets
import train
from synthetic import SyntheticRooms

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "32x32", "--train-samples", "16", "--val-samples", "4", "--max-iters", "2", "--dim", "16",
        "--eval-interval", "2", "--workers", "0"]


# --- the property: every drawn value is accepted or refused in one paragraph ------------------

def configure(argv, tmp):
    """train.cli(argv) up to the point where a run would start: (exit code, stderr, the accepted cfg or None)."""
    accepted = {}

    def stub(cfg, *args, **kwargs):
        accepted["cfg"] = cfg

    err = io.StringIO()
    with mock.patch.object(train, "run", stub), mock.patch.object(train, "evaluate_checkpoint", stub), \
            mock.patch.object(train.support, "spawn_local_procs", lambda story, cfg, *a, **k: stub(cfg)), \
            mock.patch.object(train.support, "check_inputs", lambda cfg: None), contextlib.redirect_stderr(err):
        try:
            code = train.cli([*argv, "--out-dir", str(tmp / "never-written")])
        except SystemExit as stop:                  # argparse's refusals (and --help) exit by themselves
            code = stop.code
    return code, err.getvalue(), accepted.get("cfg")


def integers():
    return st.one_of(st.integers(-3, 70), st.integers(-2**70, 2**70), st.sampled_from([2**32, 2**63, 10**30]))


def numbers():
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e400, 0.25]))


def text_of(strategy):
    return strategy.map(str)


JUNK = st.sampled_from(["", "abc", "1.5", "nan", "inf", "-inf", "1e3", "0x10", "½", " 7", "9" * 40])
COUNT = st.one_of(text_of(integers()), JUNK)
REAL = st.one_of(text_of(numbers()), text_of(integers()), JUNK)
SIZE = st.one_of(st.builds("{}x{}".format, integers(), integers()), st.builds("{}x{}".format, JUNK, integers()), JUNK)


def choice(valid):
    return st.one_of(st.sampled_from(valid), JUNK)


FLAGS = {
    "--workers": COUNT, "--image-size": SIZE, "--train-samples": COUNT, "--val-samples": COUNT, "--data-seed": COUNT,
    "--num-slots": COUNT, "--topk": REAL, "--dim": COUNT, "--batch-size": COUNT, "--accum": COUNT,
    "--max-iters": COUNT, "--lr": REAL, "--weight-decay": REAL, "--warmup-iters": COUNT, "--grad-clip": REAL,
    "--seed": COUNT, "--procs": st.one_of(st.just("auto"), COUNT), "--eval-interval": COUNT, "--log-interval": COUNT,
    "--dataset": choice(datasets.NAMES), "--exchange": choice(["kem", "cross", "none"]),
    "--etf": choice(["none", "features", "slots", "both", "normalize"]), "--topk-mode": choice(["mask", "post"]),
    "--backbone": choice(["tiny", "resnet18", "swin_t"]), "--device": choice(["auto", "cpu", "cuda", "mps"]),
    "--amp": choice(["auto", "none", "bf16", "fp16"]), "--tasks": st.sampled_from(["semseg", "depth,semseg", "x", ","]),
}


@st.composite
def command_lines(draw):
    """A few flags, each with a drawn value, written --flag=value (so that -5 is a value, not a flag)."""
    flags = draw(st.permutations(sorted(FLAGS)))[:draw(st.integers(1, 3))]
    return [f"{flag}={draw(FLAGS[flag])}" for flag in flags]


INTERNAL = re.compile(r"\b(num_vectors|num_samples|num_slots|topk_mode|data_seed|image_size|train_size|eval_size|"
                      r"grad_clip|batch_size)\b|\b[a-z_]+=\S")      # argument names and argument=value


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
@example(argv=["--image-size=7x9"])
@example(argv=["--dim=12"])
@example(argv=["--lr=nan"])
@example(argv=["--seed=-1"])
@example(argv=["--data-seed=-1"])
@example(argv=["--warmup-iters=-5"])
@example(argv=["--grad-clip=-1"])
@example(argv=["--num-slots=100000"])
@example(argv=["--etf=both", "--num-slots=100"])
@example(argv=["--dim=1000000000000"])
@example(argv=["--train-samples=1000000000"])
@example(argv=["--workers=99999"])
def test_every_value_is_accepted_or_refused_in_one_paragraph(argv, tmp_path_factory):
    code, err, cfg = configure(argv, tmp_path_factory.getbasetemp())
    event("accepted" if code == 0 else "refused")       # pytest --hypothesis-show-statistics: how many of each
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if code == 0:
        assert cfg is not None and all(line.startswith("warning: ") for line in lines), (argv, err)
        for key in ("batch_size", "max_iters", "accum", "eval_interval", "log_interval"):
            assert cfg[key] >= 1, (argv, key)
        assert math.isfinite(cfg["lr"]) and cfg["lr"] > 0 and math.isfinite(cfg["grad_clip"]) and cfg["grad_clip"] >= 0
        assert cfg["warmup_iters"] >= 0 and 0 <= cfg["seed"] < 2**32 and cfg["weight_decay"] >= 0
        return
    assert code == 2 and cfg is None, (argv, code, err)
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), (argv, err)        # one paragraph, one line here
    assert "--" in errors[0] and not INTERNAL.search(errors[0]), (argv, errors[0])   # in the command line's words


# --- --help: the chosen preset's defaults, what unusual values mean, how best.pt is chosen -----

def help_text(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())              # argparse wraps lines: compare words


def test_help_shows_the_presets_defaults(capsys):
    plain, nyud = help_text([], capsys), help_text(["--dataset", "nyud"], capsys)
    for text, preset, size in ((plain, "synthetic", "96x128"), (nyud, "nyud", "448x576")):
        for key, value in train.PRESETS[preset].items():
            if key in ("max_iters", "lr", "batch_size", "dim", "grad_clip", "warmup_iters"):
                assert f"(default: {value})" in text, (preset, key, value)
        assert f"(default: {size}" in text and f"Defaults are the {preset} preset's" in text
    assert "(default: 2000)" in plain and "(default: 40000)" in nyud and "(default: 1500)" not in nyud
    assert "evaluation pads to 480x640" in nyud


def test_help_says_what_unusual_values_mean_and_how_best_pt_is_chosen(capsys):
    text = help_text([], capsys)
    assert "0 = no clipping; not negative" in text and "(0 = none;" in text
    assert "more slots than tokens is warned about" in text
    assert ("best.pt (the evaluation with the best headline metric of the first task in --tasks, here semseg mIoU) "
            "and results.json (the last evaluation)") in text, text
    assert "here depth rmse" not in text                          # the first task of the preset's list


# --- end to end: every row of the table ------------------------------------------------

def train_py(args, tmp_path, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out-dir", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_refused(proc, *needles):
    """Exit code 2, one paragraph on stderr, nothing on stdout (nothing started)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and err.startswith("error: ") and "\n" not in err, err
    assert proc.stdout == "", proc.stdout
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("args, needles", [
    (["--image-size", "7x9"], ["--image-size must be at least 8x8 pixels, got 7x9"]),
    (["--dim", "12"], ["--dim 12 does not fit the network's GroupNorm layers", "try --dim 8 or --dim 16"]),
    (["--lr", "nan"], ["--lr must be a finite number > 0, got nan"]),
    (["--seed", "-1"], ["--seed must lie in 0..4294967295", "got -1"]),
    (["--data-seed", "-1"], ["--data-seed must be an int >= 0, got -1"]),
    (["--warmup-iters", "-5"], ["--warmup-iters must be >= 0 (0 = no warm-up), got -5"]),
    (["--grad-clip", "-1"], ["--grad-clip must be a finite number >= 0 (0 = no clipping), got -1.0"]),
    (["--etf", "both", "--num-slots", "100"], ["--etf both with --num-slots 100", "--num-slots <= 17"]),
])
def test_rows_refused_before_anything_starts(args, needles, tmp_path):
    proc = train_py([*TINY, *args], tmp_path)
    assert_refused(proc, *needles)
    assert "num_vectors" not in proc.stderr and not (tmp_path / "run").exists()


def test_row_val_samples_1_over_two_processes(tmp_path):
    """The process with no val image takes part in the evaluation; the run ends cleanly, once."""
    proc = train_py([*TINY, "--val-samples", "1", "--procs", "2"], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count("done in") == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["val_samples"] == 1 and config["world_size"] == 2
    assert (tmp_path / "run" / "results.json").is_file()


def test_row_num_slots_100000_warns_in_one_line_and_runs(tmp_path):
    proc = train_py([*TINY, "--num-slots", "100000", "--tasks", "semseg", "--procs", "2", "--max-iters", "1",
                     "--eval-interval", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "--num-slots" in line]
    assert warning == ["warning: --num-slots 100000 is more than the 16 tokens KEM sees in a 32x32 image with 1 "
                       "task(s): the slots are no longer a bottleneck (the paper's L << N); try 8-32"], proc.stderr


def test_row_batch_size_1000_shows_no_stride_warning(tmp_path):
    proc = train_py([*TINY, "--batch-size", "1000", "--procs", "2", "--tasks", "semseg,depth"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stride" not in proc.stderr.lower() and "warning" not in proc.stderr, proc.stderr


def test_a_runtime_warning_is_printed_once_by_one_process(tmp_path):
    """KEM warns when k resolves to 1; each of the two processes meets it, only process 0 speaks."""
    proc = train_py([*TINY, "--topk", "0.0001", "--procs", "2", "--tasks", "semseg"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("KEM keeps k = 1") == 1, proc.stderr


def nyud_tree(root):
    source = SyntheticRooms("train", 3, size=(32, 48), seed=1, tasks=["semseg", "depth", "normals", "edge"])
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2)), root / "NYUD_MT", "train")
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2, 3)), root / "NYUD_MT", "val")
    return root


NYUD = ["--dataset", "nyud", "--no-pretrained", "--backbone", "tiny", "--image-size", "32x32", "--dim", "16",
        "--max-iters", "2", "--eval-interval", "2", "--workers", "0", "--batch-size", "2"]


def test_row_a_truncated_jpeg_stops_the_run_before_training(tmp_path):
    root = nyud_tree(tmp_path / "data")
    jpg = root / "NYUD_MT" / "images" / "synthetic-train-s1-000001.jpg"   # not a split's first sample
    jpg.write_bytes(jpg.read_bytes()[:-100])
    proc = train_py([*NYUD, "--data-dir", str(root), "--procs", "2"], tmp_path)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert f"1 of the 15 files in {root / 'NYUD_MT'} cannot be used" in err and f"{jpg}: cannot read it" in err, err
    assert "iter " not in proc.stdout and not (tmp_path / "run" / "ckpt.pt").exists()


def test_row_a_small_nyud_tree_warns_once_per_split(tmp_path):
    root = nyud_tree(tmp_path / "data")
    proc = train_py([*NYUD, "--data-dir", str(root), "--procs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for split, n in (("train", 2), ("val", 1)):
        assert proc.stderr.count(f"nyud {split} split in") == 1, proc.stderr
    assert (root / "NYUD_MT" / datasets.VERDICT).is_file(), "the tree's verdict is remembered"
