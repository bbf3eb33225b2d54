"""The evaluation's generalization-gap check, `linear` problem, on images of CIFAR-10's shape
(3 x 32 x 32: Fashion-MNIST's images padded by 2 pixels and repeated over 3 channels, as the
tests make them: `data.cifar_shaped`), timed with its peak memory: run under `/usr/bin/time -v`.

    /usr/bin/time -v .venv/bin/python -m experiments.gap_memory --samples 5000 --points 8

Before the pixels were pooled (30,730 parameters) the check was killed past 23 GiB of RSS on a
24 GiB machine; `evaluation._pixels` pools them to 16 x 16 (7,690 parameters)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pruning_core.data import Dataset, cifar_shaped, load_dataset
from pruning_core.evaluation import gap_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--points", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the evaluation's gap task runs
    f = load_dataset("fashion-mnist")
    n = args.samples
    ds = Dataset("cifar-shaped", cifar_shaped(f.x[:n]), f.y[:n], np.arange(n), cifar_shaped(f.x_test), f.y_test, 10,
                 {"source": "npz:cifar-shaped"})
    started = time.perf_counter()
    rows = gap_check("linear", ds, n, args.points, 0.01)
    print(f"{rows[0]['problem']}: {n} samples, {len(rows)} ε values in {time.perf_counter() - started:.1f} s")
    for r in rows:
        print(f"  removed {r['n_pruned']:5d}: predicted {r['predicted_norm']:.4g}, measured {r['measured_norm']:.4g}")


if __name__ == "__main__":
    main()
