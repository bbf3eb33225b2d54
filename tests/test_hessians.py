"""Inverse-Hessian strategies, scopes and projection against exact references (float64)."""

import numpy as np
import pytest
import torch
from torch import nn

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.models import LinearModel
from pruning_core.recipe import InfluenceArgs
from pruning_core.scopes import ScopedLoss, autograd_curvature, scope_parameter_names


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 4)
        self.fc = nn.Linear(4, 3)

    def features(self, x):
        return torch.tanh(self.hidden(x))

    def forward(self, x):
        return self.fc(self.features(x))


def tiny_problem(seed=0, n=30):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    return TinyNet().double(), rng.normal(size=(n, 5)), rng.integers(0, 3, n)


def brute_force_influence(model, names, x, y, lam):
    """J(θ) over the flat scoped θ with torch.autograd.functional.hessian; s_i = (1/n) H⁻¹ ∇ℓ_i."""
    params = dict(model.named_parameters())
    shapes = [(k, params[k].shape, params[k].numel()) for k in names]
    X, Y = torch.as_tensor(x), torch.as_tensor(y)

    def state(theta):
        out, start = {}, 0
        for k, shape, size in shapes:
            out[k] = theta[start:start + size].view(shape)
            start += size
        return out

    def losses(theta, rows=slice(None)):
        logits = torch.func.functional_call(model, {**{k: v.detach() for k, v in params.items()}, **state(theta)},
                                            (X[rows],))
        return nn.functional.cross_entropy(logits, Y[rows], reduction="none")

    theta0 = torch.cat([params[k].detach().reshape(-1) for k in names])
    H = torch.autograd.functional.hessian(lambda t: losses(t).mean() + 0.5 * lam * (t * t).sum(), theta0)
    G = torch.stack([torch.autograd.functional.jacobian(lambda t: losses(t, slice(i, i + 1))[0], theta0)
                     for i in range(len(y))])
    return torch.linalg.solve(H, G.T).T.numpy() / len(y)


def engine_influence(model, scope, x, y, lam, strategy="exact", **options):
    names = scope_parameter_names(model, scope)
    loss = ScopedLoss(model, names)
    curv = autograd_curvature(loss, x, y, block_size=7)
    M, info = hessians.inverse_apply(curv, torch.eye(loss.p, dtype=torch.float64), strategy, lam, **options)
    return (loss.per_sample_gradients(x, y) @ M.T).numpy() / len(y), info


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("scope", ["all", "modules:hidden"])
def test_exact_any_scope_equals_brute_force(scope):
    model, x, y = tiny_problem()
    names = scope_parameter_names(model, scope)
    assert names == (["hidden.weight", "hidden.bias", "fc.weight", "fc.bias"] if scope == "all"
                     else ["hidden.weight", "hidden.bias"])
    fast, _ = engine_influence(model, scope, x, y, lam=0.5)
    assert rel(fast, brute_force_influence(model, names, x, y, lam=0.5)) <= 1e-8


def test_cg_and_lissa_converge_to_exact():
    model, x, y = tiny_problem(1)
    exact, _ = engine_influence(model, "all", x, y, lam=0.5)
    cg, info = engine_influence(model, "all", x, y, lam=0.5, strategy="cg", tol=1e-12)
    assert rel(cg, exact) <= 1e-6 and info.iterations < 200
    lissa, info = engine_influence(model, "all", x, y, lam=0.5, strategy="lissa", depth=150, batch_size=None)
    assert rel(lissa, exact) <= 1e-3  # 6e-5 at this depth; 2.6e-2 at depth 50


def last_layer(model, x, y, lam, strategy, block=7):
    phi = inf.last_layer_inputs(model, x, block)
    W, b = inf.last_layer_weights(model)
    probs = inf.softmax_probs(phi, W, b)
    curv = inf.last_layer_curvature(phi, probs, block)
    M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64), strategy, lam, tol=1e-12)
    return inf.influence_vectors(phi, probs, y, M.numpy(), len(y), block), phi, probs


def test_last_layer_closed_form_curvature_matches_its_dense_hessian():
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    model, x = LinearModel(6, 4).double(), rng.normal(size=(40, 6))
    y = rng.integers(0, 4, 40)
    phi = inf.last_layer_inputs(model, x, 7)
    probs = inf.softmax_probs(phi, *inf.last_layer_weights(model))
    curv = inf.last_layer_curvature(phi, probs, 7)
    H = curv.dense()
    V = torch.as_tensor(rng.normal(size=(3, curv.p)))
    assert rel(curv.hvp(V, None).numpy(), (V @ H).numpy()) <= 1e-12
    assert rel(curv.diag().numpy(), torch.diagonal(H).numpy()) <= 1e-12
    exact, _, _ = last_layer(model, x, y, 0.01, "exact")
    cg, _, _ = last_layer(model, x, y, 0.01, "cg")
    assert rel(cg, exact) <= 1e-6


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kronecker_strategies_are_exact_when_the_factorisation_is(strategy):
    """A single linear layer predicting uniformly (zero weights): every sample's output
    curvature diag(p) − p pᵀ is the same, so H_data = S ⊗ A exactly."""
    rng = np.random.default_rng(3)
    model, x = LinearModel(6, 4).double(), rng.normal(size=(50, 6))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    y = rng.integers(0, 4, 50)
    exact, _, _ = last_layer(model, x, y, 0.01, "exact")
    approx, _, _ = last_layer(model, x, y, 0.01, strategy)
    assert rel(approx, exact) <= 1e-10


