"""Inverse-Hessian strategies behind one interface, chosen by name.

Every strategy returns M = B H⁻¹ for a basis B (k, p): the identity (k = p, full vectors) or a
random projection P (k < p), so that s_i = (1/n) M ∇ℓ_i, and with a projection P s_i without
ever holding the full vector. H = H_data + shift·I with H_data = (1/n) Σ_i ∇²ℓ_i and
shift = λ + damping (docs/method.md#the-hessian).

  exact  dense H_data, Cholesky solve                      (memory p²·8 bytes)
  cg     block conjugate gradient on Hessian-vector products (H must be positive definite)
  lissa  the LiSSA recursion x ← b + x − (H x)/scale on seeded mini-batches
  kfac   H_data ≈ S ⊗ A (last layer: S = E[diag p − p pᵀ], A = E[φ̃ φ̃ᵀ]), inverted in the
         Kronecker eigenbasis
  ekfac  K-FAC's eigenbasis with eigenvalues refitted to the exact diagonal of H_data there
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import BadInputError
from .recipe import STRATEGIES

EXACT_MAX_BYTES = 16 * 2**30


@dataclass
class Curvature:
    """What the strategies need of H_data (the data part of the Hessian, a mean over n).

    hvp(V, rows) → V H_data for V (k, p), estimated on the sample indices `rows` (None: all);
    dense() → H_data (p, p); kron() → last-layer factors for kfac/ekfac (None elsewhere);
    diag() → diag(H_data) (p,), for automatic damping.
    """

    p: int
    n: int
    device: torch.device
    hvp: Callable[[torch.Tensor, np.ndarray | None], torch.Tensor]
    dense: Callable[[], torch.Tensor] | None = None
    kron: Callable[[], KroneckerFactors] | None = None
    diag: Callable[[], torch.Tensor] | None = None


@dataclass
class KroneckerFactors:
    """Last layer: S (C, C), A (d̃, d̃), and the exact diagonal of H_data in their eigenbasis
    (C, d̃), plus the map from Kronecker order c·d̃ + j to the contract order."""

    S: torch.Tensor
    A: torch.Tensor
    eigen_diagonal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    to_contract: np.ndarray


@dataclass
class SolveInfo:
    strategy: str
    shift: float
    iterations: int | None = None
    residual: float | None = None
    extra: dict = field(default_factory=dict)


def exact_bytes(p: int) -> int:
    return p * p * 8


def _check_exact_memory(p: int) -> None:
    if exact_bytes(p) > EXACT_MAX_BYTES:
        raise BadInputError(f"`hessian` exact over {p} parameters needs {exact_bytes(p) / 2**30:.1f} GiB for H "
                            f"(limit {EXACT_MAX_BYTES / 2**30:.0f} GiB); use `hessian` ekfac, cg or lissa, "
                            f"or a `projection_dim`")


def _is_identity(B: torch.Tensor, p: int) -> bool:
    return B.shape == (p, p) and bool((B.diagonal() == 1).all()) and int(torch.count_nonzero(B)) == p


def solve_exact(curv: Curvature, B: torch.Tensor, shift: float) -> tuple[torch.Tensor, SolveInfo]:
    """B H⁻¹ from the Cholesky factor of H. For B = I (full vectors) H⁻¹ comes from the factor
    itself (LAPACK potri): half the flops of solving against I, and exactly symmetric."""
    _check_exact_memory(curv.p)
    H = curv.dense() + shift * torch.eye(curv.p, dtype=torch.float64, device=curv.device)
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if int(info) != 0:
        raise BadInputError("the Hessian is not positive definite; raise `damping` (or `weight_decay`)")
    if _is_identity(B, curv.p):
        return torch.cholesky_inverse(L), SolveInfo("exact", shift)
    return torch.cholesky_solve(B.T.to(torch.float64), L).T, SolveInfo("exact", shift)


def solve_cg(curv: Curvature, B: torch.Tensor, shift: float, tol: float = 1e-10,
             max_iter: int = 1000) -> tuple[torch.Tensor, SolveInfo]:
    """Row-wise conjugate gradient for X H = B, all rows at once."""
    B = B.to(torch.float64)
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    b_norm = B.norm(dim=1).clamp_min(1e-300)
    it = 0
    for it in range(1, max_iter + 1):
        HP = curv.hvp(P, None) + shift * P
        curvature = (P * HP).sum(1)
        if (curvature <= 0).any():
            raise BadInputError("cg met a direction of non-positive curvature; raise `damping`")
        alpha = rs / curvature
        X += alpha[:, None] * P
        R -= alpha[:, None] * HP
        rs_new = (R * R).sum(1)
        if float((rs_new.sqrt() / b_norm).max()) <= tol:
            rs = rs_new
            break
        P = R + (rs_new / rs)[:, None] * P
        rs = rs_new
    return X, SolveInfo("cg", shift, it, float((rs.sqrt() / b_norm).max()))


def largest_eigenvalue(curv: Curvature, iterations: int = 50, seed: int = 0) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, curv.p, generator=g, dtype=torch.float64).to(curv.device)
    value = 0.0
    for _ in range(iterations):
        w = curv.hvp(v / v.norm(), None)
        value = float(w.norm())
        v = w
    return value


def solve_lissa(curv: Curvature, B: torch.Tensor, shift: float, depth: int = 2000, batch_size: int | None = None,
                scale: float | None = None, seed: int = 0) -> tuple[torch.Tensor, SolveInfo]:
    """x_{t+1} = b + x_t − (H x_t)/scale, so x_t → scale·H⁻¹ b; H estimated on seeded
    mini-batches of `batch_size` samples (None: all samples, deterministic)."""
    scale = scale or 1.05 * (largest_eigenvalue(curv) + shift)
    rng = np.random.default_rng(seed)
    B = B.to(torch.float64)
    X = B.clone()
    for _ in range(depth):
        rows = None if batch_size is None or batch_size >= curv.n else rng.choice(curv.n, batch_size, replace=False)
        X = B + X - (curv.hvp(X, rows) + shift * X) / scale
    residual = (curv.hvp(X / scale, None) + shift * X / scale - B).norm(dim=1) / B.norm(dim=1).clamp_min(1e-300)
    return X / scale, SolveInfo("lissa", shift, depth, float(residual.max()),
                                {"scale": scale, "batch_size": batch_size})


def solve_kronecker(curv: Curvature, B: torch.Tensor, shift: float, refit: bool) -> tuple[torch.Tensor, SolveInfo]:
    if curv.kron is None:
        raise BadInputError("`hessian` kfac/ekfac are available for `scope` last-layer; use exact, cg or lissa here")
    k = curv.kron()
    lam_s, Q_s = torch.linalg.eigh(k.S)
    lam_a, Q_a = torch.linalg.eigh(k.A)
    eig = k.eigen_diagonal(Q_s, Q_a) if refit else lam_s.clamp_min(0)[:, None] * lam_a.clamp_min(0)[None, :]
    C, dd = eig.shape
    to_contract = torch.as_tensor(k.to_contract, device=curv.device)
    Bk = torch.empty_like(B, dtype=torch.float64)
    Bk[:, to_contract] = B.to(torch.float64)  # contract order → Kronecker order
    Z = Q_s.T @ Bk.view(-1, C, dd) @ Q_a  # (k, C, d̃) in the eigenbasis
    Z = Z / (eig + shift)
    Xk = (Q_s @ Z @ Q_a.T).reshape(-1, C * dd)
    return Xk[:, to_contract], SolveInfo("ekfac" if refit else "kfac", shift)


def inverse_apply(curv: Curvature, B: torch.Tensor, strategy: str, shift: float,
                  **options) -> tuple[torch.Tensor, SolveInfo]:
    """M = B H⁻¹, (k, p) float64, by the named strategy."""
    if strategy == "exact":
        return solve_exact(curv, B, shift)
    if strategy == "cg":
        return solve_cg(curv, B, shift, **{k: v for k, v in options.items() if k in ("tol", "max_iter")})
    if strategy == "lissa":
        return solve_lissa(curv, B, shift, **{k: v for k, v in options.items()
                                              if k in ("depth", "batch_size", "scale", "seed")})
    if strategy in ("kfac", "ekfac"):
        return solve_kronecker(curv, B, shift, refit=strategy == "ekfac")
    raise BadInputError(f"`hessian` {strategy!r} is not known; valid: {', '.join(STRATEGIES)}")


def automatic_damping(curv: Curvature, factor: float = 1e-3) -> float:
    """damping = factor · mean eigenvalue of H_data (trace / p)."""
    if curv.diag is not None:
        trace = float(curv.diag().sum())
    else:  # Hutchinson with 16 Rademacher probes
        g = torch.Generator(device="cpu").manual_seed(0)
        V = (torch.randint(0, 2, (16, curv.p), generator=g) * 2 - 1).to(torch.float64).to(curv.device)
        trace = float((V * curv.hvp(V, None)).sum(1).mean())
    return factor * max(trace, 0.0) / curv.p


def projection_matrix(p: int, k: int, seed: int, kind: str = "gaussian", device="cpu",
                      block_rows: int = 256) -> torch.Tensor:
    """P (k, p), E[PᵀP] = I: Gaussian N(0, 1/k) or Rademacher ±1/√k entries, generated in row
    blocks from one seeded generator (the same P on every machine and device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for start in range(0, k, block_rows):
        size = min(block_rows, k - start)
        if kind == "gaussian":
            block = torch.randn(size, p, generator=g, dtype=torch.float64)
        else:
            block = (torch.randint(0, 2, (size, p), generator=g) * 2 - 1).to(torch.float64)
        rows.append(block / math.sqrt(k))
    return torch.cat(rows).to(device)
