"""Image tables (`parquet:PATH`, and Delta tables of encoded images) made from a slice of the
shared CIFAR-10 JPEGs: they load as the folder does, their refusals go through the command line,
and a Delta table of encoded images is pruned end to end."""

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from PIL import Image

from flows.cli import main
from flows.parameters import RunParameters
from pruning_core import images
from pruning_core.data import _load_cached, load_dataset, parse_dataset_spec
from pruning_core.errors import DatasetError
from pruning_core.versions import commit_version, read_version


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET_PRUNING_CACHE", str(tmp_path / "cache"))
    _load_cached.cache_clear()
    yield tmp_path / "cache"
    _load_cached.cache_clear()


def rows_of(root: Path, split: str, image: str = "image", label: str = "label") -> dict[str, list]:
    """The files of a folder split as rows: the JPEG bytes and the class index, in sample order."""
    classes = sorted(os.listdir(root / "train"))
    rows = {image: [], label: []}
    for c in sorted(os.listdir(root / split)):
        for f in sorted(os.listdir(root / split / c)):
            rows[image].append((root / split / c / f).read_bytes())
            rows[label].append(classes.index(c))
    return rows


def split_table(root: Path, image: str = "image", label: str = "label") -> pa.Table:
    """Train and test rows in one table with a `split` column."""
    train, test = rows_of(root, "train", image, label), rows_of(root, "test", image, label)
    return pa.table({image: pa.array(train[image] + test[image], pa.binary()),
                     label: pa.array(train[label] + test[label], pa.int64()),
                     "split": ["train"] * len(train[label]) + ["test"] * len(test[label])})


@pytest.fixture(scope="module")
def folder(cifar_slice):
    return load_dataset(f"folder:{cifar_slice}")


def same_samples(ds, folder) -> bool:
    return all(np.array_equal(a, b) for a, b in ((ds.x, folder.x), (ds.y, folder.y), (ds.x_test, folder.x_test),
                                                 (ds.y_test, folder.y_test)))


def test_a_hugging_face_parquet_folder_loads_as_the_image_folder(cifar_slice, folder, cache, tmp_path, monkeypatch):
    root = tmp_path / "cifar10-hf"
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):  # Hugging Face's export: image a struct {bytes, path}, the split in the name
        rows = rows_of(cifar_slice, split)
        image = pa.array([{"bytes": b, "path": None} for b in rows["image"]],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": image, "label": pa.array(rows["label"], pa.int64())}),
                       root / "data" / f"{split}-00000-of-00001.parquet")
    ds = load_dataset(f"parquet:{root}")
    assert same_samples(ds, folder) and (ds.sample_id == np.arange(100)).all() and ds.paths is None
    assert ds.n_classes == 10 and ds.x.shape == (100, 3, 32, 32)
    assert parse_dataset_spec(f"parquet:{root}").short_name == "cifar10-hf"
    calls = []
    monkeypatch.setattr(images, "_decode_one", lambda source: calls.append(source))
    _load_cached.cache_clear()  # as a new process: the cache holds the decoded arrays
    assert same_samples(load_dataset(f"parquet:{root}"), folder) and calls == []


def test_a_parquet_file_with_a_split_column_named_columns_and_sample_ids(cifar_slice, folder, cache, tmp_path):
    table = split_table(cifar_slice, image="img", label="y")
    ids = np.r_[1000 + np.arange(100)[::-1], np.zeros(100, int)]  # the train rows stored newest id first
    order = np.r_[np.arange(100)[::-1], 100 + np.arange(100)]
    table = table.take(pa.array(order)).append_column("sample_id", pa.array(ids, pa.int64()))
    pq.write_table(table, tmp_path / "cifar.parquet")
    spec = f"parquet:{tmp_path / 'cifar.parquet'}?label=y&image=img"
    assert str(parse_dataset_spec(spec)) == f"parquet:{tmp_path / 'cifar.parquet'}?image=img&label=y"
    assert parse_dataset_spec(str(parse_dataset_spec(spec))) == parse_dataset_spec(spec)  # travels to workers as is
    ds = load_dataset(spec)
    assert same_samples(ds, folder) and (ds.sample_id == 1000 + np.arange(100)).all()  # in sample_id order
    assert parse_dataset_spec(spec).short_name == "cifar"


