"""GPU check: the influence stage, training and a slice of the paper's setting on a CUDA GPU,
each against the CPU of the same machine, in one run of under 8 minutes on one GPU.

  1. The influence stage as the product runs it (last layer, exact inverse, pipeline.py's
     features, inverse and vectors in one process) on the GPU and on the CPU from the same
     checkpoint, for `cnn` on Fashion-MNIST and `resnet8` and `resnet18` on CIFAR-10: relative
     error of the vectors (also with cuDNN's TF32 convolutions off) and of the objective of one
     removal set, and the agreement of the product's default selection at 0.4 made from each.
  2. The stage's samples/s on the GPU against the CPU (all its cores), on all the training data
     as well, with the GPU's peak memory, and against pyDVL's `DirectInfluence` on the same GPU
     (benchmarks/peer_influence.py, in its own process) where pyDVL imports; else recorded as
     unavailable.
  3. `train_network`'s steps/s reading the loss and correctness back every step (`host_sync`)
     against once per epoch (the default), and whether both give the same results.
  4. The paper's setting, sliced: `resnet18` on CIFAR-10 with augmentation on the full data, on
     the product's default selection at 0.4 and on random 0.4, one seed, as many epochs as the
     time left allows (fitted from item 3's rate): test accuracy and training time to the full
     run's accuracy − 1.3 points.

Only the checkout travels to the GPU machine (at most 64 MiB, no ../shared) and it has no
prefect, dask or deltalake: the data travels packed in the checkout's ignored folder
benchmarks/.gpu-data, and the script calls `pruning_core` directly.

  python -m benchmarks.gpu_check --pack benchmarks/.gpu-data     # where the data is (once)
  python -m benchmarks.gpu_check                                 # on the GPU: results/gpu.json, gpu.md
  python -m benchmarks.gpu_check --device cpu --quick --out DIR  # a dry run of every step on tiny data
                                                                 # (resnet14 in resnet18's place)

Without CUDA and without --device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pruning_core import hessians
from pruning_core import influence as inf
from pruning_core.artifacts import atomic_path, save_checkpoint, save_parquet, write_json
from pruning_core.data import FASHION_MNIST_ROOT, Dataset, load_dataset
from pruning_core.errors import first_line
from pruning_core.evaluation import FULL, add_convergence
from pruning_core.models import build_model
from pruning_core.recipe import EvalArgs, InfluenceArgs, TrainArgs
from pruning_core.selection import objective, select, selection_args
from pruning_core.training import load_model, synchronize, train, train_network, training_precision

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / ".gpu-data"  # ignored by git; carried to the GPU machine
RESULTS = ROOT / "benchmarks" / "results"
CIFAR_SOURCE = ROOT.parent / "shared" / "data" / "cifar10"  # JPEGs in ImageFolder layout (train/, test/)
CIFAR_FILE, FMNIST_FILE, PACK_INFO = "cifar10.parquet", "fashion-mnist.npz", "pack.json"
PACK_LIMIT_MIB = 56  # the pack travels with the checkout (about 6 MiB): 64 MiB in all
RATIO = 0.4  # the paper's headline prune ratio
EVALUATIONS_PER_EPOCH = EvalArgs().evaluations_per_epoch
TARGETS = {"vectors_relative_error": 1e-3, "objective_relative_difference": 1e-3, "resnet18_speedup": 20.0}


@dataclass(frozen=True)
class Plan:
    """What each item computes: the real run's sizes, or a dry run's (`--quick`)."""

    budget_s: float  # the whole run, which item 4's epochs are fitted into
    per_class: int | None = None  # training samples of each class used (None: all packed)
    test_per_class: int | None = None
    paper_model: str = "resnet18"  # item 4's, and item 1's third model (on item 4's full run)
    compare_rows: dict = field(default_factory=lambda: {"cnn": 10_000, "resnet8": 10_000, "resnet18": 5_000})
    checkpoint_epochs: dict = field(default_factory=lambda: {"cnn": 2, "resnet8": 3})
    train_steps: int = 200  # item 3: steps timed per variant and model
    batch_size: int = TrainArgs.batch_size
    epochs: tuple[int, int] = (1, 30)  # item 4: bounds of the fitted epochs
    reserve_s: float = 75.0  # item 4: kept for what follows the full run (its model's item 1, the selections)
    pydvl_budget_s: float = 20.0
    quick: bool = False

    def models(self) -> dict[str, str]:
        """Items 1 and 3's models and the packed dataset of each."""
        return {"cnn": "fashion-mnist", "resnet8": "cifar10", self.paper_model: "cifar10"}


