"""The three notebooks run from top to bottom in a fresh kernel, compute what they say, and stay small.

Each of notebooks/01_etf.ipynb, 02_kem.ipynb and 03_train.ipynb is executed the way a reader's
Jupyter runs it: a new "python3" kernel (ipykernel on this very interpreter, whatever kernels the
user's Jupyter knows about), working directory notebooks/, every cell in order. Their shared set-up
(the repository on sys.path, seeds, small PNG figures, the QUICK flag) is notebooks/_setup.py.
KEM_MTL_QUICK=1 shortens every long step (training runs, random trials, timings), so the three take
one to two minutes on a 2-core CPU, kernel start-ups and two short train.py runs included. A cell that
raises fails its test with the cell's traceback. Beyond "no error", each test reads back values the
notebook printed and checks them against what the notebook claims:
  01_etf    the simplex-ETF properties hold to float32 rounding, and ETF slot queries overlap less
            in their top-k selections than random ones on isotropic tokens;
  02_kem    the step-by-step Retrieve / Write / Broadcast equals KEM.forward_literal (the equations as
            written) and KEM.forward (reassociated), and at the largest token count softmax leaks more
            mass to irrelevant tokens than top-k softmax;
  03_train  the in-notebook training run wrote finite losses to its metrics.jsonl, and the ablation
            section printed either the table or the command that makes it.
And without running anything: the committed notebooks carry the outputs of a full run and together
weigh less than 400 KB, so that they stay readable on a web page.
Executing needs nbformat, nbclient and ipykernel (requirements-dev.txt); those tests are skipped
without them, except under CI=true, where their absence is an error.

The committed notebooks carry the outputs of a full run (no KEM_MTL_QUICK), so readers see the
pictures. To regenerate them (it trains for several minutes):

    python tests/test_notebooks.py                 # all three; or name some: ... 02_kem 03_train
"""
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest

WHY = "the notebook tests need nbformat, nbclient and ipykernel: pip install -r requirements-dev.txt"


def notebook_packages():
    """nbformat and nbclient; skips the test without them (an error under CI, which installs them)."""
    if os.environ.get("CI"):
        import ipykernel  # noqa: F401
        import nbclient
        import nbformat
    else:
        nbformat = pytest.importorskip("nbformat", reason=WHY)
        nbclient = pytest.importorskip("nbclient", reason=WHY)
        pytest.importorskip("ipykernel", reason=WHY)
    return nbformat, nbclient


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_etf", "02_kem", "03_train")
MAX_BYTES = 400_000      # the three committed notebooks together, outputs included


def execute(name, *, quick):
    """Run notebooks/<name>.ipynb in a new kernel; returns (the notebook with outputs, the kernel's argv)."""
    nbformat, nbclient = notebook_packages()
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    # No kernel directories are searched, so "python3" is ipykernel's built-in spec, which launches
    # sys.executable: the kernel is this interpreter (this venv), never one from the user's config.
    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    env = {k: v for k, v in os.environ.items() if k != "KEM_MTL_QUICK"}
    if quick:
        env["KEM_MTL_QUICK"] = "1"
        # Quick runs are small, so one thread is about as fast as two, and it stays fast when another
        # process keeps the cores busy (measured here: a training step of two threads sharing two
        # cores with another two-thread run slowed 50-fold, one thread did not).
        env.setdefault("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, km=km, timeout=600 if quick else None, record_timing=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env, cleanup_kc=True)     # shut the kernel down at the end: we own its manager
    return nb, km.kernel_spec.argv


def outputs(nb):
    """Every output of every code cell (works on a NotebookNode and on the plain JSON alike)."""
    return [out for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell["outputs"]]


def printed(nb):
    """Everything the notebook's cells printed (stdout and stderr), as one string."""
    texts = [out.get("text", "") for out in outputs(nb) if out["output_type"] == "stream"]
    return "".join(t if isinstance(t, str) else "".join(t) for t in texts)   # JSON may hold a list of lines


def pictures(nb):
    return sum("image/png" in out.get("data", {}) for out in outputs(nb))


def run_quick(name):
    start = time.perf_counter()
    nb, argv = execute(name, quick=True)
    print(f"{name}: {time.perf_counter() - start:.1f} s in quick mode")
    assert argv[0] == sys.executable, f"the kernel ran {argv[0]}, not this interpreter {sys.executable}"
    return nb


def test_01_etf():
    nb = run_quick("01_etf")
    text = printed(nb)
    worst = float(re.search(r"worst deviation from the ETF properties: (\S+)", text).group(1))
    assert worst < 1e-5, f"an ETF property is off by {worst}"
    rows = re.findall(r"Gaussian +(\d+) +(random|ETF) \| +\d+ / \d+ +([\d.]+) +([\d.]+)", text)
    overlap = {(int(k), queries): float(mean) for k, queries, mean, _ in rows}
    assert len(overlap) == 4, text
    for k in {k for k, _ in overlap}:
        assert overlap[k, "ETF"] < overlap[k, "random"], f"k = {k}: mean Jaccard {overlap}"
    assert pictures(nb) >= 3


def test_02_kem():
    nb = run_quick("02_kem")
    text = printed(nb)
    for form in ("KEM.forward_literal", "KEM.forward"):
        diff = float(re.search(rf"step by step vs {re.escape(form)}: max \|difference\| = (\S+)", text).group(1))
        assert diff < 1e-5, f"the step-by-step equations differ from {form} by {diff}"
    leak = re.search(r"at N = ([\d,]+): softmax ([\d.]+), top-k softmax ([\d.]+)", text)
    assert float(leak.group(2)) > float(leak.group(3)), leak.group(0)
    assert pictures(nb) >= 5


def test_03_train():
    nb = run_quick("03_train")
    text = printed(nb)
    run_dir = Path(re.search(r"training run: (\S+)", text).group(1))
    run_dir = run_dir if run_dir.is_absolute() else NOTEBOOKS.parent / run_dir   # relative to the repository
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert any(r["kind"] == "eval" for r in records)
    assert "ablation" in text and ("Δm" in text or "python -m research ablation" in text)
    assert pictures(nb) >= 3


def test_committed_notebooks_are_small_and_full_length():
    """Read on a web page, the notebooks must load quickly: under MAX_BYTES together, with the
    pictures and printed outputs of a full run (a quick run's outputs must not be committed)."""
    sizes = {name: (NOTEBOOKS / f"{name}.ipynb").stat().st_size for name in NAMES}
    assert sum(sizes.values()) < MAX_BYTES, (
        f"the committed notebooks weigh {sum(sizes.values()):,} bytes together ({sizes}), over {MAX_BYTES:,}: "
        f"shrink figures (notebooks/_setup.py sets their size) or printed outputs")
    for name in NAMES:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        assert pictures(nb) >= 3, f"{name}.ipynb is committed without its pictures"
        assert "quick mode: False" in printed(nb), (
            f"{name}.ipynb carries no full-run outputs (quick mode, or none); regenerate: "
            f"python tests/test_notebooks.py {name}")


if __name__ == "__main__":
    nbformat, _ = notebook_packages()
    for name in sys.argv[1:] or NAMES:
        start = time.perf_counter()
        nb, _ = execute(name, quick=False)
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")
        print(f"{name}: {time.perf_counter() - start:.0f} s, outputs written; "
              f"{(NOTEBOOKS / f'{name}.ipynb').stat().st_size:,} bytes", flush=True)
