"""The training recipe: CIFAR's augmentation and what it leaves unchanged; the loop's reading back."""

import numpy as np
import pytest
import torch

from pruning_core.data import Dataset, load_dataset
from pruning_core.errors import BadInputError
from pruning_core.evaluation import retrain_key
from pruning_core.models import build_model
from pruning_core.recipe import TrainArgs
from pruning_core.training import accuracy, augment_batch, train, train_network


def test_augmented_images_are_padded_crops_flipped_half_the_time():
    """Every augmented image is its image padded by 4 zeros, cropped at an offset of 0–8 pixels
    each way, and mirrored or not; over 400 images every offset and both orientations occur;
    the same seed gives the same batch."""
    x = torch.randint(1, 256, (400, 3, 8, 6), dtype=torch.uint8).float()  # no zero pixel: the padding shows
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        found = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(padded[i, :, dy:dy + 8, dx:dx + 6]))]
        assert found, f"image {i} is no crop of its padded copy"
        seen.update(found)
    assert {dy for dy, _, _ in seen} == {dx for _, dx, _ in seen} == set(range(9))
    assert {flip for _, _, flip in seen} == {False, True}


def test_augmentation_trains_the_networks_and_is_refused_for_linear(fmnist):
    ds = Dataset("small", fmnist.x[:512], fmnist.y[:512], np.arange(512), fmnist.x_test[:256], fmnist.y_test[:256], 10,
                 {"source": "npz:small"})
    plain, augmented = (train(ds, TrainArgs(model="cnn", epochs=1, augment=a), device="cpu") for a in (False, True))
    # 4 steps learn next to nothing: what is checked is that the figure is the model's
    for result in (plain, augmented):
        assert result.test_accuracy == accuracy(result.model, ds.x_test, ds.y_test, "cpu") == result.test_correct.mean()
        assert result.test_correct.shape == (256,)
    assert augmented.info["args"]["augment"] is True and plain.info["args"]["augment"] is False
    weights = lambda r: torch.cat([p.flatten() for p in r.model.state_dict().values()])  # noqa: E731
    assert not torch.equal(weights(plain), weights(augmented))
    with pytest.raises(BadInputError, match="^augment applies to the networks"):
        TrainArgs(model="linear", augment=True)


def test_a_recipe_without_augmentation_keeps_the_retrain_records_made_before_it():
    """The retraining cache's key of a recipe without augmentation is the one computed before the
    option existed (the digest below, from 1ef0ae7's code), so that an interrupted evaluation
    resumes with its records; with augmentation the key differs."""
    x = np.arange(6 * 4, dtype=np.uint8).reshape(6, 1, 2, 2)
    ds = Dataset("d", x, np.arange(6) % 2, np.arange(6), x[:2], np.arange(2) % 2, 2, {"source": "npz:d"})
    assert retrain_key(ds, np.array([0, 2, 3]), TrainArgs(model="cnn", seed=1), 4) == "ab699a8d547f48fa"
    assert retrain_key(ds, np.array([0, 2, 3]), TrainArgs(model="cnn", seed=1, augment=True), 4) != "ab699a8d547f48fa"


def test_run_refuses_augment_for_linear_in_one_line(small_npz, tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--dataset", f"npz:{small_npz}", "--model", "linear", "--augment", "--prune-ratio", "0.4",
                 "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dataset-prune: error: --augment applies to the networks; linear trains to its optimum on the samples as "
        "they are"]
    assert not (tmp_path / "runs").exists()
    assert load_dataset(f"npz:{small_npz}").n == 2000


@pytest.mark.parametrize("model", ["cnn", "resnet8"])
def test_the_accuracy_curve_has_its_points_whatever_the_model(fmnist, model):
    """`evaluations_per_epoch` = k gives k points per epoch, each after more samples than the last,
    for the float32 cnn and for a CIFAR ResNet (bfloat16 where the CPU has it, channels_last)."""
    ds = Dataset("small", fmnist.x[:300], fmnist.y[:300], np.arange(300), fmnist.x_test[:100], fmnist.y_test[:100], 10,
                 {})
    result = train(ds, TrainArgs(model=model, epochs=2, batch_size=64), device="cpu", evaluations_per_epoch=2)
    assert [point["epoch"] for point in result.curve] == pytest.approx([0.4, 1.0, 1.4, 2.0])
    assert [point["samples_seen"] for point in result.curve] == [128, 300, 428, 600]
    assert result.seconds == result.curve[-1]["train_seconds"]


def test_a_network_records_its_test_accuracy_curve(fmnist):
    """With `evaluations_per_epoch` = k, k points per epoch at evenly spaced batches, the last
    one the final test accuracy; the run's seconds are its training time to that point."""
    ds = Dataset("small", fmnist.x[:512], fmnist.y[:512], np.arange(512), fmnist.x_test[:200], fmnist.y_test[:200], 10,
                 {"source": "npz:small"})
    result = train(ds, TrainArgs(model="cnn", epochs=2), device="cpu", evaluations_per_epoch=2)
    assert [(c["epoch"], c["samples_seen"]) for c in result.curve] == [(0.5, 256), (1.0, 512), (1.5, 768), (2.0, 1024)]
    assert result.curve[-1]["test_accuracy"] == result.test_accuracy
    assert result.seconds == result.curve[-1]["train_seconds"] > result.curve[0]["train_seconds"] > 0


@pytest.mark.parametrize("augment", [False, True])
def test_reading_back_once_per_epoch_trains_as_reading_back_every_step(fmnist, augment):
    """The default loop keeps the loss and each batch's correctness on the device and reads them
    back once per epoch; `host_sync` reads them after every step. Both give the same weights,
    correctness, epoch losses and test-accuracy curve, bit for bit."""
    ds = Dataset("small", fmnist.x[:640], fmnist.y[:640], np.arange(640), fmnist.x_test[:200], fmnist.y_test[:200], 10,
                 {"source": "npz:small"})
    runs = []
    for host_sync in (True, False):
        torch.manual_seed(0)
        model = build_model("cnn", ds.sample_shape, 10)
        losses, curve = [], []
        correctness = train_network(model, ds, TrainArgs(model="cnn", epochs=2, augment=augment), "cpu",
                                    progress=lambda epoch, epochs, loss: losses.append(loss),
                                    evaluations_per_epoch=2, curve=curve, host_sync=host_sync)
        runs.append((model.state_dict(), correctness, losses, [c["test_accuracy"] for c in curve]))
    (weights, correctness, losses, accuracies), (weights_, correctness_, losses_, accuracies_) = runs
    assert all(torch.equal(weights[k], weights_[k]) for k in weights)
    assert correctness.shape == (640, 2) and np.array_equal(correctness, correctness_)
    assert 0 < correctness.mean() < 1  # some right and some wrong: the bits compared say something
    assert len(losses) == 2 and losses == losses_ and len(accuracies) == 4 and accuracies == accuracies_
