"""The benchmarks/ and experiments/ folders stay runnable and honest: every script imports (so
none rots unseen), `make bench` runs every benchmark, experiments/README.md lists every
experiment with a result file that exists, and neither folder edits `sys.path` or patches the
library's internals (they use its public extension points). Fast: nothing trains."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("benchmarks", "experiments")


def scripts(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py")


ALL = [p for folder in FOLDERS for p in scripts(folder)]


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_every_script_imports(path):
    importlib.import_module(f"{path.parent.name}.{path.stem}")


def patches(source: str) -> list[str]:
    """Assignments to (and setattr on) attributes of the modules `source` imports, as `line N: target`."""
    tree = ast.parse(source)
    imported = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
        for target in targets:
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            if target is not base and isinstance(base, ast.Name) and base.id in imported:
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in imported:
            found.append(f"line {node.lineno}: setattr({ast.unparse(node.args[0])}, ...)")
    return found


def test_the_patch_check_finds_the_patterns_once_used():
    source = ("import pruning_core.selection as selection\nfrom pruning_core import artifacts\nimport sys\n"
              "selection.coverage_strata = len\nartifacts.column_array = len\nsetattr(sys, 'x', 1)\n"
              "local = {}\nlocal['a'] = 1\n")
    assert patches(source) == ["line 4: selection.coverage_strata", "line 5: artifacts.column_array",
                               "line 6: setattr(sys, ...)"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_no_path_edits_or_patching(path):
    """No `sys.path` edit, no patched library internals: an experiment that needs another
    behaviour passes it through a public parameter (e.g. selection_stage's `layout`, `stream`)."""
    source = path.read_text()
    assert "sys.path" not in source, f"{path.name} edits sys.path: run it as python -m {path.parent.name}.{path.stem}"
    assert not patches(source), f"{path.name} patches imported modules: {patches(source)}"


def bench_modules() -> list[str]:
    """The modules the Makefile's `bench` target runs, in its order."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:.*\n((?:\t.*\n?)+)", text, re.M)
    assert recipe, "the Makefile has no bench target"
    return re.findall(r"python -m benchmarks\.(\w+)", recipe.group(1))


def test_make_bench_runs_every_benchmark():
    """Each benchmarks/*.py is run by `make bench`, or by a script it runs (the peer's side of the
    influence benchmark, the local S3 server of the worker check), which names its module."""
    named = bench_modules()
    assert named, "make bench runs nothing"
    for path in scripts("benchmarks"):
        if path.stem in named:
            continue
        runners = [n for n in named if f"benchmarks.{path.stem}" in (ROOT / "benchmarks" / f"{n}.py").read_text()]
        assert runners, f"benchmarks/{path.name} is neither run by `make bench` nor by a script it runs"
    assert set(named) <= {p.stem for p in scripts("benchmarks")}, "make bench names a missing benchmark"


def test_the_readme_lists_every_experiment_and_its_result():
    readme = (ROOT / "experiments" / "README.md").read_text()
    for path in scripts("experiments"):
        assert f"python -m experiments.{path.stem}" in readme, f"experiments/README.md does not list {path.stem}"
    linked = re.findall(r"\]\(([^)#]+)", readme)
    assert linked, "experiments/README.md links no result file"
    for target in linked:
        assert (ROOT / "experiments" / target).resolve().exists(), f"experiments/README.md links {target}, missing"


def test_an_experiment_runs_as_a_module_from_the_root():
    """`python -m experiments.NAME` is how the README runs them: the package imports its siblings."""
    done = subprocess.run([sys.executable, "-m", "experiments.layout_variants", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--variants" in text and "Exploration on the validation split (experiments/validation_split.py)" in text
