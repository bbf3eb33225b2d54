"""Bad input: exit status 2, one clear line, nothing written (no run folder, no version)."""

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import clean_env, finished_run_files

from flows.cli import main
from pruning_core.errors import BadInputError
from pruning_core.models import LinearModel, build_model


class Payload:
    """Unpickling this runs code (it creates `path`): what weights_only=True must refuse."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_npz):
    root = tmp_path_factory.mktemp("bad")
    np.savez(root / "short.npz", x=np.zeros((5, 4)), y=np.zeros(4, int), x_test=np.zeros((2, 4)),
             y_test=np.zeros(2, int))
    np.savez(root / "nan.npz", x=np.full((5, 4), np.nan), y=np.array([0, 1, 0, 1, 0]), x_test=np.zeros((2, 4)),
             y_test=np.array([0, 1]))
    (root / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (root / "hello.pt").write_bytes(b"hello")  # torch.load's unpickler fails on it with a KeyError
    np.save(root / "array.npy", np.zeros((5, 4)))
    (root / "truncated.npz").write_bytes((root / "short.npz").read_bytes()[:200])
    good = (root / "nan.npz").read_bytes()  # the first member's data bytes flipped: its CRC no longer matches
    (root / "bad-crc.npz").write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:110]) + good[110:])
    torch.save(LinearModel(784, 10).state_dict(), root / "linear.pt")
    with open(root / "pickled.pt", "wb") as f:  # a pickle with a non-tensor object: refused by weights_only
        pickle.dump({"fc.weight": torch.zeros(2), "payload": Path("/etc/passwd")}, f)
    (root / "empty").mkdir()
    labels = np.array([0, 1, 0, 1, 0])
    np.savez(root / "inf.npz", x=np.full((5, 4), np.inf), y=labels, x_test=np.zeros((2, 4)), y_test=np.array([0, 1]))
    np.savez(root / "nan-test.npz", x=np.zeros((5, 4)), y=labels, x_test=np.full((2, 4), np.nan),
             y_test=np.array([0, 1]))
    np.savez(root / "empty.npz", x=np.zeros((0, 4)), y=np.zeros(0, int), x_test=np.zeros((2, 4)),
             y_test=np.array([0, 1]))
    np.savez(root / "negative-label.npz", x=np.zeros((5, 4)), y=np.array([0, 1, -1, 1, 0]), x_test=np.zeros((2, 4)),
             y_test=np.array([0, 1]))
    np.savez(root / "float-labels.npz", x=np.zeros((5, 4)), y=labels + 0.5, x_test=np.zeros((2, 4)),
             y_test=np.array([0, 1]))
    np.savez(root / "one-class.npz", x=np.zeros((5, 4)), y=np.zeros(5, int), x_test=np.zeros((2, 4)),
             y_test=np.zeros(2, int))
    torch.save(build_model("cnn", (1, 28, 28), 12).state_dict(), root / "cnn-12-classes.pt")
    torch.save({**LinearModel(784, 10).state_dict(), "extra": Payload(root / "pwned")}, root / "payload.pt")
    # Delta versions as only another writer could make them: duplicate sample ids, a label past
    # the class count recorded in the provenance
    from pruning_core.data import Dataset, load_dataset
    from pruning_core.versions import commit_version

    ds = load_dataset(f"npz:{small_npz}")
    ids = np.r_[np.arange(49), 0].astype(np.int64)
    commit_version(str(root / "duplicates"), Dataset("d", ds.x[:50], ds.y[:50], ids, ds.x_test, ds.y_test, 10,
                                                     dict(ds.origin)), np.ones(50, bool), {"run_id": "duplicates"})
    y = np.r_[ds.y[:49], 12].astype(np.int64)
    commit_version(str(root / "labels"), Dataset("l", ds.x[:50], y, np.arange(50), ds.x_test, ds.y_test, 10,
                                                 dict(ds.origin)), np.ones(50, bool), {"run_id": "labels"})
    commit_version(str(root / "no-data"), ds, np.ones(ds.n, bool), {"run_id": "no-data"})
    for part in (root / "no-data").glob("*.parquet"):  # its log names a data file that is gone
        part.unlink()
    return root


@pytest.fixture(scope="module")
def dead_ports():
    """A loopback port nothing listens on, and one that accepts connections and never replies."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    ports = {"closed": closed.getsockname()[1], "silent": silent.getsockname()[1]}
    closed.close()
    yield ports
    silent.close()


