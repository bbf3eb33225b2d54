"""The evaluation: convergence bookkeeping, the generalization-gap check on real data, and the
`evaluate-pruning` flow end to end under a real Prefect API with a real Dask LocalCluster."""

import base64
import json
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cifar_shaped, finished_run_files, gpu_worker

from flows.cli import main
from flows.evaluate import evaluate_pruning, influence_selection, rounds_parameters
from flows.parameters import EvaluateParameters
from pruning_core import artifacts, evaluation
from pruning_core.data import Dataset


def _record(method, ratio, seed, accuracies, seconds):
    curve = [{"epoch": i + 1.0, "samples_seen": 100 * (i + 1), "train_seconds": s, "test_accuracy": a}
             for i, (a, s) in enumerate(zip(accuracies, seconds))]
    return {"method": method, "prune_ratio": ratio, "seed": seed, "n_kept": 100, "test_accuracy": accuracies[-1],
            "train_seconds": seconds[-1], "samples_seen": curve[-1]["samples_seen"], "curve": curve}


def test_convergence_targets_and_summary():
    records = [_record("full", 0.0, 0, [0.5, 0.8, 0.9], [1.0, 2.0, 3.0]),
               _record("full", 0.0, 1, [0.5, 0.8, 0.92], [1.0, 2.0, 4.0]),
               _record("influence", 0.4, 0, [0.7, 0.895, 0.899], [0.6, 1.2, 1.8]),
               _record("influence", 0.4, 1, [0.7, 0.85, 0.88], [0.6, 1.2, 2.4]),
               _record("random", 0.4, 0, [0.6, 0.8, 0.85], [0.6, 1.2, 1.8]),
               _record("random", 0.4, 1, [0.6, 0.8, 0.86], [0.6, 1.2, 1.8])]
    evaluation.add_convergence(records, 0.013)
    inf0, inf1 = records[2], records[3]
    assert inf0["target_accuracy"] == pytest.approx(0.887)
    assert inf0["time_to_target"] == 1.2 and inf0["time_ratio"] == pytest.approx(0.4)  # 0.895 ≥ 0.887 at 1.2 s
    assert inf1["time_to_target"] is None  # 0.88 < 0.907: never reached
    assert inf0["samples_ratio"] == pytest.approx(200 / 300)  # by samples seen: 200 of the full run's 300
    summary = evaluation.summarise(records)
    assert [(s["method"], s["prune_ratio"]) for s in summary] == [("full", 0.0), ("influence", 0.4), ("random", 0.4)]
    by = {s["method"]: s for s in summary}
    assert by["influence"]["accuracy"] == pytest.approx(0.8895)
    assert by["influence"]["accuracy_std"] == pytest.approx(np.std([0.899, 0.88], ddof=1))
    assert by["influence"]["reached_target"] == 1
    assert by["influence"]["samples_to_target_ratio"] == pytest.approx(200 / 300)  # over the seeds that reached it
    goal = evaluation.targets(summary, records)
    assert goal["samples_to_target_ratio"] == pytest.approx(200 / 300)
    text = evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    assert "| 0.4 | **influence** | 100 | 88.95 ± 1.34 | 2.1 ± 0.4 | 0.40 | 0.67 | 1/2 |" in text
    assert "0.40× the full run's time; by training samples seen, which the machine's load does not change: " \
           "0.67× (target: time ≤ 0.6× in every seed): NOT met" in text
    assert goal["accuracy_drop"] == pytest.approx(0.91 - 0.8895)
    assert not goal["accuracy_drop_met"] and not goal["time_met"]
    assert evaluation.targets_line(goal) == (  # what `evaluate` prints: a missed target says so
        "at prune ratio 0.4: accuracy drop 2.05 points (≤ 1.3: NOT met), time to target 0.40× the full run's "
        "(≤ 0.6×: NOT met), influence vs others: all met (see the report)")
    assert [(c["versus"], c["met"]) for c in goal["comparisons"]] == [("random", True)]
    (c,) = goal["comparisons"]  # per seed: 0.899 − 0.85 and 0.88 − 0.86
    assert c["paired_seeds"] == 2 and c["margin"] == pytest.approx(0.0345)
    assert c["margin_se"] == pytest.approx(np.std([0.049, 0.02], ddof=1) / np.sqrt(2))


def test_report_says_when_a_margin_is_within_seed_noise():
    """Each comparison carries the standard error of its per-seed paired differences, and the
    report says so where the margin is under two of them."""
    records = [_record("full", 0.0, s, [0.9], [3.0]) for s in range(3)]
    for seed, (a, b, c) in enumerate([(0.885, 0.880, 0.870), (0.881, 0.886, 0.871), (0.887, 0.882, 0.869)]):
        records += [_record("influence", 0.6, seed, [a], [1.0]), _record("ccs", 0.6, seed, [b], [1.0]),
                    _record("random", 0.6, seed, [c], [1.0])]
    evaluation.add_convergence(records, 0.013)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records)
    text = evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    assert "ratio 0.6: influence − ccs = +0.17 points (± 0.33 standard error, paired over 3 seeds; within seed " \
           "noise): met" in text
    assert "ratio 0.6: influence − random = +1.43 points (± 0.23 standard error, paired over 3 seeds): met" in text


