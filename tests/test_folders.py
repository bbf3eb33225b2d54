"""Image folders (`folder:PATH`) on a slice of the shared CIFAR-10 JPEGs: layout, ids, labels,
pixels as Pillow decodes them, the cache of decoded arrays, every refusal through the command
line, the path columns of a run, and a pruned version written back as a folder (`export`)."""

import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import read_only_tree
from PIL import Image

from flows.cli import main
from flows.parameters import RunParameters
from pruning_core import images
from pruning_core.data import _load_cached, load_dataset, parse_dataset_spec
from pruning_core.targets import samples_parquet
from pruning_core.versions import commit_version, read_version

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder for decoded arrays, and no dataset held by this process."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DATASET_PRUNING_CACHE", str(folder))
    _load_cached.cache_clear()
    yield folder
    _load_cached.cache_clear()


@pytest.fixture
def decoded(monkeypatch) -> list:
    """Every image the decoder decodes, as it decodes it."""
    calls, real = [], images._decode_one
    monkeypatch.setattr(images, "_decode_one", lambda source: calls.append(source) or real(source))
    return calls


def entries(cache: Path) -> list[Path]:
    """The cache's entries of decoded arrays (a folder each)."""
    return sorted(p for p in (cache / "decoded").iterdir() if not p.name.startswith("."))


def copy_of(root: Path, tmp_path: Path, name: str = "data") -> Path:
    return Path(shutil.copytree(root, tmp_path / name))


def files_of(root: Path, split: str) -> list[str]:
    """`class/file` of every file of a split, by (class folder, file name): the order of sample_id."""
    return [f"{c.name}/{f}" for c in sorted((root / split).iterdir()) for f in sorted(os.listdir(c))]


def pillow_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)  # (H, W, RGB) → (C, H, W)


def test_layout_ids_labels_and_pixels_as_pillow_decodes_them(cifar_slice, cache):
    ds = load_dataset(f"folder:{cifar_slice}")
    assert ds.x.shape == ds.x_test.shape == (100, 3, 32, 32) and ds.x.dtype == ds.x_test.dtype == np.uint8
    assert ds.origin["classes"] == CLASSES and ds.n_classes == 10
    train = files_of(cifar_slice, "train")
    assert ds.paths.tolist() == train and (ds.sample_id == np.arange(100)).all()  # id i is the i-th sorted file
    assert ds.y.tolist() == [CLASSES.index(p.split("/")[0]) for p in train]
    for i in (0, 37, 99):
        assert np.array_equal(ds.x[i], pillow_rgb(cifar_slice / "train" / ds.paths[i]))
    test = files_of(cifar_slice, "test")
    assert ds.y_test.tolist() == [CLASSES.index(p.split("/")[0]) for p in test]
    assert np.array_equal(ds.x_test[55], pillow_rgb(cifar_slice / "test" / test[55]))
    assert ds.x[:, 0].mean() != ds.x[:, 2].mean()  # the channels are not one repeated
    assert parse_dataset_spec(f"folder:{cifar_slice}").short_name == cifar_slice.name


def test_grayscale_images_load_as_one_channel_and_among_colour_ones_as_rgb(cifar_slice, cache, tmp_path):
    root = tmp_path / "gray"
    for split, source in (("train", "train"), ("val", "test")):  # val/ where there is no test/
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for f in sorted(os.listdir(cifar_slice / source / c))[:3]:
                Image.open(cifar_slice / source / c / f).convert("L").save(root / split / c / f"{f[:-4]}.png")
    ds = load_dataset(f"folder:{root}")
    assert ds.x.shape == (6, 1, 32, 32) and ds.x_test.shape == (6, 1, 32, 32)
    assert np.array_equal(ds.x[4, 0], np.asarray(Image.open(root / "train" / ds.paths[4])))
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1] and ds.paths[0] == "cat/0000.png"
    shutil.copyfile(cifar_slice / "train" / "dog" / "0000.jpg", root / "train" / "dog" / "9999.jpg")  # colour
    mixed = load_dataset(f"folder:{root}")
    assert mixed.x.shape == (7, 3, 32, 32) and mixed.paths[-1] == "dog/9999.jpg"
    assert all(np.array_equal(mixed.x[4, c], ds.x[4, 0]) for c in range(3))  # gray repeated over RGB


