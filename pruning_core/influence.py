"""Influence vectors over the final linear layer (the paper's setting), closed form.

Conventions (docs/method.md#the-math):
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

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import as_float, np_float_dtype
from .errors import BadInputError
from .hessians import Curvature, KroneckerFactors
from .models import final_layer_names, inference_features
from .recipe import InfluenceArgs


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
    """φ(x), the inputs of `fc`, (n, d) in the model's dtype (float32 for networks, float64 for
    `linear`), computed block by block; the Hessian's large products run in that dtype."""
    device = torch.device(device or next(model.parameters()).device)
    dtype = next(model.parameters()).dtype
    model.eval()
    blocks = block_ranges(0, len(x), block_size)
    if not blocks:
        return np.zeros((0, model.fc.in_features), dtype=np_float_dtype(dtype))
    batch = lambda a, b: torch.as_tensor(as_float(x[a:b], np_float_dtype(dtype)), device=device)  # noqa: E731
    # oneDNN's CPU convolutions run fastest on small batches; each fixed block is cut the same way
    step = block_size if device.type == "cuda" else min(block_size, 256)
    features = inference_features(model, batch(0, min(step, len(x))))
    with torch.inference_mode():
        out = [features(batch(c, d)).cpu() for a, b in blocks for c, d in block_ranges(a, b, step)]
    return torch.cat(out).numpy()


def last_layer_weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W (C, d), b (C,)) of `fc` in float64."""
    return (model.fc.weight.detach().double().cpu().numpy(), model.fc.bias.detach().double().cpu().numpy())


def _t(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


def softmax_probs(phi: np.ndarray, W: np.ndarray, b: np.ndarray, device="cpu") -> np.ndarray:
    """p_i = softmax(W φ_i + b), (n, C) float64."""
    return torch.softmax(_t(phi, device) @ _t(W, device).T + _t(b, device), dim=1).cpu().numpy()


def residuals(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p_i − e_{y_i}, (n, C) float64: the gradient of ℓ_i with respect to the logits."""
    residual = np.array(probs, dtype=np.float64)
    residual[np.arange(len(y)), y] -= 1.0
    return residual


