"""Benchmark of the pipeline's stages on Fashion-MNIST (cnn, 60,000 samples), in one process:
training, one plain forward pass, the influence stage (features, Hessian, vectors), and the
selection objective of the greedy solver beside random and the influence-score ranking.
Prints a table and writes benchmarks/results/pipeline.json (machine, date, command)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.data import load_dataset
from pruning_core.recipe import TrainArgs
from pruning_core.selection import SelectionArgs, objective, select
from pruning_core.training import predict_logits, train


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    ds = load_dataset("fashion-mnist")
    trained, t_train = timed(lambda: train(ds, TrainArgs(model="cnn")))
    model = trained.model
    _, t_forward = timed(lambda: predict_logits(model, ds.x, batch_size=1024))
    phi, t_features = timed(lambda: inf.last_layer_inputs(model, ds.x, 1024))
    W, b = inf.last_layer_weights(model)
    probs = inf.softmax_probs(phi, W, b)
    curv = inf.last_layer_curvature(phi, probs, 1024)
    eye = torch.eye(curv.p, dtype=torch.float64)
    (H_inv, _), t_hessian = timed(lambda: hessians.inverse_apply(curv, eye, "exact", 5e-4))
    H_inv = H_inv.numpy()
    vectors, t_vectors = timed(lambda: inf.influence_vectors(phi, probs, ds.y, H_inv, ds.n, 1024, dtype=np.float32))
    t_influence = t_features + t_hessian + t_vectors

    rows = []
    m = int(0.4 * ds.n)
    greedy, t_greedy = timed(lambda: select(vectors, SelectionArgs(prune_ratio=0.4)))
    rows.append(("influence (greedy)", greedy.objective, t_greedy))
    rnd = select(vectors, SelectionArgs(method="random", prune_ratio=0.4))
    rows.append(("random", rnd.objective, None))
    smallest = np.zeros(ds.n, bool)
    smallest[np.argsort(np.linalg.norm(vectors, axis=1))[:m]] = True
    rows.append(("influence-score (smallest ‖s_i‖)", objective(vectors, smallest), None))

    result = {
        "benchmark": "pipeline", "command": "make bench  (python -m benchmarks.pipeline)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "dataset": {"name": "fashion-mnist", "n": ds.n, "model": "cnn", "test_accuracy": trained.test_accuracy},
        "seconds": {"train": t_train, "forward_pass": t_forward, "influence_features": t_features,
                    "influence_hessian": t_hessian, "influence_vectors": t_vectors, "influence_total": t_influence},
        "influence_over_forward": t_influence / t_forward,
        "influence_samples_per_s": ds.n / t_influence,
        "selection_at_ratio_0.4": [{"method": r[0], "objective": r[1], "seconds": r[2]} for r in rows],
    }
    out = Path(__file__).parent / "results" / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"Fashion-MNIST, cnn, n = {ds.n}, test accuracy {trained.test_accuracy:.4f}  ({result['date']})")
    print(f"{'stage':34} {'seconds':>9}")
    for name, seconds in result["seconds"].items():
        print(f"{name:34} {seconds:9.2f}")
    print(f"influence stage / forward pass:    {result['influence_over_forward']:.2f}x "
          f"({result['influence_samples_per_s']:.0f} samples/s)")
    print(f"\n{'selection at prune ratio 0.4':34} {'‖Σ s_i‖':>12} {'seconds':>9}")
    for name, value, seconds in rows:
        print(f"{name:34} {value:12.5g} {'' if seconds is None else f'{seconds:9.2f}'}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