REAL = Plan(budget_s=420.0)
# the dry run: resnet14 stands in for resnet18, whose exact inverse (p = 5,130) takes half a minute on one core
QUICK = Plan(budget_s=60.0, per_class=6, test_per_class=3, paper_model="resnet14",
             compare_rows={"cnn": 60, "resnet8": 40, "resnet14": 40}, checkpoint_epochs={"cnn": 1, "resnet8": 1},
             train_steps=2, batch_size=16, epochs=(1, 1), reserve_s=0.0, pydvl_budget_s=10.0, quick=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the data: packed where it is, read where the GPU is --------------------------------------

def pack(folder: Path, cifar: Path, fmnist: Path, train_per_class: int, test_per_class: int, fmnist_train: int,
         fmnist_test: int) -> dict:
    """Write the first `train_per_class` and `test_per_class` CIFAR-10 JPEGs of each class (by
    file name) as one Parquet image table (`image` bytes, `label`, `split`: what `parquet:` reads)
    and the first Fashion-MNIST rows as an `npz:` file into `folder`, then pack.json, what they
    hold. Refused, the files removed, above PACK_LIMIT_MIB."""
    import pyarrow as pa

    if not (cifar / "train").is_dir():
        raise SystemExit(f"gpu_check: no CIFAR-10 JPEGs in {cifar} (train/<class>/*.jpg); name them with --cifar")
    classes = sorted(d.name for d in (cifar / "train").iterdir() if d.is_dir())
    images, labels, splits = [], [], []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            for f in sorted((cifar / split / name).iterdir())[:per_class]:
                images.append(f.read_bytes())
                labels.append(label)
                splits.append(split)
    save_parquet(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                           "split": pa.array(splits, pa.string())}), folder / CIFAR_FILE)
    fm = load_dataset("fashion-mnist", str(fmnist))
    with atomic_path(folder / FMNIST_FILE) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, x=fm.x[:fmnist_train], y=fm.y[:fmnist_train], x_test=fm.x_test[:fmnist_test],
                            y_test=fm.y_test[:fmnist_test])
    files = {CIFAR_FILE: {"source": str(cifar), "classes": classes, "train": splits.count("train"),
                          "test": splits.count("test"), "train_per_class": train_per_class,
                          "test_per_class": test_per_class},
             FMNIST_FILE: {"source": str(fmnist), "train": min(fmnist_train, fm.n),
                           "test": min(fmnist_test, len(fm.y_test))}}
    for name, entry in files.items():
        entry["bytes"] = (folder / name).stat().st_size
    info = {"files": files, "mib": sum(e["bytes"] for e in files.values()) / 2**20, "limit_mib": PACK_LIMIT_MIB}
    if info["mib"] > PACK_LIMIT_MIB:
        for name in files:
            (folder / name).unlink()
        raise SystemExit(f"gpu_check: the pack would take {info['mib']:.1f} MiB, more than {PACK_LIMIT_MIB} MiB; "
                         "pack fewer images per class (--cifar-train-per-class, --cifar-test-per-class, --fmnist-*)")
    write_json(folder / PACK_INFO, info)
    return info


def per_class(ds: Dataset, train: int | None, test: int | None) -> Dataset:
    """The first `train` training and `test` test samples of each class (None: all of them)."""
    if train is None and test is None:
        return ds

    def first(y: np.ndarray, k: int | None) -> np.ndarray:
        return np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in range(ds.n_classes)]))

    rows, test_rows = first(ds.y, train), first(ds.y_test, test)
    return Dataset(ds.name, ds.x[rows], ds.y[rows], ds.sample_id[rows], ds.x_test[test_rows], ds.y_test[test_rows],
                   ds.n_classes, dict(ds.origin))


