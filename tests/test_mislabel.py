"""Mislabel detection: the scores and confident learning's rule against a direct reading of the
probabilities, the `mislabel` columns of a real scoring run on Fashion-MNIST with injected flips,
the picture, and the influence method removing what looks mislabelled first within its budget."""

import json

import matplotlib.image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pruning_core import corruption, figures, mislabel
from pruning_core.errors import BadInputError
from pruning_core.selection import SelectionArgs, hard_cut_for, select, selection_args


def test_scores_and_the_threshold_rule_read_the_probabilities_as_confident_learning_does():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.4), size=300)
    y = rng.integers(0, 4, 300)
    score, likely, likely_p = mislabel.mislabel_scores(probs, y)
    for i in range(300):
        others = [j for j in range(4) if j != y[i]]
        j = max(others, key=lambda c: (probs[i, c], -c))
        assert likely[i] == j and likely_p[i] == probs[i, j] and score[i] == pytest.approx(1 - probs[i, y[i]])
    t = [probs[y == c, c].mean() for c in range(4)]  # each class's mean self-confidence
    rule = [probs[i, y[i]] < t[y[i]] and probs[i, likely[i]] >= t[likely[i]] for i in range(300)]
    assert mislabel.threshold_rule(y, score, likely, likely_p, 4).tolist() == rule
    assert 0 < sum(rule) < 300
    # as many as the rule finds, the least self-confident first
    flagged = mislabel.looks_mislabelled(y, score, likely, likely_p, 4)
    assert flagged.sum() == sum(rule)
    assert probs[np.arange(300), y][flagged].max() <= probs[np.arange(300), y][~flagged].min()
    # a class that no sample is labelled with flags nothing towards it
    assert np.isinf(mislabel.class_thresholds(np.array([0, 0, 2]), np.array([0.9, 0.8, 0.7]), 4)[[1, 3]]).all()


def test_auroc_counts_pairs_ties_as_half():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 5, 200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in score[positive] for b in score[~positive]]
    assert mislabel.auroc(score, positive) == pytest.approx(np.mean(pairs))
    assert mislabel.auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(mislabel.auroc(np.arange(3.0), np.zeros(3, bool)))


def _instance(n=400, flagged=30, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 6)) * rng.exponential(size=(n, 1))
    suspect = rng.random(n)
    looks = np.zeros(n, bool)
    looks[rng.choice(n, flagged, replace=False)] = True
    columns = {"label": rng.integers(0, 4, n), "el2n": rng.random(n) * 1.4, "mislabel": suspect,
               "mislabelled": looks}
    return vectors, columns


def test_what_looks_mislabelled_is_removed_first_within_the_budget():
    vectors, columns = _instance()
    args = SelectionArgs(prune_ratio=0.25, coverage="difficulty", candidates="easiest", mislabel_first=True)
    result = select(vectors, args, columns)
    flagged = columns["mislabelled"]
    assert result.pruned.sum() == 100 and result.pruned[flagged].all()  # all 30 within the 100
    assert result.info["mislabelled_first"] == {"flagged": 30, "removed_first": 30}
    without = select(vectors, SelectionArgs(prune_ratio=0.25, coverage="difficulty", candidates="easiest"), columns)
    assert without.pruned[flagged].sum() < 30 and "mislabelled_first" not in without.info
    old = {k: v for k, v in columns.items() if k not in ("mislabel", "mislabelled")}
    assert np.array_equal(without.pruned, select(vectors, SelectionArgs(prune_ratio=0.25, coverage="difficulty",
                                                                       candidates="easiest"), old).pruned)
    # the default (None): first where at least 5 % of the samples look mislabelled (30 of 400 here),
    # as before where fewer do (clean data) and for scores without the column
    auto = SelectionArgs(prune_ratio=0.25, coverage="difficulty", candidates="easiest", mislabel_first=None)
    assert np.array_equal(select(vectors, auto, columns).pruned, result.pruned)
    assert np.array_equal(select(vectors, auto, old).pruned, without.pruned)
    few = {**columns, "mislabelled": columns["mislabelled"] & (np.cumsum(columns["mislabelled"]) <= 19)}  # 4.75 %
    assert np.array_equal(select(vectors, auto, few).pruned, without.pruned)
    forced = select(vectors, args, few)
    assert forced.pruned[few["mislabelled"]].all() and forced.info["mislabelled_first"]["removed_first"] == 19

    many = _instance(flagged=150)[1]  # more flagged than the budget: the 100 most suspect of them go
    crowded = select(vectors, args, many)
    order = np.flatnonzero(many["mislabelled"])[np.argsort(-many["mislabel"][many["mislabelled"]], kind="stable")]
    assert np.flatnonzero(crowded.pruned).tolist() == sorted(order[:100].tolist())


