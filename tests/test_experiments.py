"""experiments.py: the pieces the results stand on.

Pinned down: the softmax-leak simulation reproduces the bound when scores are noiseless and top-k
removes the leak when the relevant tokens clearly win; distractor tokens leave the output's shape
alone, cannot reach anything without an exchange, and do reach the tokens through cross-attention
and KEM; a train.py run with distractors goes end to end.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import experiments
from kem_mtl import KEM, CrossTaskAttention

ROOT = Path(__file__).resolve().parent.parent


def test_leak_without_noise_equals_the_bound_and_topk_removes_it():
    res = experiments.softmax_leak([32, 256, 2048], relevant=8, gap=2.0, noise=0.0, trials=3)
    for bound, softmax, topk in zip(res["bound"], res["softmax"], res["topk"]):
        assert softmax == pytest.approx(bound, rel=1e-9)
        assert topk == 0.0
    assert res["softmax"] == sorted(res["softmax"]), "the leak grows with the number of tokens"


def test_leak_with_noisy_scores_grows_for_topk_too():
    res = experiments.softmax_leak([64, 16384], relevant=16, gap=3.0, noise=1.0, trials=50)
    assert res["topk"][0] < res["topk"][1] < res["softmax"][1]


@pytest.mark.parametrize("make", [lambda: KEM(8, 4, 0.5), lambda: CrossTaskAttention(8)])
def test_distractors_reach_the_tokens_through_an_exchange(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 10, 8)
    clean = module(x)
    experiments.add_distractors(module, 2.0)
    noisy = module(x)
    assert noisy.shape == clean.shape
    assert not torch.allclose(noisy, clean)


def test_distractors_cannot_reach_anything_without_an_exchange():
    module = nn.Identity()
    experiments.add_distractors(module, 4.0)
    x = torch.randn(2, 10, 8)
    assert torch.equal(module(x), x)


def test_a_run_with_distractors_trains_and_evaluates(tmp_path):
    flags = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--train-samples", "8", "--val-samples", "2",
             "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--log-interval", "1",
             "--tasks", "semseg,depth", "--exchange", "kem"]
    res = experiments._run_distracted(1.0, tmp_path / "run", flags, print)
    assert set(res["metrics"]) == {"semseg", "depth"}
    ev = experiments._run_distracted(3.0, tmp_path / "eval", ["--eval-only", "--ckpt", str(tmp_path / "run" / "ckpt.pt")], print)
    assert set(ev["metrics"]) == {"semseg", "depth"}


def test_the_command_lists_the_experiments():
    proc = subprocess.run([sys.executable, str(ROOT / "experiments.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "python experiments.py ablation" in proc.stdout
