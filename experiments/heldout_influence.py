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

Run:  .venv/bin/python -m experiments.heldout_influence --out runs/budget-half \\
        --from-run runs/budget-half/runs/RUN --ratios 0.4 --seeds 0,1,2,3,4 \\
        --variants uniform,influence-score,harmful,heldout-score --report heldout-0.4.md
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from experiments import layout_variants as lv
from experiments import validation_split as vs
from pruning_core import artifacts, evaluation
from pruning_core.data import load_dataset
from pruning_core.influence import last_layer_inputs, last_layer_weights, per_sample_gradients, softmax_probs
from pruning_core.selection import SelectionArgs, selection_stage
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


def select_variant(run: Path, variant: str, ratio: float, seed: int, out: Path) -> None:
    if variant not in ("harmful", "heldout-score"):
        return lv.select_variant(run, variant, ratio, seed, out)
    d = heldout_influence(run, f"npz:{Path(vs.write_split(run.parents[1], 50000))}")
    if variant == "harmful":  # the product's layout, candidates fed in ascending d_i
        selection_stage(artifacts.scores_path(run), vs.selection_args("uniform@0", ratio, seed), out,
                        stream=np.argsort(d, kind="stable"))
    else:  # the el2n baseline removes the smallest first: d_i in place of EL2N
        selection_stage(artifacts.scores_path(run), SelectionArgs(method="el2n", prune_ratio=ratio), out,
                        columns={"el2n": d})


def retrain_on_b(job) -> dict:
    """The run as cached, its accuracy and per-sample record cut to the measuring half B."""
    record = dict(vs.retrain(job))
    correct = evaluation.unpack_correct(record["test_correct"], record["n_test"])[HALF:]
    record.update(test_correct=evaluation.pack_correct(correct), n_test=len(correct),
                  test_accuracy=float(correct.mean()))
    return record


if __name__ == "__main__":
    sys.exit(vs.main(select=select_variant, retrain=retrain_on_b, doc=__doc__))
