"""`evaluate --train-model NAME`: the retrainings train another architecture than the one that
scored (the paper's unseen-architecture experiment), under their own retrain-cache keys, and the
records, the report, the plots and evaluation.json say which."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import finished_run_files

from flows.cli import main
from flows.evaluate import rounds_parameters
from flows.parameters import EvaluateParameters
from pruning_core import evaluation
from pruning_core.data import Dataset, load_dataset
from pruning_core.recipe import TrainArgs


def _tiny() -> Dataset:
    x = np.arange(6 * 4, dtype=np.uint8).reshape(6, 1, 2, 2)
    return Dataset("d", x, np.arange(6) % 2, np.arange(6), x[:2], np.arange(2) % 2, 2, {"source": "npz:d"})


def test_train_model_changes_the_retrainings_recipe_and_the_keys_of_evaluations_without_it_stay():
    """Without --train-model the retrainings' recipe is the scoring model's, and its retrain-cache
    key the one computed before the option existed (tests/test_training.py's digest); with it the
    recipe, and so the key, is the train model's, with its default epochs: the same as an
    evaluation scored by that model, so the full-data references are shared."""
    ds, rows = _tiny(), np.array([0, 2, 3])
    plain = EvaluateParameters(model="cnn", seed=1)
    assert plain.retrain_args() == plain.train_args()
    assert evaluation.retrain_key(ds, rows, plain.retrain_args(), 4) == "ab699a8d547f48fa"
    proxy = EvaluateParameters(model="linear", train_model="cnn", seed=1)
    assert proxy.retrain_args() == TrainArgs(model="cnn", epochs=4, seed=1) == plain.retrain_args()
    assert proxy.run_parameters().model == "linear" and proxy.run_parameters().train_epochs is None  # scoring as before
    linear_key = evaluation.retrain_key(ds, rows, EvaluateParameters(model="linear", seed=1).retrain_args(), 4)
    longer = EvaluateParameters(model="linear", train_model="cnn", train_epochs=8, seed=1).retrain_args()
    assert longer.epochs == 8
    keys = {linear_key, "ab699a8d547f48fa", evaluation.retrain_key(ds, rows, longer, 4)}
    assert len(keys) == 3


def test_the_hard_cut_follows_the_retrainings_epochs_of_the_scoring_architecture_only():
    """Epochs compare within one architecture: retraining the cnn 8 epochs after a 4-epoch cnn
    scoring run shifts the hard cut as `--from-run RUN --epochs 8` does (10 % cut at 80 % pruned,
    not 15 %), in every round too; retraining another architecture leaves the scoring recipe's."""
    longer = EvaluateParameters(model="cnn", train_model="cnn", train_epochs=8, ratios=[0.8])
    assert longer.train_budget() == 2.0 and longer.selection_args_for("influence", 0.8, 0).coverage_cut() == 0.1
    later = rounds_parameters(longer.model_copy(update={"rounds": 2}), 0.8)
    assert (later.model, later.epochs, later.train_budget()) == ("cnn", None, 2.0)
    other = EvaluateParameters(model="linear", train_model="cnn", train_epochs=8, ratios=[0.8])
    assert other.train_budget() == 1.0 and other.selection_args_for("influence", 0.8, 0).coverage_cut() == 0.15
    later = rounds_parameters(other.model_copy(update={"rounds": 2}), 0.8)
    assert (later.model, later.train_epochs, later.train_budget()) == ("linear", None, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--train-epochs", "8"], "--train-epochs sets the epochs of --train-model, which is not given"),
    (["--train-model", "bogus"], "--train-model 'bogus': Input should be"),
    (["--model", "cnn", "--train-model", "linear", "--train-epochs", "3"],
     "--train-epochs with --train-model linear: it trains to its optimum, without epochs"),
    (["--model", "cnn", "--train-model", "linear", "--augment"], "--augment applies to the networks"),
    (["--model", "linear", "--train-model", "cnn", "--flat"], "--train-model cnn needs image samples"),
    (["--from-run", "RUN", "--methods", "influence,random", "--model", "cnn", "--train-model", "linear", "--epochs",
      "8"],
     "--epochs with --from-run and --train-model: the scoring run trained its own epochs"),
])
def test_train_model_bad_input_exits_2(argv, message, small_npz, tmp_path, capsys):
    """Refused in one line naming the options given, before anything is written (a model that
    cannot take the data's samples before the scoring run, not at the first retraining)."""
    dataset = small_npz
    if "--flat" in argv:  # the same samples as flat rows: linear takes them, an image model does not
        argv = [a for a in argv if a != "--flat"]
        with np.load(small_npz) as data:
            dataset = str(tmp_path / "flat.npz")
            np.savez(dataset, **{k: data[k].reshape(len(data[k]), -1) if k.startswith("x") else data[k]
                                 for k in data.files})
    if "RUN" in argv:
        argv[argv.index("RUN")] = str(finished_run_files(tmp_path / "run", f"npz:{small_npz}"))
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{dataset}", "--out", str(out), "--target", str(tmp_path / "t"),
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "t").exists()


