"""Influence strategies and projection on a trained Fashion-MNIST `cnn` (final layer)."""

import numpy as np
import pytest
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.recipe import TrainArgs
from pruning_core.selection import SelectionArgs, objective, select
from pruning_core.training import train

pytestmark = pytest.mark.integration  # trains the cnn on 10,000 samples


@pytest.fixture(scope="module")
def trained(fmnist):
    """The cnn trained 3 epochs on the first 10,000 Fashion-MNIST samples, and its last layer."""
    ds = fmnist.subset(np.arange(10_000))
    model = train(ds, TrainArgs(model="cnn", epochs=3)).model
    phi = inf.last_layer_inputs(model, ds.x, 1024)
    probs = inf.softmax_probs(phi, *inf.last_layer_weights(model))
    return ds, phi, probs, inf.last_layer_curvature(phi, probs, 1024)


def vectors(trained, strategy, basis=None):
    ds, phi, probs, curv = trained
    B = torch.eye(curv.p, dtype=torch.float64) if basis is None else basis
    M, _ = hessians.inverse_apply(curv, B, strategy, 5e-4)
    return inf.influence_vectors(phi, probs, ds.y, M.numpy(), ds.n, 1024)


def ranks(values):
    return np.argsort(np.argsort(values))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kronecker_self_influence_ranks_like_exact(trained, strategy):
    ds, phi, probs, _ = trained
    G = inf.per_sample_gradients(phi, probs, ds.y)
    exact = (vectors(trained, "exact") * G).sum(1)  # self-influence s_iᵀ g_i
    approx = (vectors(trained, strategy) * G).sum(1)
    spearman = np.corrcoef(ranks(exact), ranks(approx))[0, 1]
    assert spearman >= 0.9, spearman


def test_projected_objective_tracks_the_full_one(trained):
    """‖Σ_R P s_i‖ against ‖Σ_R s_i‖ with P of 1024 rows, for random R and for R chosen by the
    solver on the full vectors (R independent of P)."""
    ds, _, _, curv = trained
    full = vectors(trained, "exact")
    projected = vectors(trained, "exact", hessians.projection_matrix(curv.p, 1024, seed=0))
    assert projected.shape == (ds.n, 1024)
    rng = np.random.default_rng(0)
    sets = [np.isin(np.arange(ds.n), rng.choice(ds.n, m, replace=False)) for m in (500, 2000, 4000)]
    sets += [select(full, SelectionArgs(prune_ratio=r)).pruned for r in (0.2, 0.4, 0.6)]
    for pruned in sets:
        assert objective(projected, pruned) == pytest.approx(objective(full, pruned), rel=0.10)