def test_those_removed_first_count_towards_the_hardest_share():
    vectors, columns = _instance()
    args = SelectionArgs(prune_ratio=0.8, coverage="difficulty", mislabel_first=True)
    beta = hard_cut_for(0.8)  # 0.15: 60 of 400 samples
    result = select(vectors, args, columns)
    assert result.info["coverage"]["hard_cut"] == int(beta * 400) - 30 and result.pruned.sum() == 320
    rest = ~columns["mislabelled"]
    hardest = np.flatnonzero(rest)[np.argsort(-columns["el2n"][rest], kind="stable")[:30]]
    assert result.pruned[hardest].all() and result.pruned[columns["mislabelled"]].all()


def test_the_policy_turns_it_on_for_the_influence_default_only_and_refuses_it_elsewhere(tmp_path, capsys):
    assert selection_args("influence", 0.4, None, "greedy", 0, False, "auto", "auto").mislabel_first is None
    assert selection_args("el2n", 0.4, None, "greedy", 0, False, "auto", "auto").mislabel_first is False
    assert selection_args("influence", 0.4, None, "greedy", 0, False, "auto", "auto",
                          mislabel_first=False).mislabel_first is False
    with pytest.raises(BadInputError, match="mislabel_first applies to method influence under coverage difficulty"):
        selection_args("influence", 0.4, None, "greedy", 0, False, "none", "auto", mislabel_first=True)
    vectors, columns = _instance()
    with pytest.raises(BadInputError, match="needs the score column 'mislabelled'"):
        select(vectors, SelectionArgs(prune_ratio=0.4, coverage="difficulty", mislabel_first=True),
               {"label": columns["label"], "el2n": columns["el2n"]})
    scores = tmp_path / "scores.parquet"
    scores.write_bytes(b"")
    assert main(["select", "--scores", str(scores), "--prune-ratio", "0.3", "--coverage", "none",
                 "--mislabel-first", "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--mislabel-first applies to --method influence under --coverage difficulty (--prune-ratio, "
                        "greedy or scip solver)") and "\n" not in err


def test_the_picture_shows_the_most_suspect_with_given_and_likely_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(60, 1, 28, 28), dtype=np.uint8)
    labels, likely = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    suspect = rng.random(60)
    path = figures.draw_mislabelled(tmp_path / "mislabelled.png", x, labels, suspect, likely, suspect > 0.8,
                                    ["shirt", "coat", "bag"], pruned=suspect > 0.5)
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.05
    assert figures.draw_mislabelled(tmp_path / "none.png", rng.random((60, 5)), labels, suspect, likely,
                                    suspect > 0.8, ["a", "b", "c"]) is None  # not images
    assert not (tmp_path / "none.png").exists()


@pytest.fixture(scope="module")
def noisy_npz(fmnist, tmp_path_factory):
    """2,000 Fashion-MNIST training samples with 20 % of their labels flipped (seed 0), 500 test
    samples, and which were flipped."""
    from pruning_core.data import Dataset

    ds = Dataset("fmnist-2000", fmnist.x[:2000], fmnist.y[:2000], np.arange(2000), fmnist.x_test[:500],
                 fmnist.y_test[:500], 10)
    noisy, record = corruption.corrupt(ds, 0.2, 1.0, seed=0)
    path = tmp_path_factory.mktemp("noisy") / "fmnist-noisy.npz"
    np.savez(path, x=noisy.x, y=noisy.y, x_test=noisy.x_test, y_test=noisy.y_test)
    return str(path), np.isin(np.arange(2000), record["flipped"])


