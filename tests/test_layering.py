"""`pruning_core` never imports prefect or dask, directly or through its imports."""

import ast
import os
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


def test_commands_that_only_read_start_without_torch(tmp_path):
    """`--help`, `versions`, `select` and the flow parameters (the UI form's schema) never load
    torch, whose import alone took 2.2 of the 2.7 s `dataset-prune --help` did; `run` loads it when
    it trains."""
    import numpy as np
    import pyarrow.parquet as pq

    from pruning_core.artifacts import scores_table

    rng = np.random.default_rng(0)
    pq.write_table(scores_table({"sample_id": np.arange(40), "label": rng.integers(0, 2, 40), "loss": rng.random(40),
                                 "el2n": rng.random(40)}, rng.normal(size=(40, 3))), tmp_path / "scores.parquet")
    select = ["select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4", "--out",
              str(tmp_path / "selection.parquet")]
    code = ("import sys, contextlib, io\nfrom flows.cli import main\nfrom flows.parameters import RunParameters\n"
            "RunParameters.model_json_schema(); RunParameters(prune_ratio=0.4).validate_all()\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['run', '--help'], ['evaluate', '--help']):\n"
            "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
            f"assert main(['versions', {str(tmp_path / 'none')!r}]) == 2\n"
            f"assert main({select!r}) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was loaded'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "selection.parquet").num_rows == 40