def test_a_second_load_reads_the_cache_and_decodes_nothing(cifar_slice, cache, decoded):
    before = read_only_tree(cifar_slice)
    first = load_dataset(f"folder:{cifar_slice}")
    assert len(decoded) == 200
    [entry] = entries(cache)
    _load_cached.cache_clear()  # as a new process
    decoded.clear()
    again = load_dataset(f"folder:{cifar_slice}")
    assert decoded == [] and np.array_equal(again.x, first.x) and np.array_equal(again.x_test, first.x_test)
    assert again.fingerprint == first.fingerprint and again.paths.tolist() == first.paths.tolist()
    assert again.origin == first.origin
    stored = entry / "x.npy"
    stored.write_bytes(stored.read_bytes()[:5000])  # a damaged entry is decoded and written again
    _load_cached.cache_clear()
    third = load_dataset(f"folder:{cifar_slice}")
    assert len(decoded) == 200 and np.array_equal(third.x, first.x)
    assert entries(cache) == [entry] and stored.stat().st_size > 5000
    assert read_only_tree(cifar_slice) == before  # nothing written inside the source


def test_a_changed_file_is_decoded_again(cifar_slice, cache, tmp_path):
    root = copy_of(cifar_slice, tmp_path)
    first = load_dataset(f"folder:{root}")
    shutil.copyfile(root / "train" / "dog" / "0000.jpg", root / "train" / "cat" / "0001.jpg")
    again = load_dataset(f"folder:{root}")
    row = again.paths.tolist().index("cat/0001.jpg")
    assert np.array_equal(again.x[row], first.x[first.paths.tolist().index("dog/0000.jpg")])
    assert again.fingerprint != first.fingerprint and len(entries(cache)) == 2


def _resized(path: Path, size: tuple[int, int]) -> None:
    Image.open(path).resize(size).save(path, format="JPEG")