def _with_predictions(record, correct):
    return {**record, "test_accuracy": float(correct.mean()), "n_test": len(correct),
            "test_correct": evaluation.pack_correct(correct)}


def test_comparisons_carry_an_interval_over_seeds_and_test_samples():
    """Every seed agreeing is not enough: a 0.3-point lead that three seeds repeat exactly has no
    seed noise at all, yet on 2,000 test samples, with the two models disagreeing on 114 of them,
    it is within the test set's own sampling noise.
    A 3-point lead is resolved; with one seed the interval is over the test samples alone, and
    says so; without per-sample results there is no interval."""
    rng = np.random.default_rng(0)
    n = 2000
    base = rng.random(n) < 0.88
    wrong, right = np.flatnonzero(~base), np.flatnonzero(base)
    small, large = base.copy(), base.copy()  # two retrained models disagree on some samples both ways
    small[wrong[:60]], small[right[:54]] = True, False  # net 6 more right: +0.3 points, the same every seed
    large[wrong[:90]], large[right[:30]] = True, False  # net 60: +3 points
    assert evaluation.unpack_correct(evaluation.pack_correct(small), n).tolist() == small.tolist()
    records = [_with_predictions(_record("full", 0.0, s, [0.9], [3.0]), base) for s in range(3)]
    for seed in range(3):
        records += [_with_predictions(_record("influence", 0.6, seed, [0.0], [1.0]), small),
                    _with_predictions(_record("ccs", 0.6, seed, [0.0], [1.0]), base),
                    _with_predictions(_record("influence", 0.8, seed, [0.0], [1.0]), large),
                    _with_predictions(_record("ccs", 0.8, seed, [0.0], [1.0]), base)]
    evaluation.add_convergence(records, 0.013)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records)
    near, far = sorted((c for c in goal["comparisons"] if c["versus"] == "ccs"), key=lambda c: c["prune_ratio"])
    assert near["margin"] == pytest.approx(0.003) and near["margin_se"] == 0  # the seeds agree exactly
    lo, hi = near["interval"]
    assert lo < 0 < 0.003 < hi and not near["resolved"]
    assert hi - lo > 0.015  # the test draw alone: about ±1.96·√114 / 2000, a point either way
    assert far["resolved"] and 0 < far["interval"][0] < 0.03 < far["interval"][1]
    text = evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    assert ("ratio 0.6: influence − ccs = +0.30 points (± 0.00 standard error, paired over 3 seeds); "
            f"95 % interval over seeds and test samples [{100 * lo:+.2f}, {100 * hi:+.2f}], "
            "not resolved by this test set: met") in text
    assert ("ratio 0.8: influence − ccs = +3.00 points (± 0.00 standard error, paired over 3 seeds); "
            "95 % interval") in text
    bare = [{k: v for k, v in r.items() if k != "test_correct"} for r in records]
    assert evaluation.paired_interval(bare, "influence", "ccs", 0.6) is None
    one = [r for r in records if r["seed"] == 0]  # as `make demo` evaluates
    goal = evaluation.targets(evaluation.summarise(one), one)
    (single,) = [c for c in goal["comparisons"] if c["versus"] == "ccs" and c["prune_ratio"] == 0.8]
    assert single["paired_seeds"] == 1 and single["resolved"] and single["interval"][0] < 0.03 < single["interval"][1]
    text = evaluation.report_markdown(evaluation.summarise(one), one, [], goal, {}, {"dataset": "d", "model": "m"})
    assert "+3.00 points; 95 % interval over test samples (one seed: seed noise not included) [" in text


def test_every_ratio_compares_every_method_and_the_parquet_reads_back_the_same(tmp_path):
    """Below 0.4 only random is a target, but the other methods are measured the same way and
    reported as no target; rows read back from evaluation.parquet (test_correct as raw bytes)
    give the same intervals as the flow's records (base64)."""
    rng = np.random.default_rng(1)
    n = 1000
    records = [_with_predictions(_record("full", 0.0, s, [0.9], [3.0]), rng.random(n) < 0.9) for s in range(2)]
    for ratio in (0.2, 0.4):
        for seed in range(2):
            records += [_with_predictions(_record(m, ratio, seed, [0.0], [1.0]), rng.random(n) < p)
                        for m, p in (("influence", 0.89), ("el2n", 0.88), ("random", 0.87))]
    evaluation.add_convergence(records, 0.013)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records)
    assert [(c["prune_ratio"], c["versus"]) for c in goal["comparisons"]] == [(0.2, "random"), (0.4, "el2n"),
                                                                              (0.4, "random")]
    (other,) = goal["other_comparisons"]
    assert (other["prune_ratio"], other["versus"], other["met"]) == (0.2, "el2n", None) and other["interval"]
    text = evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    assert "Below ratio 0.4 only random is a target; the other methods, measured the same way:" in text
    assert f"- ratio 0.2: influence − el2n = {100 * other['margin']:+.2f} points" in text
    assert text.count(": not a target\n") == 1
    artifacts.save_parquet(evaluation.evaluation_table(records), tmp_path / "evaluation.parquet")
    rows = pq.read_table(tmp_path / "evaluation.parquet").to_pylist()
    assert isinstance(rows[0]["test_correct"], bytes)
    for ratio, versus in ((0.2, "el2n"), (0.4, "random")):
        assert evaluation.paired_interval(rows, "influence", versus, ratio) == \
            evaluation.paired_interval(records, "influence", versus, ratio)


