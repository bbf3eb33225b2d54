"""benchmarks/gpu_check.py, prepared here for a CUDA machine: the data it packs is what the
product's `parquet:` and `npz:` sources read, and its dry run (`--device cpu --quick`) runs every
step on a tiny pack of the real data with prefect, dask and deltalake absent, as on the GPU
machine, writing results of the structure a GPU run writes. Nothing is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_FOLDER, HANG

from pruning_core.data import load_dataset
from pruning_core.images import decode_images

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("prefect", "prefect_dask", "dask", "distributed", "deltalake")  # not on the GPU machine
# runs the script as `python -m benchmarks.gpu_check ARGS` with the packages above missing
WITHOUT_ORCHESTRATION = f"""
import runpy, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Absent())
sys.argv[0] = "gpu_check"
runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
"""


def gpu_check(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ORCHESTRATION, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG, env=env)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """6 training and 3 test CIFAR-10 JPEGs of each class and 300 + 100 Fashion-MNIST images,
    packed as for the GPU machine."""
    if not (CIFAR10_FOLDER / "train").is_dir():
        pytest.skip(f"the shared CIFAR-10 folder {CIFAR10_FOLDER} is absent (../shared/data/cifar10 from the "
                    "project root)")
    folder = tmp_path_factory.mktemp("gpu-data")
    done = gpu_check("--pack", folder, "--cifar", CIFAR10_FOLDER, "--cifar-train-per-class", 6,
                     "--cifar-test-per-class", 3, "--fmnist-train", 300, "--fmnist-test", 100)
    assert done.returncode == 0, done.stderr
    return folder


def test_the_pack_is_what_the_product_reads(packed, fmnist):
    info = json.loads((packed / "pack.json").read_text())
    cifar = load_dataset(f"parquet:{packed / 'cifar10.parquet'}")
    assert (cifar.n, len(cifar.y_test), cifar.sample_shape, cifar.n_classes) == (60, 30, (3, 32, 32), 10)
    assert np.array_equal(np.bincount(cifar.y), np.full(10, 6)) and info["files"]["cifar10.parquet"]["train"] == 60
    first_airplane = sorted((CIFAR10_FOLDER / "train" / "airplane").iterdir())[0]
    assert np.array_equal(cifar.x[:1], decode_images([str(first_airplane)], ["airplane"], "cifar10"))
    small = load_dataset(f"npz:{packed / 'fashion-mnist.npz'}")
    assert np.array_equal(small.x, fmnist.x[:300]) and np.array_equal(small.y_test, fmnist.y_test[:100])
    assert info["mib"] == pytest.approx(sum(f.stat().st_size for f in packed.glob("*.*") if f.name != "pack.json")
                                        / 2**20)


@pytest.mark.integration  # trains a dozen small networks
def test_the_dry_run_runs_every_item_without_the_orchestration_packages(packed, tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--data", packed, "--device", "cpu", "--quick", "--out", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    assert results["quick"] is True and results["device"]["type"] == "cpu" and results["acceptance"] is None
    assert results["data"]["cifar10"] == {"train": 60, "test": 30, "shape": [3, 32, 32]}
    # items 1 and 2: on the CPU both sides are the same computation, so every difference is 0
    assert set(results["influence"]) == {"cnn", "resnet8", "resnet14"}  # resnet14: resnet18's stand-in
    for name, stage in results["influence"].items():
        assert stage["vectors_relative_error"] == stage["vectors_relative_error_without_tf32"] == 0, name
        assert stage["objective_relative_error"] == stage["selection"]["objective_relative_difference"] == 0, name
        assert stage["selection"]["identical"] and stage["selection"]["removed"] == round(0.4 * stage["n"]), name
        assert stage["p"] == {"cnn": 1290, "resnet8": 650, "resnet14": 650}[name]
        assert stage["device"]["samples_per_s"] > 0 and stage["cpu"]["samples_per_s"] > 0
    assert results["influence"]["resnet14"]["all_rows"]["n"] == 60  # 40 compared, all 60 for item 4
    pydvl = results["pydvl"]
    assert pydvl["available"] or "pyDVL does not import here" in pydvl["reason"]
    # item 3: reading back once per epoch changes no result
    for name, speed in results["training"].items():
        assert speed["same_correctness"] and speed["same_weights"], name
        assert speed["host_sync_steps_per_s"] > 0 and speed["sync_free_steps_per_s"] > 0
    assert results["training"]["resnet14"]["augment"] is True and results["training"]["cnn"]["augment"] is False
    # item 4: the full data, the default selection's and random's kept 60 %, each with its curve
    sliced = results["paper_slice"]
    assert sliced["model"] == results["paper_model"] == "resnet14"
    assert [r["method"] for r in sliced["runs"]] == ["full", "influence", "random"]
    assert [r["n_kept"] for r in sliced["runs"]] == [60, 36, 36]
    assert sliced["recipe"]["augment"] is True and sliced["recipe"]["epochs"] == 1
    for run in sliced["runs"]:
        assert run["curve"] and run["curve"][-1]["test_accuracy"] == run["test_accuracy"]
        assert "time_to_target" in run and run["target_accuracy"] == pytest.approx(
            sliced["runs"][0]["test_accuracy"] - 0.013)
    report = (out / "gpu.md").read_text()
    for heading in ("## 1–2. The influence stage", "## 3. Training steps/s", "## 4. resnet14 on CIFAR-10",
                    "## Acceptance"):
        assert heading in report


def test_a_dry_run_writes_only_where_out_says(tmp_path):
    done = gpu_check("--data", tmp_path, "--device", "cpu", "--quick")
    assert done.returncode == 2 and "writes where --out says" in done.stderr
    done = gpu_check("--data", tmp_path / "none", "--device", "cpu", "--quick", "--out", tmp_path / "out")
    assert done.returncode == 2 and "no packed data" in done.stderr and not (tmp_path / "out").exists()