def load_packed(folder: Path, plan: Plan) -> dict[str, Dataset]:
    """The packed datasets by name, cut to the plan's samples per class."""
    found = {"fashion-mnist": load_dataset(f"npz:{folder / FMNIST_FILE}"),
             "cifar10": load_dataset(f"parquet:{folder / CIFAR_FILE}")}
    return {name: per_class(ds, plan.per_class, plan.test_per_class) for name, ds in found.items()}


def sample_rows(n: int, k: int) -> np.ndarray:
    """k of n rows drawn with seed 0, in order (every class, unlike the first k of a packed table)."""
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


# --- items 1 and 2: the influence stage -----------------------------------------------------

def influence_stage(model, x: np.ndarray, y: np.ndarray, device) -> dict:
    """The product's last-layer stage on `device` with its default settings (pipeline.py's
    features, inverse and vectors shards, in one process): vectors (n, p) float32, EL2N (n,),
    seconds."""
    args, weight_decay = InfluenceArgs(), TrainArgs().weight_decay
    synchronize(device)
    started = time.perf_counter()
    phi = inf.last_layer_inputs(model, x, args.block_size, device)
    probs = inf.softmax_probs(phi, *inf.last_layer_weights(model), device)
    curv = inf.last_layer_curvature(phi, probs, args.block_size, device)
    M, _ = hessians.inverse_apply(curv, torch.eye(curv.p, dtype=torch.float64, device=device), args.hessian,
                                  weight_decay + args.damping)
    vectors = inf.influence_vectors(phi, probs, y, M.cpu().numpy(), len(y), args.block_size, device,
                                    dtype=np.float32)
    synchronize(device)
    return {"vectors": vectors, "el2n": inf.loss_and_el2n(probs, y)[1], "seconds": time.perf_counter() - started}


def default_selection(vectors: np.ndarray, y: np.ndarray, el2n: np.ndarray):
    """The product's default selection at RATIO: the influence method under difficulty coverage,
    its candidate order on auto."""
    return select(vectors, selection_args("influence", RATIO, None, "greedy", 0, False, "auto", "auto"),
                  {"label": y, "el2n": el2n})


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 where both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale else float(np.linalg.norm(a))


def peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def strict_float32():
    """cuDNN's convolutions in IEEE float32 (its default on Ampere and later is TF32, ten mantissa
    bits); matrix products are float32 already (torch's default)."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def compare_stage(name: str, ds: Dataset, checkpoint: Path, device, rows: int, work: Path, pydvl: dict,
                  pydvl_budget_s: float) -> tuple[dict, dict]:
    """Items 1 and 2 for one model: the stage on `device` and on the CPU over `rows` seeded rows
    of `ds` from `checkpoint`, their agreement and speeds; the stage on `device` over all of
    `ds`; pyDVL on `device` over the same rows where `pydvl` says it imports. Returns the record
    and the stage over all of `ds` (vectors, EL2N)."""
    pick = sample_rows(ds.n, min(rows, ds.n))
    x, y = ds.x[pick], ds.y[pick]
    model = {d: load_model(str(checkpoint), name, ds, d) for d in (str(device), "cpu")}
    on = model[str(device)]
    influence_stage(on, x[:256], y[:256], device)  # warm-up: kernels, allocator, cuDNN
    reset_peak(device)
    on_device = influence_stage(on, x, y, device)
    peak = peak_mib(device)
    on_cpu = influence_stage(model["cpu"], x, y, "cpu")
    vd, vc = on_device["vectors"], on_cpu["vectors"]
    try:
        with strict_float32():
            strict = relative_error(influence_stage(on, x, y, device)["vectors"], vc)
    except (RuntimeError, TypeError) as exc:  # a torch that refuses the legacy flag
        strict = f"not measured ({first_line(exc)})"
    sel_d, sel_c = default_selection(vd, y, on_device["el2n"]), default_selection(vc, y, on_cpu["el2n"])
    removed = int(sel_c.pruned.sum())
    row_norms = np.linalg.norm(vc.astype(np.float64), axis=1)  # a confident sample's is near 0: not a scale
    worst_row = np.linalg.norm((vd - vc).astype(np.float64), axis=1).max() / max(np.sqrt((row_norms**2).mean()),
                                                                                  np.finfo(np.float64).tiny)
    record = {
        "n": int(len(y)), "p": int(vc.shape[1]),
        "vectors_relative_error": relative_error(vd, vc),
        "vectors_relative_error_without_tf32": strict,
        "worst_row_error_over_rms_row": float(worst_row),
        "objective_relative_error": relative_error(objective(vd, sel_c.pruned), sel_c.objective),
        "selection": {"removed": removed, "same_removals": int((sel_d.pruned & sel_c.pruned).sum()),
                      "identical": bool(np.array_equal(sel_d.pruned, sel_c.pruned)),
                      "objective_cpu": sel_c.objective, "objective_device": sel_d.objective,
                      "objective_relative_difference": relative_error(sel_d.objective, sel_c.objective)},
        "cpu": {"seconds": on_cpu["seconds"], "samples_per_s": len(y) / on_cpu["seconds"],
                "threads": torch.get_num_threads()},
        "device": {"seconds": on_device["seconds"], "samples_per_s": len(y) / on_device["seconds"],
                   "peak_memory_mib": peak},
        "speedup": on_cpu["seconds"] / on_device["seconds"],
    }
    everything = on_device if len(pick) == ds.n else None
    if everything is None:  # item 2 at scale: the whole training set on the device
        reset_peak(device)
        everything = influence_stage(on, ds.x, ds.y, device)
        record["all_rows"] = {"n": ds.n, "seconds": everything["seconds"],
                              "samples_per_s": ds.n / everything["seconds"], "peak_memory_mib": peak_mib(device)}
    if pydvl.get("available") and name != "resnet8":
        record["pydvl"] = pydvl_stage(name, x, y, checkpoint, device, vd, work, pydvl_budget_s)
    return record, everything


def pydvl_check() -> dict:
    """Whether pyDVL's torch influence imports here, asked in a process of its own (it imports
    dask, which this script must not)."""
    done = subprocess.run([sys.executable, "-c", "import pydvl.influence.torch"], capture_output=True, text=True)
    if done.returncode == 0:
        return {"available": True}
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"available": False, "reason": f"pyDVL does not import here ({reason}); the GPU machine's image has no "
                                          "pyDVL: carry its wheels (with dask, distributed and zarr) to measure it"}


def pydvl_stage(name: str, x: np.ndarray, y: np.ndarray, checkpoint: Path, device, ours: np.ndarray, work: Path,
                budget_s: float) -> dict:
    """pyDVL's DirectInfluence over the same rows and checkpoint on `device`
    (benchmarks/peer_influence.py): its samples/s (factors past its time budget extrapolated) and
    its agreement with the product's vectors on the rows it computed."""
    data, out = work / f"{name}-rows.npz", work / f"{name}-pydvl"
    np.savez(data, x=x, y=y.astype(np.int64))
    done = subprocess.run([sys.executable, "-m", "benchmarks.peer_influence", "--checkpoint", str(checkpoint),
                           "--data", str(data), "--out", str(out), "--model", name, "--device", str(device),
                           "--min-rows", str(min(len(y), 2048)), "--budget-s", str(budget_s)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    report = json.loads((out / "peer.json").read_text())
    factors = np.load(out / "peer-factors.npy")
    seconds = report["seconds"]["total_for_n"]
    return {"version": report["version"], "seconds": seconds, "samples_per_s": len(y) / seconds,
            "extrapolated": report["extrapolated"], "factor_rows": report["factor_rows"],
            "relative_error_vs_ours": relative_error(factors, ours[:len(factors)]),
            "peak_memory_mib": report.get("peak_gpu_mib")}


# --- item 3: training steps/s ----------------------------------------------------------------

def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_speed(name: str, ds: Dataset, device, plan: Plan) -> dict:
    """`train_network`'s steps/s over `plan.train_steps` steps (seeded rows of `ds`, as many epochs
    as that takes) reading back every step (`host_sync`) and once per epoch, the fastest of two
    runs each, interleaved; the networks of CIFAR augment, as in item 4."""
    b = plan.batch_size
    rows = min(ds.n, plan.train_steps * b)
    data = ds.subset(sample_rows(ds.n, rows))
    args = TrainArgs(model=name, epochs=math.ceil(plan.train_steps * b / rows), batch_size=b, augment=name != "cnn")
    steps = args.epochs * math.ceil(rows / b)

    def run(host_sync: bool, on: Dataset = data) -> tuple[float, np.ndarray, str]:
        torch.manual_seed(args.seed)
        model = build_model(name, ds.sample_shape, ds.n_classes)
        synchronize(device)
        started = time.perf_counter()
        correctness = train_network(model, on, args, device, host_sync=host_sync)
        synchronize(device)
        return time.perf_counter() - started, correctness, weights_digest(model)

    run(False, data.subset(np.arange(min(rows, 2 * b))))  # warm-up: kernels, allocator, cuDNN
    seconds, results = {True: [], False: []}, {}
    for _ in range(2):
        for host_sync in (True, False):
            elapsed, correctness, digest = run(host_sync)
            seconds[host_sync].append(elapsed)
            results[host_sync] = (correctness, digest)
    synced, free = min(seconds[True]), min(seconds[False])
    return {"steps": steps, "batch_size": b, "augment": args.augment,
            "precision": training_precision(args, torch.device(device)),
            "host_sync_steps_per_s": steps / synced, "sync_free_steps_per_s": steps / free,
            "speedup": synced / free, "sync_free_samples_per_s": rows * args.epochs / free,
            "same_correctness": bool(np.array_equal(results[True][0], results[False][0])),
            "same_weights": results[True][1] == results[False][1]}


# --- item 4: the paper's setting, sliced -----------------------------------------------------

def fitted_epochs(n: int, rate: float, seconds_left: float, plan: Plan) -> dict:
    """As many epochs as three trainings (the full n and twice the kept share) take at `rate`
    samples/s, with a tenth more for the test evaluations, within `seconds_left`, inside the
    plan's bounds."""
    per_epoch = (n + 2 * (n - round(RATIO * n))) / rate * 1.1
    epochs = int(min(max(seconds_left // per_epoch, plan.epochs[0]), plan.epochs[1]))
    return {"epochs": epochs, "rate_samples_per_s": rate, "seconds_left": seconds_left, "seconds_per_epoch": per_epoch}


def run_record(method: str, result, n_kept: int) -> dict:
    return {"method": method, "seed": 0, "n_kept": n_kept, "test_accuracy": result.test_accuracy,
            "train_seconds": result.seconds, "samples_seen": result.curve[-1]["samples_seen"],
            "curve": result.curve}


def paper_slice(ds: Dataset, device, plan: Plan, rate: float, deadline: float, compare: Callable) -> dict:
    """Item 4 with `plan.paper_model`, its item 1 (`compare`, on the full run's checkpoint) between
    the full run and the pruned ones, whose selections take the stage's vectors over all of `ds`."""
    fit = fitted_epochs(ds.n, rate, deadline - time.perf_counter() - plan.reserve_s, plan)
    args = TrainArgs(model=plan.paper_model, epochs=fit["epochs"], batch_size=plan.batch_size, augment=True)
    log(f"item 4: {args.model} on {ds.n} CIFAR-10 images, {args.epochs} epochs, augmented: the full data")
    full = train(ds, args, device, evaluations_per_epoch=EVALUATIONS_PER_EPOCH)
    stage = compare(full.model)
    chosen = default_selection(stage["vectors"], ds.y, stage["el2n"])
    drawn = select(stage["vectors"], selection_args("random", RATIO, None, "greedy", 0, False, "auto", "auto"),
                   {"label": ds.y})
    records = [run_record(FULL, full, ds.n)]
    for method, selection in (("influence", chosen), ("random", drawn)):
        kept = ~selection.pruned
        log(f"item 4: {args.model} on the {int(kept.sum())} images {method} keeps")
        records.append(run_record(method, train(ds.subset(kept), args, device,
                                                evaluations_per_epoch=EVALUATIONS_PER_EPOCH), int(kept.sum())))
    add_convergence(records, EvalArgs().target_drop)
    return {"model": args.model, "n": ds.n, "n_test": int(len(ds.y_test)), "ratio": RATIO,
            "recipe": asdict(args), "precision": training_precision(args, torch.device(device)),
            "fit": fit, "target_drop": EvalArgs().target_drop,
            "selection": {"objective": chosen.objective, "coverage": chosen.info.get("coverage"),
                          "random_objective": drawn.objective},
            "runs": records}


# --- the run --------------------------------------------------------------------------------

def environment(device) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return {"name": name, "type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "machine": platform.platform()}


def acceptance(results: dict) -> dict | None:
    """The issue's acceptance on a GPU (None on the CPU, where the device is the reference)."""
    if results["device"]["type"] != "cuda":
        return None
    stages = {m: r for m, r in results["influence"].items() if "error" not in r}
    paper = stages.get(results["paper_model"], {})
    checks = {
        "vectors": all(r["vectors_relative_error"] <= TARGETS["vectors_relative_error"] for r in stages.values()),
        "objectives": all(r["selection"]["objective_relative_difference"] <= TARGETS["objective_relative_difference"]
                          for r in stages.values()),
        "resnet18_speedup": paper.get("speedup", 0) >= TARGETS["resnet18_speedup"],
        "every_model": len(stages) == 3,
    }
    return {**checks, "passed": all(checks.values()), "targets": TARGETS}


def errors_in(results: dict) -> list[str]:
    found = []
    for key, value in results.items():
        if isinstance(value, dict):
            found += [f"{key}: {value['error']}"] if "error" in value else [f"{key}.{e}" for e in errors_in(value)]
    return found


def attempt(results: dict, key: str, fn: Callable[[], dict], save: Callable[[], None]):
    """results[key] = fn(); an exception is printed and recorded there instead (the later items
    still run: one device run is all there may be), and the results are written either way."""
    try:
        results[key] = fn()
    except Exception as exc:  # recorded and reported; the run's status says it
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
    save()
    return results[key]


def check(device, data: Path, out: Path, plan: Plan, command: str) -> dict:
    """Items 3, then 1 and 2 for `cnn` and `resnet8`, then 4 with its model's 1 and 2 on its full
    run's checkpoint; gpu.json and gpu.md in `out` are written after each."""
    started = time.perf_counter()
    results = {"benchmark": "gpu_check", "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "device": environment(device), "quick": plan.quick, "budget_s": plan.budget_s,
               "paper_model": plan.paper_model,
               "pack": json.loads((data / PACK_INFO).read_text()), "influence": {}, "training": {}}
    influence, training = results["influence"], results["training"]
    models, paper = plan.models(), plan.paper_model

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        results["acceptance"] = acceptance(results)
        write_json(out / "gpu.json", results)
        with atomic_path(out / "gpu.md") as tmp:
            tmp.write_text(markdown(results))

    sets = load_packed(data, plan)
    results["data"] = {name: {"train": ds.n, "test": int(len(ds.y_test)), "shape": list(ds.sample_shape)}
                       for name, ds in sets.items()}
    log(f"data: {results['data']}")
    pydvl = pydvl_check()
    results["pydvl"] = pydvl
    stages: dict[str, dict] = {}  # each model's stage over all its data, on the device
    with tempfile.TemporaryDirectory(prefix="gpu-check.") as tmp:
        work = Path(tmp)

        def compare(name: str, model) -> dict:
            checkpoint = work / f"{name}.pt"
            save_checkpoint(model, checkpoint)
            log(f"items 1-2: {name}'s influence stage on {device} and on the CPU")
            record, stages[name] = compare_stage(name, sets[models[name]], checkpoint, device,
                                                 plan.compare_rows[name], work, pydvl, plan.pydvl_budget_s)
            return record

        for name in models:
            log(f"item 3: {name}'s training steps/s")
            attempt(training, name, lambda: training_speed(name, sets[models[name]], device, plan), save)
        for name in ("cnn", "resnet8"):
            def item() -> dict:
                args = TrainArgs(model=name, epochs=plan.checkpoint_epochs[name], batch_size=plan.batch_size)
                result = train(sets[models[name]], args, device)
                return {**compare(name, result.model), "checkpoint": {"epochs": args.epochs,
                                                                       "test_accuracy": result.test_accuracy}}
            attempt(influence, name, item, save)

        def paper_stage(model) -> dict:
            """Items 1 and 2 of item 4's model on its full run; its stage over all the data."""
            attempt(influence, paper, lambda: {**compare(paper, model), "checkpoint": "item 4's full run"}, save)
            return stages.get(paper) or influence_stage(model, sets["cifar10"].x, sets["cifar10"].y, device)

        rate = training.get(paper, {}).get("sync_free_samples_per_s") or 1.0
        attempt(results, "paper_slice", lambda: paper_slice(sets["cifar10"], device, plan, rate,
                                                            started + plan.budget_s, paper_stage), save)
        influence.setdefault(paper, {"error": "not measured: item 4's full run did not finish"})
    save()
    return results


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _rows(results: dict, render) -> list[str]:
    """One table row per model of `results`: `render(name, entry)`, or the error it stopped at."""
    return [f"| {name} | {s['error']} |" if "error" in s else render(name, s) for name, s in results.items()]


def markdown(r: dict) -> str:
    """gpu.md: the run's figures, item by item, from its gpu.json."""
    d = r["device"]
    lines = [f"# GPU check: {d['name']}", "",
             f"{r['date']}; torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}; CPU reference on "
             f"{d['cpu_threads']} threads; `{r['command']}`" + (" (a dry run on tiny data)" if r["quick"] else "")
             + f"; {_number(r.get('elapsed_s'))} s.", "",
             "## 1–2. The influence stage against the CPU", "",
             "| model | n | p | vectors rel. error | without TF32 | objective rel. error | same removals | "
             "selection objectives rel. diff. | CPU samples/s | GPU samples/s | speed-up | GPU peak MiB | "
             "all rows: n, samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def influence_row(name: str, s: dict) -> str:
        sel, every = s["selection"], s.get("all_rows", {})
        return (f"| {name} | {s['n']} | {s['p']} | {_number(s['vectors_relative_error'])} | "
                f"{_number(s['vectors_relative_error_without_tf32'])} | "
                f"{_number(s['objective_relative_error'])} | "
                f"{sel['same_removals']} of {sel['removed']} | {_number(sel['objective_relative_difference'])} | "
                f"{_number(s['cpu']['samples_per_s'])} | {_number(s['device']['samples_per_s'])} | "
                f"{_number(s['speedup'])} | {_number(s['device']['peak_memory_mib'])} | "
                f"{every.get('n', '–')}, {_number(every.get('samples_per_s'))} |")
    lines += _rows(r["influence"], influence_row)
    pydvl = r["pydvl"]
    lines += ["", "pyDVL `DirectInfluence` on the same device: " + (
        "; ".join(f"{m}: {_number(s['pydvl'].get('samples_per_s'))} samples/s"
                  f"{' (extrapolated)' if s['pydvl'].get('extrapolated') else ''}, rel. error vs ours "
                  f"{_number(s['pydvl'].get('relative_error_vs_ours'))}" if "error" not in s["pydvl"]
                  else f"{m}: {s['pydvl']['error']}" for m, s in r["influence"].items() if "pydvl" in s)
        if pydvl.get("available") else f"not measured: {pydvl.get('reason')}"), "",
        "## 3. Training steps/s: read back every step against once per epoch", "",
        "| model | steps | batch | augment | precision | every step | once per epoch | speed-up | same results |",
        "|---|---|---|---|---|---|---|---|---|"]
    lines += _rows(r["training"], lambda name, t: (
        f"| {name} | {t['steps']} | {t['batch_size']} | {t['augment']} | {t['precision']} | "
        f"{_number(t['host_sync_steps_per_s'])} | {_number(t['sync_free_steps_per_s'])} | "
        f"{_number(t['speedup'])} | {t['same_correctness'] and t['same_weights']} |"))
    lines += ["", f"## 4. {r['paper_model']} on CIFAR-10, augmented: full data, influence 0.4, random 0.4", ""]
    p = r.get("paper_slice", {})
    if "runs" in p:
        lines += [f"{p['n']} training and {p['n_test']} test images, epochs: {p['recipe']['epochs']} (fitted: "
                  f"{_number(p['fit']['seconds_per_epoch'])} s per epoch of the three runs), seed 0, "
                  f"{p['precision']}; target: the full run's accuracy − {100 * p['target_drop']:.1f} points.", "",
                  "| run | kept | test accuracy | training s | time to target s | share of the full run's time |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['method']} | {x['n_kept']} | {x['test_accuracy']:.4f} | {_number(x['train_seconds'])} | "
                  f"{_number(x['time_to_target'])} | {_number(x['time_ratio'])} |" for x in p["runs"]]
    else:
        lines.append(p.get("error", "not run"))
    a = r.get("acceptance")
    lines += ["", "## Acceptance", "", "not applicable: no GPU in this run" if a is None else
              ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in a.items() if k != "targets")
              + f" (targets: {a['targets']})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="the device under test (default: cuda where it is)")
    parser.add_argument("--quick", action="store_true", help="a dry run: every step on a few images")
    parser.add_argument("--data", type=Path, default=DATA, help="the packed data (--pack)")
    parser.add_argument("--out", type=Path, help="folder for gpu.json and gpu.md (default, on CUDA only: "
                                                 "benchmarks/results)")
    parser.add_argument("--budget-s", type=float, help="seconds the run may take (item 4's epochs are fitted to it)")
    packing = parser.add_argument_group("packing the data (where the sources are)")
    packing.add_argument("--pack", type=Path, metavar="DIR", help="write the data into DIR and stop")
    packing.add_argument("--cifar", type=Path, default=CIFAR_SOURCE, help="CIFAR-10 JPEGs in ImageFolder layout")
    packing.add_argument("--fmnist", type=Path, default=FASHION_MNIST_ROOT, help="Fashion-MNIST's idx files")
    packing.add_argument("--cifar-train-per-class", type=int, default=5000)
    packing.add_argument("--cifar-test-per-class", type=int, default=1000)
    packing.add_argument("--fmnist-train", type=int, default=60_000)
    packing.add_argument("--fmnist-test", type=int, default=10_000)
    args = parser.parse_args(argv)
    if args.pack:
        info = pack(args.pack, args.cifar, args.fmnist, args.cifar_train_per_class, args.cifar_test_per_class,
                    args.fmnist_train, args.fmnist_test)
        print(f"packed {info['mib']:.1f} MiB into {args.pack}: {json.dumps(info['files'])}")
        return 0
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA device here: the GPU check did not run (a dry run: --device cpu --quick --out DIR)")
        return 0
    device = torch.device(args.device or "cuda")
    if args.out is None and (device.type != "cuda" or args.quick):
        print("gpu_check: a run without CUDA or with --quick writes where --out says, not into benchmarks/results",
              file=sys.stderr)
        return 2
    if not (args.data / PACK_INFO).exists():
        print(f"gpu_check: no packed data in {args.data}; pack it where the sources are: python -m "
              f"benchmarks.gpu_check --pack {args.data}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else REAL
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    command = " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    results = check(device, args.data, args.out or RESULTS, plan, command)
    problems = errors_in(results)
    verdict = results["acceptance"]
    log(f"written to {(args.out or RESULTS) / 'gpu.json'} and gpu.md" + "".join(f"\n  error: {e}" for e in problems)
        + ("" if verdict is None else f"\n  acceptance: {'met' if verdict['passed'] else 'NOT met'}"))
    return 1 if problems or (verdict is not None and not verdict["passed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