def test_kronecker_strategies_differ_from_exact_elsewhere():
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    model, x = LinearModel(6, 4).double(), 3 * rng.normal(size=(50, 6))
    y = rng.integers(0, 4, 50)
    exact, _, _ = last_layer(model, x, y, 0.01, "exact")
    kfac, _, _ = last_layer(model, x, y, 0.01, "kfac")
    ekfac, _, _ = last_layer(model, x, y, 0.01, "ekfac")
    assert rel(kfac, exact) > 1e-3 and rel(ekfac, exact) > 1e-3


def curved_last_layer(seed=4):
    """A linear layer with random weights on spread-out inputs (not Kronecker-exact), its
    closed-form curvature and features."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, x = LinearModel(6, 4).double(), 3 * rng.normal(size=(50, 6))
    y = rng.integers(0, 4, 50)
    phi = inf.last_layer_inputs(model, x, 7)
    probs = inf.softmax_probs(phi, *inf.last_layer_weights(model))
    return inf.last_layer_curvature(phi, probs, 7), phi, probs, y


def test_ekfac_eigenvalues_are_the_dense_hessian_s_diagonal_in_the_kronecker_eigenbasis():
    """EK-FAC's refitted eigenvalues (George et al. 2018) are diag(QᵀHQ), Q = Q_S ⊗ Q_A the
    eigenvectors of K-FAC's factors and H the dense H_data, here in Kronecker order c·d̃ + j."""
    curv, *_ = curved_last_layer()
    factors = curv.kron()
    _, Q_s = torch.linalg.eigh(factors.S)
    _, Q_a = torch.linalg.eigh(factors.A)
    to_kron = torch.as_tensor(np.asarray(factors.to_contract))
    H = torch.empty(curv.p, curv.p, dtype=torch.float64)
    H[to_kron[:, None], to_kron[None, :]] = curv.dense()  # contract order → Kronecker order
    Q = torch.kron(Q_s, Q_a)
    reference = torch.diagonal(Q.T @ H @ Q).reshape(len(Q_s), len(Q_a))
    assert rel(factors.eigen_diagonal(Q_s, Q_a).numpy(), reference.numpy()) <= 1e-12


@pytest.mark.parametrize("strategy", ["exact", "kfac", "ekfac"])
def test_projected_vectors_are_the_full_ones_times_the_projection(strategy):
    """M = P H⁻¹ makes the stored vectors P s_i: the projected run's vectors equal the full
    run's times Pᵀ, to rounding, for every strategy that solves exactly in its own model of H."""
    curv, phi, probs, y = curved_last_layer()
    P = hessians.projection_matrix(curv.p, 7, seed=3)
    full, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64), strategy, 0.01)
    projected, _ = hessians.inverse_apply(curv, P, strategy, 0.01)
    vectors = {name: inf.influence_vectors(phi, probs, y, M.numpy(), len(y), 7) for name, M in
               (("full", full), ("projected", projected))}
    assert vectors["projected"].shape == (50, 7)
    assert rel(vectors["projected"], vectors["full"] @ P.numpy().T) <= 1e-12


def test_kfac_refused_outside_last_layer():
    from pruning_core.errors import BadInputError

    with pytest.raises(BadInputError, match="last-layer"):
        InfluenceArgs(scope="all", hessian="ekfac")


def test_projection_is_seeded_and_norm_preserving():
    P1 = hessians.projection_matrix(500, 300, seed=7)
    P2 = hessians.projection_matrix(500, 300, seed=7)
    assert torch.equal(P1, P2) and not torch.equal(P1, hessians.projection_matrix(500, 300, seed=8))
    v = torch.randn(500, dtype=torch.float64)
    for kind in ("gaussian", "rademacher"):
        P = hessians.projection_matrix(500, 2000, seed=1, kind=kind)
        assert abs(float((P @ v).norm() / v.norm()) - 1) < 0.1


def test_automatic_damping_is_a_fraction_of_the_mean_eigenvalue():
    """Where the curvature gives its diagonal, 1e-3 · trace / p exactly; elsewhere Hutchinson's
    estimate with its 16 seeded Rademacher probes v: 1e-3 · mean(vᵀHv) / p, within four standard
    deviations of the trace (Var vᵀHv = 2 (‖H‖_F² − Σ H_ii²))."""
    model, x, y = tiny_problem(5)
    curv = autograd_curvature(ScopedLoss(model, scope_parameter_names(model, "all")), x, y, 7)
    H = curv.dense()
    trace = float(torch.trace(H))
    g = torch.Generator(device="cpu").manual_seed(0)
    V = (torch.randint(0, 2, (16, curv.p), generator=g) * 2 - 1).to(torch.float64)
    estimate = float(torch.einsum("ip,pq,iq->i", V, H, V).mean())
    assert hessians.automatic_damping(curv) == pytest.approx(1e-3 * estimate / curv.p, rel=1e-10)
    sd = (2 * (float((H * H).sum()) - float((torch.diagonal(H) ** 2).sum())) / 16) ** 0.5
    assert abs(estimate - trace) <= 4 * sd
    with_diagonal = hessians.Curvature(p=curv.p, n=curv.n, device=curv.device, hvp=None,
                                       diag=lambda: torch.diagonal(H))
    assert hessians.automatic_damping(with_diagonal) == pytest.approx(1e-3 * trace / curv.p, rel=1e-12)
    assert hessians.automatic_damping(with_diagonal, factor=0.5) == pytest.approx(0.5 * trace / curv.p, rel=1e-12)


def test_exact_refuses_what_does_not_fit_with_the_memory_it_needs():
    from pruning_core.errors import BadInputError

    curv = hessians.Curvature(p=100_000, n=1, device=torch.device("cpu"), hvp=None)
    with pytest.raises(BadInputError, match="74.5 GiB"):
        hessians.solve_exact(curv, torch.eye(2), 1.0)
