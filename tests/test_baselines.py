"""Score-based baselines: their orders on hand-made data, and every method through the flow."""

from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from pruning_core.artifacts import column_array, load_scores
from pruning_core.baselines import ccs_order, forgetting_events, herding_order, kcenter_order, removal_order
from pruning_core.selection import METHODS, SelectionArgs, select


def columns(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return {"label": np.repeat(np.arange(4), n // 4), "el2n": rng.random(n), "grand": rng.random(n),
            "forgetting": rng.integers(0, 4, n), "embedding": rng.normal(size=(n, 5)),
            "mislabel": rng.random(n)}, rng.normal(size=(n, 3))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "influence"])
def test_every_baseline_prunes_exactly_the_budget(method):
    cols, vectors = columns()
    result = select(vectors, SelectionArgs(method=method, prune_ratio=0.3), cols)
    assert result.pruned.sum() == 60
    if method in ("herding", "kcenter", "moderate"):  # per-class methods prune classes in proportion
        assert np.bincount(cols["label"][result.pruned]).tolist() == [15, 15, 15, 15]


def test_score_rankings_remove_the_lowest_first():
    cols, vectors = columns()
    for method in ("el2n", "grand"):
        pruned = select(vectors, SelectionArgs(method=method, prune_ratio=0.25), cols).pruned
        assert cols[method][pruned].max() < cols[method][~pruned].min()
    norms = np.linalg.norm(vectors, axis=1)
    pruned = select(vectors, SelectionArgs(method="influence-score", prune_ratio=0.25), cols).pruned
    assert norms[pruned].max() < norms[~pruned].min()
    pruned = select(vectors, SelectionArgs(method="forgetting", prune_ratio=0.25), cols).pruned
    assert cols["forgetting"][pruned].max() <= cols["forgetting"][~pruned].min()


def test_the_mislabel_score_alone_removes_the_most_suspect_first():
    cols, vectors = columns()
    pruned = select(vectors, SelectionArgs(method="mislabel", prune_ratio=0.25), cols).pruned
    assert cols["mislabel"][pruned].min() > cols["mislabel"][~pruned].max()
    del cols["mislabel"]  # scores written before the column existed
    with pytest.raises(Exception, match="needs the score column 'mislabel'"):
        select(vectors, SelectionArgs(method="mislabel", prune_ratio=0.25), cols)


def test_forgetting_events_count_correct_to_wrong_transitions():
    correctness = np.array([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
    assert forgetting_events(correctness).tolist() == [2, 0, 4, 0]


def test_herding_and_kcenter_orders():
    E = np.array([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [0.1, 0.0], [0.0, 5.0]])
    assert herding_order(E)[0] == int(np.argmin(((E - E.mean(0)) ** 2).sum(1)))
    order = kcenter_order(E)
    assert order[0] == 0 and set(order[1:3]) == {1, 2}  # nearest the mean, then the farthest points
    assert sorted(order.tolist()) == list(range(5))


def test_moderate_keeps_the_middle_distances():
    E = np.array([[float(d), 0.0] for d in range(-10, 11)])  # one class, centroid 0
    order = removal_order("moderate", {"label": np.zeros(21, np.int64), "embedding": E}, None, 0, 6)
    removed = np.abs(E[order[:6], 0])
    kept = np.abs(E[order[6:], 0])
    # distances 0, 1, 1, …, 10, 10 around their median 5: the six farthest from it are 0, 10, 10
    # and three of the 1s and 9s
    assert sorted(np.abs(removed - 5).tolist()) == [4, 4, 4, 5, 5, 5]
    assert (np.abs(removed - 5) >= np.abs(kept - 5).max() - 1e-9).all()


def test_ccs_cuts_the_hardest_and_covers_every_stratum():
    el2n = np.linspace(0, 1, 1000)
    order = ccs_order(el2n, n_prune=500, seed=0, strata=10, hard_fraction=0.1)
    kept = np.sort(order[500:])
    assert set(order[:100]) == set(range(900, 1000))  # the hardest 10 % go first
    assert len(kept) == 500 and np.histogram(el2n[kept], bins=10, range=(0, 0.9))[0].min() > 0


def test_missing_columns_are_a_clear_error():
    from pruning_core.errors import BadInputError

    with pytest.raises(BadInputError, match="needs the score column 'forgetting'"):
        select(np.zeros((5, 2)), SelectionArgs(method="forgetting", prune_ratio=0.4), {"label": np.zeros(5, int)})


@pytest.mark.parametrize("method", [m for m in METHODS if m != "influence"])
def test_every_method_runs_through_the_flow_and_writes_a_version(method, dask_cluster, prefect_api, small_npz,
                                                                 cnn_checkpoint, tmp_path):
    from flows.parameters import RunParameters
    from flows.prune import prune_dataset

    # forgetting events are recorded while the run trains; the others score the same 2-epoch cnn, trained once
    model = {"epochs": 2} if method == "forgetting" else {"checkpoint": cnn_checkpoint}
    manifest = prune_dataset(RunParameters(dataset=f"npz:{small_npz}", model="cnn", method=method,
                                           prune_ratio=0.3, shards=2, block_size=256, dask_address=dask_cluster,
                                           out=str(tmp_path / "runs"), target=str(tmp_path / "table"), **model))
    rows = DeltaTable(manifest["version"]["uri"], version=manifest["version"]["version"]).to_pyarrow_table()
    assert rows.num_rows == 1400 == manifest["selection"]["n_kept"]
    assert manifest["selection"]["method"] == method
    # the version holds exactly what `select` keeps over the run's own scores
    table, vectors, _ = load_scores(Path(manifest["run_dir"]) / "scores.parquet")
    names = ("label", "el2n", "grand", "forgetting", "embedding", "mislabel")
    columns = {name: column_array(table, name) for name in names if name in table.column_names}
    pruned = select(vectors, SelectionArgs(method=method, prune_ratio=0.3), columns).pruned
    kept = table.column("sample_id").to_numpy()[~pruned]
    assert sorted(rows.column("sample_id").to_pylist()) == sorted(kept.tolist())
