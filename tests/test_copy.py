"""Copying etf.py and kem_mtl.py into someone else's project, as a new user would.

Pinned down, each in a fresh Python process that sees the copied files and not this repository:
the README's snippet (the first python block after the heading "Copy a module") runs as
written in a folder holding only etf.py and kem_mtl.py, and, with its import made relative as its
comment says, as a module of a package `mypkg/` holding the two files; both files import both ways,
and ETF slots and ETF features find etf.py in either layout (inside the package, the package's own
etf.py, not a top-level one); kem_mtl.py copied alone runs KEM with learned slots and a MultiTaskNet
without the ETF, flat and in a package, and asking it for ETF slots says that etf.py is missing.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNIPPET_IMPORT = "from kem_mtl import KEM"


def readme_snippet():
    readme = (ROOT / "README.md").read_text()
    heading = re.search(r"^#+ .*Copy a module.*$", readme, re.M)
    assert heading, "the README has no section 'Copy a module'"
    block = re.search(r"```python\n(.*?)```", readme[heading.end():], re.S)
    assert block, "no python block after the heading 'Copy a module'"
    return block.group(1)


def copy_modules(folder, names=("etf.py", "kem_mtl.py")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(ROOT / name, folder / name)
    return folder


def python(args, cwd):
    """Run Python in `cwd` with nothing of this repository on its path; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"python {' '.join(args)} in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# Checks run in the copies' process: the module really is the copy, and what it can build.
CHECKS = """
import sys, warnings
import torch
{imports}
assert str(ROOT) not in [p.rstrip("/") for p in sys.path], "the repository leaked into the path"
assert kem_mtl.__file__.startswith(HERE), kem_mtl.__file__
x = torch.randn(2, 30, 16)
assert kem_mtl.KEM(16, 4)(x).shape == x.shape
net = kem_mtl.MultiTaskNet({{"semseg": 3, "depth": 1}}, dim=16, num_slots=4)
assert net(torch.randn(1, 3, 16, 24))["depth"].shape == (1, 1, 16, 24)
"""

WITH_ETF = """
assert kem_mtl.KEM(16, 4, slots="etf")(x).shape == x.shape
for mode in ("both", "normalize"):
    net = kem_mtl.MultiTaskNet({{"semseg": 3}}, dim=16, num_slots=4, etf=mode)
    assert net(torch.randn(1, 3, 16, 24))["semseg"].shape == (1, 3, 16, 24)
print(sorted(m for m in sys.modules if m == "etf" or m.endswith(".etf")))
"""

WITHOUT_ETF = """
for make in (lambda: kem_mtl.KEM(16, 4, slots="etf"), lambda: kem_mtl.MultiTaskNet({{"semseg": 3}}, dim=16, etf="features"),
             lambda: kem_mtl.MultiTaskNet({{"semseg": 3}}, dim=16, etf="normalize")):
    try:
        make()
    except ImportError as error:
        assert "need etf.py" in str(error), error
    else:
        raise AssertionError("built an ETF without etf.py")
print("refused")
"""


def script(here, imports, tail, first=""):
    """Python source: `first` (running the snippet), then the checks on the copies found in `here`."""
    return f"ROOT, HERE = {str(ROOT)!r}, {str(here)!r}\n{first}\n" + (CHECKS + tail).format(imports=imports)


def test_in_a_flat_folder_the_snippet_runs_and_both_files_import(tmp_path):
    copy_modules(tmp_path)
    (tmp_path / "snippet.py").write_text(readme_snippet())
    code = script(tmp_path, "import kem_mtl\nimport etf", WITH_ETF,
                  first="import runpy; runpy.run_path('snippet.py', run_name='__main__')")
    printed = python(["-c", code], tmp_path).splitlines()
    assert printed == ["torch.Size([2, 64, 12, 16])", "['etf']"], printed


def test_in_a_package_the_snippet_runs_and_the_files_find_each_other_there(tmp_path):
    snippet = readme_snippet()
    assert SNIPPET_IMPORT in snippet
    package = copy_modules(tmp_path / "mypkg")
    (package / "__init__.py").write_text("")
    (package / "snippet.py").write_text(snippet.replace(SNIPPET_IMPORT, "from .kem_mtl import KEM"))
    code = script(package, "import mypkg.kem_mtl as kem_mtl\nfrom mypkg import etf", WITH_ETF,
                  first="import runpy; runpy.run_module('mypkg.snippet', run_name='__main__')")
    printed = python(["-c", code], tmp_path).splitlines()
    assert printed == ["torch.Size([2, 64, 12, 16])", "['mypkg.etf']"], f"the package's own etf.py: {printed}"


def test_kem_mtl_alone_for_learned_slots_flat_and_in_a_package(tmp_path):
    copy_modules(tmp_path, ["kem_mtl.py"])
    package = copy_modules(tmp_path / "mypkg", ["kem_mtl.py"])
    (package / "__init__.py").write_text("")
    code = script(tmp_path, "import kem_mtl", WITHOUT_ETF) + script(package, "import mypkg.kem_mtl as kem_mtl", WITHOUT_ETF)
    assert python(["-c", code], tmp_path).split() == ["refused", "refused"]