def loss_and_el2n(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy −log p_{i,y_i} and EL2N ‖p_i − e_{y_i}‖₂, each (n,) float64."""
    picked = probs[np.arange(len(y)), y]
    return -np.log(np.maximum(picked, np.finfo(np.float64).tiny)), np.linalg.norm(residuals(probs, y), axis=1)


def contract_order(n_classes: int, d: int) -> np.ndarray:
    """perm with v_contract = v_kron[perm], v_kron indexed c·(d+1) + j over φ̃ = [φ, 1]."""
    weight = (np.arange(n_classes)[:, None] * (d + 1) + np.arange(d)[None, :]).ravel()
    bias = np.arange(n_classes) * (d + 1) + d
    return np.concatenate([weight, bias])


def per_sample_gradients(phi: np.ndarray, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇_θ ℓ_i for θ = (fc.weight, fc.bias), (n, C·d + C) float64, contract order."""
    residual = residuals(probs, y)  # (n, C)
    weight = (residual[:, :, None] * phi[:, None, :]).reshape(len(y), -1)  # (n, C·d)
    return np.concatenate([weight, residual], axis=1)


def last_layer_gradient_norms(phi: np.ndarray, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """‖∇_θ ℓ_i‖ over the last layer, (n,) float64: ‖p_i − e_{y_i}‖·‖φ̃_i‖ (GraNd at the end of training)."""
    return np.linalg.norm(residuals(probs, y), axis=1) * np.sqrt((phi.astype(np.float64) ** 2).sum(1) + 1.0)


def last_layer_hessian(phi: np.ndarray, probs: np.ndarray, block_size: int, device="cpu") -> np.ndarray:
    """H_data = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ, (p, p), contract order; the shift
    λ + damping is added by the strategy (`hessians.solve_exact`).

    Accumulated over fixed blocks in index order (bit-identical for any sharding).
    """
    n, d = phi.shape
    C = probs.shape[1]
    dd = d + 1
    cdtype = torch.float32 if phi.dtype == np.float32 else torch.float64  # products; sums over blocks in float64
    H = torch.zeros(C * dd, C * dd, dtype=torch.float64, device=device)  # upper block triangle, kron order
    for a, b in block_ranges(0, n, block_size):
        f = torch.cat([torch.as_tensor(phi[a:b], device=device).to(cdtype),
                       torch.ones(b - a, 1, dtype=cdtype, device=device)], 1)  # (k, d+1)
        p = torch.as_tensor(probs[a:b], device=device).to(cdtype)  # (k, C)
        q = (p[:, :, None] * f[:, None, :]).reshape(b - a, C * dd)  # (k, C(d+1)): p_i ⊗ φ̃_i
        for c in range(C):  # block (c, c): Σ (p_c − p_c²) φ̃φ̃ᵀ; blocks (c, e > c): −Σ p_c p_e φ̃φ̃ᵀ
            rows = slice(c * dd, (c + 1) * dd)
            H[rows, rows] += ((f * (p[:, c] - p[:, c] ** 2)[:, None]).T @ f).double()
            if c + 1 < C:
                H[rows, (c + 1) * dd:] -= (q[:, rows].T @ q[:, (c + 1) * dd:]).double()
    H = torch.triu(H) + torch.triu(H, 1).T
    H /= n
    perm = torch.as_tensor(contract_order(C, d), device=device)
    return H[perm][:, perm].cpu().numpy()


def influence_vectors(phi: np.ndarray, probs: np.ndarray, y: np.ndarray, M: np.ndarray, n_total: int,
                      block_size: int, device="cpu", dtype=np.float64) -> np.ndarray:
    """s_i = (1/n) M ∇ℓ_i for the rows given, (b, k) in `dtype`; n_total is the full n.

    M = B H⁻¹ (k, p): H⁻¹ itself (full vectors) or P H⁻¹ (projected vectors, P s_i).
    """
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    Mt = torch.as_tensor(M, device=device).to(tdtype)
    out = []
    for a, b in block_ranges(0, len(y), block_size):
        out.append((last_layer_gradients(phi[a:b], probs[a:b], y[a:b], device, tdtype) @ Mt.T / n_total).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, M.shape[0]), dtype=dtype)


def last_layer_gradients(phi: np.ndarray, probs: np.ndarray, y: np.ndarray, device="cpu",
                         dtype=torch.float64) -> torch.Tensor:
    """∇ℓ_i over (fc.weight, fc.bias) = (p_i − e_{y_i}) ⊗ (φ_i, 1), (b, p) in contract order."""
    f = torch.as_tensor(phi, device=device).to(dtype)  # (b, d)
    r = torch.as_tensor(residuals(probs, y), device=device).to(dtype)  # (b, C)
    return torch.cat([(r[:, :, None] * f[:, None, :]).reshape(len(f), -1), r], 1)


def last_layer_curvature(phi: np.ndarray, probs: np.ndarray, block_size: int, device="cpu") -> Curvature:
    """H_data of the last layer in closed form: dense, Hessian-vector products, diagonal and
    the Kronecker factors for kfac/ekfac, all over fixed blocks in index order."""
    n, d = phi.shape
    C = probs.shape[1]
    dd = d + 1
    perm = contract_order(C, d)
    perm_t = torch.as_tensor(perm, device=device)

    def blocks(rows=None):
        idx = np.arange(n) if rows is None else np.sort(np.asarray(rows))
        for a in range(0, len(idx), block_size):
            sel = idx[a:a + block_size]
            f = torch.cat([_t(phi[sel], device), torch.ones(len(sel), 1, dtype=torch.float64, device=device)], 1)
            yield f, _t(probs[sel], device)  # (b, d+1), (b, C)

    def hvp(V: torch.Tensor, rows=None) -> torch.Tensor:
        Vk = torch.empty_like(V, dtype=torch.float64)
        Vk[:, perm_t] = V.to(torch.float64)
        Vk = Vk.view(-1, C, dd)
        out = torch.zeros_like(Vk)
        count = 0
        for f, p in blocks(rows):
            Z = Vk @ f.T  # (k, C, b): logit directions per sample
            AZ = p.T * Z - p.T * (p.T * Z).sum(1, keepdim=True)  # (diag p − p pᵀ) z per sample
            out += AZ @ f
            count += len(f)
        return (out.reshape(len(V), -1) / count)[:, perm_t]

    def dense() -> torch.Tensor:
        return torch.as_tensor(last_layer_hessian(phi, probs, block_size, device), device=device)

    def diag() -> torch.Tensor:
        total = torch.zeros(C, dd, dtype=torch.float64, device=device)
        for f, p in blocks():
            total += (p - p * p).T @ (f * f)
        return (total.reshape(-1) / n)[perm_t]

    def eigen_diagonal(Q_s: torch.Tensor, Q_a: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_i diag(Q_sᵀ A_i Q_s) ⊗ (Q_aᵀ φ̃_i)²: the exact diagonal of H_data in the
        Kronecker eigenbasis (EK-FAC's refitted eigenvalues, without sampling)."""
        total = torch.zeros(C, dd, dtype=torch.float64, device=device)
        for f, p in blocks():
            D = p @ (Q_s * Q_s) - (p @ Q_s) ** 2  # (b, C)
            total += D.T @ (f @ Q_a) ** 2
        return total / n

    def factors() -> KroneckerFactors:
        S = torch.zeros(C, C, dtype=torch.float64, device=device)
        A = torch.zeros(dd, dd, dtype=torch.float64, device=device)
        for f, p in blocks():
            S += torch.diag(p.sum(0)) - p.T @ p
            A += f.T @ f
        return KroneckerFactors(S / n, A / n, eigen_diagonal, perm)

    return Curvature(p=C * dd, n=n, device=torch.device(device), hvp=hvp, dense=dense, diag=diag, kron=factors)


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

    weight, bias = final_layer_names(model)

    def unflatten(theta):
        return {weight: theta[:W0.numel()].view(shapes[0]), bias: theta[W0.numel():].view(shapes[1])}

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


def stage_estimate(n: int, p: int, feature_dim: int, args: InfluenceArgs, flops_per_second: float = 2e10) -> dict:
    """Rough memory and time of the influence stage, printed before it starts.

    Peak memory counts the arrays held at once in the process computing M = B H⁻¹ (features,
    dense H, M, one block of gradients); time assumes `flops_per_second` (the default: a small
    CPU's float64 matmul rate) and excludes the forward passes.
    """
    k = args.projection_dim or p
    item = np.dtype(args.storage_dtype).itemsize
    memory = {
        "features": n * (feature_dim + 1) * 8 if args.scope == "last-layer" else 0,
        "hessian": p * p * 8 if args.hessian == "exact" else 0,
        "inverse_basis": k * p * 8,
        "gradient_block": min(args.block_size, n) * p * 8,
        "stored_vectors": n * k * item,
    }
    flops = 2.0 * n * p * k  # the vectors: G Mᵀ
    if args.hessian == "exact":
        flops += 2.0 * n * p * p + p**3 / 3 + 2.0 * p * p * k
    elif args.hessian in ("kfac", "ekfac"):
        flops += 4.0 * n * p * (feature_dim + 1) + 2.0 * k * p * (feature_dim + 1)
    else:
        iterations = args.cg_max_iter if args.hessian == "cg" else args.lissa_depth
        rows = n if args.hessian == "cg" or args.lissa_batch_size is None else min(n, args.lissa_batch_size)
        flops += 4.0 * rows * p * k * min(iterations, 100)  # iterations until convergence, capped for the guess
    peak = memory["features"] + memory["hessian"] + memory["inverse_basis"] + memory["gradient_block"]
    return {"n": n, "p": p, "k": k, "memory_bytes": memory, "peak_bytes": peak, "flops": flops,
            "seconds": flops / flops_per_second}


def format_estimate(estimate: dict) -> str:
    """One line: the math's arrays held at once (not the process's whole footprint), then the
    vectors written out shard by shard, then the time of the math."""
    memory = estimate["memory_bytes"]
    parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items() if v and k != "stored_vectors")
    stored = f"vectors stored {_gib(memory['stored_vectors'])}; " if memory.get("stored_vectors") else ""
    return (f"influence stage estimate: n={estimate['n']}, p={estimate['p']}, stored dim={estimate['k']}; "
            f"math arrays held at once ≈ {_gib(estimate['peak_bytes'])} ({parts}); "
            f"{stored}≈ {estimate['seconds']:.0f} s of math")


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def memory_available() -> dict:
    """This machine's memory in bytes: `total` (MemTotal, or the process's cgroup limit if
    lower) and `available` (MemAvailable, or what that limit leaves once reclaimable page cache
    is counted free, if lower); None where the kernel does not say."""
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    limit = _cgroup_memory()
    if limit is not None:
        total = min(total or limit["limit"], limit["limit"])
        available = min(available if available is not None else limit["free"], limit["free"])
    return {"total": total, "available": available}


def _cgroup_memory() -> dict | None:
    """The memory limit of this process's cgroup (v2, or v1 as mounted in a container) and what
    it leaves free, reclaimable page cache counted free; None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = next((line.split("::", 1)[1].strip("/") for line in lines if line.startswith("0::")), None)
    layouts = [(Path("/sys/fs/cgroup") / v2, "memory.max", "memory.current", "inactive_file")] if v2 is not None else []
    layouts.append((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes",
                    "total_inactive_file"))
    for folder, max_file, current_file, cache_key in layouts:
        try:
            raw = (folder / max_file).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:  # no limit
                continue
            stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines())
            used = int((folder / current_file).read_text()) - int(stat.get(cache_key, 0))
            return {"limit": int(raw), "free": max(0, int(raw) - used)}
        except (OSError, ValueError):
            continue
    return None


def check_memory(estimate: dict, limit_bytes: int | None, where: str) -> None:
    """Refuse, before anything runs, an influence stage whose estimated peak (`stage_estimate`)
    exceeds `limit_bytes` (None: unknown, not checked); the message carries the estimate."""
    if limit_bytes is not None and estimate["peak_bytes"] > limit_bytes:
        raise BadInputError(f"the influence stage needs ≈ {_gib(estimate['peak_bytes'])} but only "
                            f"{_gib(limit_bytes)} is available ({where}); lower `projection_dim`, "
                            "use `hessian` ekfac, cg or lissa, or run "
                            f"where there is more memory ({format_estimate(estimate)})")
