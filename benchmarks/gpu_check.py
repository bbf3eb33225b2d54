"""GPU check: the `cnn` and `resnet18` influence stages on CUDA against the CPU result, with
throughput. Run where a CUDA GPU exists (`python -m benchmarks.gpu_check`); elsewhere it says
so and exits 0. Writes benchmarks/results/gpu_check.json.

cnn: Fashion-MNIST (first 20,000 training images), freshly initialised seeded weights (the
check compares devices, not accuracy). resnet18: 4,000 seeded random 3x32x32 images (CIFAR
is not downloadable offline).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.data import load_dataset
from pruning_core.models import build_model


def stage(model, x, y, device, block=1024):
    """features → exact H⁻¹ → vectors on `device`; returns vectors (float64) and seconds."""
    model = model.to(device).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    phi = inf.last_layer_inputs(model, x, block, device)
    probs = inf.softmax_probs(phi, *inf.last_layer_weights(model), device)
    curv = inf.last_layer_curvature(phi, probs, block, device)
    M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64, device=device), "exact", 5e-4)
    vectors = inf.influence_vectors(phi, probs, y, M.cpu().numpy(), len(y), block, device, dtype=np.float32)
    if device == "cuda":
        torch.cuda.synchronize()
    return vectors.astype(np.float64), time.perf_counter() - started


def main() -> int:
    out = Path(__file__).parent / "results" / "gpu_check.json"
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU check did not run")
        return 0
    fm = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    cases = {
        "cnn": (fm.x[:20000], fm.y[:20000], (1, 28, 28)),
        "resnet18": (rng.integers(0, 256, (4000, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 4000), (3, 32, 32)),
    }
    results = {"benchmark": "gpu_check", "command": "python -m benchmarks.gpu_check",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(0),
               "machine": platform.platform(), "torch": torch.__version__, "models": {}}
    ok = True
    for name, (x, y, shape) in cases.items():
        torch.manual_seed(0)
        model = build_model(name, shape, 10)
        stage(build_model(name, shape, 10), x[:1024], y[:1024], "cuda")  # warm-up: kernels, allocator
        gpu, t_gpu = stage(model, x, y, "cuda")
        cpu, t_cpu = stage(model, x, y, "cpu")
        error = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
        ok &= error <= 1e-3
        results["models"][name] = {"n": len(y), "relative_error_vs_cpu": error, "gpu_seconds": t_gpu,
                                   "cpu_seconds": t_cpu, "gpu_samples_per_s": len(y) / t_gpu,
                                   "cpu_samples_per_s": len(y) / t_cpu}
        print(f"{name:9} n={len(y):6}  rel. error vs CPU {error:.2e}  GPU {len(y) / t_gpu:10.0f} samples/s  "
              f"CPU {len(y) / t_cpu:8.0f} samples/s")
    results["passed"] = ok
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(("PASS" if ok else "FAIL") + f": written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
