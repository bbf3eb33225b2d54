"""A run's pictures: what was pruned per class, by difficulty and by influence, and examples."""

import base64

import matplotlib.image as mpimg
import numpy as np
import pytest

from pruning_core import figures


def selection_data(n=600, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    el2n = rng.uniform(0, 1.4, n)
    pruned = el2n < np.quantile(el2n, 0.4)  # the easiest 40 %
    norms = np.where(pruned, 1e-6, 1e-3) * rng.uniform(0.5, 2, n)
    return labels, pruned, el2n, norms


def test_selection_picture_shows_counts_difficulty_and_influence(tmp_path, monkeypatch):
    labels, pruned, el2n, norms = selection_data()
    drawn = {}
    save = figures.save_figure

    def keep(fig, axes, path):
        drawn["axes"] = axes
        return save(fig, axes, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    names = figures.class_names("fashion-mnist", 10)
    path = figures.draw_selection(tmp_path / "selection.png", labels, pruned, el2n, norms, names, objective=0.0123)
    per_class, difficulty, influence = drawn["axes"]
    kept_bars, pruned_bars = per_class.containers
    assert [b.get_width() for b in kept_bars] == np.bincount(labels[~pruned], minlength=10).tolist()
    assert [b.get_width() for b in pruned_bars] == np.bincount(labels[pruned], minlength=10).tolist()
    assert [t.get_text() for t in per_class.get_yticklabels()][:2] == ["T-shirt/top", "Trouser"]
    assert {t.get_text() for t in per_class.get_legend().get_texts()} == {f"kept ({(~pruned).sum()})",
                                                                          f"pruned ({pruned.sum()})"}
    assert "EL2N" in difficulty.get_xlabel() and "samples" in difficulty.get_ylabel()
    assert "‖s_i‖₂" in influence.get_xlabel() and influence.get_xscale() == "log"
    assert f"Σ_pruned ‖s_i‖₂ = {norms[pruned].sum():.3g}" in influence.get_title() and "0.0123" in influence.get_title()
    assert ({p.get_label() for p in difficulty.patches} == {p.get_label() for p in influence.patches}
            == {"kept", "pruned"})
    image = mpimg.imread(path)
    assert image.shape[1] > 1500 and image.std() > 0.05


def test_many_classes_are_drawn_as_a_sorted_share(tmp_path):
    labels, pruned, el2n, norms = selection_data(n=3000, classes=100)
    names = figures.class_names("cifar100", 100)
    assert names[:3] == ["0", "1", "2"]
    path = figures.draw_selection(tmp_path / "s.png", labels, pruned, el2n, norms, names)
    assert mpimg.imread(path).std() > 0.05


def test_examples_grid_for_images_and_none_for_vectors(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    pruned = np.zeros(60, dtype=bool)
    pruned[:30] = True  # class 2 has nothing pruned
    x = rng.integers(0, 256, (60, 1, 12, 12), dtype=np.uint8)
    path = figures.draw_examples(tmp_path / "examples.png", x, labels, pruned, ["a", "b", "c"], per_side=4)
    assert mpimg.imread(path).std() > 0.05
    assert figures.draw_examples(tmp_path / "none.png", rng.normal(size=(60, 20)), labels, pruned,
                                 ["a", "b", "c"]) is None
    assert not (tmp_path / "none.png").exists()


def test_examples_of_many_classes_are_the_most_and_the_least_pruned(tmp_path):
    labels = np.repeat(np.arange(30), 10)
    pruned = np.zeros(300, dtype=bool)
    for c, k in enumerate((np.arange(30) * 7) % 11):  # class c loses k of its 10 samples
        pruned[10 * c:10 * c + k] = True
    share = [np.mean(~pruned[labels == c]) for c in range(30)]
    chosen = figures.example_classes(labels, pruned, 30)
    assert len(chosen) == 10 and [share[c] for c in chosen] == sorted(share[c] for c in chosen)
    assert (max(share[c] for c in chosen[:5]) <= sorted(share)[4]
            and min(share[c] for c in chosen[5:]) >= sorted(share)[-5])
    assert figures.example_classes(labels[:40], pruned[:40], 4) == [0, 1, 2, 3]
    x = np.random.default_rng(2).integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)
    path = figures.draw_examples(tmp_path / "examples.png", x, labels, pruned, [str(c) for c in range(30)])
    assert mpimg.imread(path).shape[0] > 10 * 8  # ten rows of images


def test_displayable_images():
    gray = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8).repeat(2, axis=2).repeat(2, axis=3)
    assert figures.displayable(gray).shape == (1, 4, 4) and figures.displayable(gray).max() == 1.0
    rgb = np.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    shown = figures.displayable(rgb)
    assert shown.shape == (2, 4, 4, 3) and shown.min() == 0.0 and shown.max() == 1.0
    assert figures.displayable(np.zeros((2, 5, 4, 4))) is None and figures.displayable(np.zeros((2, 16))) is None


def test_inline_images_carry_the_picture_or_name_its_path(tmp_path):
    (tmp_path / "plots").mkdir()
    png = tmp_path / "plots" / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2000))
    text = "# r\n\n![a plot](plots/a.png)\n![big](big.png)\n![gone](missing.png)\n[a link](plots/a.png)\n"
    out = figures.inline_images(text, tmp_path, limit=1000)
    (data,) = [line for line in out.splitlines() if line.startswith("![a plot](data:image/png;base64,")]
    assert base64.b64decode(data.split(",", 1)[1].rstrip(")")) == png.read_bytes()
    assert f"![big]({big})" in out and f"![gone]({tmp_path / 'missing.png'})" in out
    assert "[a link](plots/a.png)" in out  # links that are not images stay as they are


@pytest.mark.parametrize("source,n,expected", [("fashion-mnist", 10, "Ankle boot"), ("cifar10", 10, "truck"),
                                               ("npz:/x.npz", 4, "3"), ("fashion-mnist", 7, "6")])
def test_class_names(source, n, expected):
    assert figures.class_names(source, n)[-1] == expected
