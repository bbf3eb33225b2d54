"""Closed-form last-layer influence against autograd, and against retraining."""

import numpy as np
import pytest
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.models import LinearModel, SmallCNN
from pruning_core.training import fit_linear


def closed_form(model, x, y, weight_decay, damping, block_size=7):
    phi = inf.last_layer_inputs(model, x, block_size)
    W, b = inf.last_layer_weights(model)
    probs = inf.softmax_probs(phi, W, b)
    curv = inf.last_layer_curvature(phi, probs, block_size)
    M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64), "exact", weight_decay + damping)
    return inf.influence_vectors(phi, probs, y, M.numpy(), len(y), block_size)


@pytest.mark.parametrize("kind", ["linear", "cnn"])
def test_closed_form_matches_autograd_in_float64(kind):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind == "linear":
        model, x = LinearModel(6, 3).double(), rng.normal(size=(40, 6))
    else:
        model, x = SmallCNN(1, 4, hidden=5).double(), rng.normal(size=(30, 1, 28, 28))
    y = rng.integers(0, model.fc.out_features, len(x))
    fast = closed_form(model, x, y, weight_decay=0.01, damping=0.003)
    reference = inf.influence_vectors_autograd(model, x, y, weight_decay=0.01, damping=0.003)
    assert fast.shape == (len(x), model.fc.weight.numel() + model.fc.bias.numel())
    assert np.linalg.norm(fast - reference) / np.linalg.norm(reference) <= 1e-8


def test_vector_order_is_weight_row_major_then_bias():
    """With H = I (no data curvature is impossible, so check the gradient layout directly)."""
    phi = np.array([[1.0, 2.0]])
    probs = np.array([[0.25, 0.75]])
    g = inf.per_sample_gradients(phi, probs, np.array([1]))
    # residual (0.25, -0.25); weight rows c=0: 0.25*[1,2], c=1: -0.25*[1,2]; then bias
    np.testing.assert_allclose(g[0], [0.25, 0.5, -0.25, -0.5, 0.25, -0.25])


def test_results_do_not_depend_on_block_size_beyond_rounding():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    model, x = LinearModel(5, 3).double(), rng.normal(size=(50, 5))
    y = rng.integers(0, 3, 50)
    a, b = closed_form(model, x, y, 0.01, 0.0, block_size=7), closed_form(model, x, y, 0.01, 0.0, block_size=50)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_shard_ranges_cover_whole_blocks():
    for n, shards, block in [(2000, 7, 128), (10, 3, 4), (1, 5, 1024), (60000, 4, 1024)]:
        ranges = inf.shard_ranges(n, shards, block)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a % block == 0 and a < b for a, b in ranges)
        assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
        assert len(ranges) <= shards


def test_predicted_change_matches_retraining_on_real_data(fmnist):
    """`linear` on 2,000 Fashion-MNIST samples (7x7 average-pooled): Σ_{i∈R} s_i against the
    change measured by retraining without R (removed terms dropped, n kept:
    docs/method.md#influence-vectors-sign-and-scale)."""
    n, lam = 2000, 0.02
    x = fmnist.x[:n, 0].astype(np.float64).reshape(n, 7, 4, 7, 4).mean((2, 4)).reshape(n, 49) / 255
    y = fmnist.y[:n]
    model, info = fit_linear(x, y, 10, lam)
    assert info["grad_inf_norm"] <= 1e-6
    s = closed_form(model, x, y, lam, 0.0, block_size=256)
    theta = np.concatenate([p.detach().numpy().ravel() for p in (model.fc.weight, model.fc.bias)])
    rng = np.random.default_rng(0)
    for fraction in (0.01, 0.02, 0.03, 0.05):
        removed = rng.choice(n, int(fraction * n), replace=False)
        weights = np.ones(n)
        weights[removed] = 0.0
        retrained, _ = fit_linear(x, y, 10, lam, weights=weights, init=model)
        measured = np.concatenate([p.detach().numpy().ravel()
                                   for p in (retrained.fc.weight, retrained.fc.bias)]) - theta
        predicted = s[removed].sum(axis=0)
        cosine = predicted @ measured / (np.linalg.norm(predicted) * np.linalg.norm(measured))
        norm_error = abs(np.linalg.norm(predicted) - np.linalg.norm(measured)) / np.linalg.norm(measured)
        assert cosine >= 0.99, (fraction, cosine)
        assert norm_error <= 0.05, (fraction, norm_error)
        assert np.linalg.norm(predicted - measured) / np.linalg.norm(measured) <= 0.05


def test_not_positive_definite_hessian_is_a_clear_error():
    from pruning_core.errors import BadInputError

    curv = hessians.Curvature(p=3, n=1, device=torch.device("cpu"), hvp=None,
                              dense=lambda: -torch.eye(3, dtype=torch.float64))
    with pytest.raises(BadInputError, match="positive definite"):
        hessians.solve_exact(curv, torch.eye(3, dtype=torch.float64), 0.0)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet8", "tests.user_models:make_net"])
def test_fast_cpu_feature_pass_equals_eager(name):
    """The frozen oneDNN graph used for the feature pass gives eager's features (float32 rounding),
    for a batch size it was not traced with; also for the user's own model, whose features a
    forward pre-hook captures."""
    from pruning_core.models import build_model, inference_features

    torch.manual_seed(0)
    shape = (1, 28, 28) if name == "cnn" else (3, 32, 32)
    model = build_model(name, shape, 10).eval()
    fast = inference_features(model, torch.rand(8, *shape))
    assert isinstance(fast, torch.jit.ScriptModule)  # the fast path was taken, not the fallback
    x = torch.rand(37, *shape)
    with torch.inference_mode():
        expected = model.features(x)
        assert torch.allclose(fast(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert inference_features(model, torch.rand(8, *shape, dtype=torch.float64)) == model.features
