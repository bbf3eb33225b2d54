"""The last-layer influence stage of the CIFAR ResNets against one plain forward pass.

On the first 10,000 CIFAR-10 training images (1,000 per class, 32 x 32, decoded from the shared
JPEG folder ../shared/data/cifar10), for `resnet8` and `resnet20` (seeded initial weights: the
time does not depend on their values), on one thread as a shard runs:

  forward pass  model(x) in eager mode, batches of 1024 (as benchmarks/influence.py times the cnn's)
  stage         features (the traced inference graph) + softmax + exact Hessian and solve + vectors

Each is timed `--repeats` times and the fastest kept (the machine is shared). Target: stage ≤ 1.5x
the forward pass. Writes benchmarks/results/resnet-influence.json.
Run:  .venv/bin/python -m benchmarks.resnet_influence
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.data import as_float
from pruning_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RESULT = ROOT / "benchmarks" / "results" / "resnet-influence.json"
BLOCK = 1024
WEIGHT_DECAY = 5e-4
TARGET_STAGE_OVER_FORWARD = 1.5


def cifar_images(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` training images of each class, (n, 3, 32, 32) uint8, and labels."""
    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    files = [(c, f) for c, name in enumerate(classes) for f in sorted((CIFAR / "train" / name).iterdir())[:per_class]]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for _, f in files])
    return x, np.array([c for c, _ in files])


def fastest(fn, repeats: int):
    best, value = np.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return value, best


def measure(name: str, x: np.ndarray, y: np.ndarray, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, tuple(x.shape[1:]), 10).eval()

    @torch.no_grad()
    def forward_pass():
        return [model(torch.as_tensor(as_float(x[a:a + BLOCK]))) for a in range(0, len(x), BLOCK)]

    with torch.no_grad():
        model(torch.as_tensor(as_float(x[:64])))  # warm-up (one-time kernel setup)
    _, t_forward = fastest(forward_pass, repeats)

    def stage():
        phi = inf.last_layer_inputs(model, x, BLOCK)
        W, b = inf.last_layer_weights(model)
        probs = inf.softmax_probs(phi, W, b)
        curv = inf.last_layer_curvature(phi, probs, BLOCK)
        M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64), "exact", WEIGHT_DECAY)
        return inf.influence_vectors(phi, probs, y, M.numpy(), len(y), BLOCK, dtype=np.float32)

    vectors, t_stage = fastest(stage, repeats)
    return {"model": name, "n": len(y), "p": int(vectors.shape[1]), "forward_pass_s": t_forward, "stage_s": t_stage,
            "stage_over_forward": t_stage / t_forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = cifar_images(args.per_class)
    rows = [measure(name, x, y, args.repeats) for name in ("resnet8", "resnet20")]
    for row in rows:
        verdict = "met" if row["stage_over_forward"] <= TARGET_STAGE_OVER_FORWARD else "NOT met"
        print(f"{row['model']:9} n={row['n']} p={row['p']}: forward {row['forward_pass_s']:.2f} s, stage "
              f"{row['stage_s']:.2f} s, {row['stage_over_forward']:.2f}x (target ≤ {TARGET_STAGE_OVER_FORWARD}: "
              f"{verdict})")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "benchmark": "resnet-influence", "command": ".venv/bin/python -m benchmarks.resnet_influence",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
