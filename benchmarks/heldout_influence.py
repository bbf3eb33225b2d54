"""Exploration on the validation split: does a held-out loss signal pick better removals than the
parameter-change objective alone? (Not a product option; the product is unchanged.)

The paper's objective keeps the predicted parameter change ‖Σ_R s_i‖ small. Influence on a held-out
loss (Koh & Liang 2017; Wang et al., AAAI 2020, "Less is better") asks instead what removing i does
to the loss on data the model did not train on: d_i = ∇L_A(θ̂)ᵀ s_i, with s_i as stored
(θ̂_{−i} ≈ θ̂ + s_i), so d_i < 0 predicts that removing i lowers the held-out loss. The validation
rows are halved: the first half (A) gives ∇L_A over the scoring model's last layer; the retrained
models are measured on the second half only (B), which the selection never sees.

Variants, on top of layout_variants.py's:
  harmful          the product's layout (difficulty strata, uniform@0), candidates fed in ascending
                   d_i (most harmful first) instead of a seeded uniform order
  heldout-score    a plain ranking: remove the smallest d_i first (no strata)

Run:  .venv/bin/python benchmarks/heldout_influence.py --out runs/budget-half \\
        --from-run runs/budget-half/runs/RUN --ratios 0.4 --seeds 0,1,2,3,4 \\
        --variants uniform,influence-score,harmful,heldout-score --report heldout-0.4.md
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layout_variants as lv
import validation_split as vs

import pruning_core.selection as selection
from pruning_core import artifacts, evaluation
from pruning_core.data import load_dataset
from pruning_core.influence import last_layer_inputs, last_layer_weights, per_sample_gradients, softmax_probs
from pruning_core.training import load_model

HALF = 5000  # validation rows 0..HALF-1 of the split give ∇L_A; the rest measure


@functools.lru_cache
def heldout_influence(run: Path, dataset: str) -> np.ndarray:
    """d_i = ∇L_A(θ̂)ᵀ s_i over the last layer, (n,) float64, for every scored training sample."""
    ds = load_dataset(dataset)
    model = load_model(str(artifacts.checkpoint_path(run)), "cnn", ds, device="cpu")
    phi = last_layer_inputs(model, ds.x_test[:HALF], 1024, "cpu")
    W, b = last_layer_weights(model)
    g = per_sample_gradients(phi, softmax_probs(phi, W, b), ds.y_test[:HALF]).mean(axis=0)
    _, vectors, _ = artifacts.load_scores(artifacts.scores_path(run))
    return vectors.astype(np.float64) @ g


_column_array = artifacts.column_array


def column_array(table, name):
    if name == "el2n" and "heldout-score" in lv.LAYOUT:  # the el2n baseline removes the smallest first
        return lv.LAYOUT["heldout-score"]
    return _column_array(table, name)


_layout_args = lv.selection_args


def selection_args(variant: str, ratio: float, seed: int):
    if variant not in ("harmful", "heldout-score"):
        return _layout_args(variant, ratio, seed)
    lv.LAYOUT.clear()
    run = lv.scoring_run()
    d = heldout_influence(run, f"npz:{Path(vs.write_split(run.parents[1], 50000))}")
    if variant == "harmful":
        lv.LAYOUT["dense"] = d  # the candidate-stream hook: ascending keys are fed first
        return lv._selection_args("uniform@0", ratio, seed)  # the original: this module patches vs.selection_args
    lv.LAYOUT["heldout-score"] = d
    return selection.SelectionArgs(method="el2n", prune_ratio=ratio)


_retrain = vs._retrain


def retrain_on_b(job):
    """The run as cached, its accuracy and per-sample record cut to the measuring half B."""
    record = dict(_retrain(job))
    correct = evaluation.unpack_correct(record["test_correct"], record["n_test"])[HALF:]
    record.update(test_correct=evaluation.pack_correct(correct), n_test=len(correct),
                  test_accuracy=float(correct.mean()))
    return record


if __name__ == "__main__":
    selection.coverage_strata = lv.layout
    selection.row_keys = lv.row_keys
    artifacts.column_array = column_array
    vs.selection_args = selection_args
    vs._retrain = retrain_on_b
    sys.exit(vs.main())