def test_a_pooled_interval_treats_each_fold_as_its_own_test_set():
    """The folds of a cross-validation are separate test sets (the same seeds in each): pairs are
    matched within a fold, each fold is resampled on its own, and four folds' held-out samples
    give an interval about half as wide as one fold's; one fold alone gives what it gave without."""
    rng = np.random.default_rng(2)
    n, records = 2000, []
    for fold in range(4):
        base = rng.random(n) < 0.88
        for seed in range(3):
            better = base.copy()
            flip = rng.choice(n, 150, replace=False)
            better[flip] = rng.random(150) < 0.95
            records += [{**_with_predictions(_record("influence", 0.4, seed, [0.0], [1.0]), better), "fold": fold},
                        {**_with_predictions(_record("ccs", 0.4, seed, [0.0], [1.0]), base), "fold": fold}]
    one = [r for r in records if r["fold"] == 0]
    lo1, hi1 = evaluation.paired_interval(one, "influence", "ccs", 0.4)
    assert evaluation.paired_interval(one, "influence", "ccs", 0.4, by="fold") == (lo1, hi1)
    d = evaluation.paired_differences(records, "influence", "ccs", 0.4, by="fold")
    assert len(d) == 12 and len(evaluation.paired_differences(records, "influence", "ccs", 0.4)) == 3  # seeds collide
    lo, hi = evaluation.paired_interval(records, "influence", "ccs", 0.4, by="fold")
    assert lo < d.mean() < hi
    assert 0.35 < (hi - lo) / (hi1 - lo1) < 0.7


def pool(x: np.ndarray, side: int) -> np.ndarray:
    """28x28 uint8 images (n, 1, 28, 28) average-pooled to side x side, still uint8."""
    k = 28 // side
    return x.astype(np.float64).reshape(len(x), 1, side, k, side, k).mean((3, 5)).round().astype(np.uint8)


