"""Which training recipe gets a CIFAR ResNet furthest in about ten minutes of a 2-core CPU, chosen
on a validation split: the last 5,000 of a seeded permutation of the 50,000 training images are
held out, the model trains on the other 45,000 with the product's own loop (`training.train`) and
is measured on the 5,000 once an epoch. The test set is never read.

Run from the repository root (quiet machine; about 9 minutes a `resnet20` recipe):

  .venv/bin/python -m experiments.resnet_recipe --data folder:PATH --model resnet20 --epochs 9 --lr 0.2 \\
      --low-res-epochs 0 --out benchmarks/results/resnet-recipe.jsonl

Each run appends one line to --out: the recipe, the validation accuracy after each epoch and at
the end (as the recipe measures it, and both without and with test-time flips), and the training
seconds (the evaluations not counted)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch

from pruning_core.data import Dataset, load_dataset
from pruning_core.recipe import TrainArgs
from pruning_core.training import accuracy, train

VALIDATION = 5000  # held-out training images
SPLIT_SEED = 12345


def validation_split(ds: Dataset) -> Dataset:
    """`ds` with its training split cut in two: the first part trains, the held-out
    VALIDATION images take the test split's place."""
    order = np.random.default_rng(SPLIT_SEED).permutation(ds.n)
    kept, held = np.sort(order[:-VALIDATION]), np.sort(order[-VALIDATION:])
    return Dataset(f"{ds.name}-validation", ds.x[kept], ds.y[kept], ds.sample_id[kept], ds.x[held], ds.y[held],
                   ds.n_classes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the CIFAR-10 source, e.g. folder:../shared/data/cifar10")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--low-res-epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON lines file the result is appended to")
    ns = parser.parse_args(argv)
    ds = validation_split(load_dataset(ns.data))
    args = TrainArgs(model=ns.model, epochs=ns.epochs, lr=ns.lr, low_res_epochs=ns.low_res_epochs,
                     batch_size=ns.batch_size, seed=ns.seed)
    started = time.perf_counter()
    result = train(ds, args, evaluations_per_epoch=1,
                   progress=lambda e, n, loss: print(f"epoch {e}/{n}: loss {loss:.4f}", flush=True))
    record = {"recipe": {k: getattr(args, k) for k in ("model", "epochs", "lr", "low_res_epochs", "batch_size", "seed",
                                                       "augment", "precision", "test_flips")},
              "validation_accuracy": result.test_accuracy,
              "validation_accuracy_plain": accuracy(result.model, ds.x_test, ds.y_test, flips=False),
              "validation_accuracy_flip_tta": accuracy(result.model, ds.x_test, ds.y_test, flips=True),
              "train_seconds": round(result.seconds, 1),
              "wall_seconds": round(time.perf_counter() - started, 1),
              "curve": [round(c["test_accuracy"], 4) for c in result.curve],
              "n_train": ds.n, "n_validation": VALIDATION, "data": ns.data,
              "machine": f"{platform.node()} · {torch.get_num_threads()} threads · torch {torch.__version__}",
              "date": datetime.now(timezone.utc).isoformat(timespec="minutes")}
    with open(ns.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("recipe", "validation_accuracy_plain", "validation_accuracy_flip_tta",
                                             "train_seconds")}))


if __name__ == "__main__":
    main()
