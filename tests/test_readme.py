"""The README's promises, and those of docs/RUNNING.md and research/README.md: CI runs exactly the test
command the README shows; every train.py command shown parses its flags (the long runs themselves are not
executed here); every lab command shown runs from the repository's root (experiments with --dry-run,
benchmarks with --help); and every command runs after the README's own install step: each third-party
module its script can import (read statically with `ast`, following the project's modules, imports
inside functions included) is provided by requirements.txt, and none of them is a development-only
package. Scripts under tests/ are checked against requirements-dev.txt instead."""
import ast
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/RUNNING.md", "research/README.md")}
ALL_DOCS = "\n".join(DOCS.values())


def test_ci_runs_the_readme_test_command():
    shown = re.search(r"pip install -r requirements-dev.txt && (.+)", README).group(1).strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert shown in ci, f"README shows {shown!r}; .ci/run must run exactly that"


def readme_train_commands():
    for line in ALL_DOCS.splitlines():
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


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_name_and_link_only_existing_files(doc):
    text, here = DOCS[doc], (ROOT / doc).parent
    named = re.findall(r"`([\w/]+\.(?:py|ipynb|txt|md))`", text)
    linked = [link.split("#")[0] for link in re.findall(r"\]\(([\w/.#-]+)\)", text) if "://" not in link]
    for name in set(named):
        assert (ROOT / name).exists() or (ROOT / "notebooks" / name).exists() or (here / name).exists(), name
    for link in set(linked) - {""}:
        assert (here / link).exists(), f"{doc} links {link}, which does not exist"


def lab_commands():
    """Every `python -m research ...` / `python -m research.bench ...` the documents show, as argv lists."""
    found = re.findall(r"python -m (research(?:\.bench)?) (\w+)", ALL_DOCS)
    return sorted(set(found))


def test_the_documents_show_lab_commands():
    modules = {module for module, _ in lab_commands()}
    assert modules == {"research", "research.bench"}, modules


@pytest.mark.parametrize("module, name", lab_commands(), ids=[" ".join(c) for c in lab_commands()])
def test_lab_commands_run_from_the_root(module, name, tmp_path):
    """An experiment shows its plan (--dry-run: nothing trains), a benchmark its help: the command exists and
    starts, exactly as written, from the repository's root."""
    extra = ["--dry-run", "--runs", str(tmp_path)] if module == "research" and name != "leak" else ["--help"]
    proc = subprocess.run([sys.executable, "-m", module, name, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-1500:] + proc.stderr[-1500:]


# --- every README command runs after `pip install -r requirements.txt` ----------------------------

DISTRIBUTION = {"PIL": "pillow"}    # import name -> the distribution providing it, where the two differ
DEV_ONLY = {"pytest", "hypothesis", "nbformat", "nbclient", "ipykernel", "jupyter-client"}


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path):
    """The distributions a requirements file installs (canonical names), following `-r` includes."""
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            names |= requirements(Path(path).parent / line[2:].strip())
        elif line:
            names.add(_canonical(re.split(r"[<>=!~\[;\s]", line)[0]))
    return names


def _module_files(base, parts):
    """The files importing module `parts` (a dotted name, split) from folder `base` runs: each package's
    __init__.py on the way down and the module itself (name.py, or a package's __init__.py)."""
    files = []
    for i in range(1, len(parts) + 1):
        stem = base.joinpath(*parts[:i])
        files += [f for f in (stem.with_suffix(".py"), stem / "__init__.py") if f.is_file()]
    return files


@functools.cache
def third_party_imports(script):
    """{top-level module: the file importing it} for every module `script` can import that is neither
    the standard library nor one of the project's files (which are followed, transitively: modules
    beside the script or at the root, and the modules of the project's packages such as research/)."""
    found, seen, todo = {}, set(), [Path(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:      # `from . import x` in a package
                base = path.parents[node.level - 1]
                module = node.module.split(".") if node.module else []
                todo += _module_files(base, module) if module else []
                todo += [f for alias in node.names for f in _module_files(base, [*module, alias.name])]
                continue
            elif isinstance(node, ast.ImportFrom):                          # the module, or a submodule named
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for parts in (name.split(".") for name in names):
                top = parts[0]
                bases = [d for d in (Path(script).parent, ROOT) if _module_files(d, [top])]
                if bases:
                    todo += _module_files(bases[0], parts)
                elif top not in sys.stdlib_module_names:
                    found.setdefault(top, path.relative_to(ROOT).as_posix())
    return found


def readme_commands():
    """(command, script) for every `python <script>.py ...`, `torchrun ... <script>.py` and `python -m
    research[.bench] ...` in the documents; a module's script is the file `python -m` runs."""
    text = ALL_DOCS.replace("\\\n", " ")                             # join continued lines
    commands = re.finditer(r"\b(?:python3?|torchrun)\s+(?:--?[\w-]+(?:=\S+)?\s+)*([\w./-]+\.py)\b[^`\n#]*", text)
    found = {(" ".join(m.group(0).split()), m.group(1)) for m in commands}
    for m in re.finditer(r"python -m (research(?:\.bench)?)\b[^`\n#]*", text):
        script = "research/bench.py" if m.group(1) == "research.bench" else "research/__main__.py"
        found.add((" ".join(m.group(0).split()), script))
    return sorted(found)


def missing_requirements(command, script, requirements_file):
    """One line per module the command can import that `requirements_file` does not provide."""
    provided = requirements(requirements_file)
    problems = []
    for module, importer in sorted(third_party_imports(ROOT / script).items()):
        distribution = _canonical(DISTRIBUTION.get(module, module))
        if distribution not in provided:
            problems.append(f"`{command}` can import {module} (in {importer}), which "
                            f"{Path(requirements_file).name} does not provide: add {distribution} to it")
    return problems


def test_the_readme_shows_the_commands_this_test_walks():
    shown = {script for _, script in readme_commands()}
    assert {"train.py", "synthetic.py", "research/bench.py", "research/__main__.py"} <= shown, shown
    assert any(command.startswith("torchrun") for command, _ in readme_commands())


@pytest.mark.parametrize("command, script", readme_commands(), ids=[c for c, _ in readme_commands()])
def test_readme_commands_need_only_their_requirements(command, script):
    dev = Path(script).parent.name == "tests"        # shown after `pip install -r requirements-dev.txt`
    problems = missing_requirements(command, script, ROOT / ("requirements-dev.txt" if dev else "requirements.txt"))
    if not dev:
        problems += [f"`{command}` can import {module} (in {importer}), a development-only package: a README "
                     f"command must run after `pip install -r requirements.txt` alone"
                     for module, importer in sorted(third_party_imports(ROOT / script).items())
                     if _canonical(DISTRIBUTION.get(module, module)) in DEV_ONLY]
    assert not problems, "\n".join(problems)


def test_runtime_requirements_hold_no_development_package():
    assert not requirements(ROOT / "requirements.txt") & DEV_ONLY