REFUSALS = {
    "no train folder": (lambda r: shutil.rmtree(r / "train"), "no train/ folder; the layout is PATH/train/<class>/"),
    "empty class folder": (lambda r: [f.unlink() for f in (r / "train" / "cat").iterdir()],
                           "the class folder train/cat is empty"),
    "corrupt image": (lambda r: (r / "train" / "dog" / "0003.jpg").write_bytes(b"not a JPEG at all"),
                      "train/dog/0003.jpg cannot be read as an image (not in an image format Pillow reads)"),
    "truncated image": (lambda r: (r / "test" / "ship" / "0002.jpg").write_bytes(
        (r / "test" / "ship" / "0002.jpg").read_bytes()[:300]), "test/ship/0002.jpg cannot be read as an image"),
    "mixed sizes": (lambda r: _resized(r / "train" / "horse" / "0004.jpg", (16, 24)),
                    "images of different sizes, train/airplane/0000.jpg is 32x32 and train/horse/0004.jpg is 16x24 "
                    "(width x height); images are not resized"),
    "test class missing from train": (lambda r: shutil.copytree(r / "test" / "cat", r / "test" / "unicorn"),
                                      "test/unicorn is a class that train/ does not have"),
    "neither test nor val": (lambda r: shutil.rmtree(r / "test"), "neither test/ nor val/ beside train/"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_folder_exits_2_with_one_line_and_writes_nothing(case, cifar_slice, cache, tmp_path, capsys):
    spoil, expected = REFUSALS[case]
    root = copy_of(cifar_slice, tmp_path)
    spoil(root)
    before = read_only_tree(root)
    out, target = tmp_path / "runs", tmp_path / "table"
    code = main(["run", "--dataset", f"folder:{root}", "--model", "linear", "--prune-ratio", "0.4", "--out", str(out),
                 "--target", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dataset-prune: error: --dataset folder:{root}: ") and expected in err, err
    assert not out.exists() and not target.exists() and not cache.exists()  # no run, no version, no cache entry
    assert read_only_tree(root) == before


def test_a_version_exports_as_a_folder_of_hard_links(cifar_slice, cache, tmp_path, capsys):
    ds = load_dataset(f"folder:{cifar_slice}")
    keep = np.arange(ds.n) % 3 != 0
    uri = tmp_path / "table"
    commit_version(str(uri), ds, keep, {"run_id": "export"})
    back = read_version(str(uri), 0)  # its paths and its origin (the source folder) come back
    assert back.paths.tolist() == ds.paths[keep].tolist() and back.origin == ds.origin
    assert np.array_equal(back.x, ds.x[keep])
    dvc_rows = pq.read_table(io.BytesIO(samples_parquet(ds, keep)))  # the DVC and lakeFS targets' file
    assert dvc_rows.column("path").to_pylist() == ds.paths[keep].tolist()

    to = tmp_path / "pruned"
    assert main(["export", f"{uri}@0", "--to", str(to)]) == 0
    out = capsys.readouterr().out
    assert f"{to}: 66 kept training files in 10 class folders and 100 test files" in out and "(hard links)" in out
    assert files_of(to, "train") == ds.paths[keep].tolist() and files_of(to, "test") == files_of(cifar_slice, "test")
    for split, path in [("train", p) for p in ds.paths[keep]] + [("test", p) for p in files_of(cifar_slice, "test")]:
        assert os.stat(to / split / path).st_ino == os.stat(cifar_slice / split / path).st_ino
    exported = load_dataset(f"folder:{to}")  # what a training script reading folders sees
    assert np.array_equal(exported.x, ds.x[keep]) and np.array_equal(exported.y, ds.y[keep])
    assert np.array_equal(exported.x_test, ds.x_test)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pruned", "table"]  # no staging left


def test_export_copies_where_the_file_system_refuses_links(cifar_slice, cache, tmp_path, capsys, monkeypatch):
    ds = load_dataset(f"folder:{cifar_slice}")
    commit_version(str(tmp_path / "table"), ds, ds.y < 2, {"run_id": "copies"})

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    to = tmp_path / "copied"
    to.mkdir()  # an empty folder is fine
    assert main(["export", f"delta:{tmp_path / 'table'}", "--to", str(to)]) == 0
    assert "20 kept training files" in capsys.readouterr().out
    path = to / "train" / "airplane" / "0000.jpg"
    assert path.read_bytes() == (cifar_slice / "train" / "airplane" / "0000.jpg").read_bytes()
    assert os.stat(path).st_ino != os.stat(cifar_slice / "train" / "airplane" / "0000.jpg").st_ino
    assert sorted(os.listdir(to / "train")) == CLASSES  # every class folder, pruned away or not: labels keep


def test_export_refusals_exit_2_and_write_nothing(cifar_slice, cache, tmp_path, capsys):
    root = copy_of(cifar_slice, tmp_path, "source")
    ds = load_dataset(f"folder:{root}")
    commit_version(str(tmp_path / "table"), ds, np.ones(ds.n, bool), {"run_id": "folder"})
    np.savez(tmp_path / "arrays.npz", x=ds.x, y=ds.y, x_test=ds.x_test, y_test=ds.y_test)
    arrays = load_dataset(f"npz:{tmp_path / 'arrays.npz'}")
    commit_version(str(tmp_path / "npz-table"), arrays, np.ones(arrays.n, bool), {"run_id": "npz"})
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    cases = [
        ([f"{tmp_path / 'table'}@0", "--to", str(full)], f"--to {full}: exists and is not empty"),
        ([f"{tmp_path / 'npz-table'}", "--to", str(tmp_path / "new")],
         f"its source is npz:{tmp_path / 'arrays.npz'}, not an image folder (folder:PATH)"),
        ([f"{tmp_path / 'table'}@4", "--to", str(tmp_path / "new")], "@4: no such version (the newest is 0)"),
        ([f"dvc:{tmp_path}#x", "--to", str(tmp_path / "new")], "give a Delta version, URI[@VERSION]"),
    ]
    for argv, expected in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    (root / "train" / "frog" / "0007.jpg").unlink()  # gone from the source since the version was made
    assert main(["export", f"{tmp_path / 'table'}", "--to", str(tmp_path / "new")]) == 2
    assert "train/frog/0007.jpg is no longer in its source folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and os.listdir(full) == ["x"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging folder left


def test_a_run_on_a_folder_carries_the_paths_and_its_version_exports(cifar_slice, prefect_api, dask_cluster, tmp_path,
                                                                     capsys):
    from flows.prune import prune_dataset

    manifest = prune_dataset(RunParameters(
        dataset=f"folder:{cifar_slice}", model="linear", prune_ratio=0.4, hessian="kfac", projection_dim=64, shards=2,
        dask_address=dask_cluster, out=str(tmp_path / "runs"), target=str(tmp_path / "table")))
    ds = load_dataset(f"folder:{cifar_slice}")
    run_dir = Path(manifest["run_dir"])
    scores, selection = pq.read_table(run_dir / "scores.parquet"), pq.read_table(run_dir / "selection.parquet")
    assert scores.column("path").to_pylist() == selection.column("path").to_pylist() == ds.paths.tolist()
    pruned = selection.column("pruned").to_numpy(zero_copy_only=False)
    assert pruned.sum() == 40 and manifest["dataset"]["origin"]["classes"] == CLASSES
    version = read_version(str(tmp_path / "table"), manifest["version"]["version"])
    assert version.paths.tolist() == ds.paths[~pruned].tolist()
    assert main(["export", f"{tmp_path / 'table'}", "--to", str(tmp_path / "pruned")]) == 0
    assert files_of(tmp_path / "pruned", "train") == ds.paths[~pruned].tolist()
