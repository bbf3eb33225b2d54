"""Peer side of benchmarks/influence.py: pyDVL's exact-Hessian influence over the final layer.

Runs in the benchmark's own virtual environment (benchmarks/.env-peer, pyDVL from PyPI), as a
separate process started from the repository's root (`python -m benchmarks.peer_influence`) so
that its peak memory (ru_maxrss) is its own. For the same trained model (`cnn` unless --model
says otherwise) and the same training arrays as the project's stage, on --device (the CPU unless
said otherwise: benchmarks/gpu_check.py runs it on the GPU), it computes

    H⁻¹ ∇_θ ℓ(z_i)   with   H = (1/n) Σ_i ∇²ℓ_i + λ I,   θ = (fc.weight, fc.bias),

by `pydvl.influence.torch.DirectInfluence` (a dense Hessian by torch.func over the parameters
that require grad, then torch.linalg.solve): every parameter but fc's is frozen, the loss is the
mean cross-entropy, `regularization` = λ. The factors are scaled by 1/n to the project's s_i.

The Hessian is always fitted on all n samples (it is part of the quantity); the factors are
computed in batches until all rows are done or the time budget runs out, in which case the
factor time is extrapolated linearly to n (reported as such). Writes a JSON report and the
computed rows (float32 .npy) for the agreement check; imports nothing of the project but the
model class (pruning_core.models, which imports only torch).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruning_core.models import build_model  # the architecture only


class _Batches(torch.utils.data.Dataset):
    """Index batches → (float32 in [0, 1], labels) on the arrays' device; uint8 converted per
    batch, as the project does."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: str = "cpu"):
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, rows):
        a, b = rows[0], rows[-1] + 1  # contiguous (sequential batch sampler)
        return self.x[a:b].float() / 255.0, self.y[a:b]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synchronize(device: str) -> None:
    """Wait for the queued GPU work, so that a clock read next counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="npz with x (n, C, H, W) uint8 and y (n,) int64")
    parser.add_argument("--model", default="cnn", help="the checkpoint's architecture (pruning_core.models)")
    parser.add_argument("--device", default="cpu", help="where pyDVL computes: cpu or cuda")
    parser.add_argument("--out", required=True, help="folder for peer.json and peer-factors.npy")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-rows", type=int, default=None, help="factor at most this many rows")
    parser.add_argument("--min-rows", type=int, default=2048, help="rows always factored (agreement check)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop factoring once fit + factors would exceed this; extrapolate the rest")
    args = parser.parse_args()

    import pydvl
    from pydvl.influence.torch import DirectInfluence

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = np.load(args.data)
    x, y = data["x"], data["y"].astype(np.int64)
    n = len(y)

    model = build_model(args.model, tuple(x.shape[1:]), 10)
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.to(args.device).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))  # the scope: fc.weight, fc.bias (state_dict order)
    loss = nn.functional.cross_entropy  # reduction "mean"

    dataset = _Batches(x, y, args.device)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), args.batch_size, False)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None)

    with torch.no_grad():
        model(dataset[list(range(64))][0])  # warm-up (one-time kernel setup), as the project's side does

    synchronize(args.device)
    started = time.perf_counter()
    influence = DirectInfluence(model, loss, regularization=float(args.weight_decay)).fit(loader)
    synchronize(args.device)
    t_fit = time.perf_counter() - started

    limit = n if args.max_rows is None else min(n, args.max_rows)
    # the output a full run holds (n, p), allocated and touched whatever the rows factored,
    # so that peak memory counts it even when the time budget stops the factors early
    factors = torch.zeros(n, sum(p.numel() for p in model.parameters() if p.requires_grad))
    done, t_factors, batch_times = 0, 0.0, []
    for a in range(0, limit, args.batch_size):
        b = min(a + args.batch_size, limit)
        xb, yb = dataset[[a, b - 1]]
        t0 = time.perf_counter()
        factors[a:b] = influence.influence_factors(xb, yb).detach().cpu()  # the copy waits for the device
        batch_times.append(time.perf_counter() - t0)
        t_factors += batch_times[-1]
        done = b
        per_row = t_factors / done
        if done >= min(args.min_rows, limit) and done < limit and \
                t_fit + per_row * (done + args.batch_size) > args.budget_s:
            break
    factors = factors[:done] / n  # s_i = (1/n) H⁻¹ ∇ℓ_i
    extrapolated = done < n
    t_factors_all = t_factors * n / done
    report = {
        "library": "pyDVL", "version": pydvl.__version__, "torch": torch.__version__,
        "class": "pydvl.influence.torch.DirectInfluence", "second_order_mode": "HESSIAN",
        "regularization": args.weight_decay, "loss": "torch.nn.functional.cross_entropy (mean)",
        "model": args.model, "device": args.device,
        "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "n": n, "hessian_rows": n, "factor_rows": done, "batch_size": args.batch_size,
        "seconds": {"fit_hessian": t_fit, "factors_measured": t_factors,
                    "factors_for_n": t_factors_all, "total_for_n": t_fit + t_factors_all},
        "extrapolated": extrapolated,
        "extrapolation": (f"factors timed on the first {done} of {n} rows ({len(batch_times)} batches of "
                          f"{args.batch_size}) and scaled linearly to n; the Hessian fit ran on all {n}")
        if extrapolated else None,
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(args.device) / 2**20
        if torch.device(args.device).type == "cuda" else None,
    }
    np.save(out / "peer-factors.npy", factors.numpy().astype(np.float32))
    (out / "peer.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
