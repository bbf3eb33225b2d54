"""Shared fixtures: a small real dataset (a Fashion-MNIST subset as `npz`), a real Prefect
API (`prefect_test_harness`: a temporary server subprocess) exported to Dask workers.

Two tiers: `integration` (marked) and unit (unmarked, `make check`). A test that uses one of
`INTEGRATION_FIXTURES` is marked here; a test that starts one of those on its own, or computes
past tiny data, carries `@pytest.mark.integration` (or its module's `pytestmark`); an unmarked
test that starts a Dask cluster or Prefect's own server in-process fails (`unit_tests_start_no_servers`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401  (see below: `import prefect` alone sets nothing up)
import pytest
import torch

from pruning_core.data import FASHION_MNIST_ROOT, cifar_shaped, load_dataset  # noqa: F401 (cifar_shaped: the tests')

# Prefect sets up its console log handler when prefect.main is first imported (by the first use of
# `prefect.flow` and the like, not by `import prefect`), on the sys.stderr of that moment.
# Imported first inside a test that captures with capsys, the handler keeps that test's stream,
# closed after it: every later flow log in the process prints a "Logging error" traceback into the
# next test's captured stderr. Imported here, at collection, it keeps pytest's own stream.


# seconds: the bound on a wait for a subprocess or a worker that only a hang reaches; what is
# waited for ends the wait (the suite's own limit is pytest-timeout's 900 s per test)
HANG = 600

# fixtures that start a Prefect server, a Dask cluster, a browser or an object store
INTEGRATION_FIXTURES = {"prefect_api", "dask_cluster", "own_home", "served", "browser", "s3"}


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def unit_tests_start_no_servers(request, monkeypatch):
    """In an unmarked test, starting a Dask LocalCluster or Prefect's temporary server fails the
    test, naming the mark it lacks: the unit tier stays free of them without anyone timing it."""
    if request.node.get_closest_marker("integration"):
        return
    from distributed import LocalCluster
    from prefect.server.api.server import SubprocessASGIServer

    def refuse(what):
        def start(*args, **kwargs):
            pytest.fail(f"this unit test starts {what}: mark it @pytest.mark.integration", pytrace=False)
        return start

    monkeypatch.setattr(LocalCluster, "__init__", refuse("a Dask LocalCluster"))
    monkeypatch.setattr(SubprocessASGIServer, "start", refuse("a Prefect server"))


def pytest_configure(config):
    """Each test process computes on its share of the cores (xdist starts one per core), and so do
    the commands the tests start, which inherit OMP_NUM_THREADS: with torch's default of one thread
    per core in every process, the processes' threads spin-waited against each other (2-thread
    training beside one busy process: 3x the CPU of 1-thread) and tests/test_flow.py,
    test_baselines.py and test_evaluate.py took 23 % more CPU and 22 % more time
    (benchmarks/results/test-suite.md). An OMP_NUM_THREADS given is kept. Dask's local workers run
    on one thread each whatever this says (their nanny sets it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # xdist's workers and the Dask workers inherit it
        # the image sources' decoded arrays go to a folder of the session's, never the user's cache
        config.image_cache = tempfile.mkdtemp(prefix="dataset-pruning-cache.")
        os.environ["DATASET_PRUNING_CACHE"] = config.image_cache
    processes = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # set in xdist's workers only
    if processes is None and getattr(config.option, "numprocesses", None):
        return  # xdist's controller, which tests nothing: its workers would inherit what it set
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(processes or 1))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_unconfigure(config):
    if getattr(config, "image_cache", None):
        shutil.rmtree(config.image_cache, ignore_errors=True)


@pytest.fixture(scope="module")
def own_home(tmp_path_factory):
    """A PREFECT_HOME for a module's commands, apart from the session's: the first server started
    with it migrates its database (about 20 s here), the next one finds it ready."""
    return tmp_path_factory.mktemp("prefect-home")


def clean_env(home: Path, **extra) -> dict:
    """A subprocess environment with its own PREFECT_HOME and none of this session's Prefect
    settings (telemetry off unless `extra` says otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", COLUMNS="200")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def fmnist():
    if not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (make test installs it)")
    return load_dataset("fashion-mnist")


# the shared CIFAR-10 JPEGs, `../shared/data/cifar10` from the project root (train/<class>/NNNN.jpg,
# test/<class>/NNNN.jpg): for tests only, the product never reads it
CIFAR10_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def copy_cifar_slice(root: Path, per_class: int, test_per_class: int) -> Path:
    """The first `per_class` training and `test_per_class` test images of every CIFAR-10 class,
    copied from the shared folder into `root` in its layout; the test is skipped where that
    folder is absent."""
    if not (CIFAR10_FOLDER / "train").is_dir():
        pytest.skip(f"the shared CIFAR-10 folder {CIFAR10_FOLDER} is absent (../shared/data/cifar10 from the "
                    "project root)")
    for split, k in (("train", per_class), ("test", test_per_class)):
        for folder in sorted((CIFAR10_FOLDER / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:k]:
                shutil.copyfile(f, root / split / folder.name / f.name)
    return root


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """10 training and 10 test images of every CIFAR-10 class, in the shared folder's layout."""
    return copy_cifar_slice(tmp_path_factory.mktemp("cifar10-slice"), 10, 10)