def test_a_run_scores_flipped_labels_as_mislabelled_and_removes_them_first(noisy_npz, prefect_api, dask_cluster,
                                                                          tmp_path, capsys):
    """A real run of the command on Fashion-MNIST with 20 % of the labels flipped: the scores'
    `mislabel` ranks the flipped samples high, the rule flags mostly them, the summary says how
    many look mislabelled and mislabelled.png draws them, and the default selection removes every
    flagged sample first."""
    path, flipped = noisy_npz
    out = tmp_path / "runs"
    assert main(["run", "--dataset", f"npz:{path}", "--model", "cnn", "--epochs", "3", "--prune-ratio", "0.4",
                 "--shards", "2", "--dask-address", dask_cluster, "--out", str(out), "--target",
                 str(tmp_path / "table"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    run_dir = next(p for p in out.iterdir() if not p.name.startswith("."))
    scores = pq.read_table(run_dir / "scores.parquet")
    score, flagged = (scores.column(c).to_numpy(zero_copy_only=False) for c in ("mislabel", "mislabelled"))
    assert mislabel.auroc(score, flipped) > 0.9 and score[flipped].mean() > score[~flipped].mean() + 0.3
    assert flagged[flipped].mean() > 0.6 and flagged[~flipped].mean() < 0.15
    assert f"mislabelled:   {flagged.sum()} samples look mislabelled" in printed
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["mislabelled"]["count"] == flagged.sum()
    assert manifest["figures"]["mislabelled"] == str(run_dir / "mislabelled.png")
    assert mpimg.imread(run_dir / "mislabelled.png").std() > 0.05
    pruned = pq.read_table(run_dir / "selection.parquet").column("pruned").to_numpy(zero_copy_only=False)
    assert pruned[flagged].all() and pruned.sum() == 800
    assert manifest["selection"]["solver_info"]["mislabelled_first"] == {"flagged": int(flagged.sum()),
                                                                         "removed_first": int(flagged.sum())}


@pytest.mark.integration  # the session's cnn, trained on 2,000 samples
def test_a_cached_shard_written_before_the_mislabel_scores_is_scored_again(small_npz, cnn_checkpoint, tmp_path):
    """An influence cache from before the mislabel scores holds shards without their columns: such
    a shard is scored again (the merge needs them), a complete one is reused as it is."""
    from flows.parameters import RunParameters
    from pruning_core import artifacts, pipeline
    from pruning_core.refs import DatasetRef, ModelRef

    data = DatasetRef(f"npz:{small_npz}")
    model = ModelRef("cnn", cnn_checkpoint, artifacts.file_sha256(cnn_checkpoint), 0.0, 0.0, 0.0)
    args = RunParameters(dataset=data.spec, prune_ratio=0.4, block_size=128).influence_args()
    features = pipeline.features_shard_stage(tmp_path, model, data, 0, 500, args)
    inverse = pipeline.inverse_stage(tmp_path, model, data, args, feature_paths=[features], weight_decay=5e-4)
    path = pipeline.influence_shard_stage(tmp_path, model, data, 0, 500, args, inverse=inverse.path)
    scored = pq.read_table(path)
    assert set(mislabel.COLUMNS) <= set(scored.column_names)
    stamp = (tmp_path / path).stat().st_mtime_ns
    assert pipeline.influence_shard_stage(tmp_path, model, data, 0, 500, args, inverse=inverse.path) == path
    assert (tmp_path / path).stat().st_mtime_ns == stamp  # complete: reused
    pq.write_table(scored.drop_columns(list(mislabel.COLUMNS)), path)  # as written before
    assert pipeline.influence_shard_stage(tmp_path, model, data, 0, 500, args, inverse=inverse.path) == path
    assert pq.read_table(path).equals(scored)
