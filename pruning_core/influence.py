"""Influence vectors over the final linear layer (the paper's setting), closed form.

Conventions (DESIGN.md, contract):
  J(θ) = (1/n) Σ_i ℓ(z_i, θ) + (λ/2)‖θ_s‖², θ_s = (fc.weight, fc.bias)
  H    = (1/n) Σ_i ∇²ℓ_i + (λ + damping)·I
  s_i  = (1/n) H⁻¹ ∇ℓ_i                      (predicted θ̂_{−R} − θ̂ ≈ Σ_{i∈R} s_i)
For cross-entropy on a linear layer with input φ̃_i = [φ_i, 1] and softmax output p_i:
  ∇ℓ_i  = (p_i − e_{y_i}) ⊗ φ̃_i,   ∇²ℓ_i = (diag(p_i) − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ.
Vectors use the contract order: fc.weight row-major (c·d + j), then fc.bias (C·d + c).

Every sum over samples runs over fixed global blocks of `block_size` rows in index order, so
results are bit-identical whatever the shard or worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import np_float_dtype, as_float
from .errors import BadInputError

SCOPES = ("last-layer",)
HESSIANS = ("exact",)
PLANNED_HESSIANS = ("kfac", "ekfac", "cg", "lissa")
EXACT_MAX_BYTES = 16 * 2**30


@dataclass
class InfluenceArgs:
    """Influence settings, saved in the manifest; a cache made with other settings is not reused."""

    scope: str = "last-layer"  # parameters s_i is taken over
    hessian: str = "exact"  # inverse-Hessian strategy
    damping: float = 0.0  # added to the diagonal of H on top of λ
    projection_dim: int | None = None  # seeded random projection of s_i (not yet available)
    block_size: int = 1024  # rows per fixed block; part of the numerical identity of results
    storage_dtype: str = "float32"  # dtype of the stored vectors: float32 or float64

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise BadInputError(f"--scope {self.scope!r} is not available; valid: {', '.join(SCOPES)}")
        if self.hessian in PLANNED_HESSIANS:
            raise BadInputError(f"--hessian {self.hessian} is not implemented yet; valid now: {', '.join(HESSIANS)}")
        if self.hessian not in HESSIANS:
            raise BadInputError(f"--hessian {self.hessian!r} is not known; valid: {', '.join(HESSIANS)}")
        if not (self.damping >= 0 and np.isfinite(self.damping)):
            raise BadInputError(f"--damping {self.damping} must be a non-negative number")
        if self.projection_dim is not None:
            raise BadInputError("--projection-dim is not implemented yet; omit it to store the full vectors")
        if self.block_size < 1:
            raise BadInputError(f"block size {self.block_size} must be at least 1")
        if self.storage_dtype not in ("float32", "float64"):
            raise BadInputError(f"storage dtype {self.storage_dtype!r}; valid: float32, float64")


def block_ranges(start: int, end: int, block_size: int) -> list[tuple[int, int]]:
    """Global blocks [k·B, (k+1)·B) clipped to [start, end); `start` must be block-aligned."""
    return [(a, min(a + block_size, end)) for a in range(start, end, block_size)]


def shard_ranges(n: int, n_shards: int, block_size: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges made of whole blocks, as equal as possible (at most n_shards)."""
    n_blocks = max(1, -(-n // block_size))
    groups = np.array_split(np.arange(n_blocks), min(max(1, n_shards), n_blocks))
    return [(int(g[0]) * block_size, min((int(g[-1]) + 1) * block_size, n)) for g in groups]


@torch.no_grad()
def last_layer_inputs(model: nn.Module, x: np.ndarray, block_size: int, device=None) -> np.ndarray:
    """φ(x), the inputs of `fc`, (n, d) float64, computed block by block in the model's dtype."""
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model.eval()
    out = [model.features(torch.as_tensor(as_float(x[a:b], np_float_dtype(dtype)), device=device)).double().cpu()
           for a, b in block_ranges(0, len(x), block_size)]
    return torch.cat(out).numpy()


def last_layer_weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W (C, d), b (C,)) of `fc` in float64."""
    return (model.fc.weight.detach().double().cpu().numpy(), model.fc.bias.detach().double().cpu().numpy())


def _t(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


def softmax_probs(phi: np.ndarray, W: np.ndarray, b: np.ndarray, device="cpu") -> np.ndarray:
    """p_i = softmax(W φ_i + b), (n, C) float64."""
    return torch.softmax(_t(phi, device) @ _t(W, device).T + _t(b, device), dim=1).cpu().numpy()


def loss_and_el2n(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy −log p_{i,y_i} and EL2N ‖p_i − e_{y_i}‖₂, each (n,) float64."""
    rows = np.arange(len(y))
    residual = probs.copy()
    residual[rows, y] -= 1.0
    return -np.log(np.maximum(probs[rows, y], np.finfo(np.float64).tiny)), np.linalg.norm(residual, axis=1)


def contract_order(n_classes: int, d: int) -> np.ndarray:
    """perm with v_contract = v_kron[perm], v_kron indexed c·(d+1) + j over φ̃ = [φ, 1]."""
    weight = (np.arange(n_classes)[:, None] * (d + 1) + np.arange(d)[None, :]).ravel()
    bias = np.arange(n_classes) * (d + 1) + d
    return np.concatenate([weight, bias])


def per_sample_gradients(phi: np.ndarray, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇_θ ℓ_i for θ = (fc.weight, fc.bias), (n, C·d + C) float64, contract order."""
    residual = probs.copy()
    residual[np.arange(len(y)), y] -= 1.0  # (n, C): p_i − e_{y_i}
    weight = (residual[:, :, None] * phi[:, None, :]).reshape(len(y), -1)  # (n, C·d)
    return np.concatenate([weight, residual], axis=1)


def hessian_bytes(n_classes: int, d: int) -> int:
    return (n_classes * (d + 1)) ** 2 * 8


def last_layer_hessian(phi: np.ndarray, probs: np.ndarray, weight_decay: float, damping: float,
                       block_size: int, device="cpu") -> np.ndarray:
    """H = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ + (λ + damping)·I, (p, p), contract order.

    Accumulated over fixed blocks in index order (bit-identical for any sharding).
    """
    n, d = phi.shape
    C = probs.shape[1]
    dd = d + 1
    if hessian_bytes(C, d) > EXACT_MAX_BYTES:
        raise BadInputError(f"the exact Hessian over {C * dd} parameters needs {hessian_bytes(C, d) / 2**30:.1f} GiB "
                            f"(limit {EXACT_MAX_BYTES / 2**30:.0f} GiB)")
    diag = torch.zeros(C, dd, dd, dtype=torch.float64, device=device)
    outer = torch.zeros(C * dd, C * dd, dtype=torch.float64, device=device)
    for a, b in block_ranges(0, n, block_size):
        f = torch.cat([_t(phi[a:b], device), torch.ones(b - a, 1, dtype=torch.float64, device=device)], 1)  # (k, d+1)
        p = _t(probs[a:b], device)  # (k, C)
        diag += torch.bmm((p.T[:, :, None] * f[None]).transpose(1, 2), f.expand(C, -1, -1))  # (C, d+1, d+1)
        q = (p[:, :, None] * f[:, None, :]).reshape(b - a, C * dd)  # (k, C(d+1)): p_i ⊗ φ̃_i
        outer += q.T @ q
    H = -outer
    for c in range(C):
        H[c * dd:(c + 1) * dd, c * dd:(c + 1) * dd] += diag[c]
    H /= n
    perm = torch.as_tensor(contract_order(C, d), device=device)
    H = H[perm][:, perm]
    H += (weight_decay + damping) * torch.eye(C * dd, dtype=torch.float64, device=device)
    return H.cpu().numpy()


def inverse_hessian(H: np.ndarray, device="cpu") -> np.ndarray:
    """H⁻¹ via Cholesky; a clear error if H is not positive definite."""
    Ht = _t(H, device)
    L, info = torch.linalg.cholesky_ex(Ht)
    if int(info) != 0:
        raise BadInputError("the Hessian is not positive definite; set --weight-decay > 0 or add --damping")
    H_inv = torch.cholesky_inverse(L)
    return (0.5 * (H_inv + H_inv.T)).cpu().numpy()


def influence_vectors(phi: np.ndarray, probs: np.ndarray, y: np.ndarray, H_inv: np.ndarray, n_total: int,
                      block_size: int, device="cpu") -> np.ndarray:
    """s_i = (1/n) H⁻¹ ∇ℓ_i for the rows given, (k, p) float64; n_total is the full n."""
    H_inv_t = _t(H_inv, device)
    out = []
    for a, b in block_ranges(0, len(y), block_size):
        g = _t(per_sample_gradients(phi[a:b], probs[a:b], y[a:b]), device)
        out.append((g @ H_inv_t / n_total).cpu())  # H⁻¹ is symmetric: (H⁻¹ g_i)ᵀ = g_iᵀ H⁻¹
    return torch.cat(out).numpy() if out else np.zeros((0, H_inv.shape[0]))


def influence_vectors_autograd(model: nn.Module, x: np.ndarray, y: np.ndarray, weight_decay: float,
                               damping: float = 0.0) -> np.ndarray:
    """Slow reference: H of J by autograd over (fc.weight, fc.bias), per-sample gradients by
    autograd through the whole model, then s_i = (1/n) H⁻¹ ∇ℓ_i. (n, p) float64."""
    model = model.double().eval()
    W0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    shapes = [W0.shape, b0.shape]
    X = torch.as_tensor(as_float(x, np.float64))
    Y = torch.as_tensor(y)
    n = len(y)

    def unflatten(theta):
        W = theta[:W0.numel()].view(shapes[0])
        return {"fc.weight": W, "fc.bias": theta[W0.numel():].view(shapes[1])}

    def losses(theta, rows=slice(None)):
        logits = torch.func.functional_call(model, unflatten(theta), (X[rows],))
        return nn.functional.cross_entropy(logits, Y[rows], reduction="none")

    def objective(theta):
        return losses(theta).mean() + 0.5 * weight_decay * (theta * theta).sum()

    theta0 = torch.cat([W0.reshape(-1), b0])
    H = torch.autograd.functional.hessian(objective, theta0) + damping * torch.eye(len(theta0), dtype=torch.float64)
    grads = torch.stack([torch.autograd.functional.jacobian(lambda t: losses(t, slice(i, i + 1))[0], theta0)
                         for i in range(n)])
    return torch.linalg.solve(H, grads.T).T.numpy() / n