def write_npz(ds, path, n: int, n_test: int) -> str:
    """The first n training and n_test test samples of `ds` as an `npz:` dataset file."""
    np.savez(path, x=ds.x[:n], y=ds.y[:n], x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])
    return str(path)


@contextlib.contextmanager
def gpu_worker(client):
    """A `dask worker --resources GPU=1` named gpu-worker joined to `client`'s scheduler, as on a
    GPU host (it computes on this machine's CPU), waited for; retired and stopped on leaving, so a
    shared cluster is as it was."""
    before = len(client.scheduler_info()["workers"])
    worker = subprocess.Popen([str(Path(sys.executable).parent / "dask"), "worker", client.scheduler.address,
                               "--nthreads", "1", "--resources", "GPU=1", "--name", "gpu-worker", "--host", "127.0.0.1",
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client.wait_for_workers(before + 1, timeout=HANG)
        yield
    finally:
        client.retire_workers(names=["gpu-worker"], close_workers=True)
        worker.terminate()
        worker.wait(timeout=HANG)


def finished_run_files(run: Path, dataset: str, n: int = 2000) -> Path:
    """The files `--from-run` asks of a finished run folder (a manifest naming `dataset` and
    `cnn`, n samples' scores, a model.pt) with made-up contents: for what is refused before any
    of them is used."""
    import json

    import pyarrow.parquet as pq

    from pruning_core.artifacts import scores_table

    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vectors = np.tile(rng.normal(size=(1, 64)), (n, 1))  # the last column, compressed (snappy)
    pq.write_table(scores_table({"sample_id": np.arange(n), "label": rng.integers(0, 10, n), "loss": rng.random(n),
                                 "el2n": rng.random(n)}, vectors), run / "scores.parquet", use_dictionary=False)
    (run / "manifest.json").write_text(json.dumps({"arguments": {"dataset": dataset, "model": "cnn",
                                                                 "data_root": None}}))
    (run / "model.pt").write_bytes(b"")
    return run


@pytest.fixture(scope="session")
def small_npz(fmnist, tmp_path_factory) -> str:
    """2,000 training and 500 test samples of Fashion-MNIST, uint8 (n, 1, 28, 28)."""
    return write_npz(fmnist, tmp_path_factory.mktemp("data") / "fmnist-small.npz", 2000, 500)


@pytest.fixture(scope="session")
def cnn_checkpoint(small_npz, tmp_path_factory) -> str:
    """A `cnn` trained for 2 epochs on `small_npz` (seed 0), saved as a state_dict."""
    from pruning_core.artifacts import save_checkpoint
    from pruning_core.recipe import TrainArgs
    from pruning_core.training import train

    path = tmp_path_factory.mktemp("checkpoint") / "cnn.pt"
    save_checkpoint(train(load_dataset(f"npz:{small_npz}"), TrainArgs(model="cnn", epochs=2)).model, path)
    return str(path)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server for the whole session; its URL is also exported to the
    environment so that Dask worker processes report to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def dask_cluster(prefect_api) -> str:
    """The address of one Dask LocalCluster, started as the flows start theirs (2 workers), for the
    in-process runs that do not test the cluster itself: a fresh cluster's workers spend about 6 s
    here importing torch and Prefect for their first task, in every run. Started after the Prefect
    API, so that its workers report to it."""
    from distributed import LocalCluster

    from flows.cluster import local_cluster_kwargs

    with LocalCluster(**local_cluster_kwargs(workers=2)) as cluster:
        yield cluster.scheduler_address


def read_until(fd: int, until=None, timeout: float = HANG) -> str:
    """What the pipe or terminal `fd` gives until `until(text so far)` holds or it ends (EOF, or
    EIO: a terminal's other side closed), each read waiting for data with `select`; fails the test,
    showing the output's end, if neither happens within `timeout` s."""
    import select
    import time

    deadline, chunks = time.monotonic() + timeout, bytearray()
    while until is None or not until(chunks.decode(errors="replace")):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"no end of the output within {timeout:.0f} s:\n{chunks.decode(errors='replace')[-3000:]}")
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side closed
            data = b""
        if not data:
            break
        chunks += data
    return chunks.decode(errors="replace")


def read_only_tree(root: Path) -> list[str]:
    """Every path under root, for asserting that nothing was written."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")) if Path(root).exists() else []
