"""Benchmark of the final-layer influence stage against a peer library (pyDVL), in one run.

Same trained `cnn`, same 60,000 Fashion-MNIST training samples, same quantity:

    s_i = (1/n) H⁻¹ ∇_θ ℓ(z_i),   H = (1/n) Σ_i ∇²ℓ_i + λ I,   θ = (fc.weight, fc.bias), λ = 5e-4.

  1. trains the cnn with the project's API (or reuses benchmarks/.cache/cnn.pt) and saves the
     training arrays to benchmarks/.cache/fashion-mnist-train.npz;
  2. creates the peer's own virtual environment benchmarks/.env-peer (pyDVL from PyPI) if missing;
  3. runs the project's stage (features + Hessian + solve + vectors) in a subprocess of this
     interpreter, which also times one plain forward pass model(x) in batches of 1024;
  4. runs benchmarks/peer_influence.py (pyDVL DirectInfluence) in a subprocess of the peer venv;
  5. checks agreement (‖ours − peer‖/‖peer‖ over the first 2,000 samples and over every row the
     peer computed), prints a table and writes benchmarks/results/influence.json.

Peak memory is each process's ru_maxrss. The project's stage must stay within
PEAK_RSS_LIMIT_MIB (stated in docs/guide.md#failures-and-operations): past it the benchmark exits with status 1.
Run:  .venv/bin/python -m benchmarks.influence
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.artifacts import file_sha256, save_checkpoint
from pruning_core.data import as_float, load_dataset
from pruning_core.recipe import TrainArgs
from pruning_core.training import accuracy, load_model, train

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CACHE = BENCH / ".cache"
CHECKPOINT = CACHE / "cnn.pt"
DATA = CACHE / "fashion-mnist-train.npz"
OURS_VECTORS = CACHE / "ours-vectors.npy"
PEER_OUT = CACHE / "peer"
PEER_ENV = BENCH / ".env-peer"
PEER_PYTHON = PEER_ENV / "bin" / "python"
PEER_MODULE = "benchmarks.peer_influence"  # run from ROOT, which `-m` puts on the peer's path
PEER_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "pyDVL[influence]==0.10.0"]
RESULT = BENCH / "results" / "influence.json"
COMMAND = ".venv/bin/python -m benchmarks.influence"

WEIGHT_DECAY = 5e-4
BLOCK = 1024
TARGET_THROUGHPUT_RATIO = 10.0  # ours ≥ 10× the peer's samples/s
TARGET_STAGE_OVER_FORWARD = 1.5  # our whole stage ≤ 1.5× one forward pass
AGREEMENT_TOL = 1e-3  # relative error; the peer works in float32 (the model's dtype)
PEAK_RSS_LIMIT_MIB = 2048  # the whole influence stage on 60,000 samples, in one process (docs/guide.md)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --- 1. model and arrays ---------------------------------------------------------------------

def prepare() -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")  # the cache (checkpoint, arrays, vectors) is never committed
    ds = load_dataset("fashion-mnist")
    if CHECKPOINT.exists():
        log(f"reusing {CHECKPOINT.relative_to(ROOT)}")
        model = load_model(str(CHECKPOINT), "cnn", ds, device="cpu")
        trained, t_train = False, None
    else:
        log("training cnn (TrainArgs(model='cnn'), CPU) …")
        started = time.perf_counter()
        model = train(ds, TrainArgs(model="cnn"), device="cpu").model
        t_train = time.perf_counter() - started
        save_checkpoint(model, CHECKPOINT)
        trained = True
    test_accuracy = accuracy(model, ds.x_test, ds.y_test, device="cpu")
    np.savez(DATA, x=ds.x, y=ds.y.astype(np.int64))
    return {"name": "fashion-mnist", "split": "train", "n": ds.n, "fingerprint": ds.fingerprint,
            "model": "cnn", "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
            "checkpoint_sha256": file_sha256(CHECKPOINT),
            "trained_in_this_run": trained, "train_seconds": t_train, "test_accuracy": test_accuracy,
            "feature_dim": model.fc.in_features, "classes": model.fc.out_features,
            "parameters_in_scope": model.fc.weight.numel() + model.fc.bias.numel()}


# --- 2. the peer's virtual environment -------------------------------------------------------

def peer_env_ready() -> bool:
    if not PEER_PYTHON.exists():
        return False
    check = subprocess.run([str(PEER_PYTHON), "-c", "import pydvl.influence.torch, torch; print(torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    return check.returncode == 0 and check.stdout.strip().startswith("2.14.1")


def ensure_peer_env() -> dict:
    created = False
    if not peer_env_ready():
        log(f"creating {PEER_ENV.relative_to(ROOT)} and installing {' '.join(PEER_REQUIREMENTS)} (minutes) …")
        subprocess.run(["python3", "-m", "venv", str(PEER_ENV)], check=True, timeout=300)
        subprocess.run([str(PEER_ENV / "bin" / "pip"), "install", "--quiet", *PEER_REQUIREMENTS],
                       check=True, timeout=1800)
        created = True
        if not peer_env_ready():
            raise RuntimeError(f"{PEER_ENV}: pyDVL or torch 2.14.1 not importable after installing")
    versions = subprocess.run([str(PEER_PYTHON), "-c",
                               "import pydvl, torch; print(pydvl.__version__, torch.__version__)"],
                              capture_output=True, text=True, check=True, timeout=300).stdout.split()
    return {"venv": str(PEER_ENV.relative_to(ROOT)), "created_in_this_run": created,
            "requirements": PEER_REQUIREMENTS, "pydvl": versions[0], "torch": versions[1]}


# --- 3. the project's stage (runs in its own process: `--worker ours`) -----------------------

def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def worker_ours(out: Path) -> None:
    data = np.load(DATA)
    x, y = data["x"], data["y"]
    n = len(y)
    shape = SimpleNamespace(sample_shape=tuple(x.shape[1:]), n_classes=10)
    model = load_model(str(CHECKPOINT), "cnn", shape, device="cpu")

    @torch.no_grad()
    def forward_pass():
        model.eval()
        return [model(torch.as_tensor(as_float(x[a:a + BLOCK]))) for a in range(0, n, BLOCK)]

    with torch.no_grad():
        model(torch.as_tensor(as_float(x[:64])))  # warm-up (one-time kernel setup), as the peer's side does
    _, t_forward = timed(forward_pass)

    phi, t_features = timed(lambda: inf.last_layer_inputs(model, x, BLOCK))
    W, b = inf.last_layer_weights(model)
    probs, t_probs = timed(lambda: inf.softmax_probs(phi, W, b))

    def solve():
        curv = inf.last_layer_curvature(phi, probs, BLOCK)
        M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64), "exact", WEIGHT_DECAY)
        return M.numpy()

    M, t_hessian = timed(solve)
    vectors, t_vectors = timed(lambda: inf.influence_vectors(phi, probs, y, M, n, BLOCK, dtype=np.float32))
    t_stage = t_features + t_probs + t_hessian + t_vectors
    report = {"n": n, "threads": torch.get_num_threads(), "dtype_vectors": str(vectors.dtype),
              "shape_vectors": list(vectors.shape),
              "seconds": {"forward_pass": t_forward, "features": t_features, "softmax": t_probs,
                          "hessian_and_solve": t_hessian, "vectors": t_vectors, "stage_total": t_stage},
              "peak_rss_mib": peak_rss_mib()}
    np.save(OURS_VECTORS, vectors)
    out.write_text(json.dumps(report, indent=2))


# --- running the two sides -------------------------------------------------------------------

def run_json(cmd: list[str], report: Path, timeout: float, what: str) -> dict:
    report.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 or not report.exists():
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    log(f"{what} done in {time.perf_counter() - started:.0f} s (process wall time)")
    return json.loads(report.read_text())


def relative_error(ours: np.ndarray, peer: np.ndarray, rows: int, chunk: int = 4096) -> float:
    num = den = 0.0
    for a in range(0, rows, chunk):
        o = np.asarray(ours[a:a + chunk], dtype=np.float64)
        p = np.asarray(peer[a:a + chunk], dtype=np.float64)
        num += float(((o - p) ** 2).sum())
        den += float((p ** 2).sum())
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-budget-s", type=float, default=540.0,
                        help="the peer's time budget (Hessian fit + factors); past it the factors are "
                             "timed on a subset and extrapolated to n")
    parser.add_argument("--check-rows", type=int, default=2000, help="rows always compared (at least)")
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        worker_ours(Path(args.report))
        return

    started = time.perf_counter()
    dataset = prepare()
    peer_env = ensure_peer_env()

    log("project stage (features + Hessian + solve + vectors) and one forward pass, own process …")
    ours = run_json([sys.executable, "-m", "benchmarks.influence", "--worker", "ours",
                     "--report", str(CACHE / "ours.json")], CACHE / "ours.json", 1200, "project stage")
    log(f"pyDVL DirectInfluence in {PEER_ENV.relative_to(ROOT)}, own process (budget {args.peer_budget_s:.0f} s) …")
    peer = run_json([str(PEER_PYTHON), "-m", PEER_MODULE, "--checkpoint", str(CHECKPOINT), "--data", str(DATA),
                     "--out", str(PEER_OUT), "--weight-decay", str(WEIGHT_DECAY), "--batch-size", str(BLOCK),
                     "--min-rows", str(args.check_rows), "--budget-s", str(args.peer_budget_s)],
                    PEER_OUT / "peer.json", args.peer_budget_s + 900, "peer")

    ours_vectors = np.load(OURS_VECTORS, mmap_mode="r")
    peer_vectors = np.load(PEER_OUT / "peer-factors.npy", mmap_mode="r")
    if peer_vectors.shape[1] != ours_vectors.shape[1]:
        raise RuntimeError(f"shapes differ: ours {ours_vectors.shape}, peer {peer_vectors.shape}")
    rows = len(peer_vectors)
    check = min(args.check_rows, rows)
    err_check = relative_error(ours_vectors, peer_vectors, check)
    err_all = relative_error(ours_vectors, peer_vectors, rows)
    o, p = np.asarray(ours_vectors[:check], np.float64), np.asarray(peer_vectors[:check], np.float64)
    per_row = np.linalg.norm(o - p, axis=1) / np.maximum(np.linalg.norm(p, axis=1), 1e-300)
    agree = err_all <= AGREEMENT_TOL

    n = dataset["n"]
    t_ours, t_forward = ours["seconds"]["stage_total"], ours["seconds"]["forward_pass"]
    t_peer = peer["seconds"]["total_for_n"]
    sps_ours, sps_peer, sps_forward = n / t_ours, n / t_peer, n / t_forward
    throughput_ratio = sps_ours / sps_peer
    stage_over_forward = t_ours / t_forward
    estimate = inf.stage_estimate(n, dataset["parameters_in_scope"], dataset["feature_dim"],
                                  inf.InfluenceArgs(block_size=BLOCK, storage_dtype="float32"))
    peak_mib = ours["peak_rss_mib"]

    results = {
        "benchmark": "influence (final layer) vs pyDVL", "command": COMMAND,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": "cpu", "note": "2 shared cores; both sides use torch's default intra-op threads"},
        "quantity": "s_i = (1/n) H^-1 grad_theta l(z_i), H = (1/n) sum_i hess l_i + 5e-4 I, "
                    "theta = (fc.weight, fc.bias), mean cross-entropy",
        "dataset": dataset,
        "ours": {"api": "pruning_core.influence last_layer_inputs/softmax_probs/last_layer_curvature + "
                        "hessians.inverse_apply('exact') + influence_vectors(float32)",
                 "samples": n, "seconds": ours["seconds"], "samples_per_s": sps_ours,
                 "peak_rss_mib": ours["peak_rss_mib"], "threads": ours["threads"],
                 "estimate": {"peak_bytes": estimate["peak_bytes"], "memory_bytes": estimate["memory_bytes"],
                              "note": "the preflight's estimate (arrays of the M = B H^-1 step); the RSS also "
                                      "holds the data, the stored vectors, torch's runtime"}},
        "peer": {**peer_env, **{k: peer[k] for k in ("class", "second_order_mode", "regularization", "loss", "dtype",
                                                     "threads", "n", "hessian_rows", "factor_rows", "batch_size",
                                                     "seconds", "extrapolated", "extrapolation", "peak_rss_mib")},
                 "samples_per_s": sps_peer,
                 "samples_per_s_basis": ("extrapolated to n (see extrapolation)" if peer["extrapolated"]
                                         else "measured on all n")},
        "forward_pass": {"seconds": ours["seconds"]["forward_pass"], "samples_per_s": sps_forward,
                         "how": "model(x) in batches of 1024, no_grad, in the project's process"},
        "agreement": {"rows_compared": rows, "relative_error_first_rows": err_check, "first_rows": check,
                      "relative_error_all_compared": err_all,
                      "per_row_relative_error_first_rows": {"median": float(np.median(per_row)),
                                                            "max": float(per_row.max())},
                      "tolerance": AGREEMENT_TOL, "agree": bool(agree)},
        "ratios": {"throughput_ours_over_peer": throughput_ratio, "stage_over_forward_pass": stage_over_forward},
        "targets": {"throughput_ours_over_peer": {"target": f">= {TARGET_THROUGHPUT_RATIO:g}",
                                                  "value": throughput_ratio,
                                                  "met": bool(throughput_ratio >= TARGET_THROUGHPUT_RATIO)},
                    "stage_over_forward_pass": {"target": f"<= {TARGET_STAGE_OVER_FORWARD:g}",
                                                "value": stage_over_forward,
                                                "met": bool(stage_over_forward <= TARGET_STAGE_OVER_FORWARD)},
                    "peak_rss_mib": {"target": f"<= {PEAK_RSS_LIMIT_MIB}", "value": peak_mib,
                                     "met": bool(peak_mib <= PEAK_RSS_LIMIT_MIB)}},
        "benchmark_wall_seconds": time.perf_counter() - started,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")

    peer_note = " (extrapolated)" if peer["extrapolated"] else ""
    print()
    print(f"{'':34}{'seconds':>10}{'samples/s':>12}{'peak MiB':>10}")
    print(f"{'forward pass (model(x), 1024)':34}{t_forward:10.2f}{sps_forward:12.0f}{'':>10}")
    print(f"{'ours: influence stage':34}{t_ours:10.2f}{sps_ours:12.0f}{ours['peak_rss_mib']:10.0f}")
    for key in ("features", "softmax", "hessian_and_solve", "vectors"):
        print(f"{'  ' + key:34}{ours['seconds'][key]:10.2f}")
    print(f"{'peer: pyDVL DirectInfluence' + peer_note:34}{t_peer:10.2f}{sps_peer:12.1f}{peer['peak_rss_mib']:10.0f}")
    print(f"{'  fit (Hessian, all n)':34}{peer['seconds']['fit_hessian']:10.2f}")
    print(f"{'  influence_factors' + (' (for n)' if peer_note else ''):34}{peer['seconds']['factors_for_n']:10.2f}")
    if peer["extrapolated"]:
        print(f"  {peer['extrapolation']}")
    print()
    print(f"agreement: ‖ours − peer‖/‖peer‖ = {err_check:.2e} (first {check} rows), {err_all:.2e} "
          f"(all {rows} rows the peer computed); {'agree' if agree else 'DISAGREE'} at tol {AGREEMENT_TOL:g}")
    print(f"throughput ours/peer = {throughput_ratio:.1f}× (target ≥ {TARGET_THROUGHPUT_RATIO:g}: "
          f"{'met' if throughput_ratio >= TARGET_THROUGHPUT_RATIO else 'NOT met'})")
    print(f"our stage / forward pass = {stage_over_forward:.2f} (target ≤ {TARGET_STAGE_OVER_FORWARD:g}: "
          f"{'met' if stage_over_forward <= TARGET_STAGE_OVER_FORWARD else 'NOT met'})")
    print(f"our stage's peak RSS = {peak_mib:.0f} MiB (limit ≤ {PEAK_RSS_LIMIT_MIB}: "
          f"{'met' if peak_mib <= PEAK_RSS_LIMIT_MIB else 'NOT met'}; the preflight estimate of its arrays: "
          f"{estimate['peak_bytes'] / 2**20:.0f} MiB)")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    if peak_mib > PEAK_RSS_LIMIT_MIB:
        sys.exit(f"the influence stage's peak RSS {peak_mib:.0f} MiB exceeds the stated limit of "
                 f"{PEAK_RSS_LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
