"""Parameter scopes and autograd curvature for any scope, via `torch.func`.

A scope names the parameters influence is taken over: `last-layer` (fc.weight, fc.bias: the
closed forms of `influence.py`; the user's own model names its final layer as its own module
does, `models.final_layer_names`), `all`, or `modules:NAME[,NAME...]` (every parameter of those
modules). Vectors are the scoped parameters in `state_dict` order, each flattened row-major.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .data import as_float, np_float_dtype
from .errors import BadInputError
from .models import final_layer_names


def scope_parameter_names(model: nn.Module, scope: str) -> list[str]:
    """Names of the scoped parameters in state_dict order."""
    names = [k for k, _ in model.named_parameters()]
    if scope == "last-layer":
        return final_layer_names(model)
    if scope == "all":
        return names
    modules = scope[len("modules:"):].split(",")
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise BadInputError(f"`scope`: no module named {missing[0]!r}; modules with parameters: "
                            + ", ".join(m for m, mod in known.items()
                                        if m and any(True for _ in mod.parameters(recurse=False))))
    chosen = [k for k in names if any(k == f"{m}.{leaf}" or k.startswith(f"{m}.") for m in modules
                                       for leaf in ("weight", "bias"))]
    if not chosen:
        raise BadInputError(f"`scope` {scope}: those modules hold no parameters")
    return chosen


def flatten(tensors: dict[str, torch.Tensor], names: list[str], batch: bool = False) -> torch.Tensor:
    """Concatenate (optionally batched) parameter tensors in `names` order: (p,) or (b, p)."""
    if batch:
        return torch.cat([tensors[k].reshape(tensors[k].shape[0], -1) for k in names], dim=1)
    return torch.cat([tensors[k].reshape(-1) for k in names])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten` for a (p,) vector."""
    out, start = {}, 0
    for k in names:
        size = like[k].numel()
        out[k] = vector[start:start + size].view_as(like[k])
        start += size
    return out


class ScopedLoss:
    """Cross-entropy of `model` as a function of its scoped parameters (others frozen)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model.eval()
        self.names = names
        self.frozen = {k: v.detach() for k, v in model.named_parameters()}
        self.frozen.update({k: v.detach() for k, v in model.named_buffers()})
        self.theta = {k: self.frozen[k] for k in names}
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.p = sum(v.numel() for v in self.theta.values())

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(as_float(x, np_float_dtype(self.dtype)), device=self.device)

    def _loss_one(self, theta, xi, yi):
        out = functional_call(self.model, {**self.frozen, **theta}, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    def _loss_mean(self, theta, X, Y):
        out = functional_call(self.model, {**self.frozen, **theta}, (X,))
        return nn.functional.cross_entropy(out, Y, reduction="sum")

    @torch.no_grad()
    def per_sample_gradients(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """∇_θ ℓ_i for the rows given, (b, p) in the model's dtype."""
        X, Y = self.tensor(x), torch.tensor(y, device=self.device)
        grads = vmap(grad(self._loss_one), in_dims=(None, 0, 0))(self.theta, X, Y)
        return flatten(grads, self.names, batch=True)

    def hvp_rows(self, V: torch.Tensor, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """Rows of V (k, p) times Σ_{i in block} ∇²ℓ_i (a sum, not a mean), (k, p)."""
        X, Y = self.tensor(x), torch.tensor(y, device=self.device)
        grad_fn = grad(self._loss_mean)

        def one(v):
            tangent = unflatten(v, self.theta, self.names)
            return flatten(jvp(lambda t: grad_fn(t, X, Y), (self.theta,), (tangent,))[1], self.names)

        return vmap(one)(V.to(self.dtype))


def autograd_curvature(loss: ScopedLoss, x: np.ndarray, y: np.ndarray, block_size: int):
    """H_data = (1/n) Σ_i ∇²ℓ_i over the scope by forward-over-reverse autograd, in fixed blocks."""
    from .hessians import Curvature

    n = len(y)

    def hvp(V: torch.Tensor, rows=None) -> torch.Tensor:
        idx = np.arange(n) if rows is None else np.sort(np.asarray(rows))
        out = torch.zeros(V.shape, dtype=torch.float64, device=loss.device)
        for a in range(0, len(idx), block_size):
            sel = idx[a:a + block_size]
            out += loss.hvp_rows(V, x[sel], y[sel]).double()
        return out / len(idx)

    def dense() -> torch.Tensor:
        H = hvp(torch.eye(loss.p, dtype=torch.float64, device=loss.device))
        return 0.5 * (H + H.T)

    return Curvature(p=loss.p, n=n, device=loss.device, hvp=hvp, dense=dense)