def _record(method, ratio, seed, accuracies, seconds):
    curve = [{"epoch": i + 1.0, "samples_seen": 100 * (i + 1), "train_seconds": s, "test_accuracy": a}
             for i, (a, s) in enumerate(zip(accuracies, seconds))]
    return {"method": method, "prune_ratio": ratio, "seed": seed, "n_kept": 100, "test_accuracy": accuracies[-1],
            "train_seconds": seconds[-1], "samples_seen": curve[-1]["samples_seen"], "curve": curve,
            "train_model": "cnn"}


def test_the_report_and_the_plots_of_retrained_runs_name_both_models(tmp_path, monkeypatch):
    records = evaluation.add_convergence([_record("full", 0.0, 0, [0.5, 0.9], [1.0, 2.0]),
                                          _record("influence", 0.4, 0, [0.7, 0.89], [0.6, 1.2])], 0.013)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records)
    context = {"dataset": "d", "model": "linear → cnn", "models": "scored with linear, retrained cnn"}
    text = evaluation.report_markdown(summary, records, [], goal, {}, context)
    assert text.startswith("# Pruning evaluation — d / linear → cnn\n")
    assert "\n- **models**: scored with linear, retrained cnn\n" in text
    assert "models" not in evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    titles = {}

    def keep(fig, axes, path):
        import matplotlib.pyplot as plt

        titles[path.name] = [ax.get_title() for ax in axes]
        plt.close(fig)
        return str(path)

    monkeypatch.setattr(evaluation, "save_figure", keep)
    evaluation.draw_plots(summary, records, [], tmp_path, models="scored with linear, retrained cnn")
    assert titles["accuracy_vs_ratio.png"][0].endswith("\n(scored with linear, retrained cnn)")
    assert titles["accuracy_vs_time.png"] == ["Convergence, seed 0\n(scored with linear, retrained cnn)"]
    assert evaluation.evaluation_table(records).column("train_model").to_pylist() == ["cnn", "cnn"]


def test_a_cnn_scored_evaluation_retrains_linear(prefect_api, small_npz, cnn_checkpoint, tmp_path, dask_cluster):
    """Scored by the cnn (its checkpoint), every retraining trains `linear`: each row says so, the
    full-data reference lies in the retrain cache under the linear recipe's key, the scoring run's
    own arguments are unchanged, and the report and evaluation.json name both models."""
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--model", "cnn", "--checkpoint", cnn_checkpoint,
                 "--train-model", "linear", "--methods", "influence,random", "--ratios", "0.5", "--seeds", "0",
                 "--gap-samples", "0", "--evaluations-per-epoch", "1", "--shards", "2", "--dask-address",
                 dask_cluster, "--out", str(out), "--target", str(tmp_path / "t")]) == 0
    folder = next(out.glob("eval-*"))
    table = pq.read_table(folder / "evaluation.parquet").to_pylist()
    assert sorted((r["method"], r["train_model"], r["n_kept"]) for r in table) == [
        ("full", "linear", 2000), ("influence", "linear", 1000), ("random", "linear", 1000)]
    ds = load_dataset(f"npz:{small_npz}")
    full_key = evaluation.retrain_key(ds, np.arange(ds.n), replace(TrainArgs(model="linear"), seed=0), 1)
    assert (out / ".cache" / "retrain" / f"{full_key}.json").is_file()
    summary = json.loads((folder / "evaluation.json").read_text())
    assert summary["models"] == {"scored": "cnn", "retrained": "linear"}
    assert summary["arguments"]["train_model"] == "linear"
    scored = json.loads((Path(summary["scores_from"]) / "manifest.json").read_text())["arguments"]
    assert scored["model"] == "cnn" and scored["train_epochs"] is None
    report = (folder / "report.md").read_text()
    assert "/ cnn → linear\n" in report.splitlines()[0] + "\n"
    assert "- **models**: scored with cnn, retrained linear" in report and '"model": "linear"' in report
