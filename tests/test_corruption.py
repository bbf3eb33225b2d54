"""Messy training sets made from real data: symmetric label noise and a long tail, reproducible by
seed, applied to the training split only, stored as a Delta table every process reads; and the
command line's refusals of settings out of range."""

import numpy as np
import pytest

from flows.cli import main
from pruning_core import corruption
from pruning_core.data import load_dataset
from pruning_core.errors import BadInputError


@pytest.fixture(scope="module")
def slice_npz(fmnist, tmp_path_factory) -> str:
    """20 training images of every Fashion-MNIST class and 100 test images, as an npz source."""
    rows = np.concatenate([np.flatnonzero(fmnist.y == c)[:20] for c in range(10)])
    path = tmp_path_factory.mktemp("slice") / "fmnist-200.npz"
    np.savez(path, x=fmnist.x[rows], y=fmnist.y[rows], x_test=fmnist.x_test[:100], y_test=fmnist.y_test[:100])
    return str(path)


def test_flips_are_binomial_never_to_the_same_class_and_uniform_over_the_others(fmnist):
    y, rate, C = fmnist.y[:6000], 0.3, 10
    counts, shifts = [], np.zeros(C, np.int64)
    for seed in range(200):
        noisy, flipped = corruption.flip_labels(y, C, rate, seed)
        assert (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
        counts.append(int(flipped.sum()))
        shifts += np.bincount((noisy[flipped] - y[flipped]) % C, minlength=C)
    # Binomial(6000, 0.3): mean 1800, variance 1260; over 200 draws the mean is within 4 of its
    # standard errors (2.5) and the variance within 4 of its (126)
    assert abs(np.mean(counts) - 1800) < 10 and abs(np.var(counts, ddof=1) - 1260) < 504
    assert shifts[0] == 0  # every other class equally likely: each of the 9 shifts gets a ninth
    expected = shifts.sum() / (C - 1)
    assert np.abs(shifts[1:] - expected).max() < 4 * np.sqrt(expected)
    again, flipped_again = corruption.flip_labels(y, C, rate, 7)
    assert np.array_equal(again, corruption.flip_labels(y, C, rate, 7)[0])  # reproducible by the seed
    assert not np.array_equal(flipped_again, corruption.flip_labels(y, C, rate, 8)[1])


def test_a_long_tail_follows_the_exponential_profile_and_never_empties_a_class(fmnist):
    counts = np.bincount(fmnist.y, minlength=10)  # 6,000 each
    kept = corruption.long_tail_counts(counts, 0.01)
    assert kept.tolist() == [round(6000 * 0.01 ** (c / 9)) for c in range(10)]
    assert kept[0] == 6000 and kept[-1] == 60
    assert corruption.long_tail_counts(np.full(10, 20), 0.01).tolist()[-2:] == [1, 1]  # 20·0.01^(8/9) rounds to 0
    assert corruption.long_tail_counts(np.full(10, 20), 1.0).tolist() == [20] * 10
    assert corruption.long_tail_counts(np.array([5, 300, 0, 300]), 0.5).tolist() == [5, 238, 0, 150]
    y = fmnist.y[:12000]
    rows = corruption.long_tail_rows(y, 10, 0.1, seed=3)
    assert np.bincount(y[rows], minlength=10).tolist() == corruption.long_tail_counts(np.bincount(y), 0.1).tolist()
    assert np.array_equal(rows, np.sort(rows)) and len(np.unique(rows)) == len(rows)
    assert np.array_equal(rows, corruption.long_tail_rows(y, 10, 0.1, seed=3))
    assert not np.array_equal(rows, corruption.long_tail_rows(y, 10, 0.1, seed=4))


def test_the_training_split_is_corrupted_and_the_test_split_left_as_it_was(slice_npz):
    ds = load_dataset(f"npz:{slice_npz}")
    bad, record = corruption.corrupt(ds, 0.3, 0.1, seed=5)
    assert bad.x_test is ds.x_test and bad.y_test is ds.y_test and bad.n_classes == 10
    rows = np.searchsorted(ds.sample_id, bad.sample_id)
    assert np.array_equal(ds.sample_id[rows], bad.sample_id) and np.array_equal(bad.x, ds.x[rows])
    true = ds.y[rows]
    assert np.bincount(true, minlength=10).tolist() == record["class_counts"] == \
        corruption.long_tail_counts(np.full(10, 20), 0.1).tolist()  # the tail is drawn on the true labels
    changed = bad.sample_id[bad.y != true]
    assert record["flipped"] == changed.tolist() and record["n_flipped"] == len(changed) > 0
    assert record["n"] == bad.n and record["n_source"] == 200 and record["source_fingerprint"] == ds.fingerprint
    clean, nothing = corruption.corrupt(ds, 0.0, 1.0, seed=5)
    assert clean.fingerprint == ds.fingerprint and nothing["flipped"] == []


def test_a_corrupted_set_is_a_delta_table_every_process_reads_alike_and_is_made_once(slice_npz, tmp_path):
    made = corruption.corrupted_source_stage(f"npz:{slice_npz}", None, 0.2, 0.5, 1, tmp_path)
    assert made["dataset"].startswith(f"delta:{tmp_path}/fmnist-200-noise0.2-tail0.5-seed1-")
    read = load_dataset(made["dataset"])
    expected, record = corruption.corrupt(load_dataset(f"npz:{slice_npz}"), 0.2, 0.5, 1)
    assert np.array_equal(read.sample_id, expected.sample_id) and np.array_equal(read.y, expected.y)
    assert np.array_equal(read.x, expected.x) and np.array_equal(read.y_test, expected.y_test)
    assert {k: v for k, v in made.items() if k != "dataset"} == record == corruption.corruption_of(made["dataset"])
    log = sorted((tmp_path / made["dataset"][6:-2] / "_delta_log").iterdir())
    stamps = [p.stat().st_mtime_ns for p in log]
    assert corruption.corrupted_source_stage(f"npz:{slice_npz}", None, 0.2, 0.5, 1, tmp_path) == made
    assert [p.stat().st_mtime_ns for p in log] == stamps  # reused, not written again
    assert [p.name for p in tmp_path.iterdir()] == [made["dataset"][6:-2].rsplit("/", 1)[1]]  # no temporary left
    assert corruption.corruption_of(f"npz:{slice_npz}") is None


@pytest.mark.parametrize("argv, message", [
    (["--label-noise", "1"], "--label-noise 1.0: Input should be less than 1"),
    (["--label-noise", "-0.1"], "--label-noise -0.1: Input should be greater than or equal to 0"),
    (["--imbalance", "0"], "--imbalance 0.0: Input should be greater than 0"),
    (["--imbalance", "1.5"], "--imbalance 1.5: Input should be less than or equal to 1"),
    (["--label-noise", "0.3", "--from-run", "/nonexistent/run"], "--label-noise with --from-run: the run brings"),
])
def test_settings_out_of_range_are_refused_in_one_line_and_nothing_is_written(argv, message, slice_npz, tmp_path,
                                                                               capsys):
    assert main(["evaluate", "--dataset", f"npz:{slice_npz}", "--out", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_class_balanced_budget_that_would_empty_a_class_is_refused_in_one_line(fmnist, tmp_path, capsys):
    """100 images of nine classes and one of the tenth: removing 90 % of the 901 in proportion takes
    90 of each large class, and the largest remainder, the one image of class 9 (0.9 of it)."""
    rows = np.concatenate([np.flatnonzero(fmnist.y == c)[:100] for c in range(9)] + [np.flatnonzero(fmnist.y == 9)[:1]])
    path = tmp_path / "tail.npz"
    np.savez(path, x=fmnist.x[rows], y=fmnist.y[rows], x_test=fmnist.x_test[:100], y_test=fmnist.y_test[:100])
    argv = ["run", "--dataset", f"npz:{path}", "--model", "linear", "--out", str(tmp_path / "runs"),
            "--target", str(tmp_path / "pruned"), "--class-balanced"]
    assert main([*argv, "--prune-ratio", "0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empties class 9 (all its 1 samples)" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pruned").exists()
    from pruning_core.selection import class_quotas
    assert class_quotas(fmnist.y[rows], 450).tolist() == [50] * 9 + [0]  # half keeps it


def test_the_core_refuses_settings_out_of_range_naming_the_field():
    for noise, imbalance, flag in ((1.0, 1.0, "--label-noise 1 must lie in [0, 1)"),
                                   (0.0, 0.0, "--imbalance 0 must lie in (0, 1]")):
        with pytest.raises(BadInputError) as caught:
            corruption.check_settings(noise, imbalance)
        assert caught.value.as_flags().startswith(flag)


@pytest.mark.integration  # an evaluation: a scoring run and three retrainings (linear, 14x14 pixels)
def test_an_evaluation_on_a_noisy_long_tail_reports_what_each_method_did(fmnist, prefect_api, dask_cluster, tmp_path,
                                                                         capsys):
    """`evaluate --label-noise 0.3 --imbalance 0.2`: the scoring run and every retraining train on
    the corrupted table, the test split stays the source's, and the report and evaluation.json say
    which labels were flipped, how many of them each method removed, the worst class's accuracy and
    that no class was emptied."""
    import json

    import pyarrow.parquet as pq

    rows = np.concatenate([np.flatnonzero(fmnist.y == c)[:80] for c in range(10)])
    pooled = lambda x: x.reshape(len(x), 1, 14, 2, 14, 2).mean((3, 5)).astype(np.float32) / 255  # noqa: E731
    source = tmp_path / "fmnist-800.npz"
    np.savez(source, x=pooled(fmnist.x[rows]), y=fmnist.y[rows], x_test=pooled(fmnist.x_test[:300]),
             y_test=fmnist.y_test[:300])
    out = tmp_path / "runs"
    assert main(["evaluate", "--dataset", f"npz:{source}", "--model", "linear", "--label-noise", "0.3", "--imbalance",
                 "0.2", "--methods", "influence,random", "--ratios", "0.4", "--seeds", "0", "--gap-samples", "0",
                 "--evaluations-per-epoch", "1", "--shards", "2", "--dask-address", dask_cluster, "--out", str(out),
                 "--target", str(tmp_path / "table")]) == 0
    capsys.readouterr()
    folder = next(out.glob("eval-*"))
    summary = json.loads((folder / "evaluation.json").read_text())
    record, table = summary["corruption"], pq.read_table(folder / "evaluation.parquet").to_pylist()
    kept = corruption.long_tail_counts(np.full(10, 80), 0.2)
    assert record["class_counts"] == kept.tolist() and record["n"] == kept.sum()
    (made,) = (out / ".cache" / "corrupted").iterdir()
    corrupted = load_dataset(f"delta:{made}@0")
    true = load_dataset(f"npz:{source}").y[corrupted.sample_id]  # an npz's ids are its rows
    assert record["flipped"] == corrupted.sample_id[corrupted.y != true].tolist() and record["n_flipped"] > 0
    assert {r["n_test"] for r in table} == {300}  # the source's test split, whole
    assert {r["n_kept"] for r in table if r["method"] == "full"} == {record["n"]}
    by = {r["method"]: r for r in summary["robustness"]}
    flipped = np.isin(corrupted.sample_id, record["flipped"])
    for method, name in (("influence", "influence-r0.4"), ("random", "random-r0.4-s0")):  # as the selections say
        pruned = pq.read_table(folder / "selections" / f"{name}.parquet").column("pruned").to_numpy(
            zero_copy_only=False)
        assert by[method]["flipped_removed"] == pytest.approx(pruned[flipped].mean())
    assert by["full"]["flipped_removed"] is None and 0.2 < by["random"]["flipped_removed"] < 0.6
    assert all(r["emptied"] == [] and r["fewest_kept"] >= 1 for r in summary["robustness"])
    assert by["full"]["worst_class_accuracy"] < by["full"]["accuracy"]
    report = (folder / "report.md").read_text()
    assert "## Messy training data" in report and "30 % symmetric label noise" in report
    assert f"| 0.4 | influence | {100 * by['influence']['flipped_removed']:.2f} |" in report
