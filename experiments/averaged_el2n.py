"""Validation-split experiment: does EL2N averaged over several scoring models (Paul et al. 2021
average theirs over 10 initialisations) make a better difficulty layout for the influence method
than the one scoring model's EL2N the product uses?

Trains the scoring recipe (`cnn`, 4 epochs) on the validation split's 50,000 training rows with
seeds 1…K−1, averages their EL2N with the scoring run's (seed 0), writes a copy of that run's
scores with the averaged `el2n` column under --out, and runs validation_split.py over it: its
`uniform` is then the product's default selection on the averaged layout, `ccs` CCS on it, and
`influence-score` (which reads no EL2N) is unchanged. Compare with the default on one model's
EL2N in benchmarks/results/layout-0.4.md (same split, seeds and recipe).

Run:  .venv/bin/python -m experiments.averaged_el2n --split runs/candidate-order \\
        --from-run runs/candidate-order/runs/20261129-013612-ba4c5f --models 4 --out runs/averaged-el2n
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from experiments import validation_split as vs
from pruning_core import artifacts


def model_el2n(job) -> np.ndarray:
    """EL2N of one scoring model trained with `seed` on the split, cached as el2n-s{seed}.npy."""
    dataset, seed, out = job
    path = Path(out) / f"el2n-s{seed}.npy"
    if not path.exists():
        import torch

        from pruning_core.data import load_dataset
        from pruning_core.influence import loss_and_el2n
        from pruning_core.recipe import TrainArgs
        from pruning_core.training import predict_logits, train

        torch.set_num_threads(1)
        ds = load_dataset(dataset)
        model = train(ds, TrainArgs(model="cnn", seed=seed)).model
        probs = torch.softmax(torch.as_tensor(predict_logits(model, ds.x)), 1).numpy()
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, loss_and_el2n(probs, ds.y)[1])
        os.replace(tmp, path)
    return np.load(path)


def main() -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="runs/candidate-order", help="validation_split.py's --out (its npz)")
    parser.add_argument("--from-run", required=True, help="the scoring run of the split (seed 0)")
    parser.add_argument("--models", type=int, default=4, help="scoring models averaged, the run's included")
    parser.add_argument("--out", default="runs/averaged-el2n")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants", default="uniform,ccs,influence-score")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    split = Path(ns.split).resolve() / "fashion-mnist-validation-split.npz"
    if not split.exists():
        raise SystemExit(f"{split} is missing: run python -m experiments.validation_split --out {ns.split} first")
    link = out / split.name
    if not link.exists():
        link.symlink_to(split)
    scores = pq.read_table(artifacts.scores_path(Path(ns.from_run)))
    jobs = [(f"npz:{split}", seed, str(out)) for seed in range(1, ns.models)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        el2n = [scores.column("el2n").to_numpy(), *pool.map(model_el2n, jobs)]
    print("Spearman of each model's EL2N with the scoring run's:",
          [round(float(np.corrcoef(np.argsort(np.argsort(e)), np.argsort(np.argsort(el2n[0])))[0, 1]), 4)
           for e in el2n[1:]], flush=True)
    run = out / "scoring-averaged"
    run.mkdir(exist_ok=True)
    averaged = scores.set_column(scores.schema.get_field_index("el2n"), "el2n",
                                 pa.array(np.mean(el2n, 0), pa.float64()))
    artifacts.save_parquet(averaged, artifacts.scores_path(run))
    return vs.main(["--out", str(out), "--from-run", str(run), "--ratios", "0.4", "--seeds", ns.seeds,
                    "--variants", ns.variants, "--title", f"EL2N averaged over {ns.models} scoring models",
                    "--report", f"averaged-el2n-{ns.models}.md"],
                   command=f".venv/bin/python -m experiments.averaged_el2n {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    sys.exit(main())
