"""The README's promises: CI runs exactly the test command the README shows, and every Python
command it shows for this project parses its flags (the long runs themselves are not executed here)."""
import re
import shlex
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    shown = re.search(r"pip install -r requirements-dev.txt && (.+)", README).group(1).strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert shown in ci, f"README shows {shown!r}; .ci/run must run exactly that"


def readme_train_commands():
    for line in README.splitlines():
        line = line.strip()
        for prefix in ("python train.py", "torchrun"):
            if line.startswith(prefix) and "train.py" in line:
                args = shlex.split(line.split("#")[0].rstrip(" \\"))
                yield args[args.index("train.py") + 1:]


@pytest.mark.parametrize("args", list(readme_train_commands()), ids=" ".join)
def test_readme_train_commands_parse(args):
    args = [re.sub(r"<[^>]*>", "x", a.replace("$t", "semseg")) for a in args]   # fill the placeholders
    parsed, given = train.parse_args(args)
    cfg = train.resolve_config(parsed, given)
    assert cfg["dataset"] in train.PRESETS


def test_readme_names_only_existing_files():
    named = re.findall(r"`([\w/]+\.(?:py|ipynb|txt))`", README)
    linked = re.findall(r"\]\(([\w/.]+\.(?:png|md|json|ipynb))\)", README)     # pictures and links
    assert linked, "the README links its results pictures"
    for name in set(named + linked):
        assert (ROOT / name).exists() or (ROOT / "notebooks" / name).exists(), name


def test_readme_bench_and_experiment_commands_exist():
    import bench
    import experiments

    shown = re.findall(r"python (bench|experiments)\.py (\w+)", README)
    assert {"bench", "experiments"} <= {script for script, _ in shown}
    for script, name in shown:
        known = bench.BENCHES if script == "bench" else experiments.EXPERIMENTS
        assert name in known, f"README shows `python {script}.py {name}`; {script}.py has {sorted(known)}"