def test_a_delta_table_of_encoded_images_and_a_version_are_told_apart(cifar_slice, folder, cache, tmp_path):
    write_deltalake(str(tmp_path / "images"), split_table(cifar_slice, image="png", label="class"))
    with pytest.raises(DatasetError, match=r"no column image, label \(columns: png, class, split\)"):
        load_dataset(f"delta:{tmp_path / 'images'}")
    ds = load_dataset(f"delta:{tmp_path / 'images'}@0?image=png&label=class")
    assert same_samples(ds, folder) and ds.name == f"delta:{tmp_path / 'images'}@0?image=png&label=class"
    commit_version(str(tmp_path / "pruned"), ds, ds.y < 5, {"run_id": "kept"})  # the product's own rows
    version = load_dataset(f"delta:{tmp_path / 'pruned'}")
    assert np.array_equal(version.x, folder.x[folder.y < 5]) and np.array_equal(version.x_test, folder.x_test)
    assert version.origin["source"] == f"delta:{tmp_path / 'images'}@0?image=png&label=class"


def _bad_parquet(tmp_path: Path, cifar_slice: Path, case: str) -> str:
    table = split_table(cifar_slice)
    if case == "missing columns":
        pq.write_table(table.rename_columns(["picture", "label", "split"]), tmp_path / "t.parquet")
        return f"parquet:{tmp_path / 't.parquet'}"
    if case == "undecodable bytes":
        image = table.column("image").to_pylist()
        image[42] = image[42][:20]
        pq.write_table(table.set_column(0, "image", pa.array(image, pa.binary())), tmp_path / "t.parquet")
        return f"parquet:{tmp_path / 't.parquet'}"
    if case == "mixed sizes":
        image = table.column("image").to_pylist()
        out = io.BytesIO()
        Image.open(io.BytesIO(image[130])).resize((20, 20)).save(out, format="PNG")
        image[130] = out.getvalue()
        pq.write_table(table.set_column(0, "image", pa.array(image, pa.binary())), tmp_path / "t.parquet")
        return f"parquet:{tmp_path / 't.parquet'}"
    if case == "no split column":
        pq.write_table(table.drop_columns(["split"]), tmp_path / "t.parquet")
        return f"parquet:{tmp_path / 't.parquet'}"
    if case == "no test files":
        (tmp_path / "hf").mkdir()
        pq.write_table(table.slice(0, 100), tmp_path / "hf" / "train.parquet")  # the train rows alone
        return f"parquet:{tmp_path / 'hf'}"
    write_deltalake(str(tmp_path / "d"), table.rename_columns(["image", "target", "split"]))  # delta, named columns
    return f"delta:{tmp_path / 'd'}?label=y"


BAD_TABLES = {
    "missing columns": "no column image (columns: picture, label, split); name them as "
                       "parquet:PATH?image=COL&label=COL",
    "undecodable bytes": "t.parquet row 42 cannot be read as an image (not in an image format Pillow reads)",
    "mixed sizes": "images of different sizes, t.parquet row 0 is 32x32 and t.parquet row 130 is 20x20",
    "no split column": "no test split: give a split column with the values train and test, or a folder of "
                       "train*.parquet and test*.parquet",
    "no test files": "no test split: the folder holds train*.parquet but no test*.parquet",
    "delta without the named column": "no column y (columns: image, target, split); name them as "
                                      "delta:URI[@VERSION]?image=COL&label=COL",
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_image_table_exits_2_with_one_line_and_writes_nothing(case, cifar_slice, cache, tmp_path, capsys):
    spec = _bad_parquet(tmp_path, cifar_slice, case)
    out, target = tmp_path / "runs", tmp_path / "table"
    code = main(["run", "--dataset", spec, "--model", "linear", "--prune-ratio", "0.4", "--out", str(out),
                 "--target", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dataset-prune: error: --dataset ") and BAD_TABLES[case] in err, err
    assert not out.exists() and not target.exists() and not cache.exists()


def test_a_delta_table_of_encoded_images_is_pruned_end_to_end(cifar_slice, folder, prefect_api, dask_cluster,
                                                              tmp_path):
    from flows.prune import prune_dataset

    uri = tmp_path / "cifar10-images"
    write_deltalake(str(uri), split_table(cifar_slice))
    manifest = prune_dataset(RunParameters(
        dataset=f"delta:{uri}", model="linear", prune_ratio=0.4, hessian="kfac", projection_dim=64, shards=2,
        dask_address=dask_cluster, out=str(tmp_path / "runs"), target=str(tmp_path / "pruned")))
    assert manifest["arguments"]["dataset"] == f"delta:{uri}@0"  # pinned, for every worker
    assert manifest["dataset"]["n"] == 100 and manifest["dataset"]["sample_shape"] == [3, 32, 32]
    pruned = pq.read_table(Path(manifest["run_dir"]) / "selection.parquet").column("pruned").to_numpy(
        zero_copy_only=False)
    version = read_version(str(tmp_path / "pruned"), manifest["version"]["version"])
    assert version.n == 60 and np.array_equal(version.x, folder.x[~pruned])
    assert np.array_equal(version.x_test, folder.x_test) and version.origin["source"] == f"delta:{uri}@0"