CASES = {
    "unknown dataset": (["--dataset", "imagenet"], "--dataset 'imagenet' is not a known dataset"),
    "unknown model": (["--model", "vit"], "--model 'vit'"),
    "ratio zero": (["--prune-ratio", "0"], "--prune-ratio 0.0"),
    "ratio above one": (["--prune-ratio", "1.5"], "--prune-ratio 1.5"),
    "ratio not a number": (["--prune-ratio", "abc"], "'abc' is not a number"),
    "both ratio and epsilon": (["--prune-ratio", "0.4", "--epsilon", "1"],
                               "run: argument --epsilon: not allowed with argument --prune-ratio"),
    "neither": ([], "give exactly one of --prune-ratio and --epsilon"),
    "epsilon zero": (["--epsilon", "0"], "--epsilon 0.0"),
    "missing npz": (["--dataset", "npz:{root}/absent.npz"], "file not found"),
    "npy file as npz": (["--dataset", "npz:{root}/array.npy"], "not an .npz archive"),
    "truncated npz": (["--dataset", "npz:{root}/truncated.npz"], "not an .npz archive"),
    "npz with a corrupt member": (["--dataset", "npz:{root}/bad-crc.npz"], "cannot be read as an .npz file"),
    "missing idx files": (["--data-root", "{root}/empty"], "train-images-idx3-ubyte.gz is missing"),
    "npz lengths": (["--dataset", "npz:{root}/short.npz", "--model", "linear"], "5 samples but 4 labels"),
    "data root for an npz": (["--dataset", "npz:{small}", "--data-root", "{root}"],
                             "names its own data; --data-root is for a named dataset"),
    "npz NaN": (["--dataset", "npz:{root}/nan.npz", "--model", "linear"], "NaN or Inf"),
    "corrupt checkpoint": (["--dataset", "npz:{small}", "--checkpoint", "{root}/corrupt.pt"],
                           "not a loadable state_dict"),
    "mismatched checkpoint": (["--dataset", "npz:{small}", "--checkpoint", "{root}/linear.pt"],
                              "does not fit --model cnn"),
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
    "unknown solver": (["--solver", "magic"], "--solver 'magic'"),
    "a solver for a baseline": (["--method", "el2n", "--solver", "bucketed"],
                                "--solver bucketed applies to --method influence (el2n ranks or draws"),
    "unknown coverage": (["--coverage", "most"], "invalid choice: 'most'"),
    "unknown candidate order": (["--candidates", "best"], "invalid choice: 'best'"),
    "uniform candidates with epsilon": (["--epsilon", "0.1", "--candidates", "uniform"],
                                        "--candidates uniform applies to --method influence with --prune-ratio"),
    "uniform candidates for a baseline": (["--method", "ccs", "--candidates", "uniform"],
                                          "--candidates uniform applies to --method influence with --prune-ratio"),
    "hard cut of one": (["--hard-cut", "1"], "--hard-cut 1.0"),
    "hard cut past the removals": (["--prune-ratio", "0.3", "--hard-cut", "0.5"],
                                   "--hard-cut 0.5 cuts more than --prune-ratio 0.3 removes; give at most 0.3"),
    "bucketed under coverage": (["--prune-ratio", "0.3", "--solver", "bucketed", "--coverage", "difficulty"],
                                "--solver bucketed solves --prune-ratio without --class-balanced or --coverage"),
    "target delta: naming nothing": (["--target", "delta:"], "delta: names no table"),
    "hard cut with epsilon": (["--epsilon", "0.1", "--hard-cut", "0.1"],
                              "--hard-cut applies to --coverage difficulty and --method ccs"),
    "hard cut for random": (["--method", "random", "--hard-cut", "0.1"], "--hard-cut applies to"),
    "zero epochs": (["--epochs", "0"], "--epochs 0"),
    "zero train epochs": (["--train-epochs", "0"], "--train-epochs 0"),
    "train epochs for a baseline": (["--method", "el2n", "--train-epochs", "8"], "--train-epochs shifts the hard cut"),
    "train epochs with a hard cut": (["--hard-cut", "0.1", "--train-epochs", "8"], "with --hard-cut given"),
    "train epochs for linear": (["--model", "linear", "--train-epochs", "8"], "--model linear trains to its optimum"),
    "a learning rate for a checkpoint": (["--dataset", "npz:{small}", "--checkpoint", "{root}/linear.pt", "--model",
                                          "linear", "--lr", "0.1", "--batch-size", "64"],
                                         "--lr, --batch-size with --checkpoint: nothing is trained"),
    "zero rounds": (["--rounds", "0"], "--rounds 0"),
    "too many rounds": (["--rounds", "11"], "--rounds 11"),
    "rounds with epsilon": (["--epsilon", "0.1", "--rounds", "2"], "--rounds 2 splits --prune-ratio over the rounds"),
    "rounds removing nothing": (["--dataset", "npz:{small}", "--prune-ratio", "0.002", "--rounds", "5"],
                                "--rounds 5: --prune-ratio 0.002 of 2000 samples removes 4, fewer than one per round"),
    "infinite lr": (["--lr", "inf"], "--lr must be finite"),
    "NaN lr": (["--lr", "nan"], "argument --lr: 'nan' is not a number"),
    "NaN ratio": (["--prune-ratio", "nan"], "argument --prune-ratio: 'nan' is not a number"),
    "negative weight decay": (["--weight-decay", "-1"], "--weight-decay -1.0"),
    "negative seed": (["--seed", "-1"], "--seed -1"),
    "zero batch size": (["--batch-size", "0"], "--batch-size 0"),
    "zero workers": (["--workers", "0"], "--workers 0"),
    "zero block size": (["--block-size", "0"], "--block-size 0"),
    "too many shards": (["--shards", "100000"], "--shards 100000"),
    "ratio one": (["--prune-ratio", "1"], "--prune-ratio 1.0"),
    "negative epsilon": (["--epsilon", "-1"], "--epsilon -1.0"),
    "infinite epsilon": (["--epsilon", "inf"], "epsilon must be finite"),
    "NaN epsilon": (["--epsilon", "nan"], "argument --epsilon: 'nan' is not a number"),
    "npz Inf": (["--dataset", "npz:{root}/inf.npz", "--model", "linear"], "train samples contain NaN or Inf"),
    "npz NaN in the test split": (["--dataset", "npz:{root}/nan-test.npz", "--model", "linear"],
                                  "test samples contain NaN or Inf"),
    "empty dataset": (["--dataset", "npz:{root}/empty.npz", "--model", "linear"], "must both be non-empty"),
    "negative label": (["--dataset", "npz:{root}/negative-label.npz", "--model", "linear"],
                       "train labels must lie in [0, 2), found [-1, 1]"),
    "float labels": (["--dataset", "npz:{root}/float-labels.npz", "--model", "linear"],
                     "y must be a 1-d integer array"),
    "one class": (["--dataset", "npz:{root}/one-class.npz", "--model", "linear"], "at least two classes"),
    "duplicate sample ids": (["--dataset", "delta:{root}/duplicates"], "sample_id values must be unique"),
    "labels outside the classes": (["--dataset", "delta:{root}/labels"],
                                   "train labels must lie in [0, 10), found [0, 12]"),
    "missing delta table": (["--dataset", "delta:{root}/absent"], "no Delta table there"),
    "missing delta version": (["--dataset", "delta:{root}/duplicates@7"], "@7: no such version (the newest is 0)"),
    "delta table whose data file is gone": (["--dataset", "delta:{root}/no-data"], "@0: its data cannot be read"),
    "delta table that is a file": (["--dataset", "delta:{root}/corrupt.pt"], "is a file; a Delta table is a folder"),
    "target of an unknown scheme": (["--target", "bogus://bucket/table"], "--target bogus://bucket/table: unknown "
                                    "scheme 'bogus'"),
    "dask address without a port": (["--dask-address", "tcp://127.0.0.1"], "missing port number"),
    "checkpoint of another class count": (["--dataset", "npz:{small}", "--checkpoint", "{root}/cnn-12-classes.pt"],
                                          "does not fit --model cnn"),
    "checkpoint that runs code": (["--dataset", "npz:{small}", "--model", "linear",
                                   "--checkpoint", "{root}/payload.pt"],
                                  "not a loadable state_dict"),
    "checkpoint is a folder": (["--checkpoint", "{root}"], ": is a folder, not a file"),
    "npz that is a folder": (["--dataset", "npz:{root}/empty"], "empty: is a folder, not a file"),
    "checkpoint of a few bytes": (["--dataset", "npz:{small}", "--checkpoint", "{root}/hello.pt"],
                                  "not a loadable state_dict (KeyError"),
    "target escaping with ..": (["--target", "../escape"], "'..' is not allowed"),
    "absolute target with ..": (["--target", "{root}/x/../../escape"], "'..' is not allowed"),
    "target is a file": (["--target", "{root}/corrupt.pt"], "exists and is not a folder"),
    "target naming a version": (["--target", "{root}/table@3"], "table@3: names a version; a run commits the "
                                "table's next version"),
    "target under a file": (["--target", "{root}/corrupt.pt/table"], "corrupt.pt is not a folder"),
    "target where nothing can be written": (["--target", "/proc/dataset-prune-test/table"],
                                            "nothing can be written in /proc"),
    "dask address refused": (["--dask-address", "tcp://127.0.0.1:{closed}"], "no Dask scheduler answered within 3 s"),
    "dask address silent": (["--dask-address", "tcp://127.0.0.1:{silent}"],
                            "accepted the connection but never replied"),
    "beyond memory": (["--dataset", "npz:{small}", "--scope", "all", "--hessian", "cg", "--projection-dim", "200000"],
                      "the influence stage needs ≈"),
    "projection not below p": (["--dataset", "npz:{small}", "--projection-dim", "1290"], "is not below p = 1290"),
    "exact Hessian beyond memory": (["--dataset", "npz:{small}", "--scope", "all"], "the influence stage needs ≈"),
    "scip beyond its size": (["--dataset", "npz:{small}", "--solver", "scip"],
                             "--solver scip is the exact reference for small instances: "
                             "2000 samples × 1290 dimensions"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, files, dead_ports, small_npz, tmp_path, capsys):
    import dask
    import distributed  # noqa: F401  (its config defaults, before one of them is overridden below)

    argv, expected = CASES[case]
    argv = [a.format(root=files, small=small_npz, **dead_ports) for a in argv]
    if case != "neither" and not any(a in ("--prune-ratio", "--epsilon") for a in argv):
        argv += ["--prune-ratio", "0.4"]
    out, target = tmp_path / "runs", tmp_path / "table"
    if "--target" not in argv:
        argv += ["--target", str(target)]
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):  # a scheduler that does not answer
        code = main(["run", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("dataset-prune: error: ") and expected in err, err
    assert not out.exists() and not target.exists()
    assert not (files / "pwned").exists() and not (files / "x").exists() and not Path("../escape").exists()


def _scores(n: int, ids=None, vectors=None, **columns):
    from pruning_core.artifacts import scores_table

    rng = np.random.default_rng(0)
    columns = {"sample_id": np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64),
               "label": rng.integers(0, 2, n), "loss": rng.random(n), "el2n": rng.random(n), **columns}
    return scores_table(columns, rng.normal(size=(n, 3)) if vectors is None else vectors)


SCORES = {
    "no rows": (lambda: _scores(0), "no rows"),
    "duplicate sample ids": (lambda: _scores(4, ids=[0, 1, 1, 2]), "sample_id values must be unique"),
    "NaN in a vector": (lambda: _scores(4, vectors=np.array([[0.0, 1], [np.nan, 0], [1, 1], [2, 0]])),
                        "influence vectors contain NaN or Inf"),
    "no influence column": (lambda: _scores(4).drop_columns(["influence"]), "column influence"),
    # each went through: a negative label crashed the class quotas with a traceback, NaN scores
    # were ranked (sorted last) into a selection that meant nothing
    "negative label": (lambda: _scores(4, label=np.array([0, 1, -5, 1])), "label values must be class indices"),
    "NaN EL2N": (lambda: _scores(4, el2n=np.array([0.1, np.nan, 0.3, 0.2])), "column el2n contains NaN"),
    "Inf GraNd": (lambda: _scores(4, grand=np.array([0.1, np.inf, 0.3, 0.2])), "column grand contains NaN, Inf"),
    "empty loss": (lambda: _scores(4).set_column(2, "loss", pa.array([0.1, None, 0.3, 0.2], pa.float64())),
                   "loss has empty values"),
}


@pytest.mark.parametrize("case", list(SCORES))
def test_select_refuses_bad_scores_in_one_line(case, tmp_path, capsys):
    """A scores file another tool wrote, or a run's cut short: one line, exit 2, no selection file
    (an empty one divided by zero, NaN vectors were solved over)."""
    import pyarrow.parquet as pq

    make, expected = SCORES[case]
    pq.write_table(make(), tmp_path / "scores.parquet")
    out = tmp_path / "selection.parquet"
    assert main(["select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert err.startswith(f"dataset-prune: error: --scores {tmp_path / 'scores.parquet'}: "), err  # the file, named
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--method", "random", "--seed", "-1"], "--seed -1 must be ≥ 0"),
    (["--method", "random", "--solver", "scip"], "--solver scip applies to --method influence (random ranks or draws"),
    # a cluster of none: waited for ever
    (["--solver", "bucketed", "--workers", "0"], "--workers 0 must be at least 1"),
    (["--workers", "4"], "--workers applies to --solver bucketed"),  # was ignored
    (["--time-limit", "5"], "--time-limit applies to --solver scip"),  # was ignored
    (["--solver", "scip", "--time-limit", "-5"], "--time-limit -5 must be a positive number of seconds"),
    (["--dask-address", "tcp://127.0.0.1:8786"], "--dask-address applies to --solver bucketed"),
    (["--solver", "bucketed", "--dask-address", "tcp://127.0.0.1:abc"], "must look like tcp://host:port (invalid"),
    (["--solver", "bucketed", "--dask-address", "bogus"], "--dask-address 'bogus' must look like tcp://host:port"),
    (["--train-epochs", "8", "manifest:{bad"], "manifest.json: cannot be read as a run's manifest (Expecting"),
    (["--train-epochs", "8", "manifest:[]"], "manifest.json: not a run's manifest"),
    (["--train-epochs", "8", 'manifest:{"arguments": {"model": "linear"}}'], "--model linear trains to its optimum"),
    (["--train-epochs", "8", 'manifest:{"arguments": {"model": "bogus"}}'],
     "manifest.json: its arguments are not a run's (--model 'bogus' is not a known model"),
])
def test_select_refuses_bad_options_in_one_line(argv, expected, tmp_path, capsys):
    """Each was a traceback, or a wait for ever (no workers), before it was checked."""
    import pyarrow.parquet as pq

    pq.write_table(_scores(10), tmp_path / "scores.parquet")
    for arg in argv:
        if arg.startswith("manifest:"):  # the run folder's manifest, damaged
            (tmp_path / "manifest.json").write_text(arg.removeprefix("manifest:"))
    argv = [a for a in argv if not a.startswith("manifest:")]
    out = tmp_path / "selection.parquet"
    assert main(["select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4", "--out", str(out),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("command, out, expected", [
    ("run", "{root}/corrupt.pt/runs", "corrupt.pt is not a folder"),
    ("run", "/proc/dataset-prune-test", "nothing can be written in /proc"),
    ("select", "{root}", "is a folder; give the selection's file path"),
    ("select", "{root}/corrupt.pt/selection.parquet", "corrupt.pt is not a folder"),
    ("select", "/proc/dataset-prune-test/selection.parquet", "nothing can be written in /proc"),
    # these two went through: the scores replaced by the selection, a finished run's selection changed
    ("select", "{tmp}/scores.parquet", "is the --scores file; the selection would replace the scores"),
    ("select", "{tmp}/run/selection.parquet", "is a run folder's own selection, which its manifest describes"),
])
def test_an_out_where_nothing_can_be_written_is_refused_in_one_line(command, out, expected, files, small_npz, tmp_path,
                                                                   capsys):
    """Checked before any work: these were tracebacks once the run or the selection had finished."""
    import pyarrow.parquet as pq

    out = out.format(root=files, tmp=tmp_path)
    if command == "run":
        argv = ["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--target", str(tmp_path / "t")]
    else:
        pq.write_table(_scores(10), tmp_path / "scores.parquet")
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "manifest.json").write_text("{}")
        argv = ["select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4"]
    scores = (tmp_path / "scores.parquet").read_bytes() if command == "select" else None
    assert main([*argv, "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "t").exists() and not list(files.glob(".dataset-prune-probe*"))
    if command == "select":
        assert (tmp_path / "scores.parquet").read_bytes() == scores and not (tmp_path / "run" / "selection.parquet"
                                                                               ).exists()


RUN_IDS = {"parent folder": "../escape", "absolute path": "/tmp/escaped-run", "nested": "a/b", "dots": "..",
           "empty": "", "existing run folder": "done"}


@pytest.mark.parametrize("case", list(RUN_IDS))
def test_run_ids_that_leave_their_folder_are_refused(case, small_npz, tmp_path, prefect_api):
    """The flow's `run_id` (a deployment parameter, not a command-line option) names one folder
    under `out`; anything else is refused before anything is written."""
    from flows.parameters import RunParameters
    from flows.prune import prune_dataset

    out = tmp_path / "runs"
    (out / "done").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    expected = "already exists" if case == "existing run folder" else "must be one folder name"
    with pytest.raises(BadInputError, match=expected):
        prune_dataset(RunParameters(dataset=f"npz:{small_npz}", prune_ratio=0.4, out=str(out),
                                    target=str(tmp_path / "table")), run_id=RUN_IDS[case])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/escaped-run").exists() and not (tmp_path / "escape").exists()


def installed(*argv: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The installed `dataset-prune` run in a subprocess (text; no Prefect API unless `env` sets
    one; output captured unless `kwargs` route it), within 300 s unless `timeout` says otherwise."""
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run([str(Path(sys.executable).parent / "dataset-prune"), *argv], text=True,
                          env={**os.environ, "PREFECT_API_URL": "", **(env or {})},
                          **{"timeout": 300, **kwargs})


def test_console_script_exit_status(tmp_path):
    """The installed command itself exits 2 (checked once in a real subprocess)."""
    result = installed("run", "--dataset", "nope", "--prune-ratio", "0.4", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dataset-prune: error: --dataset 'nope' is not a known dataset; valid: fashion-mnist, mnist, cifar10, "
        "cifar100, npz:PATH, delta:URI[@VERSION], folder:PATH, parquet:PATH"]
    assert not (tmp_path / "r").exists()


@pytest.mark.integration
def test_select_on_its_own_local_cluster_prints_its_one_line_and_no_dask_chatter(tmp_path):
    """`select --solver bucketed` printed 34 INFO lines of the Dask cluster's start and close on
    stderr before its result: importing distributed set its logger back to INFO."""
    import pyarrow.parquet as pq

    pq.write_table(_scores(400), tmp_path / "scores.parquet")
    out = tmp_path / "selection.parquet"
    result = installed("select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4",
                       "--solver", "bucketed", "--workers", "1", "--out", str(out))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith(f"{out}: pruned 160 of 400, objective") and result.stdout.count("\n") == 1
    assert pq.read_table(out).num_rows == 400


def test_a_reader_that_goes_away_ends_the_command_quietly_with_its_work_kept(tmp_path):
    """`dataset-prune … | head`: the print after the work met a closed pipe and ended in a
    BrokenPipeError traceback (exit 1). Now: exit 141, as if killed by SIGPIPE, nothing on stderr."""
    import pyarrow.parquet as pq

    pq.write_table(_scores(50), tmp_path / "scores.parquet")
    out = tmp_path / "selection.parquet"
    reader, writer = os.pipe()
    os.close(reader)  # gone before the command writes a line
    try:
        result = installed("select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4",
                           "--out", str(out), stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (141, ""), result.stderr
    assert pq.read_table(out).num_rows == 50  # the selection was written before the line


def test_a_dask_address_that_never_answers_fails_within_the_connect_timeout(small_npz, dead_ports, tmp_path):
    """The installed command against a port that accepts and never replies: one line, exit 2,
    within Dask's connect timeout (set to 3 s here), the command bounded by a 60 s timeout."""
    out = tmp_path / "runs"
    result = installed("run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--dask-address",
                       f"tcp://127.0.0.1:{dead_ports['silent']}", "--out", str(out), timeout=60,
                       env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dataset-prune: error: --dask-address tcp://127.0.0.1:{dead_ports['silent']}: no Dask scheduler answered "
        f"within 3 s (it accepted the connection but never replied); start one (dask scheduler) or leave "
        f"--dask-address out for a local cluster"]
    assert not out.exists()


def test_gpu_on_a_cluster_without_gpu_workers_is_refused_before_anything_runs(dask_cluster, small_npz, tmp_path,
                                                                              capsys):
    """The shards, and an evaluation's retrainings, would wait for ever for a worker offering the
    resource GPU."""
    from flows.preflight import check_gpu_workers

    out = tmp_path / "runs"
    refusal = [f"dataset-prune: error: --gpu: none of the 2 workers at --dask-address {dask_cluster} offers the Dask "
               "resource GPU, so the tasks asking for it would wait for one for ever; start one worker per GPU with "
               f"`dask worker {dask_cluster} --resources GPU=1`, or leave --gpu out"]
    assert main(["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--gpu", "--dask-address",
                 dask_cluster, "--out", str(out), "--target", str(tmp_path / "table")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    assert not out.exists() and not (tmp_path / "table").exists()
    run_dir = finished_run_files(tmp_path / "scored", f"npz:{small_npz}")  # no scoring run, whose preflight refuses it
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--from-run", str(run_dir), "--methods", "random",
                 "--gpu", "--dask-address", dask_cluster, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    assert not out.exists()
    cpu, gpu = {"resources": {}}, {"resources": {"GPU": 1.0}}
    check_gpu_workers("tcp://h:1", {"workers": {"a": cpu, "b": gpu}})  # one GPU worker is enough
    check_gpu_workers("tcp://h:1", {"workers": {}})  # none has joined yet: GPU workers may still come


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
    assert main(["versions", f"delta:{tmp_path / 't'}"]) == 0  # the form lineage and provenance print
    assert capsys.readouterr().out == out
    (tmp_path / "not-git").mkdir()
    (tmp_path / "a-file").write_text("x")
    for uri, expected in ((str(tmp_path / "missing"), "no Delta table there"),
                          (f"delta:{tmp_path / 't'}@0", f"give {tmp_path / 't'} without @0"),
                          (str(tmp_path / "a-file"), "is a file; a Delta table is a folder"),
                          ("", "versions: no table given"), ("delta:", "versions: no table given"),
                          ("bogus://x/y", "unknown scheme 'bogus'"),
                          (f"dvc:{tmp_path / 'absent'}#x", "is not a folder"),
                          (f"dvc:{tmp_path / 'not-git'}#x", "is not the top folder of a git repository")):
        assert main(["versions", uri]) == 2, uri
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err and "@None" not in err, err
        assert "--target" not in err, err  # versions takes no --target: its argument is named


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, small_npz, capsys):
    code = main(["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--hessian", "ekfac",
                 "--projection-dim", "256", "--dry-run", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "n=2000, p=1290, stored dim=256" in out and "math arrays held at once ≈" in out and "vectors stored" in out
    assert not (tmp_path / "runs").exists()


def test_every_option_of_every_command_says_what_it_does(capsys):
    """`--help` documents each option: its own help, or the flow parameter's description (the
    UI form's text) with the allowed values and the default."""
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"run", "select", "evaluate", "versions", "export"}
    for name, command in commands.items():
        bare = [a.option_strings or [a.dest] for a in command._actions if not a.help]
        assert not bare, f"dataset-prune {name}: options without help: {bare}"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method METHOD the paper's optimisation, or a baseline; one of influence, random, el2n" in text
    assert "--seed SEED seed of training and of random selection (default: 0)" in text


def test_version_and_a_missing_command(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"dataset-prune {version('dataset-pruning')}\n"
    assert main([]) == 2
    assert capsys.readouterr().err == "dataset-prune: error: the following arguments are required: command\n"


def test_the_reference_lists_every_option_as_help_says_it():
    """docs/reference.md's option tables are the parser's own text: an option added, renamed or
    re-described without `make options` fails here."""
    from flows.cli import OPTIONS_BEGIN, OPTIONS_END, options_reference

    reference = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    assert OPTIONS_BEGIN in reference and OPTIONS_END in reference
    block = reference.partition(OPTIONS_BEGIN)[2].partition(OPTIONS_END)[0]
    assert block.strip() == options_reference().strip(), "docs/reference.md is stale: run `make options`"
    for flag in ("--prune-ratio PRUNE_RATIO", "--train-epochs TRAIN_EPOCHS", "--lineage", "--from-run FROM_RUN"):
        assert f"| `{flag}` |" in block


@pytest.mark.parametrize("setting, expected", [(None, "false"), ("true", "true")])
def test_the_server_a_command_starts_for_itself_sends_no_telemetry_unless_asked(setting, expected, own_home):
    """Offline, the temporary server's telemetry logged an ERROR into every run's output."""
    env = clean_env(own_home)
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED")
    if setting is not None:
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = setting
    probe = ("import os, psutil\nfrom flows.cli import prefect_api\nwith prefect_api():\n"
             "    servers = [p for p in psutil.Process().children(recursive=True) "
             "if 'prefect.server' in ' '.join(p.cmdline())]\n"
             "    print('server', [p.environ().get('PREFECT_SERVER_ANALYTICS_ENABLED') for p in servers])\n"
             "print('after', os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED'))\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"server ['{expected}']" in done.stdout.lower()  # as Prefect passes it on: False/True
    assert f"after {setting}".lower() in done.stdout.lower()  # the command's own environment is left as it was
    assert ("Failed to send telemetry" in done.stderr) <= (expected == "true")


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_sigterm_exits_143_even_when_what_it_interrupted_wraps_it(wrapped, small_npz, tmp_path, monkeypatch,
                                                                  capsys):
    """A real SIGTERM lands inside a command; when the code it interrupted re-raises it as another
    exception (Prefect does so while serialising a task's context), the command still reports a
    stop (128 + SIGTERM) rather than a failure (1). Without a signal, an error stays an error."""
    import signal

    import flows.cli as cli

    def select_that_is_stopped(ns):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in the main thread
        except SystemExit as stop:
            if wrapped:
                raise RuntimeError("Error calling to_json: SystemExit") from stop
            raise
        raise AssertionError("the signal did not interrupt the command")

    monkeypatch.setattr(cli, "cmd_select", select_that_is_stopped)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["select", "--scores", str(tmp_path / "scores.parquet"), "--prune-ratio", "0.4",
            "--out", str(tmp_path / "sel.parquet")]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is removed again

    def select_that_fails(ns):
        raise RuntimeError("a real failure")

    monkeypatch.setattr(cli, "cmd_select", select_that_fails)
    with pytest.raises(RuntimeError, match="a real failure"):
        main(argv)


def test_a_delta_target_may_be_named_as_lineage_names_it(tmp_path):
    """`--target delta:PATH`, the form `versions`, lineage and `--dataset` use: the table at PATH.
    It was taken as a relative path, a folder named `delta:` in the working directory."""
    from flows.parameters import RunParameters

    params = RunParameters(prune_ratio=0.4, target=f"delta:{tmp_path}/table")
    assert params.target == f"{tmp_path}/table" and params.target_uri() == str(tmp_path / "table")
    assert RunParameters(prune_ratio=0.4, target="delta:s3://bucket/t").target_uri() == "s3://bucket/t"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine: its local workers have a GPU")
def test_gpu_with_a_local_cluster_on_a_machine_without_cuda_is_refused(small_npz, tmp_path, capsys):
    """The local cluster's workers all offer the resource GPU: here they computed on the CPU, and
    `--gpu` did nothing (run, and evaluate --from-run, which makes no scoring run)."""
    refusal = ["dataset-prune: error: --gpu without --dask-address: this machine has no CUDA device for the local "
               "cluster's workers; leave --gpu out, or give the address of a cluster with GPU workers"]
    assert main(["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--gpu", "--out",
                 str(tmp_path / "runs"), "--target", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    run_dir = finished_run_files(tmp_path / "scored", f"npz:{small_npz}")
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--from-run", str(run_dir), "--methods", "random",
                 "--gpu", "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == refusal
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t").exists()
