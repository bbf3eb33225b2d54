"""Bad input: exit status 2, one clear line, nothing written (no run folder, no version)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import main
from pruning_core.models import LinearModel


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_npz):
    root = tmp_path_factory.mktemp("bad")
    np.savez(root / "short.npz", x=np.zeros((5, 4)), y=np.zeros(4, int), x_test=np.zeros((2, 4)), y_test=np.zeros(2, int))
    np.savez(root / "nan.npz", x=np.full((5, 4), np.nan), y=np.array([0, 1, 0, 1, 0]), x_test=np.zeros((2, 4)),
             y_test=np.array([0, 1]))
    (root / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    torch.save(LinearModel(784, 10).state_dict(), root / "linear.pt")
    with open(root / "pickled.pt", "wb") as f:  # a pickle with a non-tensor object: refused by weights_only
        pickle.dump({"fc.weight": torch.zeros(2), "payload": Path("/etc/passwd")}, f)
    (root / "empty").mkdir()
    return root


CASES = {
    "unknown dataset": (["--dataset", "imagenet"], "--dataset 'imagenet' is not a known dataset"),
    "unknown model": (["--model", "vit"], "--model 'vit'"),
    "ratio zero": (["--prune-ratio", "0"], "--prune-ratio 0.0"),
    "ratio above one": (["--prune-ratio", "1.5"], "--prune-ratio 1.5"),
    "ratio not a number": (["--prune-ratio", "abc"], "'abc' is not a number"),
    "both ratio and epsilon": (["--prune-ratio", "0.4", "--epsilon", "1"], "not allowed with argument"),
    "neither": ([], "exactly one of prune_ratio and epsilon"),
    "epsilon zero": (["--epsilon", "0"], "--epsilon 0.0"),
    "missing npz": (["--dataset", "npz:{root}/absent.npz"], "file not found"),
    "missing idx files": (["--data-root", "{root}/empty"], "train-images-idx3-ubyte.gz is missing"),
    "npz lengths": (["--dataset", "npz:{root}/short.npz", "--model", "linear"], "5 samples but 4 labels"),
    "npz NaN": (["--dataset", "npz:{root}/nan.npz", "--model", "linear"], "NaN or Inf"),
    "corrupt checkpoint": (["--dataset", "npz:{small}", "--checkpoint", "{root}/corrupt.pt"], "not a loadable state_dict"),
    "mismatched checkpoint": (["--dataset", "npz:{small}", "--checkpoint", "{root}/linear.pt"], "does not fit --model cnn"),
    "pickled objects": (["--dataset", "npz:{small}", "--checkpoint", "{root}/pickled.pt"], "not a loadable state_dict"),
    "missing checkpoint": (["--checkpoint", "{root}/absent.pt"], "file not found"),
    "unknown hessian": (["--hessian", "newton"], "--hessian 'newton'"),
    "unknown method": (["--method", "oracle"], "--method 'oracle'"),
    "unknown scope": (["--scope", "everything"], "--scope 'everything' is not valid"),
    "unknown module": (["--scope", "modules:conv9"], "no module named 'conv9'"),
    "kfac outside the last layer": (["--scope", "all", "--hessian", "kfac"], "available for --scope last-layer"),
    "bad damping": (["--damping", "lots"], "'lots' is not a number"),
    "negative damping": (["--damping", "-1"], "--damping -1.0"),
    "zero projection": (["--projection-dim", "0"], "--projection-dim 0"),
    "zero shards": (["--shards", "0"], "--shards 0"),
    "bad dask address": (["--dask-address", "localhost"], "must look like tcp://host:port"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, files, small_npz, tmp_path, capsys):
    argv, expected = CASES[case]
    argv = [a.format(root=files, small=small_npz) for a in argv]
    if case != "neither" and not any(a in ("--prune-ratio", "--epsilon") for a in argv):
        argv += ["--prune-ratio", "0.4"]
    out, target = tmp_path / "runs", tmp_path / "table"
    code = main(["run", *argv, "--out", str(out), "--target", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("dataset-prune: error: ") and expected in err, err
    assert not out.exists() and not target.exists()


def test_console_script_exit_status(tmp_path):
    """The installed command itself exits 2 (checked once in a real subprocess)."""
    exe = Path(sys.executable).parent / "dataset-prune"
    result = subprocess.run([str(exe), "run", "--dataset", "nope", "--prune-ratio", "0.4", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dataset-prune: error: --dataset 'nope' is not a known dataset; valid: fashion-mnist, mnist, cifar10, "
        "cifar100, npz:PATH, delta:URI[@VERSION]"]
    assert not (tmp_path / "r").exists()


def test_versions_command_lists_provenance(tmp_path, small_npz, capsys):
    from pruning_core.data import load_dataset
    from pruning_core.versions import commit_version

    ds = load_dataset(f"npz:{small_npz}")
    commit_version(str(tmp_path / "t"), ds, np.arange(ds.n) < 100,
                   {"run_id": "r1", "method": "random", "prune_ratio": 0.95, "objective": 1.5,
                    "source": {"name": ds.name}})
    assert main(["versions", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "random / 0.95" in out and "100" in out
    assert main(["versions", str(tmp_path / "missing")]) == 2


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, small_npz, capsys):
    code = main(["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--hessian", "ekfac",
                 "--projection-dim", "256", "--dry-run", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "n=2000, p=1290, stored dim=256" in out and "peak" in out
    assert not (tmp_path / "runs").exists()
