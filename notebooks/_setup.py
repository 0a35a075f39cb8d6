"""The set-up the three notebooks share: `from _setup import ROOT, QUICK, seed_everything, ...`.

Importing this module
- puts the repository root (the folder holding kem_mtl.py) first on sys.path, so that the notebooks
  import the project's modules (etf, kem_mtl, datasets, train, ...) as they are in the repository;
- seeds torch, numpy and random (seed 0), so a notebook computes the same numbers every run;
- sets small matplotlib defaults and, inside Jupyter, shows figures as low-resolution PNGs of at
  most 256 colours (`png` below), so that the committed notebooks stay small enough to read on a
  web page (the tests keep all three together under 400 KB);
- reads QUICK from the environment: KEM_MTL_QUICK=1 (the tests set it) shortens every long step.

It also holds the two things more than one notebook does: `load_model` (a MultiTaskNet from one of
train.py's checkpoints) and `run_train` (train.py as a subprocess, its log in a file, the last lines
printed).
"""
import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

# --- the repository root on sys.path ----------------------------------------------------------
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent)
             if (p / "kem_mtl.py").is_file()), None)
if ROOT is None:
    raise RuntimeError(f"cannot find the repository (kem_mtl.py) from {Path.cwd()}; start Jupyter inside it")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = os.environ.get("KEM_MTL_QUICK") == "1"   # the tests set it: short runs, few trials, small N
SEED = 0


def seed_everything(seed=SEED):
    """Seed every random number generator the notebooks use."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


seed_everything()

# --- small figures ----------------------------------------------------------------------------
DPI = 72          # pixels per inch of every figure: a 6-inch-wide figure is 432 pixels wide
plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "figure.figsize": (6, 2.5), "font.size": 8,
                     "axes.titlesize": 8, "legend.fontsize": 7, "image.interpolation": "nearest"})


def png(fig):
    """The figure as a PNG of at most 256 colours, at DPI: about a third of the bytes of
    matplotlib's own PNG, and to the eye the same picture (plots use few colours; the rendered
    scenes lose a little shading)."""
    from PIL import Image

    drawn = io.BytesIO()
    fig.savefig(drawn, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    image = Image.open(drawn).convert("RGB").quantize(256, dither=Image.Dither.NONE)
    packed = io.BytesIO()
    image.save(packed, format="png", optimize=True)
    return packed.getvalue()


try:                                            # inside IPython / Jupyter: every figure shown through png()
    from IPython import get_ipython
    from matplotlib.figure import Figure
    from matplotlib_inline.backend_inline import set_matplotlib_formats
    if get_ipython() is not None:
        set_matplotlib_formats("png")           # PNG only (no SVG or PDF copies in the notebook) ...
        get_ipython().display_formatter.formatters["image/png"].for_type(Figure, png)   # ... made by png()
except ImportError:                             # plain Python: nothing to configure
    pass


def describe():
    """One line saying how this notebook runs."""
    return (f"quick mode: {QUICK}; torch {torch.__version__}, matplotlib {matplotlib.__version__}; "
            f"{torch.get_num_threads()} intra-op thread(s)")


# --- helpers more than one notebook needs -------------------------------------------------------

def load_model(ckpt_path):
    """(MultiTaskNet in eval mode, the run's config, the checkpoint's iteration): train.load_trained."""
    import train

    return train.load_trained(ckpt_path)


def run_train(flags, log_path, *, show=4):
    """`python train.py <flags>` in the repository root, everything it prints going to log_path.

    Prints the command, the log's first line (what is being trained) and its last `show` lines, and
    returns the seconds it took. A failed run raises with the end of the log.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("python train.py " + " ".join(flags))
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, "train.py", *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    lines = log_path.read_text().splitlines()
    if code != 0:
        raise RuntimeError(f"train.py exited with code {code}; the end of {log_path}:\n" + "\n".join(lines[-20:]))
    shown = lines[:1] + (["..."] if len(lines) > show + 1 else []) + lines[max(1, len(lines) - show):]
    where = log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path
    print(f"the log ({len(lines)} lines, all in {where}), first and last lines:")
    print("\n".join("  " + line for line in shown))
    return seconds
