"""`pruning_core` never imports prefect or dask, directly or through its imports."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pruning_core

FORBIDDEN = ("prefect", "prefect_dask", "dask", "distributed")


def test_no_orchestrator_imports_in_source():
    for path in Path(pruning_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_no_orchestrator_modules_loaded_at_runtime():
    modules = [m.name for m in pkgutil.iter_modules(pruning_core.__path__)]
    code = ("import sys\n" + "".join(f"import pruning_core.{m}\n" for m in modules) +
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\nprint(bad)\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
