"""How long a run takes to refuse a Dask cluster whose workers cannot open its source: a
`delta:` table of Fashion-MNIST's 60,000 training samples in a local S3 store (moto), a
LocalCluster started before the store's credentials were set (as a cluster started by someone
without them), then `dataset-prune run --dask-address` with the credentials in the command's
environment. Prints the exit status, the seconds to it and the error line, and writes them to
benchmarks/results/worker-check.json (machine, date, command, commit).

    .venv/bin/python -m benchmarks.worker_check [--epochs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "worker-check.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    from distributed import LocalCluster

    from benchmarks.local_s3 import local_s3
    from flows.cli import main as cli
    from flows.parameters import RunParameters
    from flows.prune import dask_runner
    from pruning_core.data import load_dataset
    from pruning_core.versions import commit_version


    folder = Path(tempfile.mkdtemp(prefix="worker-check-"))
    try:
        with local_s3(folder / "moto.log") as store, \
                LocalCluster(**dask_runner(RunParameters(prune_ratio=0.4, workers=2)).cluster_kwargs) as cluster:
            os.environ.update(store)  # after the cluster started: its workers lack the credentials
            ds = load_dataset("fashion-mnist")
            commit_version("s3://datasets/fmnist", ds, np.ones(ds.n, bool), {"run_id": "source"})
            argv = ["run", "--dataset", "delta:s3://datasets/fmnist", "--model", "cnn", "--epochs", str(args.epochs),
                    "--prune-ratio", "0.4", "--out", str(folder / "runs"), "--target", str(folder / "table"),
                    "--dask-address", cluster.scheduler_address]
            err = io.StringIO()
            started = time.perf_counter()
            with contextlib.redirect_stderr(err):
                code = cli(argv)
            seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("dataset-prune: error")]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"benchmark": "time to refuse a Dask cluster whose workers cannot open the source",
              "command": f".venv/bin/python -m benchmarks.worker_check --epochs {args.epochs}", "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"platform": platform.platform(), "node": platform.node(), "cpu_count": os.cpu_count()},
              "epochs": args.epochs, "exit_status": code, "seconds": round(seconds, 1),
              "error": errors[-1] if errors else err.getvalue()[-2000:]}
    RESULT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{result['date']} · {platform.node()} · {os.cpu_count()} CPUs · {commit}")
    print(f"exit status {code} after {seconds:.1f} s (epochs {args.epochs})")
    print(result["error"])
    print(f"written: {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