def test_the_gain_panel_zooms_past_a_collapse_and_names_what_it_cuts():
    """A baseline 30 points below random would flatten every other gain to a line at 0: the
    panel stops at GAIN_FLOOR and names, per prune ratio, what falls below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    gains = [(40.0, "influence", 0.9), (40.0, "el2n", 0.8), (80.0, "influence", 1.7), (80.0, "el2n", -35.5),
             (80.0, "forgetting", -33.7)]
    for x, _, g in gains:
        ax.plot([x], [g], "o")
    labels = evaluation.zoom_gains(ax, gains)
    assert labels == ["below:\nel2n -35.5\nforgetting -33.7"]
    bottom, top = ax.get_ylim()
    assert bottom == evaluation.GAIN_FLOOR and top > 1.7
    assert [t.get_text() for t in ax.texts] == labels
    fig.clf()
    ax = fig.subplots()
    ax.plot([40, 80], [-2.5, 1.0], "o")
    before = ax.get_ylim()
    assert evaluation.zoom_gains(ax, [(40.0, "el2n", -2.5), (80.0, "el2n", 1.0)]) == [] and ax.get_ylim() == before
    plt.close(fig)


def test_without_random_the_gain_panel_compares_with_the_full_data(tmp_path, monkeypatch):
    """An evaluation of methods without random left the right panel blank (its legend alone)."""
    panels = {}

    class Drawn(Exception):
        pass

    def keep(fig, axes, path):  # the first figure is the one looked at: stop there
        panels[path.name] = axes
        raise Drawn

    monkeypatch.setattr(evaluation, "save_figure", keep)
    summary = [{"method": "full", "prune_ratio": 0.0, "accuracy": 0.9024, "accuracy_std": 0.001}]
    for method, accuracies in (("influence", (0.9017, 0.8663)), ("grand", (0.9006, 0.5302))):
        summary += [{"method": method, "prune_ratio": r, "accuracy": a, "accuracy_std": 0.002}
                    for r, a in zip((0.2, 0.8), accuracies)]
    with pytest.raises(Drawn):
        evaluation.draw_plots(summary, [], [], tmp_path)
    _, delta = panels["accuracy_vs_ratio.png"]
    assert delta.get_visible() and "full data" in delta.get_ylabel()
    drawn = {line.get_label() for line in delta.get_lines()}
    assert {"full data"} <= drawn and len(delta.containers) == 2  # influence's and grand's error bars
    bottom, _ = delta.get_ylim()
    assert bottom <= 100 * (0.8663 - 0.9024) < -3  # the product's own line in view, below the usual floor
    assert any("grand -37.2" in t.get_text() for t in delta.texts)


def test_removal_overlaps_against_the_influence_set(tmp_path):
    ids = np.arange(10)

    def selection(name, pruned_rows):
        pruned = np.isin(ids, pruned_rows)
        artifacts.save_parquet(artifacts.selection_table(ids, pruned, {}), tmp_path / f"{name}.parquet")
        return str(tmp_path / f"{name}.parquet")

    selections = [
        {"path": selection("inf", [0, 1, 2, 3]), "method": "influence", "prune_ratio": 0.4, "draw_seed": None},
        {"path": selection("el2n", [0, 1, 2, 9]), "method": "el2n", "prune_ratio": 0.4, "draw_seed": None},
        {"path": selection("r1", [5, 6, 7, 8]), "method": "random", "prune_ratio": 0.4, "draw_seed": 1},
        {"path": selection("r0", [3, 4, 5, 6]), "method": "random", "prune_ratio": 0.4, "draw_seed": 0},
        {"path": selection("el2n6", [0, 1, 2, 3, 4, 5]), "method": "el2n", "prune_ratio": 0.6, "draw_seed": None},
    ]
    assert evaluation.removal_overlaps(selections) == [  # random by its seed-0 draw; 0.6 has no influence set
        {"prune_ratio": 0.4, "method": "el2n", "removed": 4, "also_removed": 0.75, "jaccard": 3 / 5},
        {"prune_ratio": 0.4, "method": "random", "removed": 4, "also_removed": 0.25, "jaccard": 1 / 7}]


@pytest.mark.integration  # retrains linear on 1,500 samples at each of 5 points
def test_generalization_gap_on_real_linear_data(fmnist):
    """The paper's theory check on Fashion-MNIST `linear`: the measured parameter change tracks
    the predicted one over ε and the test-loss change stays under Lip·‖Σ s_i‖ (the full-size
    check, 784 pixels and 5,000 samples, runs in every evaluation and is in its report)."""
    pooled = Dataset("fashion-mnist 7x7", pool(fmnist.x, 7), fmnist.y, fmnist.sample_id, pool(fmnist.x_test, 7),
                     fmnist.y_test, 10)  # 7x7 average-pooled: p = 500, so the check runs in seconds
    gaps = evaluation.gap_check("linear", pooled, samples=1500, points=5, weight_decay=0.01)
    assert len(gaps) >= 4 and all(g["n_pruned"] > 0 for g in gaps)
    assert sorted(g["n_pruned"] for g in gaps) == [g["n_pruned"] for g in gaps]  # larger ε, larger R
    assert evaluation.pearson([g["predicted_norm"] for g in gaps], [g["measured_norm"] for g in gaps]) >= 0.95
    assert gaps[0]["cosine"] > 0.99 and abs(gaps[0]["measured_norm"] / gaps[0]["predicted_norm"] - 1) < 0.1
    assert all(g["predicted_norm"] <= g["epsilon"] * (1 + 1e-9) for g in gaps)
    assert all(abs(g["test_loss_gap"]) <= g["bound"] for g in gaps)


def test_the_linear_gap_problem_pools_pixels_that_are_too_many(fmnist):
    """Linear on CIFAR-10's 3x32x32 pixels has 30,730 parameters: its dense Hessian and factor took
    more than 23 GiB and the check was killed. Pixels are 2x2-pooled until the problem has at most
    8,192 parameters; Fashion-MNIST's 7,850 stay as they are (the committed check unchanged), the
    report names the pooling."""
    x = fmnist.x[:50]
    rows, times = evaluation._pixels(x, 10)
    assert times == 0 and np.array_equal(rows, x.reshape(50, -1) / 255)  # as the pixels are used: in [0, 1]
    cifar = cifar_shaped(x)
    cifar[:, 1] = 255 - cifar[:, 1]  # channels that differ: pooled each on its own
    rows, times = evaluation._pixels(cifar, 10)
    assert times == 1 and rows.shape == (50, 3 * 16 * 16) and (rows.shape[1] + 1) * 10 <= 8192
    means = (cifar / 255).reshape(50, 3, 16, 2, 16, 2).mean((3, 5))
    assert np.allclose(rows, means.reshape(50, -1)) and not np.allclose(rows[:, :256], rows[:, 256:512])
    assert evaluation._pixels(cifar, 100)[1] == 3  # CIFAR-100: 3x4x4 pixels, 4,900 parameters
    small = Dataset("cifar-shaped", cifar, fmnist.y[:50], np.arange(50), cifar_shaped(fmnist.x_test[:20]),
                    fmnist.y_test[:20], 10)
    assert evaluation._head_problem("linear", small, np.arange(50), None, None)[2] == "linear on 2x2-pooled pixels"


@pytest.fixture(scope="module")
def pooled_npz(small_npz, tmp_path_factory) -> str:
    """`small_npz` 2x2 average-pooled to 14x14: `linear` then has 1,970 parameters instead of
    7,850, so the exact H⁻¹ of its scoring run and gap check take a second, not a minute."""
    with np.load(small_npz) as data:
        pooled = {k: pool(data[k], 14) if k.startswith("x") else data[k] for k in data.files}
    path = tmp_path_factory.mktemp("pooled") / "fmnist-small-14x14.npz"
    np.savez(path, **pooled)
    return str(path)


def test_gap_samples_beyond_the_training_set_use_all_of_them_and_say_so(prefect_api, pooled_npz, caplog):
    from prefect import flow

    from pruning_core.refs import DatasetRef
    from tasks.evaluate import generalization_gap

    @flow
    def gap_only():
        return generalization_gap("linear", DatasetRef(f"npz:{pooled_npz}"), 5000, 2, 0.01)

    with caplog.at_level("WARNING"):
        gaps = gap_only()
    assert gaps and {g["n"] for g in gaps} == {2000}
    assert "--gap-samples 5000 is more than the 2000 training samples: the check uses all of them" in caplog.text


def test_evaluate_flow_end_to_end(prefect_api, pooled_npz, tmp_path, capsys, dask_cluster):
    out = tmp_path / "runs"
    code = main(["evaluate", "--dataset", f"npz:{pooled_npz}", "--model", "linear", "--methods", "influence,random",
                 "--ratios", "0.5", "--seeds", "0,1", "--gap-samples", "300", "--gap-points", "3",
                 "--evaluations-per-epoch", "2", "--shards", "2", "--dask-address", dask_cluster, "--out", str(out),
                 "--target", str(tmp_path / "t")])
    assert code == 0
    printed = capsys.readouterr().out
    folder = next(p for p in out.iterdir() if p.name.startswith("eval-"))
    assert f"report:            {folder / 'report.md'}" in printed
    table = pq.read_table(folder / "evaluation.parquet").to_pylist()
    assert sorted((r["method"], r["prune_ratio"], r["seed"]) for r in table) == [
        ("full", 0.0, 0), ("full", 0.0, 1), ("influence", 0.5, 0), ("influence", 0.5, 1),
        ("random", 0.5, 0), ("random", 0.5, 1)]
    assert {r["n_kept"] for r in table if r["method"] != "full"} == {1000}
    assert all(0.3 < r["test_accuracy"] <= 1 and r["target_accuracy"] is not None for r in table)
    for r in table:  # which test samples each run got right, as the accuracy counts them
        correct = np.unpackbits(np.frombuffer(r["test_correct"], np.uint8), count=r["n_test"])
        assert r["n_test"] == 500 and correct.mean() == pytest.approx(r["test_accuracy"])
    summary = json.loads((folder / "evaluation.json").read_text())
    assert summary["scores_from"]
    # random draws once per seed; at 0.5 (no hard share cut) the influence method's candidates come
    # easiest first: one selection, trained with every seed
    assert all(r["selection_seed"] == r["seed"] for r in table if r["method"] == "random")
    assert all(r["selection_seed"] is None for r in table if r["method"] == "influence")
    draws = [pq.read_table(folder / "selections" / f"random-r0.5-s{seed}.parquet").column("pruned") for seed in (0, 1)]
    assert not draws[0].equals(draws[1]) and (folder / "selections" / "influence-r0.5.parquet").exists()
    report = (folder / "report.md").read_text()
    (c,) = [c for c in summary["targets"]["comparisons"] if c["versus"] == "random"]
    assert c["interval"][0] < c["margin"] < c["interval"][1] and "95 % interval over seeds and test samples" in report
    (overlap,) = summary["overlaps"]  # random's first draw against the influence set, from the files themselves
    influence_set, first_draw = (pq.read_table(folder / "selections" / f"{name}.parquet").column("pruned").to_numpy(
        zero_copy_only=False) for name in ("influence-r0.5", "random-r0.5-s0"))
    assert overlap == {"prune_ratio": 0.5, "method": "random", "removed": 1000,
                       "also_removed": pytest.approx((influence_set & first_draw).sum() / 1000),
                       "jaccard": pytest.approx((influence_set & first_draw).sum()
                                                / (influence_set | first_draw).sum())}
    assert f"| 0.5 | random | 1000 | {100 * overlap['also_removed']:.1f} % |" in report
    for name in ("accuracy_vs_ratio", "accuracy_vs_time", "generalization_gap", "comparisons", "removal_overlap"):
        assert f"(plots/{name}.png)" in report
        image = mpimg.imread(folder / "plots" / f"{name}.png")
        assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0.05  # drawn, not blank
    assert "| 0.5 | **influence** | 1000 |" in report and "Pearson(predicted, measured)" in report
    assert "(`--coverage difficulty`)" in report and "(`--candidates " in report  # how influence chose, in words
    assert "hardest share cut first (0 % at ratio 0.5: the schedule (r − 0.5) / 2)" in report
    assert f"torch {torch.__version__} · CPU capability {torch.backends.cpu.get_cpu_capability()}" in report
    assert not any((out / ".staging").iterdir())
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the report in the UI carries its plots (it cannot read files)
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pruning-evaluation"])))
    (artifact,) = [a for a in found if a.description == f"evaluation {folder.name}"]
    inline = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact.data)
    assert sorted(base64.b64decode(data) for data in inline) == sorted(
        (folder / "plots" / f"{name}.png").read_bytes()
        for name in ("accuracy_vs_ratio", "accuracy_vs_time", "generalization_gap", "comparisons", "removal_overlap"))

    # Each finished retraining was recorded as it completed: a second evaluation (as after an
    # interruption) trains nothing again, and reports the very same runs.
    # The scoring run's folder moved meanwhile: its manifest still names where it was made, and the
    # evaluation reads the folder it is given.
    assert len(list((out / ".cache" / "retrain").glob("*.json"))) == 6
    moved = tmp_path / "moved-run"
    shutil.move(summary["scores_from"], moved)
    assert main(["evaluate", "--dataset", f"npz:{pooled_npz}", "--model", "linear", "--methods", "influence,random",
                 "--ratios", "0.5", "--seeds", "0,1", "--gap-samples", "0", "--evaluations-per-epoch", "2",
                 "--from-run", str(moved), "--dask-address", dask_cluster, "--out", str(out),
                 "--target", str(tmp_path / "t")]) == 0
    again = next(p for p in out.iterdir() if p.name.startswith("eval-") and p != folder)
    assert json.loads((again / "evaluation.json").read_text())["scores_from"] == str(moved.resolve())
    key = ("method", "prune_ratio", "seed", "n_kept", "test_accuracy", "train_seconds", "curve")
    assert sorted(tuple(str(r[k]) for k in key) for r in pq.read_table(again / "evaluation.parquet").to_pylist()) == \
        sorted(tuple(str(r[k]) for k in key) for r in table)
    assert len(list((out / ".cache" / "retrain").glob("*.json"))) == 6

    # The bucketed solver, as a deployment's parameters ask for it (or `evaluate --solver bucketed`):
    # the selections map their buckets over the evaluation's scheduler from the flow; as Dask tasks
    # they failed ("the bucketed solver needs the run's Dask scheduler address")
    bucketed = evaluate_pruning(EvaluateParameters(
        dataset=f"npz:{pooled_npz}", model="linear", methods=["influence"], ratios=[0.5], seeds=[0], gap_samples=0,
        evaluations_per_epoch=2, from_run=str(moved), solver="bucketed", dask_address=dask_cluster, out=str(out),
        target=str(tmp_path / "t")))
    third = Path(bucketed["report"]).parent
    (row,) = [r for r in pq.read_table(third / "evaluation.parquet").to_pylist() if r["method"] == "influence"]
    assert row["n_kept"] == 1000
    chosen = pq.read_schema(third / "selections" / "influence-r0.5.parquet").metadata[b"dataset_pruning"]
    assert json.loads(chosen)["solver"] == "bucketed" and json.loads(chosen)["n_pruned"] == 1000


def test_gpu_retrainings_run_only_on_the_workers_that_offer_the_resource(prefect_api, pooled_npz, tmp_path,
                                                                          dask_cluster):
    """`evaluate --gpu`: the retrainings, not only the scoring run's shards, ask for the Dask
    resource GPU=1, so on a cluster of two plain workers and one offering it (a `dask worker
    --resources GPU=1`, as on a GPU host, joining the session's cluster for this test) only that
    worker trains them; without it they went to any worker, and a 30-epoch ResNet-18 trained on a
    CPU. (They compute on its CPU here.)"""
    from distributed import Client, get_task_stream

    with Client(dask_cluster) as client, gpu_worker(client):  # retired and stopped on leaving
        with get_task_stream(client) as stream:
            result = evaluate_pruning(EvaluateParameters(
                dataset=f"npz:{pooled_npz}", model="linear", methods=["random"], ratios=[0.25, 0.5],
                seeds=[0, 1], gap_samples=0, evaluations_per_epoch=2, shards=2, gpu=True,
                dask_address=dask_cluster, out=str(tmp_path / "runs"), target=str(tmp_path / "t")))
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    ran = {}
    for task in stream.data:
        ran.setdefault(task["key"].rsplit("-", 1)[0], []).append(names[task["worker"]])
    assert len(ran["retrain"]) == 6 and set(ran["retrain"]) == {"gpu-worker"}  # full and 2 ratios, 2 seeds each
    assert set(ran["features_shard"]) == set(ran["influence_shard"]) == {"gpu-worker"}  # the scoring run's
    assert len(pq.read_table(Path(result["run_dir"]) / "evaluation.parquet")) == 6


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0.4,1.5"], "--ratios"),
    (["--methods", "influence,bogus"], "--methods"),
    (["--seeds", "0,x"], "--seeds"),
    (["--gap-samples", "50"], "--gap-samples"),
    (["--from-run", "/nonexistent/run"], "--from-run"),
    (["--from-run", "/nonexistent/run", "--prune-ratio", "0.5"], "--prune-ratio with --from-run: no scoring run"),
    (["--seeds", "0,1,0"], "--seeds must be distinct"),
    (["--methods", "influence,random,influence"], "--methods lists influence more than once"),
    (["--ratios", "0.4,0.6,0.4"], "--ratios lists 0.4 more than once"),
    (["--seeds", "1,,2"], "'1,,2' has an empty entry"),
    (["--methods", "influence,,random"], "'influence,,random' has an empty entry"),
])
def test_evaluate_bad_input_exits_2(argv, message, small_npz, tmp_path, capsys):
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--out", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "runs").exists()



@pytest.mark.parametrize("damage, message", [
    ("no model", "not a finished run folder (no manifest.json, scores.parquet or model.pt)"),
    ("manifest not JSON", "manifest.json: cannot be read as a run's manifest (Expecting"),
    ("manifest a list", "manifest.json: not a run's manifest"),
    ("scores cut short", "its scores.parquet: cannot be read as Parquet (Parquet magic bytes not found"),
    ("scores damaged inside", "its scores.parquet: cannot be read as Parquet"),
])
def test_evaluate_refuses_a_damaged_run_folder_before_it_trains(damage, message, small_npz, tmp_path, capsys):
    """A copied or half-deleted run folder: one line, exit 2, nothing written. The scores are read
    whole: a file damaged inside has a sound footer and schema."""
    run = finished_run_files(tmp_path / "run", f"npz:{small_npz}")
    rng = np.random.default_rng(1)
    scores = (run / "scores.parquet").read_bytes()
    if damage == "no model":
        (run / "model.pt").unlink()
    elif damage == "manifest not JSON":
        (run / "manifest.json").write_text("{bad")
    elif damage == "manifest a list":
        (run / "manifest.json").write_text("[]")
    elif damage == "scores cut short":
        (run / "scores.parquet").write_bytes(scores[:len(scores) // 2])
    else:  # inside the vectors' compressed pages, the footer intact
        inside = int(0.7 * len(scores))
        (run / "scores.parquet").write_bytes(scores[:inside] + rng.bytes(512) + scores[inside + 512:])
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--from-run", str(run), "--out", str(out),
                 "--target", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize("argv, message", [
    (["--hard-cut", "0.1"], "--hard-cut applies to the influence method and ccs, which --methods el2n does not list"),
    (["--swap-rounds", "3"], "--swap-rounds applies to the influence method, which --methods el2n does not list"),
    (["--candidates", "uniform", "--solver", "scip"], "--solver, --candidates apply to the influence method"),
    (["--rounds", "2"], "--rounds applies to the influence method, which --methods el2n does not list"),
])
def test_influence_options_without_the_influence_method_are_refused(argv, message, small_npz, tmp_path, capsys):
    """With --from-run (no scoring run of its own) and --methods without influence, these options
    changed nothing and the whole evaluation ran (--rounds 2 trained rounds for nothing)."""
    run = finished_run_files(tmp_path / "run", f"npz:{small_npz}")
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{small_npz}", "--from-run", str(run), "--methods", "el2n",
                 "--ratios", "0.4", "--seeds", "0", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    if argv[0] == "--hard-cut":  # which acts on ccs too
        EvaluateParameters(dataset=f"npz:{small_npz}", from_run=str(run), methods=["el2n", "ccs"],
                           hard_cut=0.1)._check_selection_options_apply()


def test_selections_that_draw_at_random_are_drawn_once_per_seed():
    from flows.parameters import EvaluateParameters

    params = EvaluateParameters(methods=["influence", "el2n", "ccs"], ratios=[0.4, 0.6, 0.8], seeds=[0, 1])

    def uniform(method, ratio):
        return params.selection_args_for(method, ratio, 0).candidates == "uniform"

    names = [job["name"] for job in evaluation.selection_jobs(params.eval_args(), draws=uniform)]
    assert names == ["influence-r0.4",  # 0.4: easiest first, 0.6: a seeded uniform order, 0.8: smallest ‖s_i‖ first
                     "influence-r0.6-s0", "influence-r0.6-s1", "influence-r0.8", "el2n-r0.4", "el2n-r0.6", "el2n-r0.8",
                     "ccs-r0.4-s0", "ccs-r0.4-s1", "ccs-r0.6-s0", "ccs-r0.6-s1", "ccs-r0.8-s0", "ccs-r0.8-s1"]
    assert [job["name"] for job in evaluation.selection_jobs(params.eval_args())][:3] == ["influence-r0.4",
                                                                                        "influence-r0.6",
                                                                                        "influence-r0.8"]


def test_the_solver_of_an_evaluation_is_the_influence_method_s():
    """A baseline ranks or draws its removals and refuses a solver: an evaluation with
    `solver: bucketed` (a deployment's parameter) gives it to the influence method alone."""
    bucketed = EvaluateParameters(solver="bucketed")
    assert [bucketed.selection_args_for(m, 0.4, 0).solver for m in ("influence", "random", "el2n")] == \
        ["bucketed", "greedy", "greedy"]


def test_auto_candidates_take_the_easiest_first_where_no_hard_share_is_cut():
    """`--candidates auto` under difficulty coverage: easiest where β = 0, uniform where a hardest
    share is cut, smallest from 70 %, uniform again from 90 % (extreme budgets); a longer recipe (β shifted
    to 0 at 60 %) or an explicit
    --hard-cut moves the boundary with β; baselines and `--coverage none` keep `smallest`."""
    from flows.parameters import selection_args

    def order(ratio, **kw):
        return selection_args("influence", ratio, None, "greedy", 0, False, kw.pop("coverage", "auto"), "auto",
                              **kw).candidates

    assert [order(r) for r in (0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.98)] == ["easiest", "easiest", "easiest", "uniform",
                                                                       "smallest", "uniform", "uniform"]
    assert order(0.4, hard_cut=0.1) == "uniform" and order(0.6, hard_cut=0.0) == "easiest"
    assert order(0.6, train_budget=2.0) == "easiest" and order(0.4, train_budget=0.5) == "uniform"
    assert order(0.4, coverage="none") == "smallest"
    assert selection_args("ccs", 0.4, None, "greedy", 0, False, "auto", "auto").candidates == "smallest"


def test_retraining_longer_than_the_scoring_run_shifts_the_hard_cut(tmp_path):
    """An evaluation that retrains a --from-run's scores with twice its epochs selects with the
    schedule shifted (10 % cut at 80 % pruned, not 15 %), with half of them 25 %; the baselines keep their published
    schedules; a scoring run of its own trains as long as it retrains; train_epochs is refused."""

    from flows.parameters import EvaluateParameters
    from pruning_core.errors import BadInputError

    run = tmp_path / "run"
    run.mkdir()
    arguments = {"dataset": "fashion-mnist", "model": "cnn", "data_root": None, "epochs": None}  # cnn default: 4
    (run / "manifest.json").write_text(json.dumps({"arguments": arguments}))
    columns = {"sample_id": np.arange(2), "label": np.arange(2), "loss": np.zeros(2), "el2n": np.zeros(2),
               "forgetting": np.zeros(2, np.int64)}
    pq.write_table(artifacts.scores_table(columns, np.ones((2, 3)), embedding=np.ones((2, 3))), run / "scores.parquet")
    (run / "model.pt").write_bytes(b"")  # not read here
    params = EvaluateParameters(from_run=str(run), epochs=8, ratios=[0.6, 0.8])
    params.validate_all()
    assert params.train_budget() == 2.0
    assert [params.selection_args_for("influence", r, 0).coverage_cut() for r in (0.6, 0.8)] == [0.0, 0.1]
    assert params.selection_args_for("ccs", 0.8, 0).train_budget == 1.0
    # in rounds, the later rounds score with the scoring run's 4 epochs and select for 8, as round 1
    later = rounds_parameters(params.model_copy(update={"rounds": 2}), 0.8)
    assert (later.epochs, later.train_budget(), later.prune_ratio) == (4, 2.0, 0.8)
    assert later.selection_args_for("influence", 0.6, 0).coverage_cut() == 0.0
    assert rounds_parameters(EvaluateParameters(epochs=8, rounds=2), 0.8).train_budget() == 1.0  # scored with 8
    assert EvaluateParameters(epochs=8).selection_args_for("influence", 0.8, 0).coverage_cut() == 0.15
    shorter = EvaluateParameters(from_run=str(run), epochs=2, ratios=[0.6, 0.8])  # half the epochs: more is cut
    assert [shorter.selection_args_for("influence", r, 0).coverage_cut() for r in (0.6, 0.8)] == [0.15, 0.25]
    assert ("25 % at ratio 0.8: the schedule (r − 0.5 − 0.2·log2 0.5) / 2, retraining 0.5×"
            in influence_selection(shorter))
    # the report says whether the solver's path is the answer, and names --swap-rounds when given
    assert influence_selection(shorter).endswith("the greedy path kept as the answer (no swap search)")
    assert influence_selection(EvaluateParameters(swap_rounds=0)).endswith("(no swap search: `--swap-rounds 0`)")
    assert influence_selection(EvaluateParameters(swap_rounds=500)).endswith(
        "at most 500 swap rounds after the greedy path (`--swap-rounds 500`)")
    with pytest.raises(BadInputError, match="retrains with its own epochs"):
        EvaluateParameters(from_run=str(run), train_epochs=8).validate_all()
    with pytest.raises(BadInputError, match="checkpoint with from_run: the run .* brings its own scores and model"):
        EvaluateParameters(from_run=str(run), checkpoint=str(run / "manifest.json")).validate_all()


def test_evaluate_in_rounds_rescores_the_influence_method_only(prefect_api, pooled_npz, tmp_path, capsys,
                                                                dask_cluster):
    """--rounds 2: the influence method's set at 0.5 is pruned 25 % by the scoring run's model, then
    a third of the rest by a fresh model trained on what round 1 kept; random stays one draw per
    seed; the selection names each sample's round and the report says how the set was chosen."""
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{pooled_npz}", "--model", "linear", "--methods", "influence,random",
                 "--ratios", "0.5", "--seeds", "0", "--gap-samples", "0", "--evaluations-per-epoch", "1",
                 "--shards", "2", "--rounds", "2", "--dask-address", dask_cluster, "--out", str(out),
                 "--target", str(tmp_path / "t")]) == 0
    folder = next(p for p in out.iterdir() if p.name.startswith("eval-"))
    selection = pq.read_table(folder / "selections" / "influence-r0.5.parquet")
    in_round = selection.column("round").to_numpy()
    assert [(in_round == j).sum() for j in (0, 1, 2)] == [1000, 500, 500]
    round_two = folder / "rounds" / "influence-r0.5" / "round-2"
    scores, _, meta = artifacts.load_scores(round_two / "scores.parquet")
    assert scores.column("sample_id").to_numpy().tolist() == np.flatnonzero(in_round != 1).tolist()
    summary = json.loads((folder / "evaluation.json").read_text())
    first = artifacts.load_manifest(Path(summary["scores_from"]))
    assert meta["checkpoint_sha256"] != first["checkpoint_sha256"]
    table = pq.read_table(folder / "evaluation.parquet").to_pylist()
    assert sorted((r["method"], r["n_kept"]) for r in table) == [("full", 2000), ("influence", 1000), ("random", 1000)]
    report = (folder / "report.md").read_text()
    assert "in 2 rounds (`--rounds 2`), each removing an equal share of the samples (of those still kept: 25 %, " \
           "33.3 % at ratio 0.5)" in report
    assert not any((out / ".staging").iterdir())
